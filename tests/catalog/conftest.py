"""Fixtures for the catalog's tests: its own database and cache prefix per test, catalog replicas as
processes, an HTTP client with tokens, and a reader of ``catalog.changes`` from a mark.

``catalog.changes`` is a declared, shared topic (the runtime cannot be pointed at a private copy), so
each replica gets a consumer group of its own positioned at the end of the topic before it starts: it
sees the events of this test, not the history of every earlier run. Tests tell their events apart by
title id; the titles whose cache behaviour they assert are created by the test, under random ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, TopicPartition
from redis.asyncio import Redis

from services.bus.auth import TokenIssuer
from services.bus.consumer import Incoming
from services.bus.contracts import Contracts
from services.bus.events import TitleChanged
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.tracing import header_bytes
from services.cli import infra
from services.cli.infra import Layout
from tests.conftest import ServiceProcess, SpawnService, unique, wait_for

TOPIC = "catalog.changes"
WRITE = ["catalog:write"]
TITLE_BODY: dict[str, Any] = {
    "name": "The Test Pattern",
    "genres": ["documentary"],
    "runtime_ms": 5_400_000,
    "release_year": 2024,
    "maturity_rating": "PG",
    "ladder_kbps": [235, 750, 1750, 3000],
}


@pytest.fixture
async def catalog_db(bus_infra: Layout) -> AsyncIterator[str]:
    name = unique("catalog").replace("-", "_")
    await asyncio.to_thread(infra.ensure_database, bus_infra, name)
    yield f"postgresql://reelbus@127.0.0.1:{bus_infra.postgres_port}/{name}"
    await asyncio.to_thread(infra.psql, bus_infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_url(layout: Layout) -> str:
    return f"redis://127.0.0.1:{layout.redis_port}/0"


@pytest.fixture
async def cache_prefix(bus_infra: Layout) -> AsyncIterator[str]:
    prefix = unique("test-catalog") + ":"
    yield prefix
    redis = Redis.from_url(redis_url(bus_infra))
    try:
        keys = [k async for k in redis.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


def end_offsets(bootstrap: str, topic: str = TOPIC) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("mark"), "log_level": 3})
    try:
        meta = consumer.list_topics(topic, timeout=10.0).topics[topic]
        return [
            TopicPartition(
                topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10.0)[1]
            )
            for p in sorted(meta.partitions)
        ]
    finally:
        consumer.close()


def position_group_at_end(bootstrap: str, group: str, topic: str = TOPIC) -> None:
    """Commit the end offsets for ``group``, so a replica using it starts at the head of the topic."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "log_level": 3}
    )
    try:
        consumer.commit(offsets=end_offsets(bootstrap, topic), asynchronous=False)
    finally:
        consumer.close()


StartCatalog = Callable[..., Awaitable[ServiceProcess]]


@pytest.fixture
def start_catalog(
    catalog_db: str, cache_prefix: str, spawn_service: SpawnService, bus_infra: Layout
) -> StartCatalog:
    """Start a catalog replica on ``database_url`` with cache prefix ``prefix``; waits until ready.

    It depends on ``catalog_db`` and ``cache_prefix`` before ``spawn_service`` so that the replicas
    are stopped before the test's database is dropped and its cache keys deleted."""

    async def start(database_url: str, prefix: str, **env: str) -> ServiceProcess:
        group = unique("catalog-replica")
        await asyncio.to_thread(position_group_at_end, bus_infra.bootstrap_servers, group)
        settings = {
            "CATALOG_DATABASE_URL": database_url,
            "CATALOG_REDIS_URL": redis_url(bus_infra),
            "CATALOG_CACHE_KEY_PREFIX": prefix,
            "CATALOG_GROUP_ID": group,
        }
        service = spawn_service("services.catalog", "CATALOG_", **{**settings, **env})
        await service.wait_ready(90)
        return service

    return start


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def cache(self) -> str | None:
        return self.headers.get("X-Cache")


class Api:
    """Calls a catalog replica with a bearer token."""

    def __init__(self, session: aiohttp.ClientSession, issuer: TokenIssuer) -> None:
        self.session = session
        self.issuer = issuer

    def token(self, scopes: list[str] | None = None) -> str:
        return self.issuer.issue(unique("account"), unique("device"), "tv", scopes=scopes or [])

    async def call(
        self,
        service: ServiceProcess,
        method: str,
        path: str,
        body: Any = None,
        scopes: list[str] | None = None,
        token: str | None = "auto",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        headers = {"Content-Type": "application/json", **(headers or {})}
        if token == "auto":
            token = self.token(scopes)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        async with self.session.request(method, service.url + path, data=data, headers=headers) as resp:
            text = await resp.text()
            return Response(resp.status, dict(resp.headers), json.loads(text) if text else None)

    async def get(self, service: ServiceProcess, path: str, **kw: Any) -> Response:
        return await self.call(service, "GET", path, **kw)

    async def create(self, service: ServiceProcess, **changes: Any) -> dict[str, Any]:
        resp = await self.call(service, "POST", "/v1/catalog/titles", {**TITLE_BODY, **changes}, WRITE)
        assert resp.status == 201, resp
        created: dict[str, Any] = resp.body
        return created


@pytest.fixture
async def api(token_issuer: TokenIssuer) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield Api(session, token_issuer)


async def metric(service: ServiceProcess, api: Api, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    async with api.session.get(service.url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


class ChangesTail:
    """The ``catalog.changes`` records written after ``mark()``, decoded."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.serde = Serde(Contracts.load(), RegistryClient(layout.registry_url))
        self.marks: list[TopicPartition] = []

    async def mark(self) -> None:
        self.marks = await asyncio.to_thread(end_offsets, self.layout.bootstrap_servers)

    def _read(self) -> list[Incoming]:
        ends = {tp.partition: tp.offset for tp in end_offsets(self.layout.bootstrap_servers)}
        starts = [tp for tp in self.marks if tp.offset < ends[tp.partition]]
        if not starts:
            return []
        consumer = Consumer(
            {
                "bootstrap.servers": self.layout.bootstrap_servers,
                "group.id": unique("tail"),
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        out: list[Incoming] = []
        try:
            consumer.assign([TopicPartition(TOPIC, tp.partition, tp.offset) for tp in starts])
            remaining = {tp.partition for tp in starts}
            while remaining:
                for msg in consumer.consume(500, 0.5):
                    if msg.error() is not None:
                        continue
                    record = Incoming.of(msg)
                    if record.offset < ends[record.partition]:
                        out.append(record)
                    if record.offset + 1 >= ends[record.partition]:
                        remaining.discard(record.partition)
        finally:
            consumer.close()
        return out

    async def records(self) -> list[tuple[str, TitleChanged, dict[str, bytes]]]:
        """(key, event, headers) since the mark, in partition order."""
        out: list[tuple[str, TitleChanged, dict[str, bytes]]] = []
        for record in await asyncio.to_thread(self._read):
            event = await self.serde.decode_event(None, record.value)
            if isinstance(event, TitleChanged):
                key = str(await self.serde.decode_key(record.key))
                out.append((key, event, {k: header_bytes(v) for k, v in record.headers}))
        return out

    async def events(self) -> list[tuple[str, TitleChanged]]:
        return [(key, event) for key, event, _ in await self.records()]

    async def wait_for_events(
        self,
        accept: Callable[[list[TitleChanged]], bool],
        title_ids: set[str],
        what: str,
        timeout: float = 30,
    ) -> list[TitleChanged]:
        """Poll until the events of ``title_ids`` since the mark satisfy ``accept``."""

        async def probe() -> list[TitleChanged] | None:
            found = [e for key, e in await self.events() if key in title_ids and e.title_id == key]
            return found if found and accept(found) else None

        return await wait_for(probe, what, timeout, interval=0.5)


@pytest.fixture
async def changes(bus_infra: Layout) -> ChangesTail:
    tail = ChangesTail(bus_infra)
    await tail.mark()
    return tail
