"""Session fixtures: the real bus, started once per test session through the same code as ``make up``.

Components that were already running (a developer's ``make up``) are reused and left running; the
ones this session started are stopped at its end, by pid. Each test makes its own topics, groups
and databases, so tests do not see each other.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.bus.admin import Admin
from services.bus.auth import TokenIssuer, load_private_key
from services.bus.contracts import Contracts, Topic
from services.bus.registry import RegistryClient
from services.bus.tracing import setup_tracing
from services.cli import infra, stack

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Quarantined tests (``@pytest.mark.quarantine(reason=...)``) fail intermittently for a cause not
    yet found; they are skipped, with their reason shown, unless ``REELBUS_RUN_QUARANTINED=1``
    (``make test-quarantined`` runs just them)."""
    if os.environ.get("REELBUS_RUN_QUARANTINED") == "1":
        return
    for item in items:
        mark = item.get_closest_marker("quarantine")
        if mark is not None:
            item.add_marker(pytest.mark.skip(reason=f"quarantined: {mark.kwargs.get('reason', '')}"))


@pytest.fixture(scope="session")
def layout() -> infra.Layout:
    return infra.Layout.from_env()


@pytest.fixture(scope="session")
def bus_infra(layout: infra.Layout) -> Iterator[infra.Layout]:
    say = lambda m: print(f"[infra] {m}", flush=True)  # noqa: E731
    result = asyncio.run(infra.up(layout, list(stack.INFRA), progress=say))
    # The declared topics and schemas, as `make up` applies them (services' tests use them).
    applied = Admin(layout.bootstrap_servers, RegistryClient(layout.registry_url)).apply(Contracts.load())
    assert not applied.refusals, applied.refusals
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServiceProcess:
    """A service started by a test, in its own process, on its own port."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            return bool(http_json(f"{self.url}/readyz", timeout=3)["ready"])
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 60.0) -> None:
        async def probe() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            return await asyncio.to_thread(self.ready)

        await wait_for(probe, f"{self.log.stem} to be ready", timeout)


SpawnService = Callable[..., ServiceProcess]


@pytest.fixture
def spawn_service(tmp_path: Path, bus_infra: infra.Layout) -> Iterator[SpawnService]:
    """Start ``python -m <module>`` with the bus settings under ``<prefix>``; stopped (by pid) at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(module: str, prefix: str, **env: str) -> ServiceProcess:
        port = int(env.pop(f"{prefix}HTTP_PORT", 0)) or free_port()
        log = (
            tmp_path
            / f"{module.rsplit('.', 2)[-2 if module.endswith('__main__') else -1]}-{len(started)}.log"
        )
        full_env = {
            **os.environ,
            f"{prefix}HTTP_PORT": str(port),
            f"{prefix}KAFKA_BOOTSTRAP_SERVERS": bus_infra.bootstrap_servers,
            f"{prefix}REGISTRY_URL": bus_infra.registry_url,
            "OTEL_TRACES_EXPORTER": "zipkin",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": f"{bus_infra.zipkin_url}/api/v2/spans",
            "REELBUS_HOME": str(bus_infra.home),
            **env,
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module], cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT
            )
        started.append(proc)
        return ServiceProcess(proc, port, log)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def token_issuer(bus_infra: infra.Layout) -> TokenIssuer:
    """Mints access tokens with the bus's signing key, for tests that call services directly."""
    return TokenIssuer(load_private_key(bus_infra.home / "keys" / "token-signing.pem"))
