"""Starting the accounts service as a process on its own database, and reading its events back.

Used by the accounts tests and by the gateway tests (which need a real accounts behind the gateway).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from services.bus.contracts import Contracts
from services.bus.events import ProfileCreated
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import infra
from services.cli.infra import Layout
from services.cli.tail import read
from tests.conftest import ServiceProcess, SpawnService, unique

PROFILES_TOPIC = "accounts.profiles"
# Cheap argon2 parameters for tests: hashing stays argon2id, only faster.
FAST_HASHING = {
    "ACCOUNTS_ARGON2_TIME_COST": "1",
    "ACCOUNTS_ARGON2_MEMORY_KIB": "8192",
    "ACCOUNTS_ARGON2_PARALLELISM": "1",
}


@asynccontextmanager
async def accounts_database(layout: Layout) -> AsyncIterator[str]:
    """A database of the test's own, dropped afterwards."""
    name = unique("accounts").replace("-", "_")
    await asyncio.to_thread(infra.ensure_database, layout, name)
    try:
        yield f"postgresql://reelbus@127.0.0.1:{layout.postgres_port}/{name}"
    finally:
        await asyncio.to_thread(infra.psql, layout, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def start_accounts(spawn_service: SpawnService, database_url: str, **env: str) -> ServiceProcess:
    service = spawn_service(
        "services.accounts",
        "ACCOUNTS_",
        ACCOUNTS_DATABASE_URL=database_url,
        OTEL_SERVICE_NAME="accounts",
        **{**FAST_HASHING, **env},
    )
    await service.wait_ready()
    return service


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
    headers: Mapping[str, str] | None = None,
    raw: bytes | None = None,
) -> Reply:
    """One request; the reply's JSON body (or its text when it is not JSON)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if raw is not None:
        sent.setdefault("Content-Type", "application/json")
    async with http.request(method, url, json=body, data=raw, headers=sent) as resp:
        text = await resp.text()
        try:
            parsed: Any = await resp.json(content_type=None)
        except ValueError:
            parsed = text
        return Reply(resp.status, parsed, dict(resp.headers))


@dataclass
class Account:
    account_id: str
    email: str
    password: str
    token: str


async def sign_up_and_log_in(http: aiohttp.ClientSession, base_url: str) -> Account:
    email = f"{unique('viewer')}@example.com"
    password = "correct horse battery staple"
    made = await call(http, "POST", f"{base_url}/v1/accounts", {"email": email, "password": password})
    assert made.status == 201, made
    login = await call(
        http,
        "POST",
        f"{base_url}/v1/auth/login",
        {"email": email, "password": password, "device_id": "tv-1", "device_type": "tv"},
    )
    assert login.status == 200, login
    assert login.body["account_id"] == made.body["account_id"]
    return Account(made.body["account_id"], email, password, login.body["access_token"])


def now_ms() -> int:
    return int(time.time() * 1000)


async def profile_events(layout: Layout, account_id: str, since_ms: int) -> list[ProfileCreated]:
    """The ``ProfileCreated`` events for this account on the declared topic since ``since_ms``."""
    contracts = Contracts.load()
    topic = contracts.topic(PROFILES_TOPIC)
    records = await asyncio.to_thread(
        lambda: list(read(layout.bootstrap_servers, PROFILES_TOPIC, None, since_ms, False, None))
    )
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    found: list[ProfileCreated] = []
    for record in records:
        if record.key is None or str(await serde.decode_key(record.key)) != account_id:
            continue
        event = await serde.decode_event(topic, record.value)
        assert isinstance(event, ProfileCreated)
        found.append(event)
    return found


async def fetch_value(database_url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


def as_uuid(value: str) -> uuid.UUID:
    return uuid.UUID(value)
