"""The shared side of the transactional outbox: turning events into rows, and the relay that publishes them.

A service writes its events to an ``outbox`` table in the transaction that changes its state; a relay
later publishes the unsent rows in ``id`` order on the idempotent producer, waits for every
acknowledgement and only then marks them sent (at-least-once: consumers deduplicate on
``event_id``). What differs between services is only the database side (its SQL, its locking, its
transactions), which is the :class:`OutboxStore` each service implements in its
``adapters/outbox.py``.

Each row keeps the W3C trace context of the request that wrote it, so the relay's PRODUCER span
continues the request's trace even though it is sent later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate

from services.bus.contracts import Topic
from services.bus.events import AvroEvent
from services.bus.producer import Delivered, Producer
from services.bus.runtime import Bus

Row = Mapping[str, Any]
Decoders = Mapping[str, Callable[[Mapping[str, Any]], AvroEvent]]
Publish = Callable[[Sequence[Row]], Awaitable[None]]


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
    """The W3C trace context of the current span, to store with an outbox row."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def produce_in_trace(
    producer: Producer, topic: Topic, key: str, event: AvroEvent, trace_context: Mapping[str, str]
) -> asyncio.Future[Delivered]:
    """Queue ``event`` on the producer as a child of the stored ``trace_context``."""
    token = otel_context.attach(propagate.extract(trace_context))
    try:
        return producer.produce(topic, key, event)
    finally:
        otel_context.detach(token)


class OutboxStore(Protocol):
    """The database side of a relay: one batch of unsent rows, oldest first, marked sent after publishing.

    ``relay_batch`` takes at most ``limit`` unsent rows in ``id`` order (each with ``id``, ``topic``,
    ``key``, ``event_type``, ``payload`` and ``trace_context``), awaits ``publish(rows)`` and, only if
    it returned, marks those rows sent; it returns how many rows were published (0 when there were
    none, or another relay holds the batch). ``purge_sent`` forgets rows sent long enough ago.
    """

    async def relay_batch(self, limit: int, publish: Publish) -> int: ...

    async def purge_sent(self) -> None: ...


class OutboxRelay:
    """Publishes a service's outbox until cancelled; the database side is its :class:`OutboxStore`.

    Transient failures (``transient``) are logged and retried with backoff (0.5s doubling to 10s);
    anything else ends ``run()``. Nothing is marked sent before the broker acknowledged the whole batch.
    """

    def __init__(
        self,
        store: OutboxStore,
        bus: Bus,
        *,
        decoders: Decoders,
        transient: tuple[type[BaseException], ...],
        logger: logging.Logger,
        batch_size: int,
        poll_interval: float,
        start_delay: float = 0.0,
        start_delay_setting: str = "OUTBOX_RELAY_START_DELAY_SECONDS",
    ) -> None:
        self.store = store
        self.bus = bus
        self.decoders = decoders
        self.transient = transient
        self.log = logger
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.start_delay = start_delay
        self.start_delay_setting = start_delay_setting
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something was committed to the outbox: publish it now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        if self.start_delay:
            self.log.warning(
                "outbox relay held back for %.1fs (%s)", self.start_delay, self.start_delay_setting
            )
            await asyncio.sleep(self.start_delay)
        backoff = 0.5
        while True:
            if not self.bus.producer_ready:
                await asyncio.sleep(0.2)
                continue
            self._wake.clear()  # rows committed from here on wake the wait below
            try:
                sent = await self.relay_once()
                await self.store.purge_sent()
            except self.transient as exc:
                self.log.warning("outbox relay failed (%r); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            if sent >= self.batch_size:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows, in order, then mark them sent; returns how many."""
        sent = await self.store.relay_batch(self.batch_size, self.publish)
        if sent:
            self.log.info("outbox relay published %d event(s)", sent)
        return sent

    async def publish(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` in order (the idempotent producer keeps that order) and wait for every
        acknowledgement; raises the first failure, after the queued ones settled."""
        futures: list[asyncio.Future[Delivered]] = []
        failed: BaseException | None = None
        for row in rows:
            try:
                futures.append(self._produce(row))
            except Exception as exc:
                failed = exc
                break
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        failed = failed or next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failed is not None:
            raise failed  # nothing is marked sent; the whole batch goes again

    def _produce(self, row: Row) -> asyncio.Future[Delivered]:
        decode = self.decoders.get(row["event_type"])
        if decode is None:
            raise LookupError(f"outbox row {row['id']} has an unknown event type {row['event_type']!r}")
        event = decode(json.loads(row["payload"]))
        topic = self.bus.contracts.topic(row["topic"])
        return produce_in_trace(self.bus.producer, topic, row["key"], event, json.loads(row["trace_context"]))
