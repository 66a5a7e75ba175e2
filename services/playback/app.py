"""Playback's ServiceSpec: routes, the handler table, and its resources (database, outbox relay,
catch-up tracker), each a cleanup_ctx context."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from services.bus.auth import claims_of
from services.bus.consumer import Handler, Record, Retryable
from services.bus.events import (
    ApplianceContents,
    ApplianceHealth,
    PaymentFailed,
    ProfileCreated,
    SubscriptionCancelled,
    SubscriptionRenewed,
    SubscriptionStarted,
    TitleChanged,
)
from services.bus.http import ApiError, parse_body
from services.bus.runtime import BUS, ServiceSpec
from services.playback import handlers
from services.playback.adapters.catch_up import CatchUp
from services.playback.adapters.db import TRANSIENT_DB_ERRORS, PlaybackStore
from services.playback.adapters.outbox import OutboxRelay
from services.playback.appliances import Appliance
from services.playback.client_address import client_address
from services.playback.settings import Settings

log = logging.getLogger("reelbus.playback")

SERVICE = "playback"
CONSUMES = ("billing.events", "accounts.profiles", "catalog.changes", "opencdn.appliances")
PRODUCES = (handlers.PLAYBACK_EVENTS,)


class PlaybackState:
    """The service's state, filled in by its resources: the store, the relay, the catch-up tracker."""

    def __init__(self, settings: Settings, appliances: tuple[Appliance, ...]) -> None:
        self.settings = settings
        self.appliances = appliances
        self.appliance_ids = frozenset(a.id for a in appliances)
        self.store: PlaybackStore | None = None
        self.catch_up: CatchUp | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def require_store(self) -> PlaybackStore:
        if self.store is None:
            raise RuntimeError("the database resource is not set up")
        return self.store

    def playback(self) -> handlers.Playback:
        return handlers.Playback(
            store=self.require_store(),
            appliances=self.appliances,
            manifest_max_urls=self.settings.manifest_max_urls,
            position_margin_ms=self.settings.position_margin_ms,
        )


STATE = web.AppKey("playback_state", PlaybackState)


# -- HTTP ---------------------------------------------------------------------------------------


def _session_id(request: web.Request) -> uuid.UUID:
    raw = request.match_info["session_id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(400, f"session_id must be a UUID, got {raw!r}", field="session_id") from None


def _refusal(exc: handlers.Refused) -> web.Response:
    body: dict[str, Any] = {"error": exc.code, "message": exc.message, "reason": exc.reason}
    if exc.field is not None:
        body["field"] = exc.field
    return web.json_response(body, status=exc.status)


async def start_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    claims = claims_of(request)
    command = await parse_body(request, handlers.StartSession)
    client = client_address(
        request.remote, request.headers.getall("X-Forwarded-For", []), state.settings.trusted_proxies
    )
    try:
        started = await handlers.start_session(command, claims, client, state.playback())
    except handlers.Refused as exc:
        return _refusal(exc)
    body = {
        "session_id": str(started.session_id),
        "manifest": {"cdn": started.cdn, "ladder": started.ladder_kbps},
    }
    location = f"/v1/playback/sessions/{started.session_id}"
    return web.json_response(body, status=201, headers={"Location": location})


async def heartbeat(request: web.Request) -> web.Response:
    state = request.app[STATE]
    claims = claims_of(request)
    session_id = _session_id(request)
    report = await parse_body(request, handlers.HeartbeatReport)
    sequence = await handlers.record_heartbeat(session_id, report, claims, state.playback())
    return web.json_response({"session_id": str(session_id), "sequence": sequence}, status=202)


async def stop(request: web.Request) -> web.Response:
    state = request.app[STATE]
    claims = claims_of(request)
    session_id = _session_id(request)
    command = await parse_body(request, handlers.StopSession)
    stopped = await handlers.stop_session(session_id, command, claims, state.playback())
    body = {"session_id": str(session_id), "stopped": True, "already_stopped": stopped.already_stopped}
    return web.json_response(body, status=202)


Probe = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def probes(request: web.Request, handler: Probe) -> web.StreamResponse:
    """Adds playback's own conditions to the runtime's probes: ``/readyz`` also waits for the
    projections to catch up; ``/livez`` also fails when the outbox relay or the tracker died."""
    response = await handler(request)
    if request.path not in ("/readyz", "/livez") or not isinstance(response, web.Response):
        return response
    if not isinstance(response.body, bytes):
        return response
    state = request.app[STATE]
    body: dict[str, Any] = json.loads(response.body)
    if request.path == "/readyz":
        tracker = state.catch_up
        body["checks"]["projections_caught_up"] = tracker is not None and tracker.caught_up
        if tracker is not None and tracker.behind and not tracker.caught_up:
            body["behind"] = tracker.behind
        ok = all(body["checks"].values())
        body["ready"] = ok
    else:
        dead = [name for name, task in state.tasks.items() if task.done()]
        body["dead_tasks"] = [*body.get("dead_tasks", []), *dead]
        ok = not body["dead_tasks"]
        body["live"] = ok
    return web.json_response(body, status=200 if ok else 503)


# -- consumed events ----------------------------------------------------------------------------


def _handler_table(state: PlaybackState) -> dict[str, Handler]:
    def transient_is_retryable(
        handle: Callable[[Any, PlaybackStore], Awaitable[None]],
    ) -> Handler:
        async def run(event: Any, record: Record) -> None:
            try:
                await handle(event, state.require_store())
            except TRANSIENT_DB_ERRORS as exc:
                raise Retryable(f"database: {exc!r}") from exc

        return run

    async def health(event: ApplianceHealth, store: PlaybackStore) -> None:
        await handlers.on_appliance_health(event, store, state.appliance_ids)

    async def contents(event: ApplianceContents, store: PlaybackStore) -> None:
        await handlers.on_appliance_contents(event, store, state.appliance_ids)

    billing = transient_is_retryable(handlers.on_billing_event)
    return {
        SubscriptionStarted.SCHEMA_NAME: billing,
        SubscriptionRenewed.SCHEMA_NAME: billing,
        SubscriptionCancelled.SCHEMA_NAME: billing,
        PaymentFailed.SCHEMA_NAME: billing,
        ProfileCreated.SCHEMA_NAME: transient_is_retryable(handlers.on_profile_created),
        TitleChanged.SCHEMA_NAME: transient_is_retryable(handlers.on_title_changed),
        ApplianceHealth.SCHEMA_NAME: transient_is_retryable(health),
        ApplianceContents.SCHEMA_NAME: transient_is_retryable(contents),
    }


# -- resources ----------------------------------------------------------------------------------


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await task
        except Exception:
            log.exception("%s had failed", task.get_name())


def build_spec(settings: Settings, appliances: tuple[Appliance, ...]) -> ServiceSpec:
    state = PlaybackState(settings, appliances)

    def routes(app: web.Application) -> None:
        app[STATE] = state
        app.middlewares.append(probes)
        app.router.add_post("/v1/playback/sessions", start_session)
        app.router.add_post("/v1/playback/sessions/{session_id}/heartbeats", heartbeat)
        app.router.add_post("/v1/playback/sessions/{session_id}/stop", stop)

    async def database(app: web.Application) -> AsyncIterator[None]:
        embedded = sum(1 for a in appliances if a.kind == "embedded")
        log.info(
            "steering to %d appliance(s): %d embedded, %d at exchange points",
            len(appliances),
            embedded,
            len(appliances) - embedded,
        )
        state.store = await PlaybackStore.connect(settings.database_url, settings.db_pool_max_size)
        yield
        await state.store.close()

    async def outbox_relay(app: web.Application) -> AsyncIterator[None]:
        bus = app[BUS]
        store = state.require_store()
        relay = OutboxRelay(
            store.pool,
            bus.producer,
            bus.contracts,
            wake=store.published,
            producer_ready=lambda: bus.producer_ready,
            poll_seconds=settings.outbox_poll_seconds,
        )
        task = asyncio.create_task(relay.run(), name="outbox-relay")
        state.tasks["outbox-relay"] = task
        yield
        await _stop_task(task)

    async def catch_up(app: web.Application) -> AsyncIterator[None]:
        tracker = CatchUp(
            settings.kafka_bootstrap_servers,
            settings.group_id or SERVICE,
            CONSUMES,
            timeout=settings.catch_up_timeout_seconds,
        )
        state.catch_up = tracker
        task = asyncio.create_task(tracker.run(), name="catch-up")
        task.add_done_callback(_report_failure)
        yield
        await _stop_task(task)

    return ServiceSpec(
        name=SERVICE,
        consumes=CONSUMES,
        produces=PRODUCES,
        handlers=_handler_table(state),
        routes=routes,
        resources=[database, outbox_relay, catch_up],
    )


def _report_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed: %r; readiness stays false", task.get_name(), task.exception())
