"""Session fixtures: the real bus, started once per test session through the same code as ``make up``.

Components that were already running (a developer's ``make up``) are reused and left running; the
ones this session started are stopped at its end, by pid. Each test makes its own topics, groups
and databases, so tests do not see each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.bus.admin import Admin
from services.bus.contracts import Contracts, Topic
from services.bus.registry import RegistryClient
from services.bus.tracing import setup_tracing
from services.cli import infra

T = TypeVar("T")


async def wait_for(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30.0, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


async def until(predicate: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Like ``wait_for`` for a plain (non-async) condition."""

    async def probe() -> T | None:
        return predicate()

    return await wait_for(probe, what, timeout)


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="session")
def layout() -> infra.Layout:
    return infra.Layout.from_env()


@pytest.fixture(scope="session")
def bus_infra(layout: infra.Layout) -> Iterator[infra.Layout]:
    names = ["postgres", "kafka", "registry", "zipkin"]
    result = asyncio.run(infra.up(layout, names, progress=lambda m: print(f"[infra] {m}", flush=True)))
    try:
        yield layout
    finally:
        if result.started:
            infra.down(layout, result.started)


@pytest.fixture(scope="session")
def tracing(bus_infra: infra.Layout) -> Iterator[TracerProvider]:
    """This process's tracer provider, exporting to the session's Zipkin."""
    os.environ["OTEL_EXPORTER_ZIPKIN_ENDPOINT"] = f"{bus_infra.zipkin_url}/api/v2/spans"
    os.environ["OTEL_TRACES_EXPORTER"] = "zipkin"
    provider = setup_tracing("test-client")
    yield provider
    provider.shutdown()


@pytest.fixture(scope="session")
def contracts() -> Contracts:
    return Contracts.load()


@pytest.fixture(scope="session")
def registry(bus_infra: infra.Layout) -> RegistryClient:
    return RegistryClient(bus_infra.registry_url)


@pytest.fixture(scope="session")
def admin(bus_infra: infra.Layout, registry: RegistryClient) -> Admin:
    return Admin(bus_infra.bootstrap_servers, registry)


TopicFactory = Callable[..., Awaitable[tuple[Contracts, Topic]]]


@pytest.fixture
async def make_topic(contracts: Contracts, admin: Admin) -> AsyncIterator[TopicFactory]:
    """Declare and apply a topic of this test's own, modelled on a declared one."""
    made: list[str] = []

    async def factory(
        like: str = "history.views", partitions: int = 3, **changes: Any
    ) -> tuple[Contracts, Topic]:
        base = contracts.topic(like)
        name = f"test.{uuid.uuid4().hex[:10]}.{like}"
        topic = replace(base, name=name, partitions=partitions, **changes)
        extended = contracts.with_topics([topic])
        plan = await asyncio.to_thread(admin.apply, extended, [name])
        assert not plan.refusals, plan.refusals
        made.extend([topic.name, topic.dlq])
        return extended, topic

    yield factory
    await asyncio.to_thread(admin.delete_topics, made)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
