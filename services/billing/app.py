"""The billing service for the runtime: HTTP routes, the two database pools, the payment provider,
the outbox relay and the renewal job (both root tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from services.billing import handlers
from services.billing.adapters.db import MYSQL_ERRORS, Database, create_pool
from services.billing.adapters.outbox import TRANSIENT, OutboxRelay
from services.billing.adapters.provider import PaymentProvider
from services.billing.settings import Settings
from services.bus.auth import claims_of
from services.bus.http import parse_body
from services.bus.runtime import BUS, ServiceSpec

log = logging.getLogger("reelbus.billing")

SETTINGS = web.AppKey("billing_settings", Settings)
DEPS = web.AppKey("billing_deps", handlers.Deps)
RELAY = web.AppKey("billing_relay", OutboxRelay)


# -- resources ---------------------------------------------------------------------------------


async def database(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    write = await create_pool(s.write_host, s.write_port, s.database_user, s.database_password,
                              s.database_name, s.database_pool_size)  # fmt: skip
    read = await create_pool(s.read_host, s.read_port, s.database_user, s.database_password,
                             s.database_name, s.database_pool_size)  # fmt: skip
    db = Database(write, read, s.transaction_attempts)
    await db.create_schema()
    own = await create_pool(s.write_host, s.write_port, s.database_user, s.database_password,
                            s.database_name, s.database_pool_size)  # fmt: skip
    provider = PaymentProvider(
        Database(own, own, s.transaction_attempts),
        timeout_seconds=s.provider_timeout_seconds,
        slow_seconds=s.provider_slow_seconds,
    )
    relay = OutboxRelay(
        db,
        app[BUS],
        batch_size=s.outbox_batch_size,
        poll_interval=s.outbox_poll_interval_seconds,
        retention_hours=s.outbox_retention_hours,
        start_delay=s.outbox_relay_start_delay_seconds,
    )
    app[RELAY] = relay
    app[DEPS] = handlers.Deps(db, provider, dt.timedelta(seconds=s.period_seconds), relay.wake)
    yield
    for pool in (write, read, own):
        pool.close()
        await pool.wait_closed()


async def run_relay(app: web.Application) -> None:
    """A root task: if the relay ever ends, the runtime stops the whole service with a failure."""
    await app[RELAY].run()


async def run_renewals(app: web.Application) -> None:
    """A root task: renew the subscriptions that are due, every ``renewal_interval_seconds``."""
    interval = app[SETTINGS].renewal_interval_seconds
    while True:
        try:
            renewed = await handlers.renew_due(app[DEPS])
            if renewed:
                log.info("renewed %d subscription(s)", renewed)
        except TRANSIENT as exc:
            log.warning("renewal run failed (%r); next run in %.1fs", exc, interval)
        await asyncio.sleep(interval)


async def database_answers(app: web.Application) -> bool:
    async def ping(_conn: object) -> bool:
        return True

    with contextlib.suppress(*MYSQL_ERRORS, OSError):
        return (await app[DEPS].db.in_transaction(ping)).value
    return False


# -- HTTP --------------------------------------------------------------------------------------


def _respond(reply: handlers.Reply) -> web.Response:
    headers = {}
    if reply.gtid:
        headers["X-Write-GTID"] = reply.gtid
    if reply.replayed:
        headers["Idempotent-Replayed"] = "true"
    return web.json_response(reply.body, status=reply.status, headers=headers)


async def post_subscription(request: web.Request) -> web.Response:
    cmd = await parse_body(request, handlers.Subscribe)
    reply = await handlers.subscribe(
        cmd,
        token_account=claims_of(request).account_id,
        key=request.headers.get(handlers.IDEMPOTENCY_HEADER),
        deps=request.app[DEPS],
    )
    return _respond(reply)


async def post_cancel(request: web.Request) -> web.Response:
    cmd = await parse_body(request, handlers.Cancel) if await request.read() else handlers.Cancel()
    reply = await handlers.cancel(
        request.match_info["subscription_id"],
        cmd,
        token_account=claims_of(request).account_id,
        deps=request.app[DEPS],
    )
    return _respond(reply)


async def post_refund(request: web.Request) -> web.Response:
    cmd = await parse_body(request, handlers.Refund)
    reply = await handlers.refund(
        cmd,
        token_account=claims_of(request).account_id,
        key=request.headers.get(handlers.IDEMPOTENCY_HEADER),
        deps=request.app[DEPS],
    )
    return _respond(reply)


async def get_account(request: web.Request) -> web.Response:
    view = await handlers.account_view(
        request.match_info["account_id"],
        token_account=claims_of(request).account_id,
        read_your_writes=request.headers.get("X-Read-Your-Writes"),
        db=request.app[DEPS].db,
        wait_seconds=request.app[SETTINGS].read_your_writes_wait_seconds,
    )
    return web.json_response(view, headers={"Cache-Control": "no-store"})


def create_spec(settings: Settings) -> ServiceSpec:
    def routes(app: web.Application) -> None:
        app[SETTINGS] = settings
        app.router.add_post("/v1/billing/subscriptions", post_subscription)
        app.router.add_post("/v1/billing/subscriptions/{subscription_id}/cancel", post_cancel)
        app.router.add_post("/v1/billing/refunds", post_refund)
        app.router.add_get("/v1/billing/accounts/{account_id}", get_account)

    return ServiceSpec(
        name="billing",
        produces=[handlers.EVENTS_TOPIC],
        routes=routes,
        resources=[database],
        root_tasks={"outbox-relay": run_relay, "renewals": run_renewals},
        ready_checks={"database": database_answers},
    )
