"""A service in its own process: redelivery after a crash, SIGTERM, bad settings, a connected trace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.bus.contracts import Topic
from services.bus.events import ViewRecorded
from services.cli import infra
from services.cli.infra import Layout
from tests.bus.test_bus import producer_for, view
from tests.conftest import TopicFactory, http_json, unique, wait_for

pytestmark = pytest.mark.infra
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def ready(self) -> bool:
        try:
            return bool(http_json(f"http://127.0.0.1:{self.port}/readyz", timeout=3)["ready"])
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
async def database(bus_infra: Layout) -> AsyncIterator[str]:
    name = unique("effects").replace("-", "_")
    await asyncio.to_thread(infra.ensure_database, bus_infra, name)
    yield f"postgresql://reelbus@127.0.0.1:{bus_infra.postgres_port}/{name}"
    await asyncio.to_thread(infra.psql, bus_infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def start_service(tmp_path: Path, bus_infra: Layout) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(topic: Topic, database_url: str, group: str, **env: str) -> Service:
        port = free_port()
        log = tmp_path / f"service-{len(started)}.log"
        full_env = {
            **os.environ,
            "SAMPLE_TOPIC": topic.name,
            "SAMPLE_DATABASE_URL": database_url,
            "SAMPLE_HTTP_PORT": str(port),
            "SAMPLE_GROUP_ID": group,
            "SAMPLE_INSTANCE_ID": group + "-0",
            "SAMPLE_KAFKA_BOOTSTRAP_SERVERS": bus_infra.bootstrap_servers,
            "SAMPLE_REGISTRY_URL": bus_infra.registry_url,
            "OTEL_SERVICE_NAME": "sample",
            "OTEL_TRACES_EXPORTER": "zipkin",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": f"{bus_infra.zipkin_url}/api/v2/spans",
            **env,
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.bus.sample_service"],
                cwd=REPO,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        return Service(proc, port, log)

    yield start
    for proc in started:  # by pid: the processes this fixture started
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def exited(service: Service, timeout: float) -> int:
    def exit_code() -> list[int] | None:
        code = service.proc.poll()
        return None if code is None else [code]

    found = await wait_for(lambda: asyncio.to_thread(exit_code), "the service to exit", timeout)
    return found[0]


async def count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_a_consumer_killed_before_commit_gets_the_event_again_and_the_effect_happens_once(
    bus_infra: Layout, make_topic: TopicFactory, database: str, start_service: Any
) -> None:
    contracts, topic = await make_topic(partitions=1)
    group = unique("sample")
    event = view()
    async with producer_for(bus_infra, contracts, topic) as producer:
        await producer.send(topic.name, str(event.profile_id), event)
    crashing: Service = start_service(topic, database, group, SAMPLE_CRASH_AFTER_HANDLING="1")
    assert await exited(crashing, 60) == 17, crashing.output()
    assert await count(database, "SELECT count(*) FROM deliveries") == 1
    assert await count(database, "SELECT count(*) FROM effects") == 1

    again: Service = start_service(topic, database, group)

    async def redelivered() -> bool:
        return await count(database, "SELECT count(*) FROM deliveries") >= 2

    await wait_for(redelivered, "the redelivery", 60)
    assert await count(database, "SELECT count(*) FROM effects") == 1, "the effect happened once"
    again.proc.send_signal(signal.SIGTERM)
    assert await exited(again, 30) == 0, again.output()


async def test_sigterm_finishes_in_flight_work_and_exits_within_the_grace_period(
    bus_infra: Layout, make_topic: TopicFactory, database: str, start_service: Any
) -> None:
    contracts, topic = await make_topic(partitions=1)
    group = unique("sample")
    grace = 8.0
    service: Service = start_service(
        topic, database, group, SAMPLE_HANDLER_DELAY="1.5", SAMPLE_SHUTDOWN_GRACE_SECONDS=str(grace)
    )
    await wait_for(lambda: asyncio.to_thread(service.ready), "the service to be ready", 60)
    async with producer_for(bus_infra, contracts, topic) as producer:
        for _ in range(3):
            e = view()
            await producer.send(topic.name, str(e.profile_id), e)
    await wait_for(
        lambda: asyncio.to_thread(lambda: "handling " in service.output()), "the first handling", 30
    )
    began = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    code = await exited(service, grace + 5)
    took = time.monotonic() - began
    assert code == 0, service.output()
    assert took < grace, f"shutdown took {took:.1f}s, grace is {grace}s"
    assert "shutdown complete" in service.output()
    delivered = await count(database, "SELECT count(*) FROM deliveries")
    effects = await count(database, "SELECT count(*) FROM effects")
    assert delivered == effects == 1, "the record in hand finished, the rest of the batch was left for later"


async def test_a_bad_setting_exits_2_naming_the_variable(
    start_service: Any, make_topic: TopicFactory
) -> None:
    _, topic = await make_topic()
    service: Service = start_service(topic, "postgresql://x", "g", SAMPLE_HTTP_PORT="eighty")
    assert await exited(service, 30) == 2
    assert "SAMPLE_HTTP_PORT" in service.output()


@contextmanager
def client_span(name: str) -> Iterator[trace.Span]:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
        yield span


async def test_the_trace_is_connected_across_the_kafka_hop(
    bus_infra: Layout, make_topic: TopicFactory, database: str, start_service: Any, tracing: TracerProvider
) -> None:
    contracts, topic = await make_topic(partitions=1)
    group = unique("sample")
    service: Service = start_service(topic, database, group)
    await wait_for(lambda: asyncio.to_thread(service.ready), "the service to be ready", 60)
    event = view()
    async with producer_for(bus_infra, contracts, topic) as producer:
        with client_span("test request") as span:
            await producer.send(topic.name, str(event.profile_id), event)
            trace_id = format(span.get_span_context().trace_id, "032x")
    tracing.force_flush()

    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = http_json(f"{bus_infra.zipkin_url}/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:
            return None
        kinds = {s.get("kind") for s in found}
        return found if {"PRODUCER", "CONSUMER"} <= kinds else None

    found = await wait_for(lambda: asyncio.to_thread(spans), "producer and consumer spans in Zipkin", 30, 0.5)
    producer_span = next(s for s in found if s.get("kind") == "PRODUCER")
    consumer_span = next(s for s in found if s.get("kind") == "CONSUMER")
    assert consumer_span["parentId"] == producer_span["id"]
    assert consumer_span["localEndpoint"]["serviceName"] == "sample"
    assert producer_span["parentId"] == format(span.get_span_context().span_id, "016x")
    assert consumer_span["tags"]["reelbus.event.id"] == str(event.event_id)
    assert consumer_span["tags"]["reelbus.event.type"] == ViewRecorded.SCHEMA_NAME

    metrics = await asyncio.to_thread(http_text, f"http://127.0.0.1:{service.port}/metrics")
    assert f'reelbus_consumed_total{{outcome="ok",topic="{topic.name}"}} 1.0' in metrics
    assert 'reelbus_handler_seconds_count{event_type="reelbus.history.ViewRecorded"} 1.0' in metrics
    assert f'reelbus_consumer_lag{{group="{group}",partition="0",topic="{topic.name}"}} 0.0' in metrics
    service.proc.send_signal(signal.SIGTERM)
    assert await exited(service, 30) == 0


async def test_missing_broker_and_registry_keep_it_unready_and_it_says_what_it_waits_for(
    make_topic: TopicFactory, database: str, start_service: Any
) -> None:
    _, topic = await make_topic()
    nowhere = free_port()
    service: Service = start_service(
        topic,
        database,
        unique("sample"),
        SAMPLE_KAFKA_BOOTSTRAP_SERVERS=f"localhost:{nowhere}",
        SAMPLE_REGISTRY_URL=f"http://localhost:{nowhere}/apis/ccompat/v7",
    )

    def unready_and_said() -> bool:
        out = service.output()
        return "waiting for the schema registry" in out and f"kafka at localhost:{nowhere}" in out

    await wait_for(lambda: asyncio.to_thread(unready_and_said), "the waiting log lines", 30)
    body = await asyncio.to_thread(http_json_status, f"http://127.0.0.1:{service.port}/readyz")
    assert body[0] == 503
    assert body[1]["checks"]["kafka"] is False and body[1]["checks"]["registry"] is False
    assert service.proc.poll() is None, "it keeps retrying instead of crashing"
    service.proc.send_signal(signal.SIGTERM)
    assert await exited(service, 30) == 0, service.output()


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def http_json_status(url: str) -> tuple[int, Any]:
    try:
        return 200, http_json(url)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
