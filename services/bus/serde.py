"""Avro in the Confluent wire format: magic byte 0, a 4-byte big-endian schema id, the Avro body.

Writers use the ids that ``reelbus topics apply`` registered; they are looked up once, at start-up,
and cached. Readers resolve the writer's schema (fetched once per id) against the reader's own copy
of the same record from ``schemas/``, so a reader survives a writer with newer compatible fields.
"""

from __future__ import annotations

import asyncio
import io
import struct
from dataclasses import dataclass
from typing import Any

import fastavro

from services.bus.contracts import Contracts, Schema, Topic, make_schema
from services.bus.events import EVENT_TYPES, AvroEvent
from services.bus.registry import RegistryClient, RegistryError

MAGIC = 0
HEADER = struct.Struct(">bI")


class PoisonMessage(Exception):
    """A record that can never be handled as it is: it goes to the dead-letter topic."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class SchemaNotRegistered(RuntimeError):
    """A schema the producer needs is not in the registry: ``reelbus topics apply`` has not run."""


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


@dataclass(frozen=True)
class _Reader:
    writer: Any
    reader: Any
    fullname: str


class Serde:
    """Encodes typed events for declared topics; decodes records back into typed events."""

    def __init__(self, contracts: Contracts, registry: RegistryClient) -> None:
        self.contracts = contracts
        self.registry = registry
        self._ids: dict[tuple[str, str], int] = {}  # (subject, fullname) -> schema id
        self._readers: dict[int, _Reader] = {}

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
            self._readers.setdefault(found.id, _Reader(schema.parsed, schema.parsed, fullname))

    def encode_key(self, topic: Topic, key: Any) -> bytes:
        schema = self.contracts.schema(topic.key)
        return encode_body(schema.parsed, self._id(topic.key_subject, topic.key, topic), key)

    def encode_value(self, topic: Topic, event: AvroEvent) -> bytes:
        name = event.SCHEMA_NAME
        if name not in topic.values:
            raise ValueError(f"{name} is not declared as a value of topic {topic.name}")
        schema = self.contracts.schema(name)
        return encode_body(schema.parsed, self._id(topic.value_subject(name), name, topic), event.to_record())

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
        reader = ours.parsed if ours is not None else writer.parsed
        return _Reader(writer.parsed, reader, writer.fullname)

    async def reader_for(self, schema_id: int) -> _Reader:
        found = self._readers.get(schema_id)
        if found is None:
            found = await asyncio.to_thread(self._reader_for, schema_id)
            self._readers[schema_id] = found
        return found

    async def decode_record(self, data: bytes | None) -> tuple[str, dict[str, Any]]:
        schema_id, body = split_header(data)
        reader = await self.reader_for(schema_id)
        try:
            record = fastavro.schemaless_reader(io.BytesIO(body), reader.writer, reader.reader)
        except Exception as exc:  # fastavro raises assorted errors on a corrupt body
            raise PoisonMessage("decode", f"body does not match schema id {schema_id}: {exc!r}") from exc
        if not isinstance(record, dict):
            raise PoisonMessage("decode", f"schema id {schema_id} is not a record schema")
        return reader.fullname, record

    async def decode_event(self, topic: Topic | None, data: bytes | None) -> AvroEvent:
        fullname, record = await self.decode_record(data)
        if topic is not None and fullname not in topic.values:
            raise PoisonMessage("decode", f"{fullname} is not declared as a value of topic {topic.name}")
        cls = EVENT_TYPES.get(fullname)
        if cls is None:
            raise PoisonMessage("decode", f"no event type {fullname} in this build's schemas/")
        return cls.from_record(record)  # type: ignore[attr-defined, no-any-return]

    async def decode_key(self, data: bytes | None) -> Any:
        if data is None:
            return None
        schema_id, body = split_header(data)
        reader = await self.reader_for(schema_id)
        try:
            return fastavro.schemaless_reader(io.BytesIO(body), reader.writer, reader.reader)
        except Exception as exc:
            raise PoisonMessage("decode", f"key does not match schema id {schema_id}: {exc!r}") from exc
