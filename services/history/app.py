"""The history service for the runtime: its topics, handler table, routes and resources."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from services.bus.consumer import Handler, Record
from services.bus.events import (
    Heartbeat,
    ProfileCreated,
    SessionPaused,
    SessionResumed,
    SessionStarted,
    SessionStopped,
)
from services.bus.runtime import BUS, ServiceSpec
from services.history import handlers
from services.history.adapters.cassandra import CassandraClient
from services.history.adapters.store import HistoryStore
from services.history.api import DEPS, routes
from services.history.handlers import Dependencies, EventHandler, RollupPolicy
from services.history.settings import Settings

log = logging.getLogger("reelbus.history")

CONSUMES = ("playback.events", "accounts.profiles")
PRODUCES = (handlers.VIEWS_TOPIC,)


class Wiring:
    """Holds the dependencies once the resources have built them, for the handler table."""

    def __init__(self) -> None:
        self._deps: Dependencies | None = None

    def set(self, deps: Dependencies) -> None:
        self._deps = deps

    @property
    def deps(self) -> Dependencies:
        if self._deps is None:
            raise RuntimeError("the history store is not open yet")
        return self._deps

    def bind(self, handler: EventHandler) -> Handler:
        async def handle(event: Any, record: Record) -> None:
            await handler(event, record, self.deps)

        return handle


def build_spec(settings: Settings) -> ServiceSpec:
    wiring = Wiring()
    policy = RollupPolicy(settings.rollup_after, settings.rollup_keep_live, settings.chunk_bytes)

    async def cassandra(app: web.Application) -> AsyncIterator[None]:
        client = await CassandraClient.connect(
            settings.contact_points,
            settings.cassandra_port,
            protocol_version=settings.cassandra_protocol_version,
            request_timeout=settings.cassandra_request_timeout,
            connect_timeout=settings.cassandra_connect_timeout,
        )
        try:
            store = await HistoryStore.open(client, settings.keyspace)
        except BaseException:
            await client.close()
            raise
        deps = Dependencies(store, app[BUS].producer, policy, settings.completed_fraction)
        app[DEPS] = deps
        wiring.set(deps)
        yield
        await store.close()

    async def periodic_rollup(app: web.Application) -> None:
        interval = settings.rollup_interval.total_seconds()
        if interval <= 0:
            await asyncio.Event().wait()  # turned off: idle until the service stops
        while True:
            await asyncio.sleep(interval)
            try:
                moved = await handlers.rollup_all(app[DEPS])
                if moved:
                    log.info("periodic rollup moved %d live record(s) into CompressedVH", moved)
            except Exception:  # a failed pass leaves every record where it was; the next one retries
                log.exception("periodic rollup pass failed")

    async def cassandra_answers(app: web.Application) -> bool:
        return await app[DEPS].store.answers()

    playback = wiring.bind(handlers.record_playback)
    return ServiceSpec(
        name="history",
        consumes=CONSUMES,
        produces=PRODUCES,
        handlers={
            SessionStarted.SCHEMA_NAME: playback,
            Heartbeat.SCHEMA_NAME: playback,
            SessionPaused.SCHEMA_NAME: playback,
            SessionResumed.SCHEMA_NAME: playback,
            SessionStopped.SCHEMA_NAME: playback,
            ProfileCreated.SCHEMA_NAME: wiring.bind(handlers.record_profile),
        },
        routes=routes,
        resources=[cassandra],
        root_tasks={"periodic-rollup": periodic_rollup},
        ready_checks={"cassandra": cassandra_answers},
    )
