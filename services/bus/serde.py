"""Avro in the Confluent wire format: magic byte 0, a 4-byte big-endian schema id, the Avro body.

Writers use the ids that ``reelbus topics apply`` registered; they are looked up once, at start-up,
and cached. Readers resolve the writer's schema (fetched once per id) against the reader's own copy
of the same record from ``schemas/``, so a reader survives a writer with newer compatible fields.

The hot paths keep per-schema state: one writer per (subject, record) with its 5-byte prefix and a
schema fastavro does not parse again, one reader per schema id (no resolution at all when the writer's
schema is ours), and a shortcut for ``string`` keys. When a schema's binary layout is the one its event
class was generated from (``wire.fingerprint``), the generated codec (``events.AVRO_CODECS``) writes the
body straight from the dataclass and reads it straight into one, the same bytes fastavro would write;
anything the codec refuses (a naive datetime, a value of the wrong type) goes through fastavro, which
writes it or raises what it always raised. ``encode_values``/``encode_keys`` encode a whole
batch; ``decode_event_nowait``/``decode_key_nowait`` decode without a coroutine once the writer's
schema is cached (they raise ``SchemaNotCached`` when it is not: await ``reader_for`` and call again).

When the native codec (``services/bus/native``, see ``wire.NATIVE``) is installed, each generated codec
has a native twin that is tried first: the same bytes and the same objects, several times faster, and
for anything it does not take it raises and the generated codec decides as before. Without it (or
with ``REELBUS_NATIVE_CODEC=0``) everything above works as it did.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fastavro

from services.bus import wire
from services.bus.contracts import Contracts, Schema, Topic, make_schema
from services.bus.events import AVRO_CODECS, EVENT_TYPES, AvroEvent
from services.bus.registry import RegistryClient, RegistryError

if TYPE_CHECKING:
    from services.bus.fetch import Fetch

MAGIC = 0
HEADER = struct.Struct(">bI")
_HEADER_SIZE = HEADER.size
_WRITE_OPTIONS = {"strict": False, "strict_allow_default": False, "disable_tuple_notation": False}


class PoisonMessage(Exception):
    """A record that can never be handled as it is: it goes to the dead-letter topic."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class SchemaNotRegistered(RuntimeError):
    """A schema the producer needs is not in the registry: ``reelbus topics apply`` has not run."""


class SchemaNotCached(LookupError):
    """The writer's schema id is not cached yet: ``await serde.reader_for(schema_id)``, then retry."""

    def __init__(self, schema_id: int) -> None:
        super().__init__(f"schema id {schema_id} is not cached yet")
        self.schema_id = schema_id


def encode_body(parsed: Any, schema_id: int, record: Any) -> bytes:
    buf = io.BytesIO()
    buf.write(HEADER.pack(MAGIC, schema_id))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def split_header(data: bytes | None) -> tuple[int, memoryview]:
    if data is None:
        raise PoisonMessage("decode", "record has no value (a tombstone where an event was expected)")
    if len(data) < HEADER.size or data[0] != MAGIC:
        raise PoisonMessage("decode", "not Avro in the Confluent wire format (no magic byte 0 and schema id)")
    _, schema_id = HEADER.unpack_from(data)
    return schema_id, memoryview(data)[HEADER.size :]


def _schema_id(data: bytes | None) -> int:
    """``split_header`` without the memoryview: the schema id, or PoisonMessage."""
    if data is None:
        raise PoisonMessage("decode", "record has no value (a tombstone where an event was expected)")
    if len(data) < _HEADER_SIZE or data[0] != MAGIC:
        raise PoisonMessage("decode", "not Avro in the Confluent wire format (no magic byte 0 and schema id)")
    return int.from_bytes(data[1:_HEADER_SIZE], "big")


def _zigzag_varint(n: int) -> bytes:
    """An Avro ``long``: zig-zag, then base-128 little-endian groups."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _codec_for(schema: Schema, *others: Any) -> wire.Codec | None:
    """The generated codec of ``schema`` if it was generated from this very layout (and ``others``,
    the raw schemas it must also match, have it too)."""
    codec = AVRO_CODECS.get(schema.fullname)
    if codec is None:
        return None
    if any(wire.fingerprint(raw) != codec.fingerprint for raw in (schema.raw, *others)):
        return None
    return codec


_NATIVE_CODECS: dict[str, Any] = {}  # fullname -> the native codec of its event class (or None)


def _native_for(schema: Schema, codec: wire.Codec | None) -> Any:
    """The native codec (``wire.native_codec``) of ``schema``'s event class, when the generated codec
    is used for it (``codec``): the native one is tried first and falls back to it."""
    if codec is None or wire.NATIVE is None:
        return None
    fullname = schema.fullname
    if fullname not in _NATIVE_CODECS:
        cls = EVENT_TYPES.get(fullname)
        _NATIVE_CODECS[fullname] = None if cls is None else wire.native_codec(schema.raw, cls)
    return _NATIVE_CODECS[fullname]


# The native fast paths of decode_event_nowait/decode_key_nowait (header, cached reader, its native
# codec, the topic check, all in one call), or None without the extension.
_DECODE_FRAMED_EVENT: Any = getattr(wire.NATIVE, "decode_framed_event", None)
_DECODE_FRAMED_STRING: Any = getattr(wire.NATIVE, "decode_framed_string", None)


def _fast_writer() -> Any:
    """fastavro's compiled ``write_data`` (what its ``schemaless_writer`` calls into a bytearray), or
    None when this fastavro build does not have it or it writes something else than the public API."""
    try:
        compiled = importlib.import_module("fastavro._write")
    except ImportError:  # pragma: no cover - the pinned wheel is compiled
        return None
    write_data = getattr(compiled, "write_data", None)
    if not getattr(compiled, "CYTHON_MODULE", 0) or write_data is None:  # pragma: no cover
        return None
    probe = {"type": "record", "name": "Probe", "fields": [{"name": "a", "type": "long"}]}
    try:
        named: dict[str, Any] = {}
        parsed = fastavro.parse_schema(probe, named, _write_hint=False)
        buf = bytearray()
        write_data(buf, {"a": -3}, parsed, named, "", dict(_WRITE_OPTIONS))
        expected = io.BytesIO()
        fastavro.schemaless_writer(expected, parsed, {"a": -3})
    except Exception:  # pragma: no cover - an incompatible fastavro: use the public API
        return None
    return write_data if bytes(buf) == expected.getvalue() else None


_WRITE_DATA = _fast_writer()


@dataclass(frozen=True, eq=False)
class _Writer:
    """Everything needed to encode one schema under one id, computed once."""

    schema_id: int
    fullname: str
    prefix: bytes  # magic byte and schema id
    parsed: Any  # parsed once, with its named types in ``named``
    named: dict[str, Any]
    hinted: Any  # parsed with fastavro's "already parsed" hint, for the public API
    string: bool  # the schema is Avro "string" (keys): encoded without fastavro
    codec: wire.Codec | None = None  # the generated codec, when it was generated from this schema
    event_type: type | None = None
    native: Any = None  # the native codec of the same class, tried before ``codec``

    @classmethod
    def of(cls, schema: Schema, schema_id: int) -> _Writer:
        named: dict[str, Any] = {}
        parsed = fastavro.parse_schema(schema.raw, named, _write_hint=False)
        codec = _codec_for(schema)
        return cls(
            schema_id=schema_id,
            fullname=schema.fullname,
            prefix=HEADER.pack(MAGIC, schema_id),
            parsed=parsed,
            named=named,
            hinted=fastavro.parse_schema(schema.raw),
            string=schema.raw == "string",
            codec=codec,
            event_type=EVENT_TYPES.get(schema.fullname),
            native=_native_for(schema, codec),
        )

    def encode_event(self, event: AvroEvent) -> bytes:
        codec = self.codec
        if codec is not None and type(event) is self.event_type:
            native = self.native
            if native is not None:
                try:
                    encoded: bytes = native.encode(self.prefix, event)
                    return encoded
                except Exception:  # what it does not take, the generated codec decides
                    pass
            buf = bytearray(self.prefix)
            try:
                codec.write(buf, event)
                return bytes(buf)
            except Exception:  # what the codec does not take, fastavro writes or refuses as it always did
                pass
        return self.encode(event.to_record())

    def encode(self, datum: Any) -> bytes:
        if self.string and type(datum) is str:
            body = datum.encode()
            return self.prefix + _zigzag_varint(len(body)) + body
        if _WRITE_DATA is None:  # pragma: no cover
            return encode_body(self.hinted, self.schema_id, datum)
        buf = bytearray(self.prefix)
        _WRITE_DATA(buf, datum, self.parsed, self.named, "", _WRITE_OPTIONS)
        return bytes(buf)


@dataclass(frozen=True)
class _Reader:
    writer: Any
    reader: Any
    fullname: str
    # The fast path: schemas fastavro does not parse again; no reader schema when it is the writer's.
    hinted_writer: Any = field(default=None, compare=False)
    hinted_reader: Any = field(default=None, compare=False)
    string: bool = field(default=False, compare=False)  # writer and reader are both "string"
    # The generated codec, when the writer's layout is the one our event class was generated from.
    codec: wire.Codec | None = field(default=None, compare=False)
    native: Any = field(default=None, compare=False)  # the native codec, tried before ``codec``

    @classmethod
    def of(cls, writer: Schema, reader: Schema | None) -> _Reader:
        ours = reader if reader is not None else writer
        same = ours.raw == writer.raw
        codec = _codec_for(ours, writer.raw) if ours.fullname == writer.fullname else None
        return cls(
            writer=writer.parsed,
            reader=ours.parsed,
            fullname=writer.fullname,
            hinted_writer=fastavro.parse_schema(writer.raw),
            hinted_reader=None if same else fastavro.parse_schema(ours.raw),
            string=same and writer.raw == "string",
            codec=codec,
            native=_native_for(ours, codec),
        )

    def read(self, data: bytes) -> Any:
        """The body after the 5-byte header; fastavro's errors propagate."""
        if self.string:
            return _read_string(data)
        fo = io.BytesIO(data)
        fo.seek(_HEADER_SIZE)
        if self.hinted_writer is None:  # built by hand with only the parsed schemas
            return fastavro.schemaless_reader(fo, self.writer, self.reader)
        return fastavro.schemaless_reader(fo, self.hinted_writer, self.hinted_reader)


def _read_string(data: bytes) -> str:
    """An Avro ``string`` after the 5-byte header; ValueError when the body is not exactly one."""
    pos, shift, n = _HEADER_SIZE, 0, 0
    end = len(data)
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    length = (n >> 1) ^ -(n & 1)
    if length < 0 or pos + length > end:
        raise ValueError(f"string of {length} bytes in a body of {end - pos}")
    return data[pos : pos + length].decode()


class Serde:
    """Encodes typed events for declared topics; decodes records back into typed events."""

    def __init__(self, contracts: Contracts, registry: RegistryClient) -> None:
        self.contracts = contracts
        self.registry = registry
        self._ids: dict[tuple[str, str], int] = {}  # (subject, fullname) -> schema id
        self._readers: dict[int, _Reader] = {}
        self._writers: dict[tuple[str, str], _Writer] = {}  # (subject, fullname) -> writer

    # -- producer side --------------------------------------------------------------------

    def prepare(self, topic: Topic) -> None:
        """Look up (never register) the ids of the topic's key and value schemas. Blocking."""
        wanted = [(topic.key_subject, topic.key)] + [(topic.value_subject(v), v) for v in topic.values]
        for subject, fullname in wanted:
            if (subject, fullname) in self._ids:
                continue
            schema = self.contracts.schema(fullname)
            found = self.registry.lookup(subject, schema.raw)
            if found is None:
                raise SchemaNotRegistered(
                    f"{fullname} is not registered under subject {subject!r}: run `reelbus topics apply`"
                )
            self._ids[(subject, fullname)] = found.id
            self._readers.setdefault(found.id, _Reader.of(schema, None))

    def _writer(self, subject: str, fullname: str, topic: Topic) -> _Writer:
        found = self._writers.get((subject, fullname))
        if found is None:
            found = _Writer.of(self.contracts.schema(fullname), self._id(subject, fullname, topic))
            self._writers[(subject, fullname)] = found
        return found

    def encode_key(self, topic: Topic, key: Any) -> bytes:
        return self._writer(topic.key_subject, topic.key, topic).encode(key)

    def encode_value(self, topic: Topic, event: AvroEvent) -> bytes:
        name = event.SCHEMA_NAME
        if name not in topic.values:
            raise ValueError(f"{name} is not declared as a value of topic {topic.name}")
        return self._writer(topic.value_subject(name), name, topic).encode_event(event)

    def encode_keys(self, topic: Topic, keys: Iterable[Any]) -> list[bytes]:
        """``encode_key`` for many keys of one topic."""
        writer = self._writer(topic.key_subject, topic.key, topic)
        if writer.string:
            keys = keys if isinstance(keys, list) else list(keys)
            encoded = wire.encode_strings(writer.prefix, keys)  # natively, when all are str
            if encoded is not None:
                return encoded
        encode = writer.encode
        return [encode(key) for key in keys]

    def encode_values(self, topic: Topic, events: Iterable[AvroEvent]) -> list[bytes]:
        """``encode_value`` for many events of one topic, with the writers looked up once."""
        if not isinstance(events, list):
            events = list(events)
        if events:
            # All of one type (a service's batch usually is): the native codec encodes them in one call.
            name = events[0].SCHEMA_NAME
            if name not in topic.values:
                raise ValueError(f"{name} is not declared as a value of topic {topic.name}")
            writer = self._writer(topic.value_subject(name), name, topic)
            if writer.native is not None and writer.codec is not None:
                try:
                    encoded: list[bytes] = writer.native.encode_many(writer.prefix, events, writer.event_type)
                    return encoded
                except Exception:  # another type in the batch, or a value it does not take: one by one
                    pass
        out: list[bytes] = []
        encoders: dict[str, Any] = {}
        for event in events:
            name = event.SCHEMA_NAME
            encode = encoders.get(name)
            if encode is None:
                if name not in topic.values:
                    raise ValueError(f"{name} is not declared as a value of topic {topic.name}")
                encode = encoders[name] = self._writer(topic.value_subject(name), name, topic).encode_event
            out.append(encode(event))
        return out

    def _id(self, subject: str, fullname: str, topic: Topic) -> int:
        try:
            return self._ids[(subject, fullname)]
        except KeyError:
            raise SchemaNotRegistered(f"topic {topic.name} was not prepared for {fullname}") from None

    # -- consumer side --------------------------------------------------------------------

    def _reader_for(self, schema_id: int) -> _Reader:
        """Blocking: fetch the writer schema once and pair it with our reader schema."""
        try:
            writer_raw = self.registry.schema_by_id(schema_id)
        except RegistryError as exc:
            if exc.status == 404:
                raise PoisonMessage(
                    "decode", f"unknown schema id {schema_id}: the registry has no such schema"
                ) from None
            raise
        writer = make_schema(writer_raw)
        ours: Schema | None = self.contracts.schemas.get(writer.fullname)
        return _Reader.of(writer, ours)

    async def reader_for(self, schema_id: int) -> _Reader:
        found = self._readers.get(schema_id)
        if found is None:
            found = await asyncio.to_thread(self._reader_for, schema_id)
            self._readers[schema_id] = found
        return found

    def _cached_reader(self, data: bytes | None) -> _Reader:
        schema_id = _schema_id(data)
        found = self._readers.get(schema_id)
        if found is None:
            raise SchemaNotCached(schema_id)
        return found

    def _decode_record_with(self, reader: _Reader, data: bytes) -> dict[str, Any]:
        try:
            record = reader.read(data)
        except Exception as exc:  # fastavro raises assorted errors on a corrupt body
            schema_id = _schema_id(data)
            raise PoisonMessage("decode", f"body does not match schema id {schema_id}: {exc!r}") from exc
        if not isinstance(record, dict):
            raise PoisonMessage("decode", f"schema id {_schema_id(data)} is not a record schema")
        return record

    async def decode_record(self, data: bytes | None) -> tuple[str, dict[str, Any]]:
        schema_id = _schema_id(data)
        assert data is not None
        reader = await self.reader_for(schema_id)
        return reader.fullname, self._decode_record_with(reader, data)

    def decode_event_nowait(self, topic: Topic | None, data: bytes | None) -> AvroEvent:
        """``decode_event`` without awaiting: raises ``SchemaNotCached`` when the writer's schema id
        has not been fetched yet (``await reader_for(exc.schema_id)``, then call again)."""
        fast = _DECODE_FRAMED_EVENT
        if fast is not None:
            # What the path below does when the reader has a native codec; anything else (not
            # cached, no native codec, not declared, a body it refuses) raises, and the path below
            # decides as it always did.
            try:
                decoded: AvroEvent = fast(data, self._readers, None if topic is None else topic.values)
                return decoded
            except Exception:
                pass
        reader = self._cached_reader(data)
        assert data is not None
        fullname = reader.fullname
        codec = reader.codec
        if codec is not None:
            native = reader.native
            if native is not None:
                try:
                    event: AvroEvent = native.decode(data, _HEADER_SIZE)
                except Exception:  # what it does not take, the generated codec decides
                    pass
                else:
                    if topic is not None and fullname not in topic.values:
                        raise PoisonMessage(
                            "decode", f"{fullname} is not declared as a value of topic {topic.name}"
                        )
                    return event
            try:
                event = codec.read(data, _HEADER_SIZE)[0]
            except Exception as exc:
                schema_id = _schema_id(data)
                raise PoisonMessage("decode", f"body does not match schema id {schema_id}: {exc!r}") from exc
            if topic is not None and fullname not in topic.values:
                raise PoisonMessage("decode", f"{fullname} is not declared as a value of topic {topic.name}")
            return event
        record = self._decode_record_with(reader, data)
        if topic is not None and fullname not in topic.values:
            raise PoisonMessage("decode", f"{fullname} is not declared as a value of topic {topic.name}")
        cls = EVENT_TYPES.get(fullname)
        if cls is None:
            raise PoisonMessage("decode", f"no event type {fullname} in this build's schemas/")
        return cls.from_record(record)  # type: ignore[attr-defined, no-any-return]

    async def decode_event(self, topic: Topic | None, data: bytes | None) -> AvroEvent:
        try:
            return self.decode_event_nowait(topic, data)
        except SchemaNotCached as exc:
            await self.reader_for(exc.schema_id)
        return self.decode_event_nowait(topic, data)

    def decode_run(
        self, fetch: Fetch, start: int, end: int, topic: Topic | None, make_record: Any
    ) -> tuple[list[tuple[Any, Any]], int]:
        """The consumer's common case in one native call: from record ``start`` of ``fetch`` (before
        ``end``) on, the records whose value and key ``decode_event_nowait`` and ``decode_key_nowait``
        would decode through their native fast paths, all of one event type: ``(pairs, stop)`` with
        ``pairs`` the ``(event, make_record(topic, partition, offset, key, headers, timestamp))`` and
        ``stop`` the first record not taken (the caller's usual path takes it). ``([], start)`` when
        the fetch has no fast path or the first record is not for it."""
        try:
            return fetch.decode_run(
                start, end, self._readers, None if topic is None else topic.values, make_record
            )
        except Exception:  # the usual path decides, record by record
            return [], start

    def decode_key_nowait(self, data: bytes | None) -> Any:
        """``decode_key`` without awaiting; raises ``SchemaNotCached`` like ``decode_event_nowait``."""
        if data is None:
            return None
        fast = _DECODE_FRAMED_STRING
        if fast is not None:
            try:  # a string key whose schema id is cached; anything else goes the path below
                return fast(data, self._readers)
            except Exception:
                pass
        reader = self._cached_reader(data)
        try:
            return reader.read(data)
        except Exception as exc:
            schema_id = _schema_id(data)
            raise PoisonMessage("decode", f"key does not match schema id {schema_id}: {exc!r}") from exc

    async def decode_key(self, data: bytes | None) -> Any:
        try:
            return self.decode_key_nowait(data)
        except SchemaNotCached as exc:
            await self.reader_for(exc.schema_id)
        return self.decode_key_nowait(data)
