"""Losing the Galera writer (kill -9 of galera-1 by its recorded pid) during a stream of subscribe
requests: no payment is lost or taken twice. Every request either succeeds once or fails cleanly,
and a retry with the same Idempotency-Key completes it. galera-1 is started again afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
import uuid

import aiohttp
import pytest

from services.bus.auth import TokenIssuer
from services.cli import galera, infra
from tests.billing.service import PORTS, Customer, customer, query, start_billing, subscribe, value
from tests.conftest import SpawnService, wait_for

pytestmark = [pytest.mark.infra, pytest.mark.timeout(300)]


async def attempt(http: aiohttp.ClientSession, base: str, who: Customer, key: str) -> bool:
    """One subscribe request; True once it answered 201."""
    try:
        reply = await subscribe(http, base, who, key=key)
    except (aiohttp.ClientError, TimeoutError):
        return False
    assert reply.status in (201, 500, 503, 504), reply  # never a wrong answer, at worst "try again"
    return reply.status == 201


async def cluster_whole(layout: infra.Layout) -> None:
    def whole() -> bool:
        for name in galera.DATA_NODES:
            try:
                st = galera.wsrep_status(layout, name, timeout=3.0)
            except galera.SqlError:
                return False
            if (st.get("wsrep_cluster_size"), st.get("wsrep_local_state_comment")) != ("3", "Synced"):
                return False
        try:
            return galera.endpoint_sql(PORTS.write, "SELECT @@wsrep_node_name", timeout=5) == [("galera-1",)]
        except galera.SqlError:
            return False

    async def probe() -> bool:
        return await asyncio.to_thread(whole)

    await wait_for(probe, "both data nodes Synced and HAProxy writing to galera-1 again", 90, 0.3)


async def test_killing_the_writer_during_subscribes_loses_no_payment_and_takes_none_twice(
    billing_db: infra.Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    service = await start_billing(spawn_service, database, BILLING_TRANSACTION_ATTEMPTS="3")
    await cluster_whole(billing_db)
    customers = [customer(token_issuer) for _ in range(3)]
    keys: dict[str, Customer] = {}
    pending: set[str] = set()
    stop = asyncio.Event()

    async def stream(who: Customer) -> None:
        while not stop.is_set():
            key = str(uuid.uuid4())
            keys[key] = who
            if not await attempt(http, service.url, who, key):
                pending.add(key)

    workers = [asyncio.create_task(stream(who)) for who in customers]
    try:
        await wait_for(lambda: _async(len(keys) >= 6), "a few subscribes before the kill", 30, 0.05)
        record = infra.read_pid(billing_db, "galera-1")
        assert record is not None and record.alive(), "galera-1 is not running"
        outcome = await asyncio.to_thread(infra.stop_pid, billing_db, "galera-1", signal.SIGKILL, 10.0)
        assert outcome.startswith("stopped"), outcome
        killed = time.monotonic()
        await wait_for(lambda: _async(time.monotonic() - killed > 8), "requests during the failover", 20, 0.2)
        stop.set()
        await asyncio.gather(*workers)

        # Every request that failed completes when retried with its key.
        for key in sorted(pending):
            retry = functools.partial(attempt, http, service.url, keys[key], key)
            await wait_for(retry, f"a retry of {key} to complete", 30, 0.3)
        charges = await query(database, "SELECT account_id, count(*) FROM charges GROUP BY account_id")
        assert sum(int(n) for _, n in charges) == len(keys)
        done = await value(database, "SELECT count(*) FROM idempotency WHERE state='done'")
        assert done == len(keys)
        captured = await value(database, "SELECT count(*) FROM provider_operations WHERE outcome='captured'")
        assert captured == len(keys)  # one capture per request, none twice
        assert await value(database, "SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entries") == 0
        cash = await value(
            database, "SELECT SUM(amount_cents) FROM ledger_entries WHERE ledger_account='cash'"
        )
        assert cash == 799 * len(keys)
        print(f"\n{len(keys)} subscribes, {len(pending)} failed during the failover and were retried")
    finally:
        stop.set()
        for task in workers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await infra.up(billing_db, ["galera-1"])
        await cluster_whole(billing_db)


async def _async(flag: bool) -> bool:
    return flag
