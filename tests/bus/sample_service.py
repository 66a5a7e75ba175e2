"""A small service on the real runtime, for the tests that need a separate process.

It consumes ``SAMPLE_TOPIC`` and records each viewing as an effect in PostgreSQL, once per event id
(an upsert), while logging every delivery. With ``SAMPLE_CRASH_AFTER_HANDLING=1`` it dies right after
its first effect commits and before the bus commits the offset: the redelivery test.
``SAMPLE_HANDLER_DELAY`` makes each handling slow, for the shutdown test.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp import web
from opentelemetry import trace
from pydantic_settings import SettingsConfigDict

from services.bus.consumer import Record
from services.bus.contracts import Contracts, Topic
from services.bus.events import ViewRecorded
from services.bus.runtime import BusSettings, ServiceRuntime, ServiceSpec, load_settings, setup_logging
from services.bus.tracing import ATTR_PROFILE_ID, setup_tracing

log = logging.getLogger("sample")
POOL = web.AppKey("pool", asyncpg.Pool)


class SampleSettings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="SAMPLE_", extra="ignore", frozen=True)

    topic: str
    database_url: str
    crash_after_handling: bool = False
    handler_delay: float = 0.0


SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    event_id uuid NOT NULL, delivered_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS effects (
    event_id uuid PRIMARY KEY, title_id text NOT NULL, position_ms bigint NOT NULL);
"""


async def record_view(
    event: ViewRecorded, record: Record, *, app: web.Application, settings: SampleSettings
) -> None:
    trace.get_current_span().set_attribute(ATTR_PROFILE_ID, str(event.profile_id))
    log.info("handling %s", event.event_id)
    if settings.handler_delay:
        await asyncio.sleep(settings.handler_delay)
    async with app[POOL].acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO deliveries (event_id) VALUES ($1)", event.event_id)
        await conn.execute(
            "INSERT INTO effects (event_id, title_id, position_ms) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            event.event_id,
            event.title_id,
            event.position_ms,
        )
    if settings.crash_after_handling:
        os._exit(17)  # the effect is committed, the offset is not


def build(settings: SampleSettings, contracts: Contracts) -> ServiceRuntime:
    app_holder: dict[str, web.Application] = {}

    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[POOL] = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
        async with app[POOL].acquire() as conn:
            await conn.execute(SCHEMA)
        app_holder["app"] = app
        yield
        await app[POOL].close()

    async def handle(event: Any, record: Record) -> None:
        await record_view(event, record, app=app_holder["app"], settings=settings)

    spec = ServiceSpec(
        name="sample",
        consumes=[settings.topic],
        handlers={ViewRecorded.SCHEMA_NAME: handle},
        resources=[pool],
    )
    return ServiceRuntime(spec, settings, contracts)


def contracts_with_test_topic(name: str) -> Contracts:
    base = Contracts.load()
    like: Topic = base.topic("history.views")
    from dataclasses import replace

    return base.with_topics([replace(like, name=name)])


def main() -> None:
    settings = load_settings(SampleSettings)
    setup_logging("sample", settings.log_level)
    provider = setup_tracing("sample")
    runtime = build(settings, contracts_with_test_topic(settings.topic))
    try:
        code = asyncio.run(runtime.run())
    finally:
        provider.shutdown()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
