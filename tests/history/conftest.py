"""Fixtures for the history service's tests: the service as a process on its own keyspace and consumer
group, a producer of playback and profile events on the declared topics, tokens, and a CQL session
for looking inside the keyspace."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import DCAwareRoundRobinPolicy
from cassandra.query import dict_factory
from confluent_kafka import Consumer, TopicPartition

from services.bus.auth import TokenIssuer
from services.bus.contracts import Contracts
from services.bus.events import (
    DeviceType,
    Heartbeat,
    ProfileCreated,
    SessionStarted,
    SessionStopped,
    StopReason,
)
from services.bus.producer import Delivered, Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from tests.conftest import ServiceProcess, SpawnService, unique, wait_for

PLAYBACK = "playback.events"
PROFILES = "accounts.profiles"
VIEWS = "history.views"
ADMIN_SCOPES = ("history:admin",)


def at(seconds: float, base: datetime | None = None) -> datetime:
    """A millisecond-precise UTC time ``seconds`` after ``base`` (default: a fixed past moment)."""
    base = base or datetime(2026, 11, 20, 20, 0, tzinfo=UTC)
    when = base + timedelta(seconds=seconds)
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass
class Viewer:
    """A profile of an account of its own, with the events of its sessions."""

    account_id: uuid.UUID = field(default_factory=uuid.uuid4)
    profile_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def created(self) -> ProfileCreated:
        return ProfileCreated(account_id=self.account_id, profile_id=self.profile_id, name="test profile")

    def started(
        self, session_id: uuid.UUID, title_id: str, when: datetime, position_ms: int = 0, duration_ms: int = 0
    ) -> SessionStarted:
        return SessionStarted(
            event_time=when,
            session_id=session_id,
            account_id=self.account_id,
            profile_id=self.profile_id,
            title_id=title_id,
            device_type=DeviceType.TV,
            client_ip="192.0.2.10",
            appliance_id="oca-test-1",
            cdn_url="https://oca-test-1.example/manifest.mpd",
            initial_bitrate_kbps=3000,
            position_ms=position_ms,
            title_duration_ms=duration_ms or 3_600_000,
        )

    def heartbeat(
        self, session_id: uuid.UUID, title_id: str, when: datetime, position_ms: int, sequence: int = 1
    ) -> Heartbeat:
        return Heartbeat(
            event_time=when,
            session_id=session_id,
            profile_id=self.profile_id,
            title_id=title_id,
            sequence=sequence,
            position_ms=position_ms,
            bitrate_kbps=3000,
            buffer_ms=20_000,
            throughput_kbps=8000,
            rebuffer_ms=0,
        )

    def stopped(
        self,
        session_id: uuid.UUID,
        title_id: str,
        when: datetime,
        position_ms: int,
        watched_ms: int | None = None,
        reason: StopReason = StopReason.USER_STOPPED,
    ) -> SessionStopped:
        return SessionStopped(
            event_time=when,
            session_id=session_id,
            profile_id=self.profile_id,
            title_id=title_id,
            position_ms=position_ms,
            reason=reason,
            watched_ms=position_ms if watched_ms is None else watched_ms,
        )


class Bus:
    """Publishes playback and profile events to the declared topics."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer

    async def playback(self, *events: Any) -> Delivered:
        delivered: Delivered | None = None
        for event in events:
            delivered = await self.producer.send(PLAYBACK, str(event.session_id), event)
        assert delivered is not None
        return delivered

    async def profile(self, viewer: Viewer) -> Delivered:
        return await self.producer.send(PROFILES, str(viewer.account_id), viewer.created())


@pytest.fixture
async def bus(bus_infra: Layout, contracts: Contracts) -> AsyncIterator[Bus]:
    serde = Serde(contracts, RegistryClient(bus_infra.registry_url))
    producer = Producer(
        ProducerConfig(bus_infra.bootstrap_servers, client_id=unique("history-test")), contracts, serde
    )
    await producer.start([PLAYBACK, PROFILES])
    try:
        yield Bus(producer)
    finally:
        await producer.close()


@pytest.fixture(scope="session")
def cql(bus_infra: Layout) -> Iterator[Session]:
    """A CQL session for looking inside the test keyspaces (and dropping them)."""
    profile = ExecutionProfile(load_balancing_policy=DCAwareRoundRobinPolicy(), row_factory=dict_factory)
    cluster = Cluster(
        ["127.0.0.1"],
        port=bus_infra.cassandra_port,
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
    )
    session = cluster.connect()
    yield session
    cluster.shutdown()


@pytest.fixture
async def keyspace(cql: Session) -> AsyncIterator[str]:
    name = f"history_test_{uuid.uuid4().hex[:12]}"
    yield name
    await asyncio.to_thread(cql.execute, f"DROP KEYSPACE IF EXISTS {name}", timeout=60)


def _group_consumer(layout: Layout, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": layout.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )


def start_at_end(layout: Layout, group: str, topics: list[str]) -> None:
    """Commit the group's offsets at the current end of ``topics``: the service then sees only what a
    test publishes from now on, not the backlog other tests left on the shared declared topics."""
    consumer = _group_consumer(layout, group)
    try:
        offsets = []
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            for partition in meta.partitions:
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                offsets.append(TopicPartition(topic, partition, high))
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def committed(layout: Layout, group: str, topic: str, partition: int) -> int:
    consumer = _group_consumer(layout, group)
    try:
        [tp] = consumer.committed([TopicPartition(topic, partition)], timeout=10)
        return int(tp.offset)
    finally:
        consumer.close()


@dataclass
class History:
    """The running service and what a test needs to talk to it."""

    process: ServiceProcess
    layout: Layout
    group: str
    keyspace: str
    http: aiohttp.ClientSession
    issuer: TokenIssuer

    @property
    def url(self) -> str:
        return self.process.url

    def token(self, viewer: Viewer, scopes: tuple[str, ...] = ()) -> str:
        return self.issuer.issue(str(viewer.account_id), "device-1", "TV", scopes)

    def admin_token(self) -> str:
        return self.issuer.issue(str(uuid.uuid4()), "ops-console", "DESKTOP_BROWSER", ADMIN_SCOPES)

    async def request(
        self, method: str, path: str, token: str | None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(method, self.url + path, headers=all_headers) as resp:
            body = await resp.read()
            return resp.status, json.loads(body) if body else None

    async def history(self, viewer: Viewer, *, full: bool = False, limit: int = 1000) -> dict[str, Any]:
        path = f"/v1/profiles/{viewer.profile_id}/history?limit={limit}&full={'true' if full else 'false'}"
        status, body = await self.request("GET", path, self.token(viewer))
        assert status == 200, (status, body)
        assert isinstance(body, dict)
        return body

    async def resume(self, viewer: Viewer, title_id: str) -> int:
        path = f"/v1/profiles/{viewer.profile_id}/titles/{title_id}/resume"
        status, body = await self.request("GET", path, self.token(viewer))
        assert status == 200, (status, body)
        return int(body["position_ms"])

    async def rollup(self, viewer: Viewer, keep_live: int, force: bool = False) -> dict[str, Any]:
        path = f"/v1/internal/history/{viewer.profile_id}/rollup?keep_live={keep_live}"
        if force:
            path += "&force=true"
        status, body = await self.request("POST", path, self.admin_token())
        assert status == 200, (status, body)
        assert isinstance(body, dict)
        return body

    async def known(self, viewer: Viewer) -> None:
        """Wait until the ProfileCreated projection has the profile."""

        async def probe() -> bool:
            path = f"/v1/profiles/{viewer.profile_id}/history"
            status, _ = await self.request("GET", path, self.token(viewer))
            return status == 200

        await wait_for(probe, f"profile {viewer.profile_id} to be known", 60)

    async def processed(self, delivered: Delivered) -> None:
        """Wait until the service has handled (and committed) the record at ``delivered``."""

        async def probe() -> bool:
            offset = await asyncio.to_thread(
                committed, self.layout, self.group, delivered.topic, delivered.partition
            )
            return offset > delivered.offset

        await wait_for(probe, f"{delivered.topic}[{delivered.partition}]@{delivered.offset} handled", 60, 0.2)


@pytest.fixture
async def start_history(
    bus_infra: Layout, spawn_service: SpawnService, keyspace: str, token_issuer: TokenIssuer
) -> AsyncIterator[Any]:
    """``await start_history(**env)``: the service on this test's keyspace and group, ready."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(**env: str) -> History:
        group = unique("history-test")
        await asyncio.to_thread(start_at_end, bus_infra, group, [PLAYBACK, PROFILES])
        settings = {
            "HISTORY_KEYSPACE": keyspace,
            "HISTORY_GROUP_ID": group,
            "HISTORY_ROLLUP_INTERVAL": "0",
            "HISTORY_CASSANDRA_PORT": str(bus_infra.cassandra_port),
            "HISTORY_SHUTDOWN_GRACE_SECONDS": "10",
            **env,
        }
        process = spawn_service("services.history", "HISTORY_", **settings)
        await process.wait_ready(90)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        sessions.append(http)
        return History(process, bus_infra, group, keyspace, http, token_issuer)

    yield start
    for http in sessions:
        await http.close()
