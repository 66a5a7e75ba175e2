"""The dashboard for the runtime: its state, the three loops that keep it fresh (offset sampler, tail of
the viewed topics, Zipkin poller), the static page and the JSON it polls.

Routes:
- ``GET /dashboard``, ``/dashboard/``, ``/dashboard/app.js``, ``/dashboard/style.css``: the page,
  public (it holds no data; a browser cannot attach a bearer token to a navigation).
- ``GET /v1/dashboard/topology``, ``GET /v1/dashboard/state``: the data, for a token with the
  ``ops:read`` scope (``DASHBOARD_READ_SCOPE``); the page reads the token from its URL fragment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from confluent_kafka import Message

from services.bus.auth import claims_of
from services.bus.consumer import Record
from services.bus.contracts import DLQ_SUFFIX, Contracts
from services.bus.http import ApiError
from services.bus.runtime import BUS, ServiceSpec
from services.bus.serde import PoisonMessage
from services.bus.tracing import normalize_headers
from services.dashboard import handlers, metrics
from services.dashboard.adapters.kafka import OffsetsReader, TopicTail
from services.dashboard.adapters.zipkin import Zipkin, ZipkinUnavailable
from services.dashboard.handlers import LiveView, RateTracker, Watermarks, iso
from services.dashboard.settings import Settings

log = logging.getLogger("reelbus.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "/dashboard/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}
PUBLIC_ROUTES = tuple(("GET", path) for path in ("/dashboard", *STATIC_FILES))


@dataclass
class Dashboard:
    """Everything the page shows; written by the loops, read by the JSON views."""

    settings: Settings
    contracts: Contracts
    group_pattern: re.Pattern[str]
    view: LiveView
    rates: RateTracker
    topology: dict[str, Any]
    static: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)  # replaced whole by each sample
    sampled_at: float = 0.0  # monotonic; 0: never
    traces: list[dict[str, Any]] = field(default_factory=list)
    traces_at: datetime | None = None
    errors: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # matched group -> state
    groups_at: float = 0.0

    @property
    def shown_topics(self) -> list[str]:
        return sorted(self.contracts.topics)

    def sample_once(self, reader: OffsetsReader) -> None:
        """One sample of watermarks and group offsets (blocking: a worker thread). The result is
        built aside and swapped in whole, so a reader on the loop never sees half of it."""
        s = self.settings
        names = self.shown_topics
        partitions = reader.partitions([*names, *(n + DLQ_SUFFIX for n in names)])
        high = reader.high_watermarks(partitions)
        now = time.monotonic()
        self.rates.add(Watermarks(now, high))
        rates = self.rates.rates()
        if now - self.groups_at >= s.group_refresh_seconds or not self.groups_at:
            found = reader.groups()
            matched = sorted(g for g in found if self.group_pattern.search(g))
            self.groups = {g: found[g] for g in matched[: s.max_groups * 4]}
            self.groups_at = now
        committed = reader.committed(list(self.groups))
        lags = [
            lag
            for group, offsets in committed.items()
            if (lag := handlers.group_lag(group, self.groups.get(group, "UNKNOWN"), offsets, high))
            is not None
        ]
        totals = handlers.topic_totals(high)
        topics = []
        for name in names:
            topic = self.contracts.topics[name]
            topics.append(
                {
                    "name": name,
                    "partitions": topic.partitions,
                    "exists": name in totals,
                    "messages": totals.get(name),
                    "rate": None if name not in rates else round(rates[name], 3),
                    "dead_letters": totals.get(name + DLQ_SUFFIX),
                }
            )
        known = [rates[name] for name in names if name in rates]
        self.sample = {
            "topics": topics,
            "total_rate": round(sum(known), 3) if known else None,
            "rate_window_seconds": s.rate_window_seconds,
            "groups": [g.as_json() for g in handlers.rank_groups(lags, s.max_groups)],
            "group_pattern": self.group_pattern.pattern,
        }
        self.sampled_at = now
        self.errors.pop("kafka", None)

    def state(self) -> dict[str, Any]:
        age = None if not self.sampled_at else round(time.monotonic() - self.sampled_at, 3)
        return {
            "generated_at": iso(datetime.now(UTC)),
            "sample_age_seconds": age,
            **self.sample,
            **self.view.as_json(),
            "traces": {
                "service": self.settings.trace_service,
                "ui_url": self.settings.zipkin_ui_url,
                "fetched_at": None if self.traces_at is None else iso(self.traces_at),
                "items": self.traces,
            },
            "errors": dict(self.errors),
        }


DASH = web.AppKey("dashboard", Dashboard)


# -- loops -----------------------------------------------------------------------------------


async def sample_loop(app: web.Application) -> None:
    dash = app[DASH]
    reader = OffsetsReader(dash.settings.kafka_bootstrap_servers)
    interval = dash.settings.sample_interval_seconds
    while True:
        started = time.monotonic()
        try:
            await asyncio.to_thread(dash.sample_once, reader)
        except Exception as exc:  # the broker away for a moment: shown on the page, tried again
            dash.errors["kafka"] = f"sampling failed: {exc}"
            log.warning("sampling failed: %r", exc)
        metrics.SAMPLE_SECONDS.observe(time.monotonic() - started)
        await asyncio.sleep(max(0.05, interval - (time.monotonic() - started)))


async def tail_loop(app: web.Application) -> None:
    """The group-less tail of the viewed topics (see the package doc for why no group)."""
    dash = app[DASH]
    serde = app[BUS].serde
    s = dash.settings
    instance = s.instance_id or f"dashboard-{socket.gethostname()}-{os.getpid()}"
    tail = TopicTail(s.kafka_bootstrap_servers, handlers.VIEWED_TOPICS, s.backlog_per_partition, instance)

    async def handle(msg: Message) -> None:
        name, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        topic = dash.contracts.topics.get(name)
        value, raw_key = msg.value(), msg.key()
        try:
            event = await serde.decode_event(topic, value.encode() if isinstance(value, str) else value)
            key = await serde.decode_key(raw_key.encode() if isinstance(raw_key, str) else raw_key)
        except PoisonMessage as exc:
            # Read-only: the owning consumers dead-letter it; here it is counted and logged.
            dash.view.bad_records += 1
            metrics.BAD_RECORDS.labels(name).inc()
            log.warning("unreadable record %s[%d]@%d: %s", name, partition, offset, exc.reason)
            return
        handler = handlers.HANDLERS.get(type(event).SCHEMA_NAME)
        if handler is None:  # another type on the topic (NodeStartThrottle, say): not shown
            return
        record = Record(name, partition, offset, key, normalize_headers(msg.headers()), msg.timestamp()[1])
        await handler(event, record, dash.view)
        metrics.RECORDS.labels(name).inc()

    await tail.run(handle)


async def traces_loop(app: web.Application) -> None:
    dash = app[DASH]
    s = dash.settings
    timeout = aiohttp.ClientTimeout(total=s.zipkin_timeout_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        zipkin = Zipkin(session, s.zipkin_url)
        while True:
            try:
                # Ask for more than is shown: the page's own polls are traced too and left out.
                raw = await zipkin.recent_traces(s.trace_service, s.trace_limit * 4, s.trace_lookback_seconds)
                dash.traces = handlers.summarize_traces(raw, s.zipkin_ui_url, s.trace_limit)
                dash.traces_at = datetime.now(UTC)
                dash.errors.pop("zipkin", None)
            except ZipkinUnavailable as exc:
                dash.errors["zipkin"] = str(exc)
            await asyncio.sleep(s.trace_poll_seconds)


# -- HTTP ------------------------------------------------------------------------------------


def require_scope(request: web.Request) -> None:
    scope = request.app[DASH].settings.read_scope
    if scope not in claims_of(request).scopes:
        raise ApiError(
            403, f"the dashboard's data needs a token with the {scope!r} scope", field="Authorization"
        )


async def get_static(request: web.Request) -> web.StreamResponse:
    path = "/dashboard/" if request.path == "/dashboard" else request.path
    body, content_type = request.app[DASH].static[path]
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


async def get_topology(request: web.Request) -> web.StreamResponse:
    require_scope(request)
    return web.json_response(request.app[DASH].topology, headers={"Cache-Control": "no-store"})


async def get_state(request: web.Request) -> web.StreamResponse:
    require_scope(request)
    return web.json_response(request.app[DASH].state(), headers={"Cache-Control": "no-store"})


def routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", get_static)
    for path in STATIC_FILES:
        app.router.add_get(path, get_static)
    app.router.add_get("/v1/dashboard/topology", get_topology)
    app.router.add_get("/v1/dashboard/state", get_state)


# -- the spec --------------------------------------------------------------------------------


def build_spec(settings: Settings, contracts: Contracts | None = None) -> ServiceSpec:
    async def dashboard(app: web.Application) -> AsyncIterator[None]:
        loaded = contracts or Contracts.load()
        pattern = settings.group_pattern or handlers.default_group_pattern(loaded)
        dash = Dashboard(
            settings=settings,
            contracts=loaded,
            group_pattern=re.compile(pattern),
            view=LiveView(
                recent_items=settings.recent_items,
                stall_window_ms=int(settings.mount_stall_window_seconds * 1000),
                stall_max_points=settings.mount_stall_max_points,
            ),
            rates=RateTracker(settings.rate_window_seconds),
            topology=handlers.topology(loaded),
        )
        for path, (name, content_type) in STATIC_FILES.items():
            dash.static[path] = ((STATIC_DIR / name).read_bytes(), content_type)
        app[DASH] = dash
        yield

    async def sampled_recently(app: web.Application) -> bool:
        dash = app[DASH]
        limit = 3 * dash.settings.sample_interval_seconds + 5.0
        return bool(dash.sampled_at) and time.monotonic() - dash.sampled_at < limit

    return ServiceSpec(
        name="dashboard",
        routes=routes,
        resources=[dashboard],
        public_routes=PUBLIC_ROUTES,
        root_tasks={"sampler": sample_loop, "tail": tail_loop, "traces": traces_loop},
        ready_checks={"sampled": sampled_recently},
    )
