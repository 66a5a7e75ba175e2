"""The billing database on the Galera cluster, reached only through HAProxy: a pool on the write
endpoint (galera-1, galera-2 while galera-1 is away) and one on the read endpoint (the async replica).

Every unit of work runs in ``in_transaction``: one InnoDB transaction at a chosen isolation level,
retried as a whole on a deadlock (1213, which is also how Galera reports a certification conflict or
a brute-force abort), a lock wait timeout, a node that is not ready (1047), or a connection lost to
failover. A transaction whose COMMIT was cut may have committed: the work functions are written so
that running them again is harmless (deterministic ids, the idempotency row checked under lock).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiomysql

log = logging.getLogger("reelbus.billing.db")

T = TypeVar("T")
Conn = Any  # aiomysql.Connection (untyped library)

# Errors after which the whole transaction is run again.
RETRYABLE_CODES = frozenset(
    {
        1205,  # lock wait timeout
        1213,  # deadlock; Galera's certification failure and brute-force abort
        1047,  # WSREP has not yet prepared node for application use
        1180,  # got error during COMMIT
        2003,  # cannot connect (HAProxy has no server up for a moment)
        2006,  # server has gone away
        2013,  # lost connection during query
        4031,  # disconnected by the server for inactivity
    }
)

# What the relay and the renewal job ride out (the cluster away for a while).
MYSQL_ERRORS: tuple[type[BaseException], ...] = (
    aiomysql.OperationalError,
    aiomysql.InternalError,
    aiomysql.InterfaceError,
)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (*MYSQL_ERRORS, OSError)


def retryable(exc: BaseException) -> bool:
    """A transaction that failed so may simply be run again."""
    if isinstance(exc, OSError | aiomysql.InterfaceError):  # the connection broke (failover)
        return True
    code = exc.args[0] if exc.args else None
    return code in RETRYABLE_CODES


PLANS: dict[str, int] = {"BASIC": 799, "STANDARD": 1299, "PREMIUM": 1999}

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS plans (
        code VARCHAR(16) PRIMARY KEY,
        amount_cents BIGINT NOT NULL,
        currency CHAR(3) NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
        subscription_id CHAR(36) PRIMARY KEY,
        account_id CHAR(36) NOT NULL,
        plan VARCHAR(16) NOT NULL,
        status VARCHAR(16) NOT NULL,
        card_token VARCHAR(64) NOT NULL,
        period_start DATETIME(3) NOT NULL,
        period_end DATETIME(3) NOT NULL,
        cancel_at_period_end BOOLEAN NOT NULL DEFAULT FALSE,
        ended_at DATETIME(3) NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        KEY by_account (account_id),
        KEY due (status, period_end)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS charges (
        charge_id CHAR(36) PRIMARY KEY,
        subscription_id CHAR(36) NOT NULL,
        account_id CHAR(36) NOT NULL,
        amount_cents BIGINT NOT NULL,
        refunded_cents BIGINT NOT NULL DEFAULT 0,
        currency CHAR(3) NOT NULL,
        status VARCHAR(16) NOT NULL,
        decline_reason VARCHAR(32) NULL,
        period_start DATETIME(3) NOT NULL,
        period_end DATETIME(3) NOT NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        KEY by_account (account_id),
        CHECK (refunded_cents <= amount_cents)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS refunds (
        refund_id CHAR(36) PRIMARY KEY,
        charge_id CHAR(36) NOT NULL,
        account_id CHAR(36) NOT NULL,
        amount_cents BIGINT NOT NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        KEY by_charge (charge_id)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS ledger_entries (
        entry_id BIGINT AUTO_INCREMENT PRIMARY KEY,
        txn_id CHAR(36) NOT NULL,
        account_id CHAR(36) NOT NULL,
        ledger_account VARCHAR(32) NOT NULL,
        amount_cents BIGINT NOT NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        UNIQUE KEY one_leg (txn_id, ledger_account, amount_cents),
        KEY by_account (account_id)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS idempotency (
        account_id CHAR(36) NOT NULL,
        idem_key VARCHAR(255) NOT NULL,
        request_hash CHAR(64) NOT NULL,
        state VARCHAR(16) NOT NULL,
        status_code INT NULL,
        response JSON NULL,
        write_gtid VARCHAR(64) NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        PRIMARY KEY (account_id, idem_key)
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS outbox (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        topic VARCHAR(128) NOT NULL,
        msg_key VARCHAR(64) NOT NULL,
        event_type VARCHAR(128) NOT NULL,
        payload JSON NOT NULL,
        trace_context JSON NOT NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
        sent_at DATETIME(3) NULL,
        KEY unsent (sent_at, id)
    ) ENGINE=InnoDB""",
    # The simulated payment provider's own record of what it captured and refunded, keyed by the
    # idempotency key we send it: a retried call never moves money twice.
    """CREATE TABLE IF NOT EXISTS provider_operations (
        provider_key CHAR(36) PRIMARY KEY,
        kind VARCHAR(16) NOT NULL,
        card_token VARCHAR(64) NOT NULL,
        amount_cents BIGINT NOT NULL,
        outcome VARCHAR(32) NOT NULL,
        created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
    ) ENGINE=InnoDB""",
]


@dataclass(frozen=True)
class Committed(Generic[T]):
    """A transaction's result and the GTID its commit was given (empty for a read-only one)."""

    value: T
    gtid: str


class Database:
    def __init__(self, write: Any, read: Any, attempts: int) -> None:
        self.write = write
        self.read = read
        self.attempts = attempts

    async def create_schema(self) -> None:
        async def ddl(conn: Conn) -> None:
            async with conn.cursor() as cur:
                for statement in SCHEMA:
                    await cur.execute(statement)
                for code, cents in PLANS.items():
                    await cur.execute(
                        "INSERT IGNORE INTO plans (code, amount_cents, currency) VALUES (%s, %s, 'USD')",
                        (code, cents),
                    )

        await self.in_transaction(ddl)

    async def in_transaction(
        self,
        work: Callable[[Conn], Awaitable[T]],
        isolation: str = "READ COMMITTED",
        pool: Any = None,
    ) -> Committed[T]:
        """``work`` in one transaction on the write endpoint, retried on the errors above."""
        pool = pool or self.write
        delay = 0.05
        for attempt in range(1, self.attempts + 1):
            try:
                conn = await pool.acquire()
            except CONNECTION_ERRORS as exc:
                if attempt == self.attempts or not retryable(exc):
                    raise
                await self._backoff(exc, attempt, delay)
                delay = min(delay * 2, 1.0)
                continue
            broken = False
            try:
                async with conn.cursor() as cur:
                    await cur.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                await conn.begin()
                value = await work(conn)
                await conn.commit()
                async with conn.cursor() as cur:
                    await cur.execute("SELECT @@last_gtid")
                    row = await cur.fetchone()
                return Committed(value, str(row[0] or "") if row else "")
            except CONNECTION_ERRORS as exc:
                broken = True
                if attempt == self.attempts or not retryable(exc):
                    raise
                await self._backoff(exc, attempt, delay)
                delay = min(delay * 2, 1.0)
            except BaseException:
                broken = True
                raise
            finally:
                if broken:
                    conn.close()  # never hand a connection in an unknown state back to the pool
                pool.release(conn)
        raise AssertionError("unreachable")

    async def _backoff(self, exc: BaseException, attempt: int, delay: float) -> None:
        log.warning("transaction attempt %d failed (%r); retrying", attempt, exc)
        await asyncio.sleep(delay * (0.5 + random.random()))


async def create_pool(host: str, port: int, user: str, password: str, db: str, size: int) -> Any:
    return await aiomysql.create_pool(
        host=host,
        port=port,
        user=user,
        password=password,
        db=db,
        minsize=0,
        maxsize=size,
        autocommit=True,
        connect_timeout=5,
        pool_recycle=60,
    )


async def fetch_one(conn: Conn, sql: str, args: Any = None) -> dict[str, Any] | None:
    async with conn.cursor(aiomysql.DictCursor) as cur:
        await cur.execute(sql, args)
        row = await cur.fetchone()
        return dict(row) if row else None


async def fetch_all(conn: Conn, sql: str, args: Any = None) -> list[dict[str, Any]]:
    async with conn.cursor(aiomysql.DictCursor) as cur:
        await cur.execute(sql, args)
        return [dict(r) for r in await cur.fetchall()]


async def execute(conn: Conn, sql: str, args: Any = None) -> int:
    async with conn.cursor() as cur:
        return int(await cur.execute(sql, args))
