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

import dataclasses
import enum
import hashlib
import importlib
import json
import os
import struct
import typing
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
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


# uuid4's randomness: os.urandom read 4 KiB at a time (one syscall per 256 ids, not one per id), made
# into version-4 ids at once and handed out by a C iterator, whose next() is atomic under the GIL, so
# two threads never get the same id. A forked child drops what its parent had read: it never repeats it.
_RANDOM_READ = 4096
_random: list[Iterator[int]] = [iter(())]  # the current iterator, replaced when spent


def _forget_random() -> None:
    _random[0] = iter(())


os.register_at_fork(after_in_child=_forget_random)


def _fresh_ids() -> Iterator[int]:
    data = os.urandom(_RANDOM_READ)
    from_bytes = int.from_bytes
    return iter([(from_bytes(data[i : i + 16]) & _V4_CLEAR) | _V4_SET for i in range(0, _RANDOM_READ, 16)])


def uuid4() -> uuid.UUID:
    """``uuid.uuid4()`` (16 bytes of ``os.urandom``, version 4) without the UUID constructor's checks:
    the events' ``event_id`` default."""
    try:
        value = next(_random[0])
    except StopIteration:
        fresh = _random[0] = _fresh_ids()
        value = next(fresh)
    made = _new_uuid(_UUID)
    _set(made, "int", value)
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


# -- the native codec (optional) ------------------------------------------------------------------
#
# ``services/bus/native`` (Rust, pyo3; ``make install`` builds it) writes and reads the same bytes and
# objects as the generated codecs above, several times faster. It takes only the exact types the
# generated classes hold and raises on anything else, so ``serde`` tries it first and falls back to the
# generated codec (then fastavro) on any exception: it decides nothing the Python codec would decide
# differently (``tests/unit/test_native_codec.py`` holds the two to each other on every schema).
# ``REELBUS_NATIVE_CODEC=0`` turns it off; without the extension the Python codecs are used as before.

NATIVE_PLAN_VERSION = 2


def _load_native() -> Any:
    if os.environ.get("REELBUS_NATIVE_CODEC", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        reelbus_native = importlib.import_module("reelbus_native")
    except ImportError:
        return None
    if getattr(reelbus_native, "PLAN_VERSION", None) != NATIVE_PLAN_VERSION:  # a stale build
        return None
    return reelbus_native


NATIVE: Any = _load_native()


class _NoPlan(Exception):
    """The schema (or its class) has something the native codec does not take: no native codec."""


_PLAN_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


def _without_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) != 1:
        raise _NoPlan(f"{hint!r} is not an optional type")
    return args[0]


def _type_arg(hint: Any, origin: type, index: int) -> Any:
    if typing.get_origin(hint) is not origin:
        raise _NoPlan(f"{hint!r} is not a {origin.__name__}")
    return typing.get_args(hint)[index]


def _plan(schema: Any, hint: Any, namespace: str, named: dict[str, tuple[Any, ...]]) -> tuple[Any, ...]:
    """The plan ``reelbus_native.Codec`` compiles (see its ``Node::compile``), from the schema and the
    Python type the generated class declares for it (records and enums name their classes)."""
    if isinstance(schema, list):
        if len(schema) != 2 or schema.count("null") != 1:
            raise _NoPlan("only [null, T] unions")
        null_index = schema.index("null")
        return ("optional", null_index, _plan(schema[1 - null_index], _without_none(hint), namespace, named))
    if isinstance(schema, str):
        if schema in _PLAN_PRIMITIVES:
            return (schema,)
        for candidate in (schema if "." in schema or not namespace else f"{namespace}.{schema}", schema):
            if candidate in named:
                return named[candidate]
        raise _NoPlan(f"unknown type {schema!r}")
    if not isinstance(schema, dict):
        raise _NoPlan(f"not a schema: {schema!r}")
    kind = schema.get("type")
    if isinstance(kind, dict | list):
        return _plan(kind, hint, namespace, named)
    logical = schema.get("logicalType")
    if logical is not None:
        if (kind, logical) == ("string", "uuid"):
            return ("uuid",)
        if (kind, logical) == ("long", "timestamp-millis"):
            return ("timestamp-millis",)
        raise _NoPlan(f"logicalType {logical!r} on {kind!r}")
    if kind == "array":
        return ("array", _plan(schema.get("items"), _type_arg(hint, list, 0), namespace, named))
    if kind == "map":
        return ("map", _plan(schema.get("values"), _type_arg(hint, dict, 1), namespace, named))
    if kind not in ("record", "error", "enum", "fixed"):
        if isinstance(kind, str) and kind in _PLAN_PRIMITIVES:
            return (kind,)
        return _plan(kind, hint, namespace, named)
    explicit = schema.get("namespace")
    name = str(schema.get("name"))
    space = explicit if isinstance(explicit, str) else namespace
    fullname = name if "." in name or not space else f"{space}.{name}"
    plan: tuple[Any, ...]
    if kind == "fixed":
        plan = ("fixed", int(schema["size"]))
    elif kind == "enum":
        if not (isinstance(hint, type) and issubclass(hint, enum.Enum)):
            raise _NoPlan(f"enum {fullname} has no enum class")
        members = tuple(hint)
        if [m.value for m in members] != list(schema.get("symbols", [])):
            raise _NoPlan(f"enum {fullname}: the class's members are not the symbols")
        plan = ("enum", members, {m.value: i for i, m in enumerate(members)})
    else:
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            raise _NoPlan(f"record {fullname} has no dataclass")
        raw_fields = schema.get("fields", [])
        fields = dataclasses.fields(hint)
        names = tuple(str(f.get("name")) for f in raw_fields)
        if tuple(f.name for f in fields) != names:
            raise _NoPlan(f"record {fullname}: the dataclass's fields are not the schema's")
        hints = typing.get_type_hints(hint)
        own = fullname.rpartition(".")[0]
        plans = tuple(_plan(f.get("type"), hints[f.get("name")], own, named) for f in raw_fields)
        # Built without calling __init__ (as the dataclass's own __init__ does: object.__setattr__
        # per field) only when __init__ does nothing else.
        direct = not hasattr(hint, "__post_init__") and all(f.init for f in fields)
        # Frozen and without __dict__: with only immutable fields (the extension checks them) its
        # instances can never be part of a reference cycle, so they need not be tracked by the GC.
        params = getattr(hint, "__dataclass_params__", None)
        sealed = bool(params is not None and params.frozen and hint.__dictoffset__ == 0)
        plan = ("record", hint, names, plans, direct, sealed)
    named[fullname] = plan
    return plan


def native_plan(schema: Any, cls: type) -> tuple[Any, ...] | None:
    """The native codec's plan for the top-level record ``schema`` and its generated class, or None
    when something in it is not for the native codec."""
    try:
        plan = _plan(schema, cls, "", {})
    except (_NoPlan, KeyError, TypeError, ValueError, NameError):
        return None
    return plan if plan[0] == "record" else None


def native_codec(schema: Any, cls: type) -> Any:
    """A ``reelbus_native.Codec`` for ``cls`` (with ``encode(prefix, event)``, ``encode_many``,
    ``read(data, pos)``, ``decode(data, pos)``), or None without the extension or a plan."""
    if NATIVE is None:
        return None
    plan = native_plan(schema, cls)
    if plan is None:
        return None
    try:
        return NATIVE.Codec(plan)
    except Exception:  # a plan this build does not take: the Python codec
        return None


def uuid_texts(uuids: list[uuid.UUID]) -> list[bytes]:
    """``[str(u).encode() for u in uuids]`` (the event-id headers of a batch), natively when it can."""
    if NATIVE is not None:
        try:
            texts: list[bytes] = NATIVE.uuid_texts(uuids)
            return texts
        except Exception:  # not all uuid.UUID: as Python does it
            pass
    return [str(u).encode() for u in uuids]


def encode_strings(prefix: bytes, values: list[Any]) -> list[bytes] | None:
    """``prefix`` + the Avro string of each value (keys), natively; None when the extension is absent
    or a value is not exactly a ``str`` (the caller encodes them itself)."""
    if NATIVE is None:
        return None
    try:
        encoded: list[bytes] = NATIVE.encode_strings(prefix, values)
    except Exception:
        return None
    return encoded


def builder(cls: type[T]) -> Callable[..., T]:
    """A constructor of the dataclass ``cls`` taking its field values positionally: the native one
    (which sets the fields as the dataclass's own ``__init__`` does, without the call) when ``cls``'s
    ``__init__`` does nothing else, else ``cls`` itself."""
    if NATIVE is None or not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
        return cls
    fields = dataclasses.fields(cls)
    if not all(f.init and not f.kw_only for f in fields):
        return cls
    try:
        made: Callable[..., T] = NATIVE.Builder(cls, tuple(f.name for f in fields))
    except Exception:
        return cls
    return made


def _now_ms_python() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


#: The current UTC time truncated to milliseconds, the precision of timestamp-millis (the events'
#: ``event_time`` default): natively when it can (one object instead of two).
now_ms: Callable[[], datetime] = NATIVE.now_ms if NATIVE is not None else _now_ms_python
