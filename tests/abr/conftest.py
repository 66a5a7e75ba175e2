"""Fixtures for the live ABR service's tests: the service as a process on its own consumer group and
Redis key prefix (the group starts at the end of the shared topics), a bus producer for the topics it
reads, a reader of telemetry.bitrate, and a Redis client to look into the read model."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, TopicPartition
from redis.asyncio import Redis

from services.bus.contracts import Contracts
from services.bus.events import AvroEvent
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from tests.conftest import ServiceProcess, SpawnService, unique, wait_for

# playback's fixtures, for the heartbeat test that runs the real playback service
from tests.playback.conftest import playback_db, publisher, start_playback, world  # noqa: F401

PLAYBACK_EVENTS = "playback.events"
TELEMETRY = "telemetry.bitrate"
CONSUMED = (PLAYBACK_EVENTS, TELEMETRY)


def skip_history(layout: Layout, group: str) -> None:
    """Commit the consumed topics' end offsets for ``group``: the service sees only what comes now."""
    client = Consumer(
        {"bootstrap.servers": layout.bootstrap_servers, "group.id": group, "enable.auto.commit": False}
    )
    try:
        meta = client.list_topics(timeout=10.0)
        ends = []
        for name in CONSUMED:
            for partition in meta.topics[name].partitions:
                tp = TopicPartition(name, partition)
                high = client.get_watermark_offsets(tp, timeout=10.0)[1]
                ends.append(TopicPartition(name, partition, high))
        client.commit(offsets=ends, asynchronous=False)
    finally:
        client.close()


@dataclass
class Abr:
    process: ServiceProcess
    prefix: str  # its Redis key prefix

    @property
    def url(self) -> str:
        return self.process.url

    def metric(self, name: str, **labels: str) -> float:
        """A counter's value from /metrics (0 when not yet counted)."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=20) as resp:
            text = resp.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = re.compile(rf"^{re.escape(name)}_total\{{{re.escape(want)}\}} (\S+)$", re.M)
        found = pattern.search(text)
        return float(found.group(1)) if found else 0.0


StartAbr = Callable[..., Awaitable[Abr]]


@pytest.fixture
def start_abr(spawn_service: SpawnService, bus_infra: Layout) -> StartAbr:
    async def start(**env: str) -> Abr:
        group = unique("abr")
        prefix = unique("test-abr")
        await asyncio.to_thread(skip_history, bus_infra, group)
        process = spawn_service(
            "services.abr",
            "ABR_",
            ABR_GROUP_ID=group,
            ABR_REDIS_URL=f"redis://127.0.0.1:{bus_infra.redis_port}/0",
            ABR_REDIS_KEY_PREFIX=prefix,
            ABR_SHUTDOWN_GRACE_SECONDS="10",
            OTEL_SERVICE_NAME="abr",
            **env,
        )
        await process.wait_ready()
        return Abr(process, prefix)

    return start


@pytest.fixture(scope="module")
async def bus(bus_infra: Layout) -> AsyncIterator[Producer]:
    """The bus producer, for playback.events (as playback) and telemetry.bitrate (as any sender)."""
    contracts = Contracts.load()
    serde = Serde(contracts, RegistryClient(bus_infra.registry_url))
    producer = Producer(
        ProducerConfig(bus_infra.bootstrap_servers, client_id=unique("abr-test")), contracts, serde
    )
    await producer.start(list(CONSUMED))
    yield producer
    await producer.close()


@pytest.fixture
async def redis(bus_infra: Layout) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{bus_infra.redis_port}/0")
    yield client
    await client.aclose()


async def read_model(redis: Redis, abr: Abr, session_id: str) -> dict[str, Any]:
    raw = await redis.hgetall(f"{abr.prefix}:session:{session_id}")
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class TopicReader:
    """Reads a topic from the end offsets it saw when it was made, decoding as it goes."""

    def __init__(self, layout: Layout, topic: str) -> None:
        contracts = Contracts.load()
        self.name = topic
        self.topic = contracts.topic(topic)
        self.serde = Serde(contracts, RegistryClient(layout.registry_url))
        self.consumer = Consumer(
            {
                "bootstrap.servers": layout.bootstrap_servers,
                "group.id": unique("abr-test-reader"),
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        meta = self.consumer.list_topics(topic, timeout=10.0).topics[topic]
        self.partitions = sorted(meta.partitions)
        self.positions = {p: self._high(p) for p in self.partitions}
        self.consumer.assign([TopicPartition(topic, p, o) for p, o in self.positions.items()])
        self.seen: list[tuple[str, AvroEvent]] = []

    def _high(self, partition: int) -> int:
        tp = TopicPartition(self.name, partition)
        return int(self.consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)[1])

    async def poll(self) -> None:
        batch = await asyncio.to_thread(self.consumer.consume, 500, 0.2)
        for msg in batch:
            if msg.error() is not None:
                continue
            self.positions[msg.partition() or 0] = (msg.offset() or 0) + 1
            key = await self.serde.decode_key(msg.key())
            event = await self.serde.decode_event(self.topic, msg.value())
            self.seen.append((str(key), event))

    def keyed(self, key: str) -> list[AvroEvent]:
        return [event for k, event in self.seen if k == key]

    async def drain(self, timeout: float = 30.0) -> None:
        """Read up to the end offsets as they are now."""
        ends = {p: await asyncio.to_thread(self._high, p) for p in self.partitions}

        async def probe() -> bool:
            await self.poll()
            return all(self.positions[p] >= end for p, end in ends.items())

        await wait_for(probe, f"{self.name} to be read to its end", timeout, interval=0.0)

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
async def telemetry(bus_infra: Layout) -> AsyncIterator[TopicReader]:
    reader = await asyncio.to_thread(TopicReader, bus_infra, TELEMETRY)
    yield reader
    await asyncio.to_thread(reader.close)
