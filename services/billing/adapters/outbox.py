"""The transactional outbox: events written in the transaction that changes the state, published by
a relay in ``id`` order and marked sent only after the broker acknowledged them.

A crash between the request's commit and the publish leaves the rows unsent for the next relay
(at-least-once: consumers deduplicate on ``event_id``). The relay holds no database lock while it
publishes; one relay per service instance is assumed (a second instance would publish some rows
twice, which at-least-once allows). An account's events keep their order: they are committed in
order (each account's changes lock its subscription or charge rows) and published in ``id`` order
by an idempotent producer, keyed by account id.
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

from confluent_kafka import KafkaException
from opentelemetry import context as otel_context
from opentelemetry import propagate

from services.billing.adapters.db import MYSQL_ERRORS, Conn, Database, execute, fetch_all
from services.bus.events import (
    AvroEvent,
    PaymentFailed,
    PaymentSucceeded,
    RefundIssued,
    SubscriptionCancelled,
    SubscriptionRenewed,
    SubscriptionStarted,
)
from services.bus.producer import Delivered
from services.bus.runtime import Bus

log = logging.getLogger("reelbus.billing.outbox")

DECODERS: Mapping[str, Callable[[Mapping[str, Any]], AvroEvent]] = {
    cls.SCHEMA_NAME: cls.from_record
    for cls in (
        SubscriptionStarted,
        SubscriptionRenewed,
        SubscriptionCancelled,
        PaymentSucceeded,
        PaymentFailed,
        RefundIssued,
    )
}
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    *MYSQL_ERRORS,
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


async def add_event(conn: Conn, topic: str, key: str, event: AvroEvent) -> None:
    """Write ``event`` to the outbox in the caller's transaction."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    await execute(
        conn,
        "INSERT INTO outbox (topic, msg_key, event_type, payload, trace_context) VALUES (%s, %s, %s, %s, %s)",
        (topic, key, event.SCHEMA_NAME, json.dumps(to_payload(event)), json.dumps(carrier)),
    )


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int,
        poll_interval: float,
        retention_hours: float = 168.0,
        start_delay: float = 0.0,
    ) -> None:
        self.db = db
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.start_delay = start_delay
        self.retention_hours = retention_hours
        self._last_purge = 0.0
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        if self.start_delay:
            log.warning("outbox relay held back for %.1fs (BILLING_OUTBOX_RELAY_START_DELAY_SECONDS)",
                        self.start_delay)  # fmt: skip
            await asyncio.sleep(self.start_delay)
        backoff = 0.5
        while True:
            if not self.bus.producer_ready:
                await asyncio.sleep(0.2)
                continue
            self._wake.clear()
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
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows in order, then mark them sent; returns how many."""

        async def unsent(conn: Conn) -> list[dict[str, Any]]:
            return await fetch_all(
                conn,
                "SELECT id, topic, msg_key, event_type, payload, trace_context FROM outbox "
                "WHERE sent_at IS NULL ORDER BY id LIMIT %s",
                (self.batch_size,),
            )

        rows = (await self.db.in_transaction(unsent)).value
        if not rows:
            return 0
        futures = [self._produce(row) for row in rows]  # queued in order; the producer keeps it
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        failed = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            raise failed  # nothing is marked sent; the batch goes again

        async def mark(conn: Conn) -> None:
            ids = [int(r["id"]) for r in rows]
            marks = ", ".join(["%s"] * len(ids))
            await execute(conn, f"UPDATE outbox SET sent_at = NOW(3) WHERE id IN ({marks})", ids)

        await self.db.in_transaction(mark)
        log.info("outbox relay published %d event(s)", len(rows))
        return len(rows)

    async def _purge_sent(self) -> None:
        """Once an hour, forget the rows sent longer ago than the retention."""
        now = time.monotonic()
        if self._last_purge and now - self._last_purge < 3600:
            return
        self._last_purge = now

        async def purge(conn: Conn) -> None:
            await execute(
                conn,
                "DELETE FROM outbox WHERE sent_at < NOW(3) - INTERVAL %s SECOND",
                (int(self.retention_hours * 3600),),
            )

        await self.db.in_transaction(purge)

    def _produce(self, row: Mapping[str, Any]) -> asyncio.Future[Delivered]:
        decode = DECODERS.get(row["event_type"])
        if decode is None:
            raise LookupError(f"outbox row {row['id']} has an unknown event type {row['event_type']!r}")
        event = decode(json.loads(row["payload"]))
        parent = propagate.extract(json.loads(row["trace_context"]))
        token = otel_context.attach(parent)
        try:
            return self.bus.producer.produce(self.bus.contracts.topic(row["topic"]), row["msg_key"], event)
        finally:
            otel_context.detach(token)
