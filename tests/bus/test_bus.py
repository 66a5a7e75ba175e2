"""The bus against the real broker and registry: round trip, dead letters, retries, contracts."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.bus.consumer import (
    AnyHandler,
    BusConsumer,
    ConsumerConfig,
    Handler,
    Record,
    Retryable,
    RetryPolicy,
)
from services.bus.contracts import Contracts, Topic
from services.bus.events import ViewRecorded
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import HEADER, Serde
from services.bus.tracing import header_bytes
from services.cli.infra import Layout
from services.cli.tail import read
from tests.conftest import TopicFactory, unique, until, wait_for

pytestmark = pytest.mark.infra


def view(**changes: Any) -> ViewRecorded:
    fields: dict[str, Any] = {
        "profile_id": uuid.uuid4(),
        "account_id": uuid.uuid4(),
        "title_id": "tt0000042",
        "session_id": uuid.uuid4(),
        "position_ms": 1_234_000,
        "duration_ms": 5_400_000,
        "watched_ms": 1_200_000,
        "watched_at": dt.datetime(2026, 11, 26, 3, 0, 0, 123000, tzinfo=dt.UTC),
        "completed": False,
    }
    fields.update(changes)
    return ViewRecorded(**fields)


@asynccontextmanager
async def producer_for(
    layout: Layout, contracts: Contracts, topic: Topic, native: bool | None = None, **extra: Any
) -> AsyncIterator[Producer]:
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    config = ProducerConfig(
        layout.bootstrap_servers, client_id=unique("test-producer"), native=native, extra=extra
    )
    producer = Producer(config, contracts, serde)
    await producer.start([topic.name])
    try:
        yield producer
    finally:
        await producer.close()


@asynccontextmanager
async def consuming(
    layout: Layout,
    contracts: Contracts,
    topic: Topic,
    handlers: Mapping[str, AnyHandler],
    dead_letters: Producer,
    retry: RetryPolicy | None = None,
    native: bool | None = None,
) -> AsyncIterator[BusConsumer]:
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    consumer = BusConsumer(
        ConsumerConfig(
            layout.bootstrap_servers,
            group_id=unique("test-group"),
            topics=[topic.name],
            retry=retry or RetryPolicy(attempts=3, first_backoff=0.01),
            native=native,
        ),
        contracts,
        serde,
        handlers,
        dead_letters,
    )
    task = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 20)


def collector() -> tuple[list[tuple[Any, Record]], Handler]:
    seen: list[tuple[Any, Record]] = []

    async def handle(event: Any, record: Record) -> None:
        seen.append((event, record))

    return seen, handle


def dead_letters(layout: Layout, topic: Topic) -> list[dict[str, Any]]:
    out = []
    for msg in read(layout.bootstrap_servers, topic.dlq, None, None, follow=False, limit=None):
        headers = {k: header_bytes(v).decode(errors="replace") for k, v in msg.headers}
        out.append({"key": msg.key, "value": msg.value, "headers": headers})
    return out


async def test_typed_event_round_trip(
    bus_infra: Layout, make_topic: TopicFactory, tracing: TracerProvider
) -> None:
    contracts, topic = await make_topic()
    sent = view()
    seen, handle = collector()
    async with producer_for(bus_infra, contracts, topic) as producer:
        delivered = await producer.send(topic.name, str(sent.profile_id), sent)
        assert delivered.topic == topic.name and delivered.offset >= 0
        async with consuming(bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handle}, producer):
            await until(lambda: seen, "the event to be consumed")
    event, record = seen[0]
    assert isinstance(event, ViewRecorded)
    assert event == sent
    assert record.key == str(sent.profile_id)
    assert dict(record.headers)["reelbus.event-type"] == b"reelbus.history.ViewRecorded"
    assert "traceparent" in dict(record.headers)


async def test_poison_records_go_to_the_dlq_and_the_consumer_keeps_going(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    good = view()
    seen, handle = collector()
    async with producer_for(bus_infra, contracts, topic) as producer:
        await producer.send_raw(topic.name, b"k1", b"this is not avro", [("origin", b"test")])
        await producer.send_raw(topic.name, b"k2", HEADER.pack(0, 987_654_321) + b"\x00", [])
        await producer.send(topic.name, str(good.profile_id), good)
        async with consuming(bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handle}, producer):
            await until(lambda: seen, "the good event after two poison records")
            letters = await wait_for(
                lambda: asyncio.to_thread(
                    lambda: [d for d in [dead_letters(bus_infra, topic)] if len(d) >= 2]
                ),
                "two dead letters",
            )
    assert [e for e, _ in seen] == [good]
    first, second = letters[0][:2]
    assert first["key"] == b"k1" and first["value"] == b"this is not avro"
    assert first["headers"]["origin"] == "test", "original headers are kept"
    assert first["headers"]["reelbus.dlq.stage"] == "decode"
    assert "not Avro" in first["headers"]["reelbus.dlq.reason"]
    assert first["headers"]["reelbus.dlq.topic"] == topic.name
    assert first["headers"]["reelbus.dlq.offset"] == "0"
    assert "unknown schema id 987654321" in second["headers"]["reelbus.dlq.reason"]


async def test_handler_failures_retry_within_bounds_then_dead_letter(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    flaky, broken, fine = view(title_id="flaky"), view(title_id="broken"), view(title_id="fine")
    attempts: dict[str, int] = {}

    async def handle(event: ViewRecorded, record: Record) -> None:
        attempts[event.title_id] = attempts.get(event.title_id, 0) + 1
        if event.title_id == "flaky" and attempts["flaky"] < 3:
            raise Retryable("database briefly away")
        if event.title_id == "broken":
            raise ValueError("position_ms beyond the title's runtime")

    async with producer_for(bus_infra, contracts, topic) as producer:
        for e in (flaky, broken, fine):
            await producer.send(topic.name, str(e.profile_id), e)
        async with consuming(
            bus_infra,
            contracts,
            topic,
            {ViewRecorded.SCHEMA_NAME: handle},
            producer,
            RetryPolicy(attempts=4, first_backoff=0.01),
        ):
            await until(lambda: attempts.get("fine"), "the last event")
            letters = await wait_for(
                lambda: asyncio.to_thread(dead_letters, bus_infra, topic), "a dead letter"
            )
    assert attempts == {"flaky": 3, "broken": 1, "fine": 1}
    assert len(letters) == 1
    headers = letters[0]["headers"]
    assert headers["reelbus.dlq.stage"] == "handler"
    assert headers["reelbus.dlq.error"] == "ValueError"
    assert "position_ms beyond" in headers["reelbus.dlq.reason"]


async def test_a_consumer_refuses_handlers_for_undeclared_types(
    bus_infra: Layout, contracts: Contracts, make_topic: TopicFactory
) -> None:
    extended, topic = await make_topic()
    serde = Serde(extended, RegistryClient(bus_infra.registry_url))

    async def handle(event: Any, record: Record) -> None:
        return None

    with pytest.raises(ValueError, match=r"reelbus\.playback\.Heartbeat"):
        BusConsumer(
            ConsumerConfig(bus_infra.bootstrap_servers, "g", [topic.name]),
            extended,
            serde,
            {"reelbus.playback.Heartbeat": handle},
            dead_letters=cast(Producer, None),
        )
