"""The catalog's ``ServiceSpec``: routes, the handler table and its resources.

Routes (all need a verified token; writes need the ``catalog:write`` scope):

- ``GET    /v1/catalog/titles?limit=&offset=&genre=``  a page of titles (``X-Cache: hit|miss``)
- ``POST   /v1/catalog/titles``                        create a title (201)
- ``GET    /v1/catalog/titles/{title_id}``             one title (``X-Cache: hit|miss``)
- ``PUT    /v1/catalog/titles/{title_id}``             partial update
- ``DELETE /v1/catalog/titles/{title_id}``             delete (204)

Consumes ``catalog.changes`` (its own events) in a consumer group per replica, ``catalog-<instance>``,
so that every replica invalidates the cache; produces ``catalog.changes`` through the outbox relay.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from redis.asyncio import Redis

from services.bus.auth import claims_of
from services.bus.consumer import Record
from services.bus.events import TitleChanged
from services.bus.http import parse_body, query_int
from services.bus.runtime import BUS, ServiceSpec
from services.catalog import handlers
from services.catalog.adapters.cache import TitleCache
from services.catalog.adapters.outbox import OutboxRelay
from services.catalog.adapters.store import Store
from services.catalog.settings import Settings
from services.catalog.titles import TitleCreate, TitlePatch

log = logging.getLogger("reelbus.catalog")

STORE = web.AppKey("store", Store)
CACHE = web.AppKey("cache", TitleCache)
CATALOG_SETTINGS = web.AppKey("catalog_settings", Settings)
RELAY = web.AppKey("relay", OutboxRelay)

MAX_OFFSET = 1_000_000


def _json(body: str, status: int = 200, cache: bool | None = None) -> web.Response:
    headers = {} if cache is None else {"X-Cache": "hit" if cache else "miss"}
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


# -- routes ---------------------------------------------------------------------------------


async def list_titles(request: web.Request) -> web.Response:
    query = handlers.PageQuery(
        limit=query_int(request, "limit", 20, 1, 100),
        offset=query_int(request, "offset", 0, 0, MAX_OFFSET),
        genre=handlers.check_genre(request.query.get("genre")),
    )
    body, hit = await handlers.list_titles(query, request.app[STORE], request.app[CACHE])
    return _json(body, cache=hit)


async def get_title(request: web.Request) -> web.Response:
    body, hit = await handlers.get_title(
        request.match_info["title_id"], request.app[STORE], request.app[CACHE]
    )
    return _json(body, cache=hit)


def _require_write(request: web.Request) -> None:
    claims = claims_of(request)
    handlers.require_scope(claims.scopes, claims.account_id)


async def create_title(request: web.Request) -> web.Response:
    _require_write(request)
    body = await parse_body(request, TitleCreate)
    title = await handlers.create_title(body, request.app[STORE])
    return web.json_response(
        title.to_json(), status=201, headers={"Location": f"/v1/catalog/titles/{title.title_id}"}
    )


async def update_title(request: web.Request) -> web.Response:
    _require_write(request)
    title_id = handlers.check_title_id(request.match_info["title_id"])
    patch = await parse_body(request, TitlePatch)
    title = await handlers.update_title(title_id, patch, request.app[STORE])
    return web.json_response(title.to_json())


async def delete_title(request: web.Request) -> web.Response:
    _require_write(request)
    await handlers.delete_title(request.match_info["title_id"], request.app[STORE])
    return web.Response(status=204)


# -- the spec -------------------------------------------------------------------------------


def instance_name(settings: Settings) -> str:
    return settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"


def build_spec(settings: Settings) -> ServiceSpec:
    apps: list[web.Application] = []  # the one app the runtime builds, for the event handler

    def routes(app: web.Application) -> None:
        apps.append(app)
        app[CATALOG_SETTINGS] = settings
        app.router.add_get("/v1/catalog/titles", list_titles)
        app.router.add_post("/v1/catalog/titles", create_title)
        app.router.add_get("/v1/catalog/titles/{title_id}", get_title)
        app.router.add_put("/v1/catalog/titles/{title_id}", update_title)
        app.router.add_delete("/v1/catalog/titles/{title_id}", delete_title)

    async def handle_title_changed(event: Any, record: Record) -> None:
        assert isinstance(event, TitleChanged)
        await handlers.on_title_changed(event, record, cache=apps[0][CACHE])

    return ServiceSpec(
        name="catalog",
        consumes=[handlers.CHANGES_TOPIC],
        produces=[handlers.CHANGES_TOPIC],
        handlers={TitleChanged.SCHEMA_NAME: handle_title_changed},
        routes=routes,
        resources=[database, cache, outbox_relay],
        root_tasks={"outbox-relay": run_relay},
        ready_checks={"database": database_answers},
        # A group per replica: every replica sees every change (a shared group would split them).
        group_id=f"catalog-{instance_name(settings)}",
    )


# -- resources (aiohttp cleanup_ctx) --------------------------------------------------------


async def database(app: web.Application) -> AsyncIterator[None]:
    """The pool, the schema, and the sample catalog when the database is empty."""
    settings = app[CATALOG_SETTINGS]
    async with Store.open(settings.database_url, settings.database_pool_size) as store:
        seeded = await handlers.seed_catalog(store, settings.seed_titles, settings.seed_rng_seed)
        if seeded:
            log.info("seeded the catalog with %d titles (rng seed %d)", seeded, settings.seed_rng_seed)
        app[STORE] = store
        yield


async def cache(app: web.Application) -> AsyncIterator[None]:
    settings = app[CATALOG_SETTINGS]
    redis = Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    app[CACHE] = TitleCache(
        redis, settings.cache_key_prefix, settings.cache_ttl_seconds, settings.cache_version_ttl_seconds
    )
    if not await app[CACHE].ping():
        log.warning("the cache at %s does not answer; reads go to PostgreSQL meanwhile", settings.redis_url)
    yield
    await redis.aclose()


async def outbox_relay(app: web.Application) -> AsyncIterator[None]:
    settings = app[CATALOG_SETTINGS]
    bus = app[BUS]
    relay = OutboxRelay(
        app[STORE].pool,
        settings.database_url,
        bus.producer,
        bus.contracts.topic(handlers.CHANGES_TOPIC),
        producer_ready=lambda: bus.producer_ready,
        batch_size=settings.outbox_batch_size,
        poll_seconds=settings.outbox_poll_seconds,
    )
    app[RELAY] = relay
    yield


async def run_relay(app: web.Application) -> None:
    """A root task: if the relay ever ends, the runtime stops the service with a failure."""
    await app[RELAY].run()


async def database_answers(app: web.Application) -> bool:
    async with app[STORE].pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT 1"))
