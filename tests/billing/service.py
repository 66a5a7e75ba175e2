"""Starting the billing service as a process on a database of its own, calling it, and reading
its events and its tables back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiomysql

from services.bus.auth import TokenIssuer
from services.bus.contracts import Contracts
from services.bus.events import AvroEvent
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import galera
from services.cli.infra import Layout
from services.cli.tail import read
from tests.conftest import ServiceProcess, SpawnService

TOPIC = "billing.events"
PORTS = galera.Ports.from_env()


async def start_billing(spawn_service: SpawnService, database: str, **env: str) -> ServiceProcess:
    service = spawn_service(
        "services.billing",
        "BILLING_",
        BILLING_DATABASE_NAME=database,
        BILLING_WRITE_PORT=str(PORTS.write),
        BILLING_READ_PORT=str(PORTS.read),
        BILLING_OUTBOX_POLL_INTERVAL_SECONDS="0.2",
        BILLING_PROVIDER_TIMEOUT_SECONDS="1",
        BILLING_PROVIDER_SLOW_SECONDS="0.3",
        OTEL_SERVICE_NAME="billing",
        **env,
    )
    await service.wait_ready()
    return service


@dataclass
class Customer:
    account_id: str
    token: str


def customer(issuer: TokenIssuer) -> Customer:
    account = str(uuid.uuid4())
    return Customer(account, issuer.issue(account, "tv-1", "tv"))


@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    raw: bytes | None = None,
) -> Reply:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if key is not None:
        sent["Idempotency-Key"] = key
    if raw is not None:
        sent.setdefault("Content-Type", "application/json")
    async with http.request(method, url, json=body, data=raw, headers=sent) as resp:
        try:
            parsed: Any = await resp.json(content_type=None)
        except ValueError:
            parsed = await resp.text()
        return Reply(resp.status, parsed, dict(resp.headers))


async def subscribe(
    http: aiohttp.ClientSession, base: str, who: Customer, plan: str = "BASIC", card: str = "tok_ok",
    key: str | None = None,
) -> Reply:  # fmt: skip
    return await call(
        http,
        "POST",
        f"{base}/v1/billing/subscriptions",
        {"account_id": who.account_id, "plan": plan, "card_token": card},
        token=who.token,
        key=key or str(uuid.uuid4()),
    )


def now_ms() -> int:
    return int(time.time() * 1000)


async def billing_events(layout: Layout, account_id: str, since_ms: int) -> list[AvroEvent]:
    """The account's events on ``billing.events`` since ``since_ms``, in partition order."""
    contracts = Contracts.load()
    topic = contracts.topic(TOPIC)
    records = await asyncio.to_thread(
        lambda: list(read(layout.bootstrap_servers, TOPIC, None, since_ms, False, None))
    )
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    found: list[AvroEvent] = []
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        if record.key is None or str(await serde.decode_key(record.key)) != account_id:
            continue
        found.append(await serde.decode_event(topic, record.value))
    return found


def names(events: list[AvroEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


async def query(database: str, sql: str, args: Any = None, port: int | None = None) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` through the write endpoint (or ``port``)."""
    conn = await aiomysql.connect(
        host="127.0.0.1",
        port=port or PORTS.write,
        user=galera.APP_USER,
        password=galera.APP_PASSWORD,
        db=database,
        autocommit=True,
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql, args)
            return [tuple(r) for r in await cur.fetchall()]
    finally:
        conn.close()


async def value(database: str, sql: str, args: Any = None) -> Any:
    rows = await query(database, sql, args)
    return rows[0][0] if rows else None
