"""The generated Avro codecs (``events.AVRO_CODECS``) against fastavro: the same bytes, the same events.

Every event type is filled with the representative values of ``test_events`` (every field set, and only
the required ones), written by its codec and by fastavro (which must agree byte for byte), read back by
its codec from fastavro's bytes (which must give the event back, types included). The serde uses a codec
only when the schema's fingerprint is the codec's, and falls back to fastavro for anything a codec
refuses; both are checked here too.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest

from services.bus import wire
from services.bus.contracts import Contracts
from services.bus.events import AVRO_CODECS, EVENT_TYPES, Heartbeat
from services.bus.serde import PoisonMessage, Serde, _Reader
from tests.unit.test_events import EVENT_CLASSES, SCHEMAS, _assert_identical, _read, _Samples, _write


def test_every_event_type_has_a_codec_of_its_schema() -> None:
    assert set(AVRO_CODECS) == set(EVENT_TYPES)
    for name, codec in AVRO_CODECS.items():
        assert codec.fingerprint == wire.fingerprint(SCHEMAS[name])


@pytest.mark.parametrize("full", [True, False], ids=["full", "minimal"])
@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_codec_writes_what_fastavro_writes_and_reads_it_back(cls: type[Any], full: bool) -> None:
    schema = SCHEMAS[cls.SCHEMA_NAME]
    codec = AVRO_CODECS[cls.SCHEMA_NAME]
    event = _Samples(full=full).instance(cls)
    expected = _write(schema, event.to_record())

    out = bytearray()
    codec.write(out, event)
    assert bytes(out) == expected

    decoded, end = codec.read(expected, 0)
    assert end == len(expected)
    _assert_identical(decoded, event)
    _assert_identical(decoded, cls.from_record(_read(expected, schema)))


def test_the_fingerprint_ignores_docs_and_defaults_but_not_the_layout() -> None:
    schema = SCHEMAS[Heartbeat.SCHEMA_NAME]
    undocumented = {k: v for k, v in schema.items() if k != "doc"}
    undocumented["fields"] = [{k: v for k, v in f.items() if k != "doc"} for f in schema["fields"]]
    assert wire.fingerprint(undocumented) == wire.fingerprint(schema)
    reordered = dict(schema, fields=list(reversed(schema["fields"])))
    assert wire.fingerprint(reordered) != wire.fingerprint(schema)
    renamed = dict(schema, fields=[dict(schema["fields"][0], name="other"), *schema["fields"][1:]])
    assert wire.fingerprint(renamed) != wire.fingerprint(schema)


def _serde() -> tuple[Serde, Any]:
    contracts = Contracts.load()
    topic = contracts.topic("playback.events")
    serde = Serde(contracts, None)  # type: ignore[arg-type]  # never asked: the ids are set here
    serde._ids[(topic.key_subject, topic.key)] = 7
    serde._ids[(topic.value_subject(Heartbeat.SCHEMA_NAME), Heartbeat.SCHEMA_NAME)] = 8
    serde._readers[7] = _Reader.of(contracts.schema(topic.key), None)
    serde._readers[8] = _Reader.of(contracts.schema(Heartbeat.SCHEMA_NAME), None)
    return serde, topic


def _heartbeat(**changes: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "session_id": uuid.uuid4(),
        "profile_id": uuid.uuid4(),
        "title_id": "tt0000042",
        "sequence": 3,
        "position_ms": 61_000,
        "bitrate_kbps": 4300,
        "buffer_ms": 12_000,
        "throughput_kbps": 9800,
        "rebuffer_ms": 0,
    }
    fields.update(changes)
    return Heartbeat(**fields)


def _fastavro_body(event: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(SCHEMAS[event.SCHEMA_NAME]), event.to_record())
    return buf.getvalue()


def test_serde_uses_the_codec_and_its_bytes_are_fastavros() -> None:
    serde, topic = _serde()
    events = [_heartbeat(sequence=i) for i in range(5)]
    values = serde.encode_values(topic, events)
    assert values == [serde.encode_value(topic, e) for e in events]
    for event, value in zip(events, values, strict=True):
        assert value[:5] == b"\x00\x00\x00\x00\x08"
        assert value[5:] == _fastavro_body(event)
        assert serde.decode_event_nowait(topic, value) == event
    assert serde.encode_keys(topic, ["k1", "ké"]) == [serde.encode_key(topic, k) for k in ("k1", "ké")]
    assert serde.decode_key_nowait(serde.encode_key(topic, "ké")) == "ké"


def test_what_a_codec_refuses_goes_through_fastavro() -> None:
    serde, topic = _serde()
    # A naive datetime: fastavro reads it as local time; the codec leaves it to fastavro.
    naive = _heartbeat(event_time=datetime(2026, 1, 2, 3, 4, 5, 6000))
    assert serde.encode_value(topic, naive)[5:] == _fastavro_body(naive)
    # A value fastavro refuses is refused the same way, not written differently.
    with pytest.raises(TypeError):
        serde.encode_value(topic, _heartbeat(title_id=b"bytes, not str"))
    with pytest.raises((TypeError, ValueError, OverflowError)):
        serde.encode_values(topic, [_heartbeat(sequence=1 << 70)])


def test_a_truncated_or_corrupt_body_is_poison() -> None:
    serde, topic = _serde()
    value = serde.encode_value(topic, _heartbeat())
    for broken in (value[:20], value[:5] + b"\xff" * 12):
        with pytest.raises(PoisonMessage, match="does not match schema id 8"):
            serde.decode_event_nowait(topic, broken)


def test_a_writer_schema_that_differs_is_read_by_fastavro() -> None:
    contracts = Contracts.load()
    ours = contracts.schema(Heartbeat.SCHEMA_NAME)
    newer = dict(ours.raw, fields=[*ours.raw["fields"], {"name": "extra", "type": "int", "default": 0}])
    from services.bus.contracts import make_schema

    reader = _Reader.of(make_schema(newer), ours)
    assert reader.codec is None and reader.hinted_reader is not None
    same = _Reader.of(ours, ours)
    assert same.codec is AVRO_CODECS[Heartbeat.SCHEMA_NAME]
    event = _heartbeat(event_time=datetime(2026, 11, 26, 3, 0, tzinfo=UTC))
    body = _fastavro_body(event)
    written = io.BytesIO()
    fastavro.schemaless_writer(written, fastavro.parse_schema(newer), {**event.to_record(), "extra": 5})
    data = b"\x00\x00\x00\x00\x09" + written.getvalue()
    assert Heartbeat.from_record(reader.read(data)) == event
    assert same.codec is not None and same.codec.read(body, 0)[0] == event
    assert dataclasses.asdict(event) == dataclasses.asdict(Heartbeat.from_record(reader.read(data)))


@pytest.mark.parametrize(
    "n", [0, 1, -1, 63, -64, 64, -65, 8191, -8192, 8192, -8193, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63)]
)
def test_longs_are_written_and_read_as_fastavro_does(n: int) -> None:
    expected = io.BytesIO()
    fastavro.schemaless_writer(expected, fastavro.parse_schema("long"), n)
    out = bytearray()
    wire.w_long(out, n)
    assert bytes(out) == expected.getvalue()
    assert wire.r_long(bytes(out), 0) == (n, len(out))


def test_a_long_beyond_64_bits_is_refused() -> None:
    with pytest.raises(OverflowError):
        wire.w_long(bytearray(), 2**63)


def test_event_ids_are_random_version_4_uuids() -> None:
    made = [wire.uuid4() for _ in range(1000)]
    assert len(set(made)) == len(made)
    for u in made[:50]:
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert uuid.UUID(str(u)) == u and hash(uuid.UUID(str(u))) == hash(u)
        assert wire.uuid_of(str(u)) == u and wire.uuid_of(str(u).upper()) == u
    assert wire.uuid_of("{" + str(made[0]) + "}") == made[0]  # not canonical: uuid.UUID parses it
    with pytest.raises(ValueError):
        wire.uuid_of("not-a-uuid-at-all-but-thirty-six-ch")
