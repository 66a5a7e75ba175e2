"""The bus consumer: at-least-once, dispatch by event type, bounded retries, dead letters, traces.

- Auto-commit is off. Offsets are committed only after the handler's work is done (and, for a poison
  record, after its dead letter is acknowledged by the broker); a rebalance commits on revoke.
- Handlers are looked up by the record's Avro full name in a table the service declares; the consumer
  refuses to start if a handled type is not declared on one of its topics in the topics file.
- Failures are classified: ``Retryable`` (and connection/timeouts) back off within a bound and then go
  to ``<topic>.dlq``; a record that is not Avro, names an unknown schema id, or whose handler raised
  anything else goes to ``<topic>.dlq`` at once, with the original key, value and headers plus headers
  saying what failed and where. A dead letter that cannot be written stops the consumer (no commit).
- Each record is handled in a CONSUMER span whose parent is the producer's span (W3C headers).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.bus import metrics
from services.bus.contracts import DLQ_SUFFIX, ContractError, Contracts, Topic
from services.bus.events import AvroEvent
from services.bus.producer import Producer
from services.bus.serde import PoisonMessage, Serde
from services.bus.tracing import (
    ATTR_DLQ_REASON,
    ATTR_EVENT_ID,
    ATTR_EVENT_TYPE,
    HeaderValue,
    KafkaHeaders,
    extract_context,
    normalize_headers,
)

log = logging.getLogger("reelbus.bus.consumer")

DLQ_PREFIX = "reelbus.dlq."


class Retryable(Exception):
    """A transient failure: the record is retried with backoff, then dead-lettered."""


RETRYABLE: tuple[type[BaseException], ...] = (Retryable, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Record:
    """What a handler learns about the record besides the event."""

    topic: str
    partition: int
    offset: int
    key: Any
    headers: Sequence[tuple[str, HeaderValue]]
    timestamp_ms: int


@dataclass(frozen=True)
class Incoming:
    """A fetched record, with librdkafka's optional accessors resolved once."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: KafkaHeaders
    timestamp_ms: int

    @classmethod
    def of(cls, msg: Message) -> Incoming:
        return cls(
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            key=_as_bytes(msg.key()),
            value=_as_bytes(msg.value()),
            headers=normalize_headers(msg.headers()),
            timestamp_ms=msg.timestamp()[1],
        )


def _as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


Handler = Callable[[Any, Record], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_backoff: float = 0.1
    max_backoff: float = 2.0

    def backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.first_backoff * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class ConsumerConfig:
    bootstrap_servers: str
    group_id: str
    topics: Sequence[str]
    client_id: str = "reelbus"
    group_instance_id: str | None = None  # static membership
    auto_offset_reset: str = "earliest"
    session_timeout_ms: int = 10_000
    batch_size: int = 500
    poll_timeout: float = 0.5
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def librdkafka(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "client.id": self.client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.auto_offset_reset,
            "session.timeout.ms": self.session_timeout_ms,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "log_level": 3,
        }
        if self.group_instance_id:
            conf["group.instance.id"] = self.group_instance_id
        conf.update(self.extra)
        return conf


class ConsumerDied(RuntimeError):
    """The consume loop cannot go on; the process must exit non-zero."""


class BusConsumer:
    def __init__(
        self,
        config: ConsumerConfig,
        contracts: Contracts,
        serde: Serde,
        handlers: Mapping[str, Handler],
        dead_letters: Producer,
    ) -> None:
        self.config = config
        self.contracts = contracts
        self.serde = serde
        self.handlers = dict(handlers)
        self.dead_letters = dead_letters
        self.topics: dict[str, Topic] = {name: contracts.topic(name) for name in config.topics}
        declared = {v for t in self.topics.values() for v in t.values}
        undeclared = sorted(set(self.handlers) - declared)
        if undeclared:
            raise ContractError(
                f"handlers for {', '.join(undeclared)} but no subscribed topic "
                f"({', '.join(self.topics)}) declares them"
            )
        self._kafka: Consumer | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._pending: dict[tuple[str, int], int] = {}  # processed but not yet committed: next offset
        self._stopping = asyncio.Event()
        self._tracer = trace.get_tracer("reelbus.bus.consumer")
        self.assigned_event = asyncio.Event()

    # -- state ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return bool(self._assigned)

    @property
    def assignment(self) -> set[tuple[str, int]]:
        return set(self._assigned)

    def stop(self) -> None:
        """Stop fetching; the loop finishes the record in hand, commits, and returns."""
        self._stopping.set()

    # -- rebalance (called by librdkafka inside consume(), on the worker thread) ----------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        metrics.ASSIGNED.labels(self.config.group_id).set(len(self._assigned))
        log.info("assigned %s", sorted(self._assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self._commit_sync(consumer, only=revoked)
        self._assigned -= revoked
        metrics.ASSIGNED.labels(self.config.group_id).set(len(self._assigned))
        log.info("revoked %s", sorted(revoked))

    def _commit_sync(self, consumer: Consumer, only: set[tuple[str, int]] | None = None) -> None:
        items = [(tp, off) for tp, off in self._pending.items() if only is None or tp in only]
        if not items:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in items]
        consumer.commit(offsets=offsets, asynchronous=False)
        for tp, off in items:
            if self._pending.get(tp) == off:
                del self._pending[tp]

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop()``; raises ``ConsumerDied`` when it cannot go on."""
        consumer = Consumer(self.config.librdkafka())
        self._kafka = consumer
        try:
            consumer.subscribe(
                list(self.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            while not self._stopping.is_set():
                batch: list[Message] = await asyncio.to_thread(
                    consumer.consume, self.config.batch_size, self.config.poll_timeout
                )
                if self._assigned and not self.assigned_event.is_set():
                    self.assigned_event.set()
                for msg in batch:
                    if self._stopping.is_set():
                        break  # the rest of the batch is not committed: it is fetched again later
                    err = msg.error()
                    if err is not None:
                        self._on_error(err)
                        continue
                    incoming = Incoming.of(msg)
                    await self._process(incoming)
                    self._pending[(incoming.topic, incoming.partition)] = incoming.offset + 1
                if self._pending:
                    await asyncio.to_thread(self._commit_sync, consumer)
        except KafkaException as exc:
            raise ConsumerDied(f"consumer of group {self.config.group_id} failed: {exc}") from exc
        finally:
            await asyncio.to_thread(self._close, consumer)

    def _close(self, consumer: Consumer) -> None:
        try:
            self._commit_sync(consumer)
        finally:
            consumer.close()
            self._assigned.clear()
            self._kafka = None

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise ConsumerDied(f"fatal consumer error: {err.str()}")
        log.warning("consumer error (librdkafka retries): %s", err.str())

    async def _process(self, msg: Incoming) -> None:
        topic_name = msg.topic
        topic = self.topics.get(topic_name)
        headers = msg.headers
        parent = extract_context(headers)
        with self._tracer.start_as_current_span(
            f"process {topic_name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic_name,
                "messaging.operation.type": "process",
                "messaging.kafka.message.offset": msg.offset,
                "messaging.destination.partition.id": str(msg.partition),
                "messaging.consumer.group.name": self.config.group_id,
            },
        ) as span:
            stage = "decode"
            attempts = 0
            try:
                event = await self.serde.decode_event(topic, msg.value)
                key = await self.serde.decode_key(msg.key)
                span.set_attribute(ATTR_EVENT_TYPE, event.SCHEMA_NAME)
                span.set_attribute(ATTR_EVENT_ID, str(event.event_id))
                handler = self.handlers.get(event.SCHEMA_NAME)
                if handler is None:
                    # Declared on the topic, but this service does not care about it: done.
                    metrics.CONSUMED.labels(topic_name, "ignored").inc()
                    return
                stage = "handler"
                record = Record(topic_name, msg.partition, msg.offset, key, headers, msg.timestamp_ms)
                attempts = await self._handle_with_retries(handler, event, record)
                metrics.CONSUMED.labels(topic_name, "ok").inc()
            except PoisonMessage as exc:
                await self._dead_letter(msg, exc.stage, exc.reason, "PoisonMessage", attempts)
                span.set_status(Status(StatusCode.ERROR, exc.reason))
            except _Exhausted as exc:
                reason = f"retries exhausted after {exc.attempts} attempts: {exc.cause!r}"
                await self._dead_letter(msg, stage, reason, type(exc.cause).__name__, exc.attempts)
                span.set_status(Status(StatusCode.ERROR, reason))
            except (ConsumerDied, asyncio.CancelledError):
                raise
            except Exception as exc:  # a non-retryable handler error: poison for this service
                reason = "".join(traceback.format_exception_only(exc)).strip()
                await self._dead_letter(msg, stage, reason, type(exc).__name__, max(attempts, 1))
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, reason))

    async def _handle_with_retries(self, handler: Handler, event: AvroEvent, record: Record) -> int:
        policy = self.config.retry
        for attempt in range(1, policy.attempts + 1):
            started = time.perf_counter()
            try:
                await handler(event, record)
            except RETRYABLE as exc:
                if attempt == policy.attempts:
                    raise _Exhausted(attempt, exc) from exc
                metrics.CONSUMED.labels(record.topic, "retried").inc()
                delay = policy.backoff(attempt)
                log.warning(
                    "retryable failure in %s (attempt %d, retry in %.2fs): %r",
                    event.SCHEMA_NAME,
                    attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            finally:
                metrics.HANDLER_SECONDS.labels(event.SCHEMA_NAME).observe(time.perf_counter() - started)
            return attempt
        raise AssertionError("unreachable")

    async def _dead_letter(self, msg: Incoming, stage: str, reason: str, error: str, attempts: int) -> None:
        topic = msg.topic
        headers: KafkaHeaders = list(msg.headers)
        headers += [
            (DLQ_PREFIX + "reason", reason.encode()),
            (DLQ_PREFIX + "error", error.encode()),
            (DLQ_PREFIX + "stage", stage.encode()),
            (DLQ_PREFIX + "topic", topic.encode()),
            (DLQ_PREFIX + "partition", str(msg.partition).encode()),
            (DLQ_PREFIX + "offset", str(msg.offset).encode()),
            (DLQ_PREFIX + "timestamp", str(msg.timestamp_ms).encode()),
            (DLQ_PREFIX + "group", self.config.group_id.encode()),
            (DLQ_PREFIX + "attempts", str(attempts).encode()),
            (DLQ_PREFIX + "failed-at", str(int(time.time() * 1000)).encode()),
        ]
        trace.get_current_span().set_attribute(ATTR_DLQ_REASON, reason)
        log.error("dead-lettering %s[%d]@%d (%s): %s", topic, msg.partition, msg.offset, stage, reason)
        try:
            await self.dead_letters.send_raw(topic + DLQ_SUFFIX, msg.key, msg.value, headers)
        except Exception as exc:
            raise ConsumerDied(f"cannot write the dead letter for {topic}@{msg.offset}: {exc}") from exc
        metrics.CONSUMED.labels(topic, "dead_lettered").inc()

    # -- lag ------------------------------------------------------------------------------

    def lag(self) -> dict[tuple[str, int], int]:
        """High watermark minus committed offset, per assigned partition. Blocking."""
        consumer = self._kafka
        if consumer is None or not self._assigned:
            return {}
        parts = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        committed = consumer.committed(parts, timeout=5.0)
        result: dict[tuple[str, int], int] = {}
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            offset = tp.offset if tp.offset != OFFSET_INVALID and tp.offset >= 0 else _low
            result[(tp.topic, tp.partition)] = max(0, high - offset)
            metrics.CONSUMER_LAG.labels(self.config.group_id, tp.topic, str(tp.partition)).set(
                result[(tp.topic, tp.partition)]
            )
        return result


class _Exhausted(Exception):
    def __init__(self, attempts: int, cause: BaseException) -> None:
        super().__init__(f"{attempts} attempts")
        self.attempts = attempts
        self.cause = cause
