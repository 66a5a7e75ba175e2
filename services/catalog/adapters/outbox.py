"""The transactional outbox: ``TitleChanged`` events written with the change, published by a relay.

A writer adds an :class:`OutboxEntry` in the transaction that changes the title (``Tx.enqueue``), with
the W3C trace context of the request, and ``NOTIFY``s the relay. The relay takes a batch in id order
under an advisory lock (one relay publishes at a time across replicas, so a title's events reach
``catalog.changes`` in the order they were written), queues them all on the idempotent producer in
that order, waits for every acknowledgement and only then deletes the batch, in the same transaction.
A crash in between republishes the batch: at-least-once, which consumers absorb through
``title_version`` and ``event_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
from opentelemetry import propagate

from services.bus.contracts import Topic
from services.bus.events import TitleChanged
from services.bus.outbox import produce_in_trace
from services.bus.producer import Delivered, Producer
from services.catalog import metrics
from services.catalog.adapters.store import OUTBOX_CHANNEL, RELAY_LOCK, OutboxEntry

log = logging.getLogger("reelbus.catalog.outbox")


def outbox_entry(topic: str, event: TitleChanged) -> OutboxEntry:
    """The event as an outbox row, carrying the current trace context so that the relay's PRODUCER
    span continues the request's trace."""
    record = event.to_record()
    record["event_id"] = str(event.event_id)
    record["event_time"] = int(event.event_time.timestamp() * 1000)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return OutboxEntry(topic=topic, key=event.title_id, payload=record, trace=carrier)


def event_of(payload: Mapping[str, Any]) -> TitleChanged:
    return TitleChanged.from_record(payload)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        database_url: str,
        producer: Producer,
        topic: Topic,
        producer_ready: Callable[[], bool],
        batch_size: int = 500,
        poll_seconds: float = 1.0,
    ) -> None:
        self.pool = pool
        self.database_url = database_url
        self.producer = producer
        self.topic = topic
        self.producer_ready = producer_ready
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        """Keep a connection LISTENing; without one the relay still polls."""
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            conn = await asyncpg.connect(self.database_url)
            await conn.add_listener(OUTBOX_CHANNEL, self._notified)
            self._listener = conn
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("cannot LISTEN for outbox notifications (%s); polling", exc)

    async def run(self) -> None:
        """Publish until cancelled. A failure is logged and retried with backoff: the relay never
        gives up while the service runs, and nothing is deleted from the outbox before the broker has
        acknowledged it."""
        backoff = 0.5
        try:
            while not self.producer_ready():  # noqa: ASYNC110 - the runtime exposes a flag, not an event
                await asyncio.sleep(0.1)
            while True:
                await self._listen()
                self._wake.clear()
                try:
                    while await self.publish_batch() == self.batch_size:
                        pass
                    backoff = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("outbox relay failed; retrying in %.1fs", backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
        finally:
            if self._listener is not None:
                await self._listener.close()

    async def publish_batch(self) -> int:
        """Publish the oldest batch if no other relay holds the lock; how many rows were published."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RELAY_LOCK):
                return 0  # another replica relays; poll again later
            rows = await conn.fetch(
                "SELECT id, key, payload, trace FROM outbox ORDER BY id LIMIT $1", self.batch_size
            )
            if not rows:
                return 0
            pending: list[asyncio.Future[Delivered]] = []
            for row in rows:
                event = event_of(_json(row["payload"]))
                pending.append(
                    produce_in_trace(self.producer, self.topic, row["key"], event, _json(row["trace"]))
                )
            await asyncio.gather(*pending)
            await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in rows])
        metrics.OUTBOX_PUBLISHED.inc(len(rows))
        oldest = rows[0]["id"]
        log.debug("published outbox rows %d..%d", oldest, rows[-1]["id"])
        return len(rows)
