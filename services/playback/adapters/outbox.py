"""The transactional outbox: events are written to the ``outbox`` table in the same transaction as
the state they describe, and a relay sends them to Kafka afterwards (at least once, in the order
they were written), then deletes them. Never "commit, then publish": a crash between the two loses
nothing, it only delays (or, after a send whose deletion did not commit, repeats) an event; consumers
deduplicate on ``event_id``.

Each row keeps the W3C trace context of the request that wrote it, so the relay's PRODUCER span
joins the request's trace. One relay sends at a time across replicas (a PostgreSQL advisory lock),
which keeps a session's events in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException

from services.bus.contracts import Contracts
from services.bus.outbox import produce_in_trace
from services.bus.producer import Delivered, DeliveryFailed, Producer
from services.playback.adapters.db import TRANSIENT_DB_ERRORS, decode_outbox_event

log = logging.getLogger("reelbus.playback.outbox")

RELAY_LOCK = 0x72656C61  # "rela"
BATCH = 200
RELAY_RETRIES: tuple[type[BaseException], ...] = (
    OSError,
    DeliveryFailed,
    KafkaException,
    *TRANSIENT_DB_ERRORS,
)


class OutboxRelay:
    """Sends the outbox to Kafka; ``run()`` until cancelled."""

    def __init__(
        self,
        pool: Any,
        producer: Producer,
        contracts: Contracts,
        wake: asyncio.Event,
        producer_ready: Callable[[], bool],
        poll_seconds: float = 1.0,
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.contracts = contracts
        self.wake = wake
        self.producer_ready = producer_ready
        self.poll_seconds = poll_seconds
        self.sent = 0

    async def run(self) -> None:
        """Relay until cancelled. Transient failures (database, broker) back off and retry; anything
        else ends the task, which turns ``/livez`` false (see app.py)."""
        delay = self.poll_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)
            self.wake.clear()
            if not self.producer_ready():
                delay = min(self.poll_seconds, 0.2)
                continue
            try:
                while await self.relay_once() == BATCH:
                    pass
                delay = self.poll_seconds
            except RELAY_RETRIES as exc:
                log.warning("outbox relay: %r; retrying in %.1fs", exc, delay)
                delay = min(max(delay, 0.5) * 2, 10.0)
            except RuntimeError as exc:
                if "producer not started" not in str(exc):
                    raise
                delay = self.poll_seconds  # the runtime closed the producer: shutting down

    async def relay_once(self) -> int:
        """Send the oldest unsent events, at most ``BATCH``; the number sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                return 0  # another replica is relaying
            rows = await conn.fetch(
                "SELECT id, topic, key, event_type, payload::text AS payload, "
                "trace_context::text AS trace_context FROM outbox ORDER BY id LIMIT $1",
                BATCH,
            )
            if not rows:
                return 0
            futures: list[asyncio.Future[Delivered]] = []
            for row in rows:
                event = decode_outbox_event(row["event_type"], row["payload"])
                topic = self.contracts.topic(row["topic"])
                futures.append(
                    produce_in_trace(
                        self.producer, topic, row["key"], event, json.loads(row["trace_context"])
                    )
                )
            results = await asyncio.gather(*futures, return_exceptions=True)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed
            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [row["id"] for row in rows])
        self.sent += len(rows)
        return len(rows)
