"""Fixtures and helpers for playback's integration tests: its own database, a bus producer for the
topics playback consumes, a reader of playback.events, the service as a process, and builders of the
events the other services would publish (unique ids per test: the declared topics are shared)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from services.bus.auth import TokenIssuer
from services.bus.contracts import Contracts
from services.bus.events import (
    ApplianceContents,
    ApplianceHealth,
    AvroEvent,
    ChangeType,
    Plan,
    ProfileCreated,
    SubscriptionStarted,
    TitleChanged,
    TitleSnapshot,
)
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import infra
from services.cli.infra import Layout
from tests.conftest import ServiceProcess, SpawnService, unique, wait_for

PLAYBACK_EVENTS = "playback.events"
CONSUMED = ("billing.events", "accounts.profiles", "catalog.changes", "opencdn.appliances")
RUNTIME_MS = 5_400_000
LADDER = [235, 750, 1750, 3000, 5800]
DAY = timedelta(days=1)


def now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


# -- infrastructure -----------------------------------------------------------------------------


@pytest.fixture
async def playback_db(bus_infra: Layout) -> AsyncIterator[str]:
    name = unique("playback").replace("-", "_")
    await asyncio.to_thread(infra.ensure_database, bus_infra, name)
    yield f"postgresql://reelbus@127.0.0.1:{bus_infra.postgres_port}/{name}"
    await asyncio.to_thread(infra.psql, bus_infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
async def publisher(bus_infra: Layout) -> AsyncIterator[Producer]:
    """The bus producer, for the topics playback consumes (as billing, accounts, catalog, opencdn)."""
    contracts = Contracts.load()
    serde = Serde(contracts, RegistryClient(bus_infra.registry_url))
    producer = Producer(
        ProducerConfig(bus_infra.bootstrap_servers, client_id=unique("playback-test")), contracts, serde
    )
    await producer.start(list(CONSUMED))
    yield producer
    await producer.close()


async def publish(producer: Producer, topic: str, key: str, *events: AvroEvent) -> None:
    for event in events:
        await producer.send(topic, key, event)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class PlaybackEvents:
    """Reads playback.events from the end offsets it saw when it was made, decoding as it goes."""

    def __init__(self, layout: Layout) -> None:
        contracts = Contracts.load()
        self.topic = contracts.topic(PLAYBACK_EVENTS)
        self.serde = Serde(contracts, RegistryClient(layout.registry_url))
        self.consumer = Consumer(
            {
                "bootstrap.servers": layout.bootstrap_servers,
                "group.id": unique("playback-test-reader"),
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        meta = self.consumer.list_topics(PLAYBACK_EVENTS, timeout=10.0).topics[PLAYBACK_EVENTS]
        self.partitions = sorted(meta.partitions)
        self.positions = {p: self._high(p) for p in self.partitions}  # the next offset to read
        self.consumer.assign([TopicPartition(PLAYBACK_EVENTS, p, o) for p, o in self.positions.items()])
        self.seen: list[tuple[str, AvroEvent]] = []

    def _high(self, partition: int) -> int:
        tp = TopicPartition(PLAYBACK_EVENTS, partition)
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

    async def wait_keyed(self, key: str, count: int, what: str, timeout: float = 30.0) -> list[AvroEvent]:
        async def probe() -> list[AvroEvent] | None:
            await self.poll()
            found = self.keyed(key)
            return found if len(found) >= count else None

        return await wait_for(probe, what, timeout, interval=0.0)

    async def drain(self, timeout: float = 30.0) -> None:
        """Read up to the end offsets as they are now."""
        ends = {p: await asyncio.to_thread(self._high, p) for p in self.partitions}

        async def probe() -> bool:
            await self.poll()
            return all(self.positions[p] >= end for p, end in ends.items())

        await wait_for(probe, "playback.events to be read to its end", timeout, interval=0.0)

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
async def playback_events(bus_infra: Layout) -> AsyncIterator[PlaybackEvents]:
    reader = await asyncio.to_thread(PlaybackEvents, bus_infra)
    yield reader
    await asyncio.to_thread(reader.close)


# -- the service --------------------------------------------------------------------------------


def appliance(kind: str, prefixes: Sequence[str] = (), site: str = "lax") -> dict[str, Any]:
    """A declared appliance with a unique id."""
    appliance_id = unique(f"oca-{kind}")
    entry: dict[str, Any] = {
        "id": appliance_id,
        "base_url": f"https://{appliance_id}.example.net",
        "kind": kind,
    }
    if kind == "embedded":
        entry["prefixes"] = list(prefixes)
    else:
        entry["site"] = site
    return entry


def title_url(entry: dict[str, Any], title_id: str) -> str:
    return f"{entry['base_url']}/titles/{title_id}/"


StartPlayback = Callable[..., ServiceProcess]


def skip_history(layout: Layout, group: str) -> None:
    """Commit the consumed topics' current end offsets for ``group``, so a service of that group
    projects only what is published from now on, not every other test's history on the shared topics.
    Blocking."""
    client = Consumer(
        {"bootstrap.servers": layout.bootstrap_servers, "group.id": group, "enable.auto.commit": False}
    )
    try:
        meta = client.list_topics(timeout=10.0)
        ends = []
        for name in CONSUMED:
            for partition in meta.topics[name].partitions:
                tp = TopicPartition(name, partition)
                ends.append(
                    TopicPartition(name, partition, client.get_watermark_offsets(tp, timeout=10.0)[1])
                )
        client.commit(offsets=ends, asynchronous=False)
    finally:
        client.close()


@pytest.fixture
async def start_playback(
    spawn_service: SpawnService, playback_db: str, tmp_path: Path, bus_infra: Layout
) -> StartPlayback:
    """Start playback with these appliances declared, its own database and consumer group. The group
    starts at the end of the shared topics as they are when the test begins (see ``skip_history``)."""
    group = unique("playback")
    await asyncio.to_thread(skip_history, bus_infra, group)

    def start(appliances: Sequence[dict[str, Any]], **env: str) -> ServiceProcess:
        path = tmp_path / f"appliances-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump({"appliances": list(appliances)}))
        settings = {
            "PLAYBACK_DATABASE_URL": playback_db,
            "PLAYBACK_APPLIANCES_FILE": str(path),
            "PLAYBACK_GROUP_ID": group,
            "PLAYBACK_SHUTDOWN_GRACE_SECONDS": "10",
            "OTEL_SERVICE_NAME": "playback",
            **env,
        }
        return spawn_service("services.playback", "PLAYBACK_", **settings)

    return start


# -- the world other services describe --------------------------------------------------------


@dataclass
class Viewer:
    account_id: uuid.UUID
    profile_id: uuid.UUID
    subscription_id: uuid.UUID
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def new_viewer(issuer: TokenIssuer) -> Viewer:
    account = uuid.uuid4()
    return Viewer(account, uuid.uuid4(), uuid.uuid4(), issuer.issue(str(account), "dev-1", "tv"))


def profile_created(viewer: Viewer) -> ProfileCreated:
    return ProfileCreated(account_id=viewer.account_id, profile_id=viewer.profile_id, name="Ada")


def subscription_started(
    viewer: Viewer, start: datetime | None = None, end: datetime | None = None, at: datetime | None = None
) -> SubscriptionStarted:
    start = start or now() - DAY
    return SubscriptionStarted(
        event_time=at or start,
        account_id=viewer.account_id,
        subscription_id=viewer.subscription_id,
        plan=Plan.STANDARD,
        amount_cents=1599,
        currency="USD",
        period_start=start,
        period_end=end or start + 30 * DAY,
    )


def title_created(title_id: str, version: int = 1, ladder: Sequence[int] = LADDER) -> TitleChanged:
    return TitleChanged(
        title_id=title_id,
        change=ChangeType.CREATED if version == 1 else ChangeType.UPDATED,
        fields_changed=[],
        title_version=version,
        title=TitleSnapshot(
            name=f"Title {title_id}",
            genres=["drama"],
            runtime_ms=RUNTIME_MS,
            release_year=2026,
            maturity_rating="TV-14",
            ladder_kbps=list(ladder),
        ),
    )


def health(entry: dict[str, Any], healthy: bool = True, load: float = 0.3) -> ApplianceHealth:
    return ApplianceHealth(
        appliance_id=entry["id"],
        healthy=healthy,
        load=load,
        reported_at=now(),
        base_url=entry["base_url"],
        site=entry.get("site"),
    )


def contents(
    entry: dict[str, Any], titles: Sequence[str], full: bool = True, removed: Sequence[str] = ()
) -> ApplianceContents:
    return ApplianceContents(
        appliance_id=entry["id"], title_ids=list(titles), full_snapshot=full, removed_title_ids=list(removed)
    )


@dataclass
class World:
    """Publishes what billing, accounts, catalog and opencdn would say."""

    producer: Producer

    async def viewer(self, viewer: Viewer, subscribed: bool = True) -> Viewer:
        await publish(self.producer, "accounts.profiles", str(viewer.account_id), profile_created(viewer))
        if subscribed:
            await publish(
                self.producer, "billing.events", str(viewer.account_id), subscription_started(viewer)
            )
        return viewer

    async def billing(self, viewer: Viewer, *events: AvroEvent) -> None:
        await publish(self.producer, "billing.events", str(viewer.account_id), *events)

    async def title(self, *events: TitleChanged) -> None:
        for event in events:
            await publish(self.producer, "catalog.changes", event.title_id, event)

    async def appliance(self, *events: ApplianceHealth | ApplianceContents) -> None:
        for event in events:
            await publish(self.producer, "opencdn.appliances", event.appliance_id, event)


@pytest.fixture
def world(publisher: Producer) -> World:
    return World(publisher)


# -- the API ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any


@dataclass
class Api:
    http: aiohttp.ClientSession
    base: str

    async def call(
        self, path: str, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> Reply:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.http.post(f"{self.base}{path}", headers=headers or {}, **kwargs) as resp:
            try:
                payload = await resp.json(content_type=None)
            except ValueError:
                payload = await resp.text()
            return Reply(resp.status, payload)

    async def start(self, viewer: Viewer, title_id: str, client: str | None = None, **extra: Any) -> Reply:
        headers = dict(viewer.headers)
        if client is not None:
            headers["X-Forwarded-For"] = client
        body = {"profile_id": str(viewer.profile_id), "title_id": title_id, **extra}
        return await self.call("/v1/playback/sessions", body, headers)

    async def heartbeat(self, viewer: Viewer, session_id: str, **fields: Any) -> Reply:
        body = {"position_ms": 60_000, "bitrate_kbps": 1750, "buffer_ms": 20_000, "throughput_kbps": 6000,
                "rebuffer_ms": 0}  # fmt: skip
        body.update(fields)
        return await self.call(f"/v1/playback/sessions/{session_id}/heartbeats", body, viewer.headers)

    async def stop(self, viewer: Viewer, session_id: str, position_ms: int = 120_000) -> Reply:
        body = {"position_ms": position_ms}
        return await self.call(f"/v1/playback/sessions/{session_id}/stop", body, viewer.headers)

    async def start_when(
        self,
        viewer: Viewer,
        title_id: str,
        accept: Callable[[Reply], bool],
        what: str,
        client: str | None = None,
        timeout: float = 30.0,
    ) -> Reply:
        """Poll session starts until ``accept`` likes the reply (the projections are eventual)."""

        async def probe() -> Reply | None:
            reply = await self.start(viewer, title_id, client)
            return reply if accept(reply) else None

        return await wait_for(probe, what, timeout, interval=0.2)


def cdn_is(expected: list[str]) -> Callable[[Reply], bool]:
    return lambda reply: reply.status == 201 and reply.body["manifest"]["cdn"] == expected


def status_is(status: int) -> Callable[[Reply], bool]:
    return lambda reply: reply.status == status


async def running(service: ServiceProcess, http: aiohttp.ClientSession) -> Api:
    await service.wait_ready()
    return Api(http, service.url)
