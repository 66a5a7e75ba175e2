"""The bus producer: typed events to declared topics, Avro through the registry, trace context in headers.

Built on librdkafka (confluent-kafka): an idempotent producer with ``acks=all``, lz4 batches and a
short linger. Deliveries are reported by librdkafka on a poll thread and handed to the event loop as
futures, so ``await producer.send(...)`` returns once the broker has the record on all in-sync replicas.
The poll thread hands settled deliveries over in bulk (one loop wake-up per burst, not per record).

The librdkafka under it is the bus's native extension's (``reelbus_native.KafkaProducer``, the same
library the consumer uses, see ``services/bus/fetch.py``) when it is built: a batch is queued in one
call with no Python object per record but its encoded bytes, and its delivery reports are counted on
the extension's own thread, so Python hears once per batch (or record sent alone). Without it (the
container image), or with ``REELBUS_NATIVE_PRODUCER=0``, confluent-kafka's ``Producer``: the same
settings and behaviour, one Python call per record and per delivery report.

Two ways to send:

- ``produce``/``send``: one event, one PRODUCER span, one future resolving to ``Delivered``.
- ``produce_batch``/``send_batch``: many events to one topic, ONE PRODUCER span for the whole batch
  (``messaging.batch.message_count``) whose ``traceparent`` goes, computed once, into every record, and
  one future resolving to the number of records once every one is delivered (``BatchDeliveryFailed`` if
  any is not). Each record keeps its own Avro encoding, key and ``reelbus.event-id`` header; consumers
  handle a batch's records under one CONSUMER span, a child of the batch's span.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.bus import metrics, wire
from services.bus.contracts import Contracts, Topic
from services.bus.events import AvroEvent
from services.bus.serde import Serde
from services.bus.tracing import ATTR_EVENT_ID, ATTR_EVENT_TYPE, KafkaHeaders, context_headers


def _native_producer() -> Any:
    if os.environ.get("REELBUS_NATIVE_PRODUCER", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return getattr(wire.NATIVE, "KafkaProducer", None)


NATIVE_PRODUCER: Any = _native_producer()
NATIVE_ERRORS: tuple[type[BaseException], ...] = (
    (wire.NATIVE.KafkaError,) if NATIVE_PRODUCER is not None else ()
)

HEADER_EVENT_TYPE = "reelbus.event-type"
HEADER_EVENT_ID = "reelbus.event-id"
HEADER_PRODUCER = "reelbus.producer"
ATTR_BATCH_COUNT = "messaging.batch.message_count"


@dataclass(frozen=True)
class ProducerConfig:
    bootstrap_servers: str
    client_id: str
    linger_ms: int = 5
    compression: str = "lz4"
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The Kafka client: the native one when built (None), or say which (module doc).
    native: bool | None = None

    def librdkafka(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": self.linger_ms,
            "compression.type": self.compression,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 512 * 1024,
            "message.timeout.ms": 120_000,
            "log_level": 3,
            **self.extra,
        }


@dataclass(frozen=True)
class Delivered:
    topic: str
    partition: int
    offset: int


class DeliveryFailed(RuntimeError):
    pass


class BatchDeliveryFailed(DeliveryFailed):
    """Some records of a batch were not delivered (the others were)."""

    def __init__(self, topic: str, total: int, errors: Sequence[str]) -> None:
        super().__init__(
            f"{len(errors)} of {total} record(s) to {topic} were not delivered; first: {errors[0]}"
        )
        self.topic = topic
        self.total = total
        self.errors = list(errors)


class _BatchTracker:
    """Counts the deliveries of one batch (on whichever thread librdkafka reports them) and settles
    the batch's future on the event loop once, when the last one is in."""

    __slots__ = ("_count", "_post", "errors", "future", "topic", "total")

    def __init__(
        self, post: Callable[[Callable[[], None]], None], future: asyncio.Future[int], topic: str, total: int
    ) -> None:
        self._post = post
        self.future = future
        self.topic = topic
        self.total = total
        self.errors: list[str] = []
        self._count = itertools.count(1)  # next() is atomic under the GIL

    def delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(err.str())
        if next(self._count) == self.total:
            self._post(self._finish)

    def failed(self, reason: str) -> None:
        self.errors.append(reason)
        if next(self._count) == self.total:
            self._post(self._finish)

    def _finish(self) -> None:
        if self.future.done():  # cancelled by the caller
            return
        if self.errors:
            self.future.set_exception(BatchDeliveryFailed(self.topic, self.total, self.errors))
        else:
            self.future.set_result(self.total)


class Producer:
    """``await start()`` (looks up schema ids), ``await send(...)``, ``await close()``."""

    def __init__(self, config: ProducerConfig, contracts: Contracts, serde: Serde) -> None:
        self.config = config
        self.contracts = contracts
        self.serde = serde
        self._kafka: KafkaProducer | None = None
        self._native: Any = None  # a reelbus_native.KafkaProducer in place of _kafka (module doc)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self._pending: set[asyncio.Task[None]] = set()
        self._tracer = trace.get_tracer("reelbus.bus.producer")
        # Settled deliveries, handed from librdkafka's threads to the loop in bulk.
        self._settled: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_scheduled = False
        self._client_id_header = (HEADER_PRODUCER, config.client_id.encode())
        self._type_headers: dict[str, tuple[str, bytes]] = {}
        self._produced: dict[str, Any] = {}  # topic -> the PRODUCED counter's child

    async def start(self, topics: Sequence[str]) -> None:
        """Prepare the schema ids of every topic this producer writes; never fetched again."""
        for name in topics:
            await asyncio.to_thread(self.serde.prepare, self.contracts.topic(name))
        self._loop = asyncio.get_running_loop()
        native = self.config.native
        if native is None:
            native = NATIVE_PRODUCER is not None
        self._closing.clear()
        if native:
            if NATIVE_PRODUCER is None:
                raise RuntimeError("the native producer is not built (services/bus/native) or is turned off")
            self._native = NATIVE_PRODUCER(self.config.librdkafka())
            return
        self._kafka = KafkaProducer(self.config.librdkafka())
        self._poller = threading.Thread(target=self._poll, name=f"{self.config.client_id}-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        kafka = self._kafka
        assert kafka is not None
        while not self._closing.is_set():
            kafka.poll(0.1)

    # -- deliveries, from librdkafka's threads to the loop ----------------------------------

    def _post(self, settle: Callable[[], None]) -> None:
        """Run ``settle`` on the event loop; one wake-up serves every settlement queued until then."""
        self._settled.append(settle)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody waits for these futures any more
                self._wake_scheduled = False

    def _drain(self) -> None:
        self._wake_scheduled = False
        settled = self._settled
        while settled:
            settled.popleft()()

    def _callback(self, future: asyncio.Future[Delivered]) -> Any:
        post = self._post

        def settle(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                exc = DeliveryFailed(f"delivery to {msg.topic()} failed: {err.str()}")
                post(lambda: _set_exception(future, exc))
            else:
                done = Delivered(msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
                post(lambda: _set_result(future, done))

        return settle

    # -- one record -------------------------------------------------------------------------

    def _type_header(self, name: str) -> tuple[str, bytes]:
        found = self._type_headers.get(name)
        if found is None:
            found = self._type_headers[name] = (HEADER_EVENT_TYPE, name.encode())
        return found

    def _count(self, topic: str, n: int) -> None:
        child = self._produced.get(topic)
        if child is None:
            child = self._produced[topic] = metrics.PRODUCED.labels(topic)
        child.inc(n)

    def produce(
        self,
        topic: Topic,
        key: Any,
        event: AvroEvent,
        headers: KafkaHeaders | None = None,
    ) -> asyncio.Future[Delivered]:
        """Queue one event; the future resolves on delivery. Call from the event loop."""
        if self._kafka is None and self._native is None:
            raise RuntimeError("producer not started")
        name = event.SCHEMA_NAME
        event_id = str(event.event_id)
        span = self._tracer.start_span(
            f"send {topic.name}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic.name,
                "messaging.operation.type": "send",
                ATTR_EVENT_TYPE: name,
                ATTR_EVENT_ID: event_id,
            },
        )
        try:
            key_bytes = self.serde.encode_key(topic, key)
            value = self.serde.encode_value(topic, event)
            carried = context_headers(trace.set_span_in_context(span))
            all_headers = _without(headers, carried)
            all_headers += [
                self._type_header(name),
                (HEADER_EVENT_ID, event_id.encode()),
                self._client_id_header,
                *carried,
            ]
            future = self._raw_produce(topic.name, key_bytes, value, all_headers)
        except Exception as exc:
            _fail_span(span, exc)
            raise
        finally:
            span.end()
        self._count(topic.name, 1)
        return future

    def _raw_produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: KafkaHeaders
    ) -> asyncio.Future[Delivered]:
        if self._native is not None:
            return self._native_produce(topic, key, value, headers)
        kafka = self._kafka
        assert kafka is not None and self._loop is not None
        future: asyncio.Future[Delivered] = self._loop.create_future()
        try:
            kafka.produce(topic, value=value, key=key, headers=headers, on_delivery=self._callback(future))
        except BufferError:
            # The local queue is full: hand back a future that queues once librdkafka drains a little.
            task = self._loop.create_task(self._produce_later(topic, key, value, headers, future))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        except KafkaException as exc:
            future.set_exception(DeliveryFailed(f"cannot produce to {topic}: {exc}"))
        return future

    async def _produce_later(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: KafkaHeaders,
        future: asyncio.Future[Delivered],
    ) -> None:
        kafka = self._kafka
        assert kafka is not None
        while True:
            try:
                kafka.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._callback(future)
                )
                return
            except BufferError:
                await asyncio.sleep(0.005)  # back-pressure: wait for the local queue to drain

    def _native_produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: KafkaHeaders
    ) -> asyncio.Future[Delivered]:
        assert self._loop is not None
        future: asyncio.Future[Delivered] = self._loop.create_future()
        post = self._post

        def done(errors: list[str], partition: int, offset: int) -> None:  # the extension's thread
            if errors:
                exc = DeliveryFailed(errors[0])
                post(lambda: _set_exception(future, exc))
            else:
                done_at = Delivered(topic, partition, offset)
                post(lambda: _set_result(future, done_at))

        delivery = wire.NATIVE.Delivery(1, done)
        headers = list(headers)
        try:
            queued = self._native.produce(topic, key, value, headers, delivery)
        except NATIVE_ERRORS as exc:
            future.set_exception(DeliveryFailed(str(exc)))
            return future
        if not queued:  # the local queue is full: queue it once librdkafka drains a little
            task = self._loop.create_task(self._native_produce_later(topic, key, value, headers, delivery))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return future

    async def _native_produce_later(
        self, topic: str, key: bytes | None, value: bytes | None, headers: KafkaHeaders, delivery: Any
    ) -> None:
        while True:
            await asyncio.sleep(0.005)  # back-pressure: wait for the local queue to drain
            native = self._native
            if native is None:
                delivery.failed(f"the producer was closed before the record to {topic} was queued", 1)
                return
            try:
                if native.produce(topic, key, value, headers, delivery):
                    return
            except NATIVE_ERRORS as exc:
                delivery.failed(str(exc), 1)
                return

    async def send(
        self, topic: str, key: Any, event: AvroEvent, headers: KafkaHeaders | None = None
    ) -> Delivered:
        return await self.produce(self.contracts.topic(topic), key, event, headers)

    async def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: KafkaHeaders
    ) -> Delivered:
        """Bytes as they are (dead letters, replays): no schema, no new trace context."""
        return await self._raw_produce(topic, key, value, headers)

    # -- a batch ------------------------------------------------------------------------------

    def produce_batch(
        self,
        topic: Topic | str,
        items: Sequence[tuple[Any, AvroEvent]],
        headers: KafkaHeaders | None = None,
    ) -> asyncio.Future[int]:
        """Queue ``(key, event)`` pairs to one topic under one PRODUCER span; the future resolves to
        the number of records once all are delivered, or fails with ``BatchDeliveryFailed`` (after
        every record is settled) if any is not. ``headers`` go on every record. Every event is
        encoded before anything is queued, so an event the topic does not declare raises here and
        queues nothing. Call from the event loop."""
        loop = self._loop
        if (self._kafka is None and self._native is None) or loop is None:
            raise RuntimeError("producer not started")
        if isinstance(topic, str):
            topic = self.contracts.topic(topic)
        future: asyncio.Future[int] = loop.create_future()
        total = len(items)
        if total == 0:
            future.set_result(0)
            return future
        name = topic.name
        events = [event for _, event in items]
        kinds = {event.SCHEMA_NAME for event in events}
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.destination.name": name,
            "messaging.operation.type": "send",
            ATTR_BATCH_COUNT: total,
        }
        if len(kinds) == 1:
            attributes[ATTR_EVENT_TYPE] = next(iter(kinds))
        span = self._tracer.start_span(f"send {name}", kind=SpanKind.PRODUCER, attributes=attributes)
        try:
            values = self.serde.encode_values(topic, events)
            keys = self.serde.encode_keys(topic, [key for key, _ in items])
            carried = context_headers(trace.set_span_in_context(span))
            base = _without(headers, carried)
            type_headers = {kind: self._type_header(kind) for kind in kinds}
            client = self._client_id_header
            ids = wire.uuid_texts([event.event_id for event in events])
            if self._native is not None:
                self._native_batch(name, keys, values, ids, base, events, type_headers, carried, future)
                return future
            all_headers: list[KafkaHeaders]
            if len(kinds) == 1 and not base:  # the usual batch: the same headers but the event id
                (type_header,) = type_headers.values()
                all_headers = [[type_header, (HEADER_EVENT_ID, eid), client, *carried] for eid in ids]
            else:
                all_headers = [
                    [*base, type_headers[event.SCHEMA_NAME], (HEADER_EVENT_ID, eid), client, *carried]
                    for event, eid in zip(events, ids, strict=True)
                ]
            tracker = _BatchTracker(self._post, future, name, total)
            self._queue_batch(name, keys, values, all_headers, tracker)
        except Exception as exc:
            _fail_span(span, exc)
            raise
        finally:
            span.end()
        self._count(name, total)
        return future

    def _native_batch(
        self,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes],
        ids: Sequence[bytes],
        base: KafkaHeaders,
        events: list[AvroEvent],
        type_headers: dict[str, tuple[str, bytes]],
        carried: KafkaHeaders,
        future: asyncio.Future[int],
    ) -> None:
        """``produce_batch`` on the native producer: one call queues the batch (each record's headers
        are ``[*base, event type, event id, client, *carried]``, as below), one report settles it."""
        total = len(values)
        post = self._post

        def finish(errors: list[str]) -> None:
            if future.done():  # cancelled by the caller
                return
            if errors:
                future.set_exception(BatchDeliveryFailed(topic, total, errors))
            else:
                future.set_result(total)

        def done(errors: list[str], partition: int, offset: int) -> None:  # the extension's thread
            post(lambda: finish(errors))

        if len(type_headers) == 1:
            heads = [[*base, *type_headers.values()]]
        else:
            heads = [[*base, type_headers[event.SCHEMA_NAME]] for event in events]
        tail = [self._client_id_header, *carried]
        delivery = wire.NATIVE.Delivery(total, done)
        args = (topic, keys, values, heads, HEADER_EVENT_ID, ids, tail)
        queued = self._native.produce_batch(*args, 0, delivery)
        if queued < total:  # the local queue is full: the rest goes in as librdkafka drains
            assert self._loop is not None
            task = self._loop.create_task(self._native_batch_later(args, queued, total, delivery))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _native_batch_later(
        self, args: tuple[Any, ...], queued: int, total: int, delivery: Any
    ) -> None:
        while queued < total:
            await asyncio.sleep(0.005)
            native = self._native
            if native is None:
                delivery.failed(
                    f"the producer was closed before the record to {args[0]} was queued", total - queued
                )
                return
            queued = native.produce_batch(*args, queued, delivery)

    def _queue_batch(
        self,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes | None],
        headers: Sequence[KafkaHeaders],
        tracker: _BatchTracker,
    ) -> None:
        kafka = self._kafka
        assert kafka is not None and self._loop is not None
        produce = kafka.produce
        on_delivery = tracker.delivered
        for i in range(len(values)):
            try:
                produce(topic, value=values[i], key=keys[i], headers=headers[i], on_delivery=on_delivery)
            except BufferError:
                # The local queue is full: the rest of the batch goes in as librdkafka drains.
                rest = list(zip(keys[i:], values[i:], headers[i:], strict=True))
                task = self._loop.create_task(self._queue_batch_later(topic, rest, tracker))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                return
            except KafkaException as exc:
                tracker.failed(f"cannot produce to {topic}: {exc}")

    async def _queue_batch_later(
        self,
        topic: str,
        rest: list[tuple[bytes | None, bytes | None, KafkaHeaders]],
        tracker: _BatchTracker,
    ) -> None:
        on_delivery = tracker.delivered
        for key, value, headers in rest:
            while True:
                kafka = self._kafka
                if kafka is None:
                    tracker.failed(f"the producer was closed before the record to {topic} was queued")
                    break
                try:
                    kafka.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                    break
                except BufferError:
                    await asyncio.sleep(0.005)
                except KafkaException as exc:
                    tracker.failed(f"cannot produce to {topic}: {exc}")
                    break

    async def send_batch(
        self,
        topic: str,
        items: Sequence[tuple[Any, AvroEvent]],
        headers: KafkaHeaders | None = None,
    ) -> int:
        """``produce_batch`` and wait for every delivery; returns the number of records."""
        return await self.produce_batch(self.contracts.topic(topic), items, headers)

    # -- the end ------------------------------------------------------------------------------

    async def flush(self, timeout: float = 30.0) -> int:
        if self._native is not None:
            left: int = await asyncio.to_thread(self._native.flush, timeout)
            return left
        kafka = self._kafka
        if kafka is None:
            return 0
        remaining: int = await asyncio.to_thread(kafka.flush, timeout)
        return remaining

    async def close(self, timeout: float = 30.0) -> None:
        remaining = await self.flush(timeout)
        self._closing.set()
        native, self._native = self._native, None
        if native is not None:
            await asyncio.to_thread(native.close)
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, 5.0)
        if self._kafka is not None:
            self._kafka.poll(0)
        self._kafka = None
        self._drain()
        if remaining:
            raise DeliveryFailed(f"{remaining} record(s) were not delivered within {timeout:.0f}s")


def _without(headers: KafkaHeaders | None, carried: KafkaHeaders) -> KafkaHeaders:
    """A copy of the caller's headers without the ones trace propagation sets (they are replaced)."""
    if not headers:
        return []
    if not carried:
        return list(headers)
    names = {k for k, _ in carried}
    return [(k, v) for k, v in headers if k not in names]


def _fail_span(span: trace.Span, exc: Exception) -> None:
    """What ``start_as_current_span`` does with an exception raised inside it."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _set_result(future: asyncio.Future[Delivered], value: Delivered) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Delivered], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
