"""The consumer's native fetch (``reelbus_native.Fetched``: ``group_end`` and ``decode_run``) against
confluent-kafka's messages through ``MessageFetch`` (no fast path): the same handler calls (so the
same span groups and runs), the same dead letters and the same offsets to commit, on a fetch that mixes
batches, trace contexts, partitions, event types with a batch handler, a per-record handler and none, a
record without headers or key, poison records and an error in place of a record.

Pure logic over fetches built by hand: no broker (the dead-letter producer is a fake that records what
it is given). ``tests/bus/test_kafka_clients.py`` runs both sources against the real broker.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message

from services.bus import consumer as consumer_module
from services.bus import fetch as fetch_module
from services.bus import wire
from services.bus.consumer import BusConsumer, ConsumerConfig, ConsumerDied, Record, batched
from services.bus.contracts import Contracts
from services.bus.events import Heartbeat, SessionPaused, SessionResumed
from services.bus.fetch import Fetch, MessageFetch
from services.bus.serde import Serde, _Reader

CONTRACTS = Contracts.load()
TOPIC = CONTRACTS.topic("playback.events")
IDS = {Heartbeat.SCHEMA_NAME: 8, SessionPaused.SCHEMA_NAME: 9, SessionResumed.SCHEMA_NAME: 10}

pytestmark = pytest.mark.skipif(
    wire.NATIVE is None or os.environ.get("REELBUS_NATIVE_CODEC") == "0", reason="no native codec"
)
NOT_A_RECORD = ("broker transport failure", False)


class FakeDeadLetters:
    """A fake dead-letter producer: records what the consumer sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, Any]]]] = []

    async def send_raw(self, topic: str, key: bytes | None, value: bytes | None, headers: Any) -> None:
        kept = [(k, v) for k, v in headers if k != "reelbus.dlq.failed-at"]
        self.sent.append((topic, key, value, kept))


def _serde() -> Serde:
    serde = Serde(CONTRACTS, None)  # type: ignore[arg-type]  # never asked: every id is set here
    serde._ids[(TOPIC.key_subject, TOPIC.key)] = 7
    serde._readers[7] = _Reader.of(CONTRACTS.schema(TOPIC.key), None)
    for name, schema_id in IDS.items():
        serde._ids[(TOPIC.value_subject(name), name)] = schema_id
        serde._readers[schema_id] = _Reader.of(CONTRACTS.schema(name), None)
    return serde


def _fetch() -> list[Message]:
    serde = _serde()
    session, profile = uuid.uuid4(), uuid.uuid4()
    offsets = {0: 100, 1: 0}

    def heartbeat(n: int) -> Heartbeat:
        return Heartbeat(
            session_id=session,
            profile_id=profile,
            title_id=f"tt{n:07d} é",
            sequence=n,
            position_ms=-n,
            bitrate_kbps=3000,
            buffer_ms=n,
            throughput_kbps=1,
            rebuffer_ms=0,
        )

    def message(
        event: Any, trace: str | None, partition: int = 0, key: str | None = "k", value: Any = None
    ) -> Message:
        offset = offsets[partition]
        offsets[partition] += 1
        headers: list[tuple[str, str | bytes | None]] | None = None
        if trace is not None:
            headers = [("reelbus.event-type", b"x"), ("traceparent", trace.encode())]
        return Message(
            topic=TOPIC.name,
            partition=partition,
            offset=offset,
            key=None if key is None else serde.encode_key(TOPIC, key),
            value=serde.encode_value(TOPIC, event) if value is None else value,
            headers=headers,
            timestamp=(1, 1_700_000_000_000 + offset),
        )

    a, b, c = (f"00-{i:032x}-{i:016x}-01" for i in (1, 2, 3))
    paused = SessionPaused(session_id=session, profile_id=profile, title_id="tt1", position_ms=5)
    resumed = SessionResumed(
        session_id=session, profile_id=profile, title_id="tt1", position_ms=6, paused_ms=7
    )
    good = serde.encode_value(TOPIC, heartbeat(0))
    return [
        *(message(heartbeat(n), a) for n in range(5)),
        *(message(heartbeat(n), b) for n in range(5, 7)),
        message(paused, b),
        message(None, b, value=b"not avro"),
        message(None, b, value=good[:20]),  # truncated: poison at decode
        *(message(heartbeat(n), b) for n in range(7, 9)),
        message(resumed, b),  # no handler: ignored
        Message(topic=TOPIC.name, partition=0, error=KafkaError(-195, NOT_A_RECORD[0])),
        message(heartbeat(9), None, key=None),
        message(heartbeat(10), None),
        message(heartbeat(11), c, partition=1),
        message(heartbeat(12), c, partition=1),
        message(heartbeat(13), c),
    ]


def _native(msgs: list[Message]) -> Fetch:
    """The same records as a native fetch."""
    records: list[tuple[Any, ...]] = []
    for m in msgs:
        err = m.error()
        if err is not None:
            records.append((m.topic(), m.partition(), m.offset() or 0, err.str(), err.fatal()))
        else:
            headers = list(m.headers() or [])
            records.append(
                (m.topic(), m.partition(), m.offset(), m.key(), m.value(), headers, m.timestamp()[1])
            )
    fetched: Fetch = wire.NATIVE.Fetched.of(records)
    return fetched


async def _run(fetched: list[Message], native: bool) -> tuple[list[Any], list[Any], dict[Any, int]]:
    calls: list[Any] = []

    async def per_batch(items: list[tuple[Any, Record]]) -> None:
        calls.append(("batch", list(items)))

    async def per_record(event: Any, record: Record) -> None:
        calls.append(("record", event, record))

    dead = FakeDeadLetters()
    consumer = BusConsumer(
        ConsumerConfig("unused:9092", "group", [TOPIC.name]),
        CONTRACTS,
        _serde(),
        {Heartbeat.SCHEMA_NAME: batched(per_batch), SessionPaused.SCHEMA_NAME: per_record},
        dead,  # type: ignore[arg-type]
    )
    make = _native if native else MessageFetch
    await consumer._process_batch(make(fetched[:9]))
    await consumer._process_batch(make(fetched[9:]))
    return calls, dead.sent, dict(consumer._pending)


async def test_native_and_python_consumer_paths_handle_a_fetch_alike() -> None:
    fetched = _fetch()
    slow_calls, slow_dead, slow_pending = await _run(fetched, False)
    fast_calls, fast_dead, fast_pending = await _run(fetched, True)
    # Heartbeats of a; of b before SessionPaused (per record); of b after the poison records; without
    # headers (one root group); of c on partition 1; of c on partition 0.
    assert [(c[0], len(c[1]) if c[0] == "batch" else 1) for c in slow_calls] == [
        ("batch", 5),
        ("batch", 2),
        ("record", 1),
        ("batch", 2),
        ("batch", 2),
        ("batch", 2),
        ("batch", 1),
    ]
    assert fast_calls == slow_calls
    assert len(slow_dead) == 2
    assert fast_dead == slow_dead
    assert fast_pending == slow_pending == {(TOPIC.name, 0): 100 + 16, (TOPIC.name, 1): 2}


async def test_the_native_fetch_decodes_runs_natively() -> None:
    """The fast path is taken: a run comes back from one ``decode_run`` call, records built natively."""
    fetched = _native(_fetch()[:5])
    serde = _serde()
    pairs, stop = serde.decode_run(fetched, 0, 5, TOPIC, wire.builder(Record))
    assert stop == 5
    assert [type(e) for e, _ in pairs] == [Heartbeat] * 5
    assert [r.offset for _, r in pairs] == [100, 101, 102, 103, 104]
    assert pairs[0][1].headers == [
        ("reelbus.event-type", b"x"),
        ("traceparent", b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"1-01"),
    ]
    assert MessageFetch(_fetch()[:5]).decode_run(0, 5, {}, None, None) == ([], 0)


def test_the_consumer_is_the_native_one() -> None:
    assert fetch_module.NATIVE_CONSUMER is wire.NATIVE.KafkaConsumer
    assert type(consumer_module._make_record) is wire.NATIVE.Builder


async def test_a_fatal_error_in_a_fetch_ends_the_consumer() -> None:
    consumer = BusConsumer(
        ConsumerConfig("unused:9092", "group", [TOPIC.name]),
        CONTRACTS,
        _serde(),
        {},
        FakeDeadLetters(),  # type: ignore[arg-type]
    )
    await consumer._process_batch(wire.NATIVE.Fetched.of([(TOPIC.name, 0, 0, "gone", False)]))
    with pytest.raises(ConsumerDied, match="fatal consumer error: fenced"):
        await consumer._process_batch(wire.NATIVE.Fetched.of([(TOPIC.name, 0, 0, "fenced", True)]))
