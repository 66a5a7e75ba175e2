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

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
from confluent_kafka import KafkaException
from opentelemetry import context as otel_context
from opentelemetry import propagate

from services.bus.events import AvroEvent, ProfileCreated
from services.bus.producer import Delivered
from services.bus.runtime import Bus

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


def to_payload(event: AvroEvent) -> dict[str, Any]:
    """The event as JSON-safe values: uuids as strings, timestamps as epoch milliseconds."""

    def plain(value: Any) -> Any:
        if isinstance(value, uuid.UUID):
            return str(value)
        if isinstance(value, dt.datetime):
            return int(value.timestamp() * 1000)
        return value

    return {k: plain(v) for k, v in event.to_record().items()}


def current_trace_context() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class OutboxRelay:
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
        self.pool = pool
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention_hours = retention_hours
        self.start_delay = start_delay
        self._wake = asyncio.Event()
        self._last_purge = 0.0

    def wake(self) -> None:
        """Something was committed to the outbox: publish it now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        if self.start_delay:
            log.warning("outbox relay held back for %.1fs (ACCOUNTS_OUTBOX_RELAY_START_DELAY_SECONDS)",
                        self.start_delay)  # fmt: skip
            await asyncio.sleep(self.start_delay)
        backoff = 0.5
        while True:
            if not self.bus.producer_ready:
                await asyncio.sleep(0.2)
                continue
            self._wake.clear()  # rows committed from here on wake the wait below
            try:
                sent = await self.relay_once()
                await self._purge_sent()
            except TRANSIENT as exc:
                log.warning("outbox relay failed (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            if sent >= self.batch_size:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows, in order; returns how many were published."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                return 0  # another instance is relaying
            rows = await conn.fetch(
                "SELECT id, topic, key, event_type, payload, trace_context FROM outbox "
                "WHERE sent_at IS NULL ORDER BY id LIMIT $1",
                self.batch_size,
            )
            if not rows:
                return 0
            futures: list[asyncio.Future[Delivered]] = []
            failed: BaseException | None = None
            for row in rows:  # queued in order; the idempotent producer keeps that order
                try:
                    futures.append(self._produce(row))
                except Exception as exc:
                    failed = exc
                    break
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            failed = failed or next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failed is not None:
                raise failed  # nothing is marked sent; the whole batch goes again
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
        log.info("outbox relay published %d event(s)", len(rows))
        return len(rows)

    def _produce(self, row: Mapping[str, Any]) -> asyncio.Future[Delivered]:
        decode = DECODERS.get(row["event_type"])
        if decode is None:
            raise LookupError(f"outbox row {row['id']} has an unknown event type {row['event_type']!r}")
        event = decode(json.loads(row["payload"]))
        parent = propagate.extract(json.loads(row["trace_context"]))
        token = otel_context.attach(parent)
        try:
            return self.bus.producer.produce(self.bus.contracts.topic(row["topic"]), row["key"], event)
        finally:
            otel_context.detach(token)

    async def _purge_sent(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < 3600:
            return
        self._last_purge = now
        await self.pool.execute(
            "DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)",
            self.retention_hours * 3600,
        )
