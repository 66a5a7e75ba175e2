"""Avro binary encoding in plain Python, for the codecs ``codegen`` generates into ``events.py``.

fastavro is generic: it walks the schema for every record and reads through a file object one call
per byte. The generated codecs know their schema at generation time, so they write and read a typed
event field by field with these helpers (no intermediate dict, no ``to_record``/``from_record``).
They produce exactly the bytes fastavro writes for the same event; ``serde`` uses them only for a
schema whose :func:`fingerprint` matches the one the codec was generated from, and falls back to
fastavro for anything they do not take (``tests/unit/test_codecs.py`` holds them to fastavro).

Readers take ``(buffer, position)`` and return ``(value, next position)``; they raise on a truncated
or malformed body (the caller turns that into a poison record).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

T = TypeVar("T")
Writer = Callable[[bytearray, Any], None]
Reader = Callable[[bytes, int], tuple[Any, int]]


@dataclass(frozen=True)
class Codec:
    """A generated codec of one top-level record: the schema's fingerprint, writer and reader."""

    fingerprint: str
    write: Callable[[bytearray, Any], None]
    read: Callable[[bytes, int], tuple[Any, int]]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_FLOAT = struct.Struct("<f")
_DOUBLE = struct.Struct("<d")
_UUID = uuid.UUID
_SAFE_UNKNOWN = uuid.SafeUUID.unknown
_new_uuid = object.__new__
_set = object.__setattr__
_V4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64)) & ((1 << 128) - 1)
_V4_SET = (0x8000 << 48) | (0x4000 << 64)  # RFC 4122 variant, version 4

# What decides the binary layout of a schema; docs, defaults, aliases and order do not.
_WIRE_KEYS = frozenset({"type", "name", "namespace", "fields", "items", "values", "symbols", "size"})
_WIRE_KEYS |= {"logicalType", "precision", "scale"}


def _wire(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_wire(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key in sorted(schema):
        if key not in _WIRE_KEYS:
            continue
        value = schema[key]
        if key == "fields":
            value = [{"name": f.get("name"), "type": _wire(f.get("type"))} for f in value]
        elif key in ("type", "items", "values"):
            value = _wire(value)
        out[key] = value
    return out


def fingerprint(schema: Any) -> str:
    """A digest of what makes the schema's binary encoding (and its logical types): two schemas with
    the same fingerprint read and write the same bytes the same way."""
    text = json.dumps(_wire(schema), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def uuid4() -> uuid.UUID:
    """``uuid.uuid4()`` (16 bytes of ``os.urandom``, version 4) without the UUID constructor's checks:
    the events' ``event_id`` default."""
    made = _new_uuid(_UUID)
    _set(made, "int", (int.from_bytes(os.urandom(16), "big") & _V4_CLEAR) | _V4_SET)
    _set(made, "is_safe", _SAFE_UNKNOWN)
    return made


# -- writing --------------------------------------------------------------------------------------


def w_long(out: bytearray, n: int) -> None:
    """int and long: zig-zag, then base-128 groups, low first (fastavro refuses what overflows 64 bits)."""
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    n = (n << 1) ^ (n >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def w_str(out: bytearray, value: str) -> None:
    data = value.encode()
    w_long(out, len(data))
    out += data


def w_uuid(out: bytearray, value: Any) -> None:
    """logicalType uuid: the canonical string of a ``uuid.UUID`` (a str goes as it is, as in fastavro)."""
    if isinstance(value, _UUID):
        out.append(72)  # the length, 36, as an Avro long
        out += str(value).encode()
    else:
        w_str(out, value)


def w_timestamp_millis(out: bytearray, value: Any) -> None:
    """An aware datetime as epoch milliseconds; an int as it is. A naive datetime (fastavro reads it as
    local time) is refused here, so the caller falls back to fastavro."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise TypeError("naive datetime: left to fastavro")
        delta = value - _EPOCH
        value = (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000
    w_long(out, value)


def w_float(out: bytearray, value: float) -> None:
    out += _FLOAT.pack(value)


def w_double(out: bytearray, value: float) -> None:
    out += _DOUBLE.pack(value)


def w_bool(out: bytearray, value: bool) -> None:
    out.append(1 if value else 0)


def w_bytes(out: bytearray, value: bytes) -> None:
    w_long(out, len(value))
    out += value


def w_null(out: bytearray, value: None) -> None:
    return None


def w_fixed(size: int) -> Writer:
    def write(out: bytearray, value: bytes) -> None:
        if len(value) != size:
            raise ValueError(f"data of length {len(value)} does not match fixed size {size}")
        out += value

    return write


def w_enum(members: Iterable[Any]) -> Writer:
    """An enum class's members, in symbol order: the member's position (``to_record`` writes ``.value``)."""
    index = {member.value: i for i, member in enumerate(members)}

    def write(out: bytearray, value: Any) -> None:
        w_long(out, index[value.value])

    return write


def w_array(write_item: Writer) -> Writer:
    def write(out: bytearray, value: list[Any]) -> None:
        if not isinstance(value, list):  # fastavro writes lists only
            raise TypeError(f"an Avro array needs a list, not {type(value).__name__}")
        if value:
            w_long(out, len(value))
            for item in value:
                write_item(out, item)
        out.append(0)

    return write


def w_map(write_value: Writer) -> Writer:
    def write(out: bytearray, value: Mapping[str, Any]) -> None:
        if value:
            w_long(out, len(value))
            for key, item in value.items():
                w_str(out, key)
                write_value(out, item)
        out.append(0)

    return write


def w_optional(null_index: int, write_value: Writer) -> Writer:
    """``["null", T]`` (``null_index`` 0) or ``[T, "null"]`` (1): the branch index, then the value."""
    null_byte, value_byte = (0, 2) if null_index == 0 else (2, 0)  # zig-zag of 0 and 1

    def write(out: bytearray, value: Any) -> None:
        if value is None:
            out.append(null_byte)
        else:
            out.append(value_byte)
            write_value(out, value)

    return write


# -- reading --------------------------------------------------------------------------------------


def r_long(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    n = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("an Avro long of more than 10 bytes")


def r_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = r_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise EOFError(f"expected {size} bytes, {len(data) - pos} left")
    return data[pos:end], end


def r_str(data: bytes, pos: int) -> tuple[str, int]:
    size, pos = r_long(data, pos)
    end = pos + size
    if size < 0 or end > len(data):
        raise EOFError(f"expected {size} bytes, {len(data) - pos} left")
    return data[pos:end].decode(), end


def uuid_of(text: str) -> uuid.UUID:
    """``uuid.UUID(text)``, without its slow constructor for the canonical 36-character form."""
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
        digits = text.replace("-", "")
        if len(digits) == 32:
            made = _new_uuid(_UUID)
            _set(made, "int", int(digits, 16))
            _set(made, "is_safe", _SAFE_UNKNOWN)
            return made
    return _UUID(text)


def r_uuid(data: bytes, pos: int) -> tuple[uuid.UUID, int]:
    text, pos = r_str(data, pos)
    return uuid_of(text), pos


def r_timestamp_millis(data: bytes, pos: int) -> tuple[datetime, int]:
    millis, pos = r_long(data, pos)
    return _EPOCH + timedelta(milliseconds=millis), pos


def r_float(data: bytes, pos: int) -> tuple[float, int]:
    return _FLOAT.unpack_from(data, pos)[0], pos + 4


def r_double(data: bytes, pos: int) -> tuple[float, int]:
    return _DOUBLE.unpack_from(data, pos)[0], pos + 8


def r_bool(data: bytes, pos: int) -> tuple[bool, int]:
    return data[pos] != 0, pos + 1  # as fastavro: anything but 0 is true


def r_null(data: bytes, pos: int) -> tuple[None, int]:
    return None, pos


def r_fixed(size: int) -> Reader:
    def read(data: bytes, pos: int) -> tuple[bytes, int]:
        end = pos + size
        if end > len(data):
            raise EOFError(f"expected {size} bytes, {len(data) - pos} left")
        return data[pos:end], end

    return read


def r_enum(members: tuple[T, ...]) -> Callable[[bytes, int], tuple[T, int]]:
    def read(data: bytes, pos: int) -> tuple[T, int]:
        index, pos = r_long(data, pos)
        if index < 0:
            raise ValueError(f"enum index {index}")
        return members[index], pos

    return read


def r_array(read_item: Reader) -> Reader:
    def read(data: bytes, pos: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        while True:
            count, pos = r_long(data, pos)
            if count == 0:
                return items, pos
            if count < 0:
                count = -count
                _, pos = r_long(data, pos)  # the block's size in bytes
            for _ in range(count):
                item, pos = read_item(data, pos)
                items.append(item)

    return read


def r_map(read_value: Reader) -> Reader:
    def read(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
        found: dict[str, Any] = {}
        while True:
            count, pos = r_long(data, pos)
            if count == 0:
                return found, pos
            if count < 0:
                count = -count
                _, pos = r_long(data, pos)
            for _ in range(count):
                key, pos = r_str(data, pos)
                found[key], pos = read_value(data, pos)

    return read


def r_optional(null_index: int, read_value: Reader) -> Reader:
    def read(data: bytes, pos: int) -> tuple[Any, int]:
        branch, pos = r_long(data, pos)
        if branch == null_index:
            return None, pos
        if branch != 1 - null_index:
            raise ValueError(f"union branch {branch} of a two-branch union")
        return read_value(data, pos)

    return read
