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

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import KafkaException

from services.billing.adapters.db import MYSQL_ERRORS, Conn, Database, execute, fetch_all
from services.bus import outbox
from services.bus.events import (
    AvroEvent,
    PaymentFailed,
    PaymentSucceeded,
    RefundIssued,
    SubscriptionCancelled,
    SubscriptionRenewed,
    SubscriptionStarted,
)
from services.bus.outbox import Publish, current_trace_context, to_payload
from services.bus.runtime import Bus

__all__ = ["DECODERS", "TRANSIENT", "OutboxRelay", "add_event", "to_payload"]

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


async def add_event(conn: Conn, topic: str, key: str, event: AvroEvent) -> None:
    """Write ``event`` to the outbox in the caller's transaction."""
    await execute(
        conn,
        "INSERT INTO outbox (topic, msg_key, event_type, payload, trace_context) VALUES (%s, %s, %s, %s, %s)",
        (topic, key, event.SCHEMA_NAME, json.dumps(to_payload(event)), json.dumps(current_trace_context())),
    )


class OutboxStore:
    """The relay's MariaDB side: the batch is read in one transaction and marked sent in another,
    after it was published; no lock is held while publishing."""

    def __init__(self, db: Database, retention_hours: float) -> None:
        self.db = db
        self.retention_hours = retention_hours
        self._last_purge = 0.0

    async def relay_batch(self, limit: int, publish: Publish) -> int:
        async def unsent(conn: Conn) -> list[dict[str, Any]]:
            return await fetch_all(
                conn,
                "SELECT id, topic, msg_key, event_type, payload, trace_context FROM outbox "
                "WHERE sent_at IS NULL ORDER BY id LIMIT %s",
                (limit,),
            )

        rows = [{**row, "key": row["msg_key"]} for row in (await self.db.in_transaction(unsent)).value]
        if not rows:
            return 0
        await publish(rows)  # nothing is marked sent if it fails; the batch goes again

        async def mark(conn: Conn) -> None:
            ids = [int(r["id"]) for r in rows]
            marks = ", ".join(["%s"] * len(ids))
            await execute(conn, f"UPDATE outbox SET sent_at = NOW(3) WHERE id IN ({marks})", ids)

        await self.db.in_transaction(mark)
        return len(rows)

    async def purge_sent(self) -> None:
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


class OutboxRelay(outbox.OutboxRelay):
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
        super().__init__(
            OutboxStore(db, retention_hours),
            bus,
            decoders=DECODERS,
            transient=TRANSIENT,
            logger=log,
            batch_size=batch_size,
            poll_interval=poll_interval,
            start_delay=start_delay,
            start_delay_setting="BILLING_OUTBOX_RELAY_START_DELAY_SECONDS",
        )
        self.db = db
        self.retention_hours = retention_hours
