"""``reelbus replay`` and ``reelbus dlq`` against the real broker, run as the CLI is run."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from services.bus.consumer import BusConsumer, ConsumerConfig, Incoming, Record, RetryPolicy
from services.bus.contracts import Contracts, Topic
from services.bus.events import ViewRecorded
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.tracing import header_bytes
from services.cli.infra import Layout
from services.cli.tail import read
from tests.bus.test_bus import collector, consuming, dead_letters, producer_for, view
from tests.bus.test_topics import reelbus
from tests.conftest import TopicFactory, unique, until, wait_for

pytestmark = pytest.mark.infra


def records(layout: Layout, topic: str) -> list[Incoming]:
    return list(read(layout.bootstrap_servers, topic, None, None, follow=False, limit=None))


def ends(layout: Layout, topic: str, partitions: int) -> list[int]:
    consumer = Consumer({"bootstrap.servers": layout.bootstrap_servers, "group.id": "test-ends"})
    try:
        return [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)
        ]
    finally:
        consumer.close()


def produce_at(layout: Layout, topic: str, rows: list[tuple[int, bytes, bytes, int]]) -> None:
    """``(partition, key, value, timestamp_ms)`` rows, with a header, flushed."""
    producer = Producer({"bootstrap.servers": layout.bootstrap_servers, "enable.idempotence": True})
    for partition, key, value, ts in rows:
        producer.produce(
            topic, value=value, key=key, partition=partition, timestamp=ts, headers=[("origin", b"test")]
        )
    assert producer.flush(30) == 0


async def run(layout: Layout, *args: str) -> Any:
    return await asyncio.to_thread(reelbus, layout, *args)


async def test_replay_of_a_time_range_copies_exactly_that_range_with_headers_marked(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    _, source = await make_topic(partitions=2)
    _, target = await make_topic(partitions=2)
    base = int(time.time() * 1000) - 3_600_000
    rows = [
        (i % 2, f"k{batch}-{i}".encode(), f"v{batch}-{i}".encode(), base + batch * 10_000 + i)
        for batch in range(3)
        for i in range(4)
    ]
    await asyncio.to_thread(produce_at, bus_infra, source.name, rows)
    start = dt.datetime.fromtimestamp((base + 5_000) / 1000, dt.UTC).isoformat()
    window = ("--from", start, "--to", str(base + 15_000))

    dry = await run(bus_infra, "replay", source.name, *window, "--into", target.name, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "4 record(s)" in dry.stdout and "nothing written" in dry.stdout
    assert ends(bus_infra, target.name, 2) == [0, 0], "a dry run writes nothing"

    done = await run(bus_infra, "replay", source.name, *window, "--into", target.name)
    assert done.returncode == 0, done.stderr
    copied = await asyncio.to_thread(records, bus_infra, target.name)
    want = [(p, k, v) for p, k, v, ts in rows if base + 5_000 <= ts <= base + 15_000]
    assert sorted((m.partition, m.key, m.value) for m in copied) == sorted(want)
    for p in (0, 1):
        assert [m.value for m in copied if m.partition == p] == [v for q, _, v in want if q == p]
    for m in copied:
        headers = {k: header_bytes(v) for k, v in m.headers}
        assert headers["origin"] == b"test"
        mark = json.loads(headers["reelbus.replay"])
        assert mark["topic"] == source.name and mark["partition"] == m.partition
        assert mark["replayed_at"]


async def test_bad_input_is_refused_with_exit_2_and_nothing_written(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    _, source = await make_topic(partitions=1)
    _, target = await make_topic(partitions=1)
    base = int(time.time() * 1000) - 3_600_000
    await asyncio.to_thread(produce_at, bus_infra, source.name, [(0, b"k", b"v", base)])
    into = ("--into", target.name)
    lo, hi = str(base), str(base + 10)
    cases = [
        (("replay", f"test.nope.{unique('t')}", "--from", "0", *into), "does not exist"),
        (("replay", source.name, "--from", hi, "--to", lo, *into), "reversed"),
        (("replay", source.name, "--from-offset", "3", "--to-offset", "1", *into), "reversed"),
        (("replay", source.name, "--from", hi, "--to", str(base + 20), *into), "no records"),
        (("replay", source.name, "--from", lo, "--group", unique("no-such-group")), "unknown"),
        (("replay", source.name, "--from", lo, "--into", f"test.nope.{unique('t')}"), "does not exist"),
    ]
    for args, says in cases:
        result = await run(bus_infra, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert says in result.stderr, (args, result.stderr)
    assert ends(bus_infra, target.name, 1) == [0]


@asynccontextmanager
async def group_consumer(
    layout: Layout, contracts: Contracts, topic: Topic, group: str, handle: Any
) -> AsyncIterator[BusConsumer]:
    async with producer_for(layout, contracts, topic) as dead:
        consumer = BusConsumer(
            ConsumerConfig(layout.bootstrap_servers, group_id=group, topics=[topic.name]),
            contracts,
            Serde(contracts, RegistryClient(layout.registry_url)),
            {ViewRecorded.SCHEMA_NAME: handle},
            dead,
        )
        task = asyncio.create_task(consumer.run())
        try:
            yield consumer
        finally:
            consumer.stop()
            await asyncio.wait_for(task, 20)


def members(layout: Layout, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": layout.bootstrap_servers})
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(desc.members)


def committed(layout: Layout, topic: str, group: str) -> int:
    consumer = Consumer({"bootstrap.servers": layout.bootstrap_servers, "group.id": group})
    try:
        return int(consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset)
    finally:
        consumer.close()


async def test_a_rewound_group_reprocesses_exactly_the_range_and_an_active_group_is_refused(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    group = unique("test-replay-group")
    events = [view(position_ms=i) for i in range(5)]
    state: dict[str, int] = {}
    offsets: list[int] = []

    async def handle(event: ViewRecorded, record: Record) -> None:  # idempotent: keyed by event id
        state[str(event.event_id)] = event.position_ms
        offsets.append(record.offset)

    async with producer_for(bus_infra, contracts, topic) as producer:
        for e in events:
            await producer.send(topic.name, str(e.profile_id), e)
    async with group_consumer(bus_infra, contracts, topic, group, handle):
        await until(lambda: len(offsets) >= 5, "the five events")
        await wait_for(
            lambda: asyncio.to_thread(lambda: committed(bus_infra, topic.name, group) == 5), "a commit of 5"
        )
        refused = await run(bus_infra, "replay", topic.name, "--from-offset", "3", "--group", group)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "active member" in refused.stderr
    await wait_for(
        lambda: asyncio.to_thread(lambda: members(bus_infra, group) == 0), "the group to have no members"
    )
    assert committed(bus_infra, topic.name, group) == 5, "a refused rewind moves nothing"
    before = dict(state)

    dry = await run(bus_infra, "replay", topic.name, "--from-offset", "3", "--group", group, "--dry-run")
    assert dry.returncode == 0 and "2 record(s)" in dry.stdout, dry.stdout + dry.stderr
    assert committed(bus_infra, topic.name, group) == 5
    done = await run(bus_infra, "replay", topic.name, "--from-offset", "3", "--group", group)
    assert done.returncode == 0, done.stderr
    assert committed(bus_infra, topic.name, group) == 3

    offsets.clear()
    async with group_consumer(bus_infra, contracts, topic, group, handle):
        await wait_for(
            lambda: asyncio.to_thread(lambda: committed(bus_infra, topic.name, group) == 5), "a commit of 5"
        )
    assert offsets == [3, 4]
    assert state == before, "an idempotent handler leaves the state as it was"


async def test_dlq_list_show_and_redrive_a_real_dead_letter(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    seen, handle = collector()
    async with producer_for(bus_infra, contracts, topic) as producer:
        await producer.send_raw(topic.name, b"k1", b"this is not avro", [("origin", b"test")])
        good = view()
        await producer.send(topic.name, str(good.profile_id), good)
        async with consuming(
            bus_infra, contracts, topic, {ViewRecorded.SCHEMA_NAME: handle}, producer, RetryPolicy(attempts=1)
        ):
            await until(lambda: seen, "the good event")
            await wait_for(lambda: asyncio.to_thread(dead_letters, bus_infra, topic), "a dead letter")

    listed = await run(bus_infra, "dlq", "list", topic.name)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("0/0 ")
    assert "stage=decode" in lines[0] and "not Avro" in lines[0] and f"original={topic.name}/0/0" in lines[0]

    shown = await run(bus_infra, "dlq", "show", topic.name, "--offset", "0")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert "not Avro" in doc["headers"]["reelbus.dlq.reason"]
    assert doc["value_raw"] == "dGhpcyBpcyBub3QgYXZybw=="  # base64 of the original bytes

    dry = await run(bus_infra, "dlq", "redrive", topic.name, "--all", "--dry-run")
    assert dry.returncode == 0 and "would redrive" in dry.stdout, dry.stdout + dry.stderr
    assert ends(bus_infra, topic.name, 1) == [2]
    redriven = await run(bus_infra, "dlq", "redrive", topic.name, "--offset", "0")
    assert redriven.returncode == 0, redriven.stderr
    back = (await asyncio.to_thread(records, bus_infra, topic.name))[2:]
    assert [(m.key, m.value) for m in back] == [(b"k1", b"this is not avro")]
    headers = {k: header_bytes(v) for k, v in back[0].headers}
    assert headers["origin"] == b"test"
    assert headers["reelbus.redriven-from"] == f"{topic.dlq}/0/0".encode()
    assert not [k for k in headers if k.startswith("reelbus.dlq.")]

    again = await run(bus_infra, "dlq", "redrive", topic.name, "--all")
    assert again.returncode == 0 and "already redriven" in again.stdout, again.stdout + again.stderr
    assert ends(bus_infra, topic.name, 1) == [3], "a repeated redrive writes nothing"

    await asyncio.to_thread(produce_at, bus_infra, topic.dlq, [(0, b"k", b"bare", int(time.time() * 1000))])
    bare = await run(bus_infra, "dlq", "redrive", topic.name, "--offset", "1")
    assert bare.returncode == 2 and "no reelbus.dlq.* headers" in bare.stderr, bare.stderr
    assert ends(bus_infra, topic.name, 1) == [3]
