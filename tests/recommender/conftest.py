"""Fixtures for the recommender's tests: private copies of its topics (a prefix), a producer of
profiles, titles and viewings on them, the service as a process, and a reader of its lists."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from services.bus.admin import Admin
from services.bus.contracts import Contracts
from services.bus.events import (
    ChangeType,
    ProfileCreated,
    RecommendedItem,
    TitleChanged,
    TitleSnapshot,
    ViewRecorded,
)
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from services.recommender.handlers import COWATCH, LISTS, PROFILES, TITLES, VIEWS
from tests.conftest import ServiceProcess, SpawnService, unique

CHANGELOG = "recommender-profiles-changelog"
NAMES = (VIEWS, COWATCH, LISTS, PROFILES, TITLES, CHANGELOG)
BASE = datetime(2026, 11, 1, tzinfo=UTC)


def at(hours: float) -> datetime:
    when = BASE + timedelta(hours=hours)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


@dataclass
class Topics:
    prefix: str
    contracts: Contracts

    def name(self, declared: str) -> str:
        return self.prefix + declared


@pytest.fixture
async def topics(contracts: Contracts, admin: Admin) -> AsyncIterator[Topics]:
    prefix = f"test.{uuid.uuid4().hex[:10]}."
    copies = [replace(contracts.topic(n), name=prefix + n) for n in NAMES]
    extended = contracts.with_topics(copies)
    plan = await asyncio.to_thread(admin.apply, extended, [c.name for c in copies])
    assert not plan.refusals, plan.refusals
    yield Topics(prefix, extended)
    await asyncio.to_thread(admin.delete_topics, [n for c in copies for n in (c.name, c.dlq)])


@dataclass
class Feed:
    """Publishes profiles, titles and viewings to the test's copies of the topics."""

    producer: Producer
    topics: Topics
    accounts: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)

    async def profile(self, profile_id: uuid.UUID, account_id: uuid.UUID | None = None) -> None:
        account = account_id or uuid.uuid4()
        self.accounts[profile_id] = account
        event = ProfileCreated(account_id=account, profile_id=profile_id, name="p")
        await self.producer.send(self.topics.name(PROFILES), str(account), event)

    async def titles(self, *title_ids: str) -> None:
        items = [
            (
                t,
                TitleChanged(
                    title_id=t,
                    change=ChangeType.CREATED,
                    fields_changed=[],
                    title_version=1,
                    title=TitleSnapshot(
                        name=f"Title {t}",
                        genres=["drama"],
                        runtime_ms=3_600_000,
                        release_year=2000,
                        maturity_rating="PG",
                        ladder_kbps=[300, 1200],
                    ),
                ),
            )
            for t in title_ids
        ]
        await self.producer.send_batch(self.topics.name(TITLES), items)

    def view(
        self, profile_id: uuid.UUID, title_id: str, when: datetime, completed: bool = True
    ) -> ViewRecorded:
        return ViewRecorded(
            event_time=when,
            profile_id=profile_id,
            account_id=self.accounts.get(profile_id, uuid.uuid4()),
            title_id=title_id,
            session_id=uuid.uuid4(),
            position_ms=3_600_000 if completed else 60_000,
            duration_ms=3_600_000,
            watched_ms=3_600_000 if completed else 60_000,
            watched_at=when,
            completed=completed,
        )

    async def views(self, *events: ViewRecorded) -> None:
        items = [(str(e.profile_id), e) for e in events]
        await self.producer.send_batch(self.topics.name(VIEWS), items)


@pytest.fixture
async def feed(bus_infra: Layout, topics: Topics) -> AsyncIterator[Feed]:
    serde = Serde(topics.contracts, RegistryClient(bus_infra.registry_url))
    producer = Producer(
        ProducerConfig(bus_infra.bootstrap_servers, client_id=unique("recommender-test")),
        topics.contracts,
        serde,
    )
    await producer.start([topics.name(n) for n in (VIEWS, PROFILES, TITLES)])
    try:
        yield Feed(producer, topics)
    finally:
        await producer.close()


StartRecommender = Callable[..., ServiceProcess]


@pytest.fixture
def start_recommender(spawn_service: SpawnService, topics: Topics, tmp_path: Path) -> StartRecommender:
    def start(instance: str = "r0", data: str | None = None, **env: str) -> ServiceProcess:
        return spawn_service(
            "services.recommender",
            "RECOMMENDER_",
            RECOMMENDER_TOPIC_PREFIX=topics.prefix,
            RECOMMENDER_INSTANCE_ID=instance,
            RECOMMENDER_DATA_DIR=str(tmp_path / (data or instance)),
            RECOMMENDER_REFRESH_INTERVAL_SECONDS="0.3",
            RECOMMENDER_LOOKUP_SYNC_SECONDS="2",
            RECOMMENDER_SESSION_TIMEOUT_SECONDS="6",
            RECOMMENDER_SHUTDOWN_GRACE_SECONDS="15",
            **env,
        )

    return start


def read_lists(layout: Layout, serde: Serde, topic: str) -> dict[uuid.UUID, list[RecommendedItem]]:
    """Every profile's latest list on the (compacted) topic, read from the beginning to its end."""
    consumer = Consumer(
        {
            "bootstrap.servers": layout.bootstrap_servers,
            "group.id": unique("lists-reader"),
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    out: dict[uuid.UUID, list[RecommendedItem]] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {}
        tps = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                tps.append(TopicPartition(topic, p, low))
        if not tps:
            return out
        consumer.assign(tps)
        done: dict[int, int] = {}
        while any(done.get(p, -1) + 1 < end for p, end in ends.items()):
            msg = consumer.poll(5.0)
            if msg is None:
                break
            if msg.error():
                continue
            event = _decode(serde, msg.value())
            out[event.profile_id] = list(event.items)
            done[msg.partition() or 0] = msg.offset() or 0
    finally:
        consumer.close()
    return out


def _decode(serde: Serde, data: bytes | None) -> Any:
    from services.bus.serde import SchemaNotCached

    try:
        return serde.decode_event_nowait(None, data)
    except SchemaNotCached as exc:
        serde._readers[exc.schema_id] = serde._reader_for(exc.schema_id)
        return serde.decode_event_nowait(None, data)


@dataclass
class Worker:
    """A recommender worker process with the helpers the tests need."""

    process: ServiceProcess
    token: str

    def status(self) -> dict[str, Any]:
        return dict(http_json_auth(f"{self.process.url}/v1/internal/recommender/status", self.token))


def http_json_auth(url: str, token: str, timeout: float = 5.0) -> Any:
    import json
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())
