"""The transactional outbox's relay: publish committed, unsent outbox rows in order, then mark them sent.

One relay at a time publishes (a transaction-scoped advisory lock), so rows go out in ``id`` order
and an account's events keep their order in its partition. A row is marked sent only in the
transaction that saw its delivery acknowledged; if the process dies in between, the next relay
publishes it again (at-least-once: consumers deduplicate on ``event_id``). Rows are never lost: a
crash between the request's commit and the publish leaves the row unsent for the next start.

The request's trace context is stored with the row, so the PRODUCER span continues the request's
trace even though it is sent later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
from confluent_kafka import KafkaException

from services.bus import outbox
from services.bus.events import AvroEvent, ProfileCreated
from services.bus.outbox import Publish, current_trace_context, to_payload
from services.bus.runtime import Bus

__all__ = ["DECODERS", "RELAY_LOCK", "TRANSIENT", "OutboxRelay", "current_trace_context", "to_payload"]

log = logging.getLogger("reelbus.accounts.outbox")

RELAY_LOCK = 0x6F757462  # "outb"
DECODERS: Mapping[str, Callable[[Mapping[str, Any]], AvroEvent]] = {
    ProfileCreated.SCHEMA_NAME: ProfileCreated.from_record,
}
# Failures that pass: the database or the broker is away for a while, or the producer is not (or no
# longer) started. Anything else is a bug and ends the relay.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    KafkaException,
    RuntimeError,  # DeliveryFailed, and "producer not started" while the runtime stops
)


class OutboxStore:
    """The relay's PostgreSQL side: the batch is taken, published and marked sent in one transaction
    that holds a transaction-scoped advisory lock."""

    def __init__(self, pool: asyncpg.Pool, retention_hours: float) -> None:
        self.pool = pool
        self.retention_hours = retention_hours
        self._last_purge = 0.0

    async def relay_batch(self, limit: int, publish: Publish) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                return 0  # another instance is relaying
            rows = await conn.fetch(
                "SELECT id, topic, key, event_type, payload, trace_context FROM outbox "
                "WHERE sent_at IS NULL ORDER BY id LIMIT $1",
                limit,
            )
            if not rows:
                return 0
            await publish(rows)
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        return len(rows)

    async def purge_sent(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < 3600:
            return
        self._last_purge = now
        await self.pool.execute(
            "DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)",
            self.retention_hours * 3600,
        )


class OutboxRelay(outbox.OutboxRelay):
    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        *,
        batch_size: int,
        poll_interval: float,
        retention_hours: float,
        start_delay: float = 0.0,
    ) -> None:
        super().__init__(
            OutboxStore(pool, retention_hours),
            bus,
            decoders=DECODERS,
            transient=TRANSIENT,
            logger=log,
            batch_size=batch_size,
            poll_interval=poll_interval,
            start_delay=start_delay,
            start_delay_setting="ACCOUNTS_OUTBOX_RELAY_START_DELAY_SECONDS",
        )
        self.pool = pool
        self.retention_hours = retention_hours
