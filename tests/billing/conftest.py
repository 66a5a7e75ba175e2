"""Fixtures for the billing tests: the Galera cluster (started like ``make up`` if it is not
running; what is started here is stopped by pid at the end), a database per test made through
HAProxy's write endpoint, and an HTTP session."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from services.cli import galera, infra


@pytest.fixture(scope="module")
def billing_db(bus_infra: infra.Layout) -> Iterator[infra.Layout]:
    say = lambda m: print(f"[galera] {m}", flush=True)  # noqa: E731
    result = asyncio.run(infra.up(bus_infra, list(galera.NAMES), progress=say))
    try:
        yield bus_infra
    finally:
        if result.started:
            infra.down(bus_infra, result.started, progress=say)


@pytest.fixture
def database(billing_db: infra.Layout) -> Iterator[str]:
    name = f"billing_test_{uuid.uuid4().hex[:10]}"
    write = galera.Ports.from_env().write
    galera.endpoint_sql(write, f"CREATE DATABASE {name}")
    yield name
    with contextlib.suppress(galera.SqlError):
        galera.endpoint_sql(write, f"DROP DATABASE IF EXISTS {name}", timeout=30)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
