"""Both Kafka clients under the bus (``services/bus/fetch.py``, ``services/bus/producer.py``), against
the real broker: the native ones (librdkafka inside ``reelbus_native``) and confluent-kafka's. Each
consumer must hand the handlers the same events and records (key, headers, offsets), send the same
poison record to the dead letters, commit every handled offset, report lag from what it committed, and
read records written in every compression codec (the native librdkafka is built here, with its own
codecs); each producer must deliver batches, single records and raw records, also when its local queue
is full.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
from confluent_kafka import Producer as KafkaProducer
from opentelemetry.sdk.trace import TracerProvider

from services.bus import fetch
from services.bus.consumer import Record, batched
from services.bus.events import ViewRecorded
from services.bus.tracing import header_bytes
from services.cli.infra import Layout
from tests.bus.test_bus import consuming, dead_letters, producer_for, view
from tests.conftest import TopicFactory, until, wait_for

pytestmark = pytest.mark.infra


@pytest.mark.parametrize("native", [True, False], ids=["native", "confluent-kafka"])
async def test_each_client_hands_over_every_record_once_and_commits_it(
    bus_infra: Layout, make_topic: TopicFactory, tracing: TracerProvider, native: bool
) -> None:
    if native and fetch.NATIVE_CONSUMER is None:
        pytest.fail("the native consumer is not built: `make install` builds services/bus/native")
    contracts, topic = await make_topic(partitions=3)
    batch = [view(title_id=f"tt{i:07d}") for i in range(90)]
    alone = view(title_id="alone")
    compressed = {codec: view(title_id=codec) for codec in ("gzip", "zstd", "snappy", "none")}
    seen: list[tuple[Any, Record]] = []

    async def handle(items: list[tuple[Any, Record]]) -> None:
        seen.extend(items)

    async with producer_for(bus_infra, contracts, topic, native=native) as producer:
        await producer.send_batch(topic.name, [(str(e.profile_id), e) for e in batch])
        await producer.send(topic.name, str(alone.profile_id), alone)
        await producer.send_raw(topic.name, b"a key", b"not avro", [("origin", b"test")])
        for codec, event in compressed.items():  # one each from another producer, in every codec
            other = KafkaProducer(
                {"bootstrap.servers": bus_infra.bootstrap_servers, "compression.type": codec}
            )
            other.produce(
                topic.name,
                producer.serde.encode_value(topic, event),
                producer.serde.encode_key(topic, str(event.profile_id)),
                headers=[("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")],
            )
            assert await asyncio.to_thread(other.flush, 10) == 0
        handlers = {ViewRecorded.SCHEMA_NAME: batched(handle)}
        async with consuming(bus_infra, contracts, topic, handlers, producer, native=native) as consumer:
            await until(lambda: len(seen) >= len(batch) + 1 + len(compressed), "every event to be handled")
            letters = await wait_for(
                lambda: asyncio.to_thread(dead_letters, bus_infra, topic), "the dead letter"
            )

            def all_committed() -> dict[tuple[str, int], int] | None:
                found = consumer.lag()
                return found if found and not any(found.values()) else None

            lag = await until(all_committed, "every handled offset to be committed (lag 0 everywhere)")

    assert sorted((e for e, _ in seen), key=lambda e: e.title_id) == sorted(
        [*batch, alone, *compressed.values()], key=lambda e: e.title_id
    )
    offsets = collections.Counter((r.partition, r.offset) for _, r in seen)
    assert max(offsets.values()) == 1, "no record handed over twice"
    for event, record in seen:
        assert record.topic == topic.name
        assert record.key == str(event.profile_id)
        headers = {k: header_bytes(v) for k, v in record.headers}
        assert headers["traceparent"].startswith(b"00-")
        assert len(record.headers) == len(list(record.headers)) == len(headers)
        if event.title_id in compressed:
            continue
        assert headers["reelbus.event-id"] == str(event.event_id).encode()
        assert headers["reelbus.event-type"] == ViewRecorded.SCHEMA_NAME.encode()
        assert record.timestamp_ms > 0
    assert sorted(lag) == [(topic.name, p) for p in range(3)]

    (letter,) = letters
    assert (letter["key"], letter["value"]) == (b"a key", b"not avro")
    assert letter["headers"]["origin"] == "test"
    assert letter["headers"]["reelbus.dlq.stage"] == "decode"
    assert "not Avro" in letter["headers"]["reelbus.dlq.reason"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "confluent-kafka"])
async def test_a_batch_larger_than_the_local_queue_is_delivered_whole(
    bus_infra: Layout, make_topic: TopicFactory, native: bool
) -> None:
    """A local queue of 50 records: the producer queues what fits and the rest as librdkafka drains."""
    contracts, topic = await make_topic(partitions=2)
    batches = [[view(title_id=f"b{b}-{i}") for i in range(400)] for b in range(3)]
    small = {"queue.buffering.max.messages": 50}
    async with producer_for(bus_infra, contracts, topic, native=native, **small) as producer:
        counts = asyncio.gather(
            *(producer.send_batch(topic.name, [(str(e.profile_id), e) for e in b]) for b in batches)
        )
        alone = asyncio.gather(
            *(producer.send(topic.name, "alone", view(title_id=f"alone-{i}")) for i in range(20))
        )
        assert await counts == [400, 400, 400]
        assert all(d.topic == topic.name and d.offset >= 0 for d in await alone)
    seen: list[tuple[Any, Record]] = []

    async def handle(items: list[tuple[Any, Record]]) -> None:
        seen.extend(items)

    async with producer_for(bus_infra, contracts, topic, native=native) as dead:
        handlers = {ViewRecorded.SCHEMA_NAME: batched(handle)}
        async with consuming(bus_infra, contracts, topic, handlers, dead, native=native):
            await until(lambda: len(seen) >= 1220, "every record to be consumed")
    titles = collections.Counter(e.title_id for e, _ in seen)
    assert len(titles) == 1220 and set(titles.values()) == {1}
