"""The ABR service for the runtime: its topics, handler table, routes and resources."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from services.abr import handlers
from services.abr.adapters.store import SessionStore
from services.abr.algorithms import make_algorithm
from services.abr.handlers import Dependencies, Limits
from services.abr.settings import Settings
from services.bus.auth import claims_of
from services.bus.consumer import Handler, Record, Retryable
from services.bus.events import BitrateSample, Heartbeat, SessionStarted, SessionStopped
from services.bus.http import ApiError, parse_body
from services.bus.runtime import BUS, ServiceSpec

CONSUMES = ("playback.events", handlers.TELEMETRY)
PRODUCES = (handlers.TELEMETRY,)

DEPS = web.AppKey("abr_deps", Dependencies)

EventHandler = Callable[[Any, Record, Dependencies], Awaitable[None]]


class Wiring:
    """Holds the dependencies once the resources have built them, for the handler table."""

    def __init__(self) -> None:
        self._deps: Dependencies | None = None

    def set(self, deps: Dependencies) -> None:
        self._deps = deps

    @property
    def deps(self) -> Dependencies:
        if self._deps is None:
            raise RuntimeError("the ABR read model is not open yet")
        return self._deps

    def bind(self, handler: EventHandler) -> Handler:
        async def handle(event: Any, record: Record) -> None:
            await handler(event, record, self.deps)

        return handle


def limits_of(settings: Settings) -> Limits:
    return Limits(
        chunk_duration_s=settings.chunk_duration_s,
        default_ladder_kbps=settings.default_ladder_kbps,
        buffer_capacity_s=settings.buffer_capacity_s,
        history=settings.history,
        max_clock_skew=timedelta(seconds=settings.max_clock_skew_seconds),
        max_sample_age=timedelta(seconds=settings.max_sample_age_seconds),
        heartbeat_max_age=timedelta(seconds=settings.heartbeat_max_age_seconds),
    )


# -- HTTP --------------------------------------------------------------------------------------------


def _session_id(request: web.Request) -> uuid.UUID:
    raw = request.match_info["session_id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, f"session_id must be a UUID, got {raw[:64]!r}", field="session_id") from None


def _unavailable(exc: Retryable) -> ApiError:
    return ApiError(503, f"the ABR read model is unavailable, retry: {exc}", code="unavailable")


async def post_telemetry(request: web.Request) -> web.Response:
    claims = claims_of(request)
    session_id = _session_id(request)
    report = await parse_body(request, handlers.TelemetryReport)
    try:
        sample = await handlers.ingest(session_id, report, claims, request.app[DEPS])
    except Retryable as exc:
        raise _unavailable(exc) from None
    body = {"session_id": str(session_id), "event_id": str(sample.event_id), "sequence": sample.sequence}
    return web.json_response(body, status=202)


async def get_decision(request: web.Request) -> web.Response:
    claims = claims_of(request)
    session_id = _session_id(request)
    try:
        decision = await handlers.current_decision(session_id, claims, request.app[DEPS])
    except Retryable as exc:
        raise _unavailable(exc) from None
    return web.json_response({"session_id": str(session_id), "abr": decision})


def routes(app: web.Application) -> None:
    app.router.add_post("/v1/sessions/{session_id}/telemetry", post_telemetry)
    app.router.add_get("/v1/sessions/{session_id}/abr-decision", get_decision)


# -- the spec ------------------------------------------------------------------------------------------


def build_spec(settings: Settings) -> ServiceSpec:
    wiring = Wiring()
    algorithm = make_algorithm(settings.algorithm)

    async def read_model(app: web.Application) -> AsyncIterator[None]:
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_seconds,
            socket_connect_timeout=settings.redis_timeout_seconds,
        )
        store = SessionStore(redis, settings.redis_key_prefix, settings.session_ttl_seconds)
        deps = Dependencies(store, app[BUS].producer, algorithm, limits_of(settings))
        app[DEPS] = deps
        wiring.set(deps)
        yield
        await redis.aclose()

    async def redis_answers(app: web.Application) -> bool:
        return await app[DEPS].store.answers()

    return ServiceSpec(
        name="abr",
        consumes=CONSUMES,
        produces=PRODUCES,
        handlers={
            SessionStarted.SCHEMA_NAME: wiring.bind(handlers.session_started),
            SessionStopped.SCHEMA_NAME: wiring.bind(handlers.session_stopped),
            Heartbeat.SCHEMA_NAME: wiring.bind(handlers.heartbeat),
            BitrateSample.SCHEMA_NAME: wiring.bind(handlers.sample),
        },
        routes=routes,
        resources=[read_model],
        ready_checks={"redis": redis_answers},
    )
