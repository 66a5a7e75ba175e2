"""The batch APIs against the real broker: ``Producer.produce_batch`` and span groups in the consumer.

A batch is one PRODUCER span whose ``traceparent`` every record carries; the consumer handles the
records of one batch fetched together under one CONSUMER span, a child of that PRODUCER span, while a
record sent on its own keeps a span of its own. A poison record inside a batch goes to the dead letters
alone, for per-record and batch handlers alike.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.bus.consumer import AnyHandler, Record, Retryable, RetryPolicy, batched
from services.bus.events import Heartbeat, ViewRecorded
from services.bus.producer import ATTR_BATCH_COUNT
from services.bus.tracing import KafkaHeaders, header_bytes
from services.cli.infra import Layout
from tests.bus.test_bus import collector, consuming, dead_letters, producer_for, view
from tests.conftest import TopicFactory, until, wait_for

pytestmark = pytest.mark.infra


@pytest.fixture
def spans(tracing: TracerProvider) -> Iterator[InMemorySpanExporter]:
    """Every span this process ends during the test, next to the session's Zipkin exporter."""
    exporter = InMemorySpanExporter()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the processor stays registered but keeps nothing from now on


def _of_topic(spans: InMemorySpanExporter, topic: str, kind: SpanKind) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.kind == kind and (s.attributes or {}).get("messaging.destination.name") == topic
    ]


def _count(span: ReadableSpan) -> int:
    return int((span.attributes or {}).get(ATTR_BATCH_COUNT, 1))  # type: ignore[arg-type]


async def test_a_batch_round_trips_with_one_producer_span_carried_by_every_record(
    bus_infra: Layout, make_topic: TopicFactory, spans: InMemorySpanExporter
) -> None:
    contracts, topic = await make_topic(partitions=3)
    sent = [view(title_id=f"tt{i:07d}") for i in range(60)]
    seen, handle = collector()
    async with producer_for(bus_infra, contracts, topic) as producer:
        delivered = await producer.send_batch(topic.name, [(str(e.profile_id), e) for e in sent])
        assert delivered == len(sent)
        async with consuming(bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handle}, producer):
            await until(lambda: len(seen) >= len(sent), "the whole batch to be consumed")

    assert sorted((e for e, _ in seen), key=lambda e: e.title_id) == sent
    for event, record in seen:
        assert record.key == str(event.profile_id)
        headers = {k: header_bytes(v) for k, v in record.headers}
        assert headers["reelbus.event-id"] == str(event.event_id).encode()
        assert headers["reelbus.event-type"] == ViewRecorded.SCHEMA_NAME.encode()
    parents = {dict(r.headers)["traceparent"] for _, r in seen}
    assert len(parents) == 1, "every record of the batch carries the batch's traceparent"

    (send,) = _of_topic(spans, topic.name, SpanKind.PRODUCER)
    assert send.name == f"send {topic.name}"
    assert _count(send) == len(sent)
    assert send.context is not None
    ctx = send.context
    assert parents == {f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()}


async def test_consumer_spans_of_a_batch_are_children_of_its_producer_span(
    bus_infra: Layout, make_topic: TopicFactory, spans: InMemorySpanExporter
) -> None:
    contracts, topic = await make_topic(partitions=1)
    batch = [view(title_id=f"batch-{i}") for i in range(40)]
    alone = view(title_id="alone")
    seen, handle = collector()
    async with producer_for(bus_infra, contracts, topic) as producer:
        await producer.send_batch(topic.name, [(str(e.profile_id), e) for e in batch])
        await producer.send(topic.name, str(alone.profile_id), alone)
        async with consuming(bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handle}, producer):
            await until(lambda: len(seen) >= len(batch) + 1, "the batch and the single event")

            def consumer_spans() -> list[ReadableSpan]:
                found = _of_topic(spans, topic.name, SpanKind.CONSUMER)
                return found if sum(_count(s) for s in found) >= len(batch) + 1 else []

            processed = await wait_for(lambda: asyncio.to_thread(consumer_spans), "the consumer spans")

    sends = _of_topic(spans, topic.name, SpanKind.PRODUCER)
    (batch_send,) = [s for s in sends if _count(s) > 1]
    (single_send,) = [s for s in sends if _count(s) == 1]
    assert batch_send.context is not None and single_send.context is not None

    of_batch = [s for s in processed if s.parent and s.parent.span_id == batch_send.context.span_id]
    of_single = [s for s in processed if s.parent and s.parent.span_id == single_send.context.span_id]
    assert sum(_count(s) for s in of_batch) == len(batch)
    assert len(of_batch) < len(batch), "a batch fetched together is handled under one span, not one each"
    assert all(s.context and s.context.trace_id == batch_send.context.trace_id for s in of_batch)
    assert len(of_single) == 1 and _count(of_single[0]) == 1
    attributes = of_single[0].attributes or {}
    assert attributes["reelbus.event.id"] == str(alone.event_id)
    assert all((s.attributes or {}).get("reelbus.event.type") == ViewRecorded.SCHEMA_NAME for s in of_batch)


@pytest.mark.parametrize("kind", ["record", "batch"])
async def test_a_poison_record_inside_a_batch_goes_to_the_dlq_alone(
    bus_infra: Layout, make_topic: TopicFactory, kind: str
) -> None:
    contracts, topic = await make_topic(partitions=1)
    events = [view(title_id=f"ok-{i}") for i in range(5)]
    events[2] = view(title_id="broken")
    handled: list[str] = []
    calls: list[int] = []

    async def handle(event: ViewRecorded, record: Record) -> None:
        if event.title_id == "broken":
            raise ValueError("position_ms beyond the title's runtime")
        handled.append(event.title_id)

    async def handle_many(items: list[tuple[Any, Record]]) -> None:
        calls.append(len(items))
        if any(e.title_id == "broken" for e, _ in items):
            raise ValueError("position_ms beyond the title's runtime")
        handled.extend(e.title_id for e, _ in items)

    handler: AnyHandler = handle if kind == "record" else batched(handle_many)
    async with producer_for(bus_infra, contracts, topic) as producer:
        await producer.send_batch(topic.name, [(str(e.profile_id), e) for e in events])
        async with consuming(bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handler}, producer):
            await until(lambda: len(handled) >= 4, "the four good records")
            letters = await wait_for(
                lambda: asyncio.to_thread(dead_letters, bus_infra, topic), "a dead letter"
            )
    assert sorted(handled) == ["ok-0", "ok-1", "ok-3", "ok-4"]
    assert len(letters) == 1
    headers = letters[0]["headers"]
    assert headers["reelbus.dlq.stage"] == "handler"
    assert headers["reelbus.dlq.error"] == "ValueError"
    assert headers["reelbus.dlq.offset"] == "2"
    if kind == "batch":
        assert calls[0] == 5, "the batch handler first gets the whole batch"
        assert calls[1:] == [1] * 5, "then, after the failure, one record at a time"


async def test_an_undecodable_record_among_a_batchs_records_goes_to_the_dlq_alone(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    good = [view(title_id="first"), view(title_id="last")]
    seen, handle = collector()
    async with producer_for(bus_infra, contracts, topic) as producer:
        # Three records that share one trace context, as a batch's do; the middle one is not Avro.
        carried: KafkaHeaders = [
            ("traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01".encode())
        ]
        first, last = (producer.serde.encode_value(topic, e) for e in good)
        key = producer.serde.encode_key(topic, "k")
        await producer.send_raw(topic.name, key, first, carried)
        await producer.send_raw(topic.name, key, b"this is not avro", carried)
        await producer.send_raw(topic.name, key, last, carried)
        async with consuming(bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handle}, producer):
            await until(lambda: len(seen) >= 2, "both good records")
            letters = await wait_for(
                lambda: asyncio.to_thread(dead_letters, bus_infra, topic), "a dead letter"
            )
    assert [e for e, _ in seen] == good
    assert len(letters) == 1
    assert letters[0]["value"] == b"this is not avro"
    assert letters[0]["headers"]["reelbus.dlq.stage"] == "decode"
    assert letters[0]["headers"]["reelbus.dlq.offset"] == "1"


async def test_a_batch_handler_is_retried_as_a_whole_on_a_retryable_error(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    events = [view(title_id=f"tt{i}") for i in range(10)]
    calls: list[list[str]] = []

    async def handle_many(items: list[tuple[Any, Record]]) -> None:
        calls.append([e.title_id for e, _ in items])
        if len(calls) == 1:
            raise Retryable("database briefly away")

    async with producer_for(bus_infra, contracts, topic) as producer:
        await producer.send_batch(topic.name, [(str(e.profile_id), e) for e in events])
        async with consuming(
            bus_infra,
            contracts,
            topic,
            {ViewRecorded.SCHEMA_NAME: batched(handle_many)},
            producer,
            RetryPolicy(attempts=3, first_backoff=0.01),
        ):
            await until(lambda: sum(len(c) for c in calls[1:]) >= len(events), "the retried batch")
    assert calls[0] == calls[1] == [e.title_id for e in events]
    assert not await asyncio.to_thread(dead_letters, bus_infra, topic)


async def test_a_batch_with_an_undeclared_event_queues_nothing(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic()
    stray = Heartbeat(
        session_id=uuid.uuid4(),
        profile_id=uuid.uuid4(),
        title_id="tt1",
        sequence=1,
        position_ms=0,
        bitrate_kbps=3000,
        buffer_ms=0,
        throughput_kbps=0,
        rebuffer_ms=0,
    )
    async with producer_for(bus_infra, contracts, topic) as producer:
        with pytest.raises(ValueError, match=r"reelbus\.playback\.Heartbeat is not declared"):
            producer.produce_batch(topic, [("k", view()), ("k", stray)])
        assert await producer.send_batch(topic.name, []) == 0
