"""The dashboard through the gateway, in headless Chromium, against the real bus: the page loads, its
live numbers (rate, message count, lag, decisions, anomalies, the mount-stall chart, trace links)
change while events are produced, and a screenshot is kept as a test artifact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Consumer, TopicPartition

from services.bus.auth import TokenIssuer
from services.bus.contracts import Contracts
from services.bus.events import (
    AnomalyDetected,
    AnomalyKind,
    MountStallSample,
    ScalingAction,
    ScalingDecision,
    Severity,
)
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from tests.conftest import ServiceProcess, SpawnService, free_port, unique, wait_for
from tests.dashboard.chromium import Chromium, Page

DECISIONS, ANOMALIES, STALLS = "scaling.decisions", "anomalies.detected", "nodes.mount-stall"
ZIPKIN_UI = "http://localhost:9411/zipkin"


@dataclass
class Stack:
    dashboard: ServiceProcess
    gateway: ServiceProcess
    trace_service: str
    group: str

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture
async def stack(bus_infra: Layout, spawn_service: SpawnService) -> Stack:
    """The dashboard (groups matching this test's group, traces of this test's gateway) behind a
    gateway whose other upstreams point at a port nothing listens on."""
    trace_service = unique("gw-dash").lower()
    group = unique("dash-test")
    dashboard = spawn_service(
        "services.dashboard",
        "DASHBOARD_",
        DASHBOARD_GROUP_PATTERN=f"^{re.escape(group)}$",
        DASHBOARD_GROUP_REFRESH_SECONDS="1",
        DASHBOARD_TRACE_SERVICE=trace_service,
        DASHBOARD_TRACE_POLL_SECONDS="1",
        DASHBOARD_ZIPKIN_URL=bus_infra.zipkin_url,
        DASHBOARD_ZIPKIN_UI_URL=ZIPKIN_UI,
        DASHBOARD_BACKLOG_PER_PARTITION="20",
        DASHBOARD_RATE_WINDOW_SECONDS="3",
        DASHBOARD_SHUTDOWN_GRACE_SECONDS="5",
        OTEL_SERVICE_NAME=unique("dashboard-test"),
    )
    nowhere = f"http://127.0.0.1:{free_port()}"
    gateway = spawn_service(
        "services.gateway",
        "GATEWAY_",
        GATEWAY_ACCOUNTS_URL=nowhere,
        GATEWAY_CATALOG_URL=nowhere,
        GATEWAY_PLAYBACK_URL=nowhere,
        GATEWAY_HISTORY_URL=nowhere,
        GATEWAY_DASHBOARD_URL=dashboard.url,
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{bus_infra.redis_port}/0",
        GATEWAY_REDIS_KEY_PREFIX=unique("test-ratelimit"),
        OTEL_SERVICE_NAME=trace_service,
    )
    await asyncio.gather(dashboard.wait_ready(90), gateway.wait_ready(90))
    return Stack(dashboard, gateway, trace_service, group)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    chromium = await Chromium.start(tmp_path)
    try:
        yield chromium
    finally:
        await chromium.stop()


def commit_at_end(layout: Layout, group: str, topic: str) -> dict[int, int]:
    """Give ``group`` committed offsets at the current end of ``topic`` (its lag is 0 from here)."""
    consumer = Consumer({"bootstrap.servers": layout.bootstrap_servers, "group.id": group, "log_level": 0})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions
        }
        consumer.commit(
            offsets=[TopicPartition(topic, p, off) for p, off in ends.items()], asynchronous=False
        )
        return ends
    finally:
        consumer.close()


class Traffic:
    """Events on the three viewed topics, with this test's unique service, subject and node."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.service = unique("svc")
        self.subject = f"service:{unique('dash')}"
        self.node = unique("node")
        self.sent = 0

    async def one_round(self, i: int) -> None:
        now = datetime.now(UTC)
        await self.producer.send(
            DECISIONS,
            self.service,
            ScalingDecision(
                service=self.service,
                from_replicas=2 + i % 3,
                to_replicas=3 + i % 3,
                action=ScalingAction.SCALE_OUT,
                reason=f"cpu 0.{80 + i % 19} > target 0.70",
                signals={"cpu_utilization": 0.8 + (i % 19) / 100},
            ),
        )
        await self.producer.send(
            STALLS,
            self.node,
            MountStallSample(
                node=self.node,
                probe_id="probe-test",
                mount_op_latency_ms=4.0 + (i % 7),
                mount_table_size=100 + i,
                mount_table_read_ms=0.3,
                probe_latency_ms=6.0 + (i % 7) * 3 + (80.0 if i % 10 == 9 else 0.0),
                stalled=i % 10 == 9,
                concurrent_mounts=i % 4,
            ),
        )
        if i % 5 == 0:
            await self.producer.send(
                ANOMALIES,
                self.subject,
                AnomalyDetected(
                    kind=AnomalyKind.LATENCY,
                    severity=Severity.WARNING,
                    subject=self.subject,
                    score=4.5 + i / 10,
                    threshold=3.0,
                    evidence={"p99_ms": str(800 + i)},
                    window_start=now - timedelta(minutes=1),
                    window_end=now,
                    detector="test-detector",
                ),
            )
        self.sent += 1

    async def backfill(self, minutes: int = 5) -> None:
        """A node's recent past (one probe every 5 s), so the chart has a history to draw."""
        now = datetime.now(UTC)
        steps = minutes * 12
        for i in range(steps):
            await self.producer.send(
                STALLS,
                self.node,
                MountStallSample(
                    event_time=now - timedelta(seconds=5 * (steps - i)),
                    node=self.node,
                    probe_id="probe-test",
                    mount_op_latency_ms=3.0 + math.sin(i / 6) * 2,
                    mount_table_size=80 + i // 3,
                    mount_table_read_ms=0.3,
                    probe_latency_ms=8.0 + math.sin(i / 6) * 4 + (60.0 if i % 17 == 16 else 0.0),
                    stalled=i % 17 == 16,
                    concurrent_mounts=i % 3,
                ),
            )

    async def run(self) -> None:
        """About ten rounds a second until cancelled."""
        i = 0
        while True:
            await self.one_round(i)
            i += 1
            await asyncio.sleep(0.1)


@pytest.fixture
async def producer(bus_infra: Layout, contracts: Contracts) -> AsyncIterator[Producer]:
    serde = Serde(contracts, RegistryClient(bus_infra.registry_url))
    made = Producer(
        ProducerConfig(bus_infra.bootstrap_servers, client_id=unique("dash-test")), contracts, serde
    )
    await made.start([DECISIONS, ANOMALIES, STALLS])
    try:
        yield made
    finally:
        await made.close()


def reading(group: str, traffic: Traffic) -> str:
    """A JavaScript expression: what the page shows, as JSON."""
    return f"""JSON.stringify((() => {{
      const q = (s) => document.querySelector(s);
      if (!q('#login') || !document.body) return {{ loading: true, ticks: 0, state: 'loading' }};
      const row = q('tr[data-topic="{DECISIONS}"]');
      const lag = q('tr[data-group="{group}"] .lag');
      return {{
        state: document.body.dataset.state,
        ticks: Number(document.body.dataset.ticks),
        topologyNodes: document.querySelectorAll('#topology g.node').length,
        activeEdges: document.querySelectorAll('#topology path.edge.active[data-topic="{DECISIONS}"]').length,
        rate: row ? row.querySelector('.rate').textContent : null,
        messages: row ? row.querySelector('.messages').textContent : null,
        lag: lag ? lag.textContent : null,
        decisions: document.querySelectorAll('#decisions li[data-service="{traffic.service}"]').length,
        anomalies: document.querySelectorAll('#anomalies li[data-subject="{traffic.subject}"]').length,
        legend: (q('#stall-legend li[data-node="{traffic.node}"]') || {{}}).textContent || null,
        stallPoints: (q('#stall-latency polyline[data-node="{traffic.node}"]')
          ?.getAttribute('points').split(' ').length) || 0,
        stalledMarks: document.querySelectorAll('#stall-latency circle.stalled').length,
        traces: [...document.querySelectorAll('#traces a')].map((a) => a.href),
        login: !document.getElementById('login').hidden,
      }};
    }})())"""


async def read(page: Page, expression: str) -> dict[str, Any]:
    value = await page.evaluate(expression)
    assert isinstance(value, str)
    doc: dict[str, Any] = json.loads(value)
    return doc


def number(text: str | None) -> float:
    """A number as the page prints it (thousands separators; a dash for none: NaN)."""
    try:
        return float((text or "").replace(",", ""))
    except ValueError:
        return float("nan")


async def test_the_dashboard_shows_the_bus_live_in_chromium(
    stack: Stack,
    browser: Chromium,
    producer: Producer,
    token_issuer: TokenIssuer,
    bus_infra: Layout,
    contracts: Contracts,
) -> None:
    commit_at_end(bus_infra, stack.group, DECISIONS)
    token = token_issuer.issue(str(uuid.uuid4()), "ops-console", "BROWSER", scopes=["ops:read"])
    traffic = Traffic(producer)
    expression = reading(stack.group, traffic)

    page = await browser.new_page()
    await page.navigate(f"{stack.url}/dashboard/#token={token}")

    async def live() -> dict[str, Any] | None:
        doc = await read(page, expression)
        # ... and the service has sampled the test's group once (a sample a second, not per tick)
        return doc if doc["ticks"] >= 2 and doc["state"] == "live" and doc["lag"] is not None else None

    before = await wait_for(live, "the page to load through the gateway and show the group", 30, 0.2)
    topology = contracts.topics.values()
    producers = {t.producer for t in topology}
    consumers = {c for t in topology for c in t.consumers}
    assert before["topologyNodes"] == len(producers) + len(contracts.topics) + len(consumers)
    assert before["lag"] == "0", before  # the group committed at the end: nothing to catch up
    assert before["decisions"] == before["anomalies"] == 0 and before["legend"] is None
    assert not before["login"]
    # requests through the gateway that the recent-requests table should link to
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(
                f"{stack.url}/v1/catalog/titles", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 502  # the catalog is nowhere; the request is traced all the same

    await traffic.backfill()
    producing = asyncio.create_task(traffic.run())
    try:

        async def showing() -> dict[str, Any] | None:
            doc = await read(page, expression)
            ok = (
                doc["decisions"] > 0
                and doc["anomalies"] > 0
                and doc["legend"] is not None
                and number(doc["rate"]) > 0
                and number(doc["lag"]) > 0
                and doc["activeEdges"] > 0
                and any(href.startswith(f"{ZIPKIN_UI}/traces/") for href in doc["traces"])
            )
            return doc if ok else None

        first = await wait_for(showing, "the produced events, rates, lag and traces on the page", 45, 0.25)

        async def moved_on() -> dict[str, Any] | None:
            doc = await read(page, expression)
            ok = (
                doc["ticks"] > first["ticks"]
                and number(doc["messages"]) > number(first["messages"])
                and number(doc["lag"]) > number(first["lag"])
                and doc["stallPoints"] > first["stallPoints"]
                and doc["stalledMarks"] > 0
            )
            return doc if ok else None

        second = await wait_for(moved_on, "the live numbers to change while events are produced", 30, 0.25)
        assert traffic.node in second["legend"] and "mounts" in second["legend"]
        assert number(second["lag"]) <= traffic.sent, "lag counts only this test's decisions"
        shot = bus_infra.home / "artifacts" / "dashboard.png"
        size = await page.screenshot(shot)
        print(f"\n[dashboard] screenshot: {shot} ({size} bytes)")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and size > 20_000
    finally:
        producing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producing

    # A browser without a token is asked for one, and the data is not shown.
    anonymous = await browser.new_page()
    await anonymous.navigate(f"{stack.url}/dashboard/")

    async def asks() -> bool:
        doc = await read(anonymous, expression)
        return bool(doc.get("login")) and doc["ticks"] == 0

    await wait_for(asks, "the page to ask for a token", 20, 0.2)


async def test_the_page_is_public_and_its_data_needs_the_ops_scope(
    stack: Stack, token_issuer: TokenIssuer
) -> None:
    async with aiohttp.ClientSession() as http:
        for path, kind in (
            ("/dashboard/", "text/html"),
            ("/dashboard", "text/html"),
            ("/dashboard/app.js", "text/javascript"),
            ("/dashboard/style.css", "text/css"),
        ):
            async with http.get(stack.url + path) as resp:
                assert resp.status == 200, path
                assert resp.headers["Content-Type"].startswith(kind), path
                body = await resp.text()
                assert "http://" not in body.replace("http://www.w3.org/2000/svg", ""), "nothing remote"
        async with http.get(f"{stack.url}/dashboard/nothing-here") as resp:
            assert resp.status == 401  # not a listed public page: the token check answers first
        state = f"{stack.url}/v1/dashboard/state"
        async with http.get(state) as resp:
            assert resp.status == 401 and (await resp.json())["field"] == "Authorization"
        plain = token_issuer.issue(str(uuid.uuid4()), "tv-1", "TV")
        async with http.get(state, headers={"Authorization": f"Bearer {plain}"}) as resp:
            assert resp.status == 403 and "ops:read" in (await resp.json())["message"]
        ops = token_issuer.issue(str(uuid.uuid4()), "ops-console", "BROWSER", scopes=["ops:read"])
        async with http.get(state, headers={"Authorization": f"Bearer {ops}"}) as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert {t["name"] for t in doc["topics"]} >= {DECISIONS, ANOMALIES, STALLS}
        assert doc["traces"]["ui_url"] == ZIPKIN_UI and doc["sample_age_seconds"] < 5
        # straight to the service, bypassing the gateway: refused the same way (zero trust)
        async with http.get(f"{stack.dashboard.url}/v1/dashboard/topology") as resp:
            assert resp.status == 401
        async with http.get(
            f"{stack.dashboard.url}/v1/dashboard/topology", headers={"Authorization": f"Bearer {plain}"}
        ) as resp:
            assert resp.status == 403
