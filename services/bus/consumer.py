"""The bus consumer: at-least-once, dispatch by event type, bounded retries, dead letters, traces.

- Auto-commit is off. Offsets are committed only after the handler's work is done (and, for a poison
  record, after its dead letter is acknowledged by the broker); a rebalance commits on revoke. Commits
  run beside the handling, one at a time, at most every ``commit_interval`` (0.1 s by default).
- Handlers are looked up by the record's Avro full name in a table the service declares; the consumer
  refuses to start if a handled type is not declared on one of its topics in the topics file.
- Failures are classified: ``Retryable`` (and connection/timeouts) back off within a bound and then go
  to ``<topic>.dlq``; a record that is not Avro, names an unknown schema id, or whose handler raised
  anything else goes to ``<topic>.dlq`` at once, with the original key, value and headers plus headers
  saying what failed and where. A dead letter that cannot be written stops the consumer (no commit).
- Records are handled in CONSUMER spans whose parent is the producer's span (W3C headers). Consecutive
  records of one fetch (same topic and partition) that carry the same trace context were sent in one
  ``Producer.produce_batch`` call; they share one CONSUMER span (``messaging.batch.message_count``), a
  child of that batch's PRODUCER span. A record sent on its own gets a span of its own, as before;
  consecutive records with no trace context at all (a producer that does not trace) share one root span.
- A handler is either ``async def handle(event, record)``, called once per record, or a batch handler,
  ``batched(async def handle(items))`` with ``items`` a list of ``(event, record)``, called once per run
  of records of its type inside one span group (so once per produced batch that was fetched together;
  a record sent on its own comes as a list of one). A batch handler that raises a retryable error is
  retried as a whole with backoff; when the retries are exhausted, or on any other error, its records
  are handled again one by one (each as a list of one, with its own retries), so only the record that
  fails goes to the dead letters. Records may therefore reach a batch handler twice, as they may any
  handler after a crash: handlers are idempotent (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.bus import metrics, wire
from services.bus.contracts import DLQ_SUFFIX, ContractError, Contracts, Topic
from services.bus.events import AvroEvent
from services.bus.producer import ATTR_BATCH_COUNT, Producer
from services.bus.serde import PoisonMessage, SchemaNotCached, Serde
from services.bus.tracing import (
    ATTR_DLQ_REASON,
    ATTR_EVENT_ID,
    ATTR_EVENT_TYPE,
    HeaderValue,
    KafkaHeaders,
    extract_context,
    normalize_headers,
    propagation_fields,
    trace_key,
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


def _headers_of(msg: Message) -> KafkaHeaders:
    raw = msg.headers()
    if raw is None:
        return []
    return raw if type(raw) is list else normalize_headers(raw)


Handler = Callable[[Any, Record], Awaitable[None]]
BatchHandlerFn = Callable[[list[tuple[Any, Record]]], Awaitable[None]]


@dataclass(frozen=True)
class Batched:
    """A handler that takes a list of ``(event, record)``; make one with :func:`batched`."""

    fn: BatchHandlerFn


def batched(fn: BatchHandlerFn) -> Batched:
    """Mark ``async def handle(items: list[tuple[event, Record]])`` as a batch handler (module doc)."""
    return Batched(fn)


AnyHandler = Handler | Batched


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
    # The least time between the starts of two commits (s): the handled records' offsets wait at most
    # this long (plus a commit in flight) for theirs. A commit is a synchronous round trip to the
    # broker during which librdkafka serves fetched records slowly; 0 commits after every batch.
    commit_interval: float = 0.1
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


@dataclass(eq=False, slots=True)
class _Held:
    """Decoded records waiting, as a run, for one call of a batch handler: the ``(event, record)``
    pairs the handler gets and, beside them, their messages (for the dead letters)."""

    pairs: list[tuple[Any, Record]] = field(default_factory=list)
    msgs: list[Message] = field(default_factory=list)


# Record(...) without the frozen dataclass's per-field object.__setattr__ calls (natively, when the
# extension is there): the same object, built once per consumed record.
_make_record = wire.builder(Record)
# _process_batch's grouping loop in one native call (reelbus_native.extend_group), or None.
_EXTEND_GROUP: Any = getattr(wire.NATIVE, "extend_group", None)


class BusConsumer:
    def __init__(
        self,
        config: ConsumerConfig,
        contracts: Contracts,
        serde: Serde,
        handlers: Mapping[str, AnyHandler],
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
        self._committed: dict[tuple[str, int], int] = {}  # what this consumer last committed
        self._commit_lock = threading.Lock()  # the loop's commits and the rebalance callbacks' ones
        self._stopping = asyncio.Event()
        self._tracer = trace.get_tracer("reelbus.bus.consumer")
        self.assigned_event = asyncio.Event()
        # Prometheus children resolved once (``.labels()`` is slow on a per-record path).
        self._consumed: dict[tuple[str, str], Any] = {}
        self._handler_seconds: dict[str, Any] = {}

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

    # -- rebalance (called by librdkafka inside consume(), on the loop or a worker thread) --

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(p.topic, p.partition) for p in partitions}
        metrics.ASSIGNED.labels(self.config.group_id).set(len(self._assigned))
        log.info("assigned %s", sorted(self._assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        self._commit_sync(consumer, only=revoked)
        self._assigned -= revoked
        for tp in revoked:  # another member commits these from now on
            self._committed.pop(tp, None)
        metrics.ASSIGNED.labels(self.config.group_id).set(len(self._assigned))
        log.info("revoked %s", sorted(revoked))

    def _commit_sync(self, consumer: Consumer, only: set[tuple[str, int]] | None = None) -> None:
        with self._commit_lock:
            items = [(tp, off) for tp, off in self._pending.items() if only is None or tp in only]
            if not items:
                return
            offsets = [TopicPartition(t, p, off) for (t, p), off in items]
            consumer.commit(offsets=offsets, asynchronous=False)
            self._committed.update(items)
            for tp, off in items:
                if self._pending.get(tp) == off:
                    del self._pending[tp]

    def _commit_offsets(self, consumer: Consumer, items: list[tuple[tuple[str, int], int]]) -> None:
        """Commit these offsets (worker thread); the loop forgets them once this returns."""
        with self._commit_lock:
            consumer.commit(offsets=[TopicPartition(t, p, off) for (t, p), off in items], asynchronous=False)
            self._committed.update(items)

    def _forget(self, items: list[tuple[tuple[str, int], int]]) -> None:
        """Committed: drop what has not moved on since (on the loop, where ``_pending`` is written)."""
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
            # A batch's offsets are committed (synchronously, on a worker thread) while the next batches
            # are fetched and handled; at most one such commit is in flight, and it must have succeeded
            # before the next one starts. The offsets of the batches handled meanwhile wait for it (the
            # loop does not stall on the broker's round trip) and go in the next commit, which starts
            # once it has succeeded and ``commit_interval`` has passed since it started: after the next
            # batch, or after a fetch that waits no longer than that (or than ``commit_interval``, at
            # least 10 ms, while one is in flight) when no record comes. Only offsets of handled records
            # are ever committed.
            commit: asyncio.Future[None] | None = None
            committing: list[tuple[tuple[str, int], int]] = []
            interval = self.config.commit_interval
            next_commit = 0.0  # time.monotonic() from which a commit may start
            try:
                while not self._stopping.is_set():
                    wait = None  # the fetch's own poll_timeout
                    if self._pending:
                        if commit is None:
                            wait = max(0.0, next_commit - time.monotonic())
                        else:
                            wait = max(interval, 0.01)
                    # What librdkafka has already fetched is taken here, without a thread hop (a
                    # consume with no timeout returns at once); only waiting for records goes to a
                    # worker thread. Either way the loop yields once per batch.
                    batch = consumer.consume(self.config.batch_size, 0) if self._assigned else []
                    if batch:
                        await asyncio.sleep(0)
                    else:
                        batch = await asyncio.to_thread(self._fetch, consumer, wait)
                    if self._assigned and not self.assigned_event.is_set():
                        self.assigned_event.set()
                    await self._process_batch(batch)
                    if commit is not None and commit.done():
                        await commit  # raises what the commit raised
                        commit = None
                        self._forget(committing)
                    now = time.monotonic()
                    if self._pending and commit is None and now >= next_commit:
                        next_commit = now + interval
                        committing = list(self._pending.items())
                        commit = asyncio.ensure_future(
                            asyncio.to_thread(self._commit_offsets, consumer, committing)
                        )
            finally:
                if commit is not None:
                    await commit
                    self._forget(committing)
        except KafkaException as exc:
            raise ConsumerDied(f"consumer of group {self.config.group_id} failed: {exc}") from exc
        finally:
            await asyncio.to_thread(self._close, consumer)

    def _fetch(self, consumer: Consumer, wait: float | None = None) -> list[Message]:
        """The next records: wait up to ``poll_timeout`` (or ``wait``, if shorter) for one, then take
        what else is already fetched, up to ``batch_size``. (One ``consume(batch_size, timeout)`` would
        sit out the whole timeout whenever fewer than ``batch_size`` records come: at a low rate every
        record would wait up to ``poll_timeout`` before its handler runs.) Blocking: on a worker thread."""
        timeout = self.config.poll_timeout if wait is None else min(wait, self.config.poll_timeout)
        first: list[Message] = consumer.consume(1, timeout)
        if not first or self.config.batch_size <= 1:
            return first
        rest: list[Message] = consumer.consume(self.config.batch_size - 1, 0)
        return first + rest

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

    async def _process_batch(self, batch: Sequence[Message]) -> None:
        """Split a fetch into span groups (module doc) and handle them in order."""
        fields = propagation_fields()
        n = len(batch)
        i = 0
        while i < n:
            if self._stopping.is_set():
                return  # the rest of the batch is not committed: it is fetched again later
            msg = batch[i]
            i += 1
            err = msg.error()
            if err is not None:
                self._on_error(err)
                continue
            headers = _headers_of(msg)
            group = [(msg, headers)]
            key = trace_key(headers, fields)
            topic, partition = msg.topic(), msg.partition()
            if _EXTEND_GROUP is not None and type(batch) is list:
                # The loop below, natively; it stops where it is unsure and the loop goes on from there.
                i = _EXTEND_GROUP(batch, i, key, partition, topic, fields, group)
            while i < n:
                nxt = batch[i]
                if nxt.error() is not None or nxt.partition() != partition or nxt.topic() != topic:
                    break
                nxt_headers = _headers_of(nxt)
                if trace_key(nxt_headers, fields) != key:
                    break
                group.append((nxt, nxt_headers))
                i += 1
            await self._process_group(group)

    async def _process_group(self, group: list[tuple[Message, KafkaHeaders]]) -> None:
        first, headers = group[0]
        topic_name = first.topic() or ""
        partition = first.partition() or 0
        topic = self.topics.get(topic_name)
        single = len(group) == 1
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.destination.name": topic_name,
            "messaging.operation.type": "process",
            "messaging.kafka.message.offset": first.offset() or 0,
            "messaging.destination.partition.id": str(partition),
            "messaging.consumer.group.name": self.config.group_id,
        }
        if not single:
            attributes[ATTR_BATCH_COUNT] = len(group)
        outcomes: dict[str, int] = {}
        with self._tracer.start_as_current_span(
            f"process {topic_name}",
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            held = _Held()
            held_by: Batched | None = None
            kinds: set[str] = set()
            stopping = self._stopping
            serde = self.serde
            decode, decode_key = serde.decode_event_nowait, serde.decode_key_nowait
            handlers = self.handlers
            n = len(group)
            i = 0
            try:
                while i < n:
                    if stopping.is_set():
                        break  # what was not handled is not committed: it is fetched again later
                    # The common case in one native call: a run of records of one event type that
                    # decode through the serde's fast paths, handled as the loop below would handle
                    # them one by one; the record that ends the run goes the way below.
                    pairs, msgs, end = serde.decode_run(group, i, topic, _make_record, topic_name, partition)
                    if pairs:
                        i = end
                        first_event = pairs[0][0]
                        name = first_event.SCHEMA_NAME
                        kinds.add(name)
                        if single:
                            span.set_attribute(ATTR_EVENT_TYPE, name)
                            span.set_attribute(ATTR_EVENT_ID, str(first_event.event_id))
                        handler = handlers.get(name)
                        if isinstance(handler, Batched):
                            if held.pairs and held_by is not handler:
                                await self._flush(held_by, held, span, outcomes)
                            held_by = handler
                            held.pairs += pairs
                            held.msgs += msgs
                            continue
                        for (event, record), msg in zip(pairs, msgs, strict=True):
                            if stopping.is_set():
                                break
                            await self._flush(held_by, held, span, outcomes)
                            if handler is None:
                                outcomes["ignored"] = outcomes.get("ignored", 0) + 1
                            else:
                                await self._handle_one(handler, event, record, msg, span, outcomes)
                            self._done(topic_name, partition, record.offset)
                        continue
                    msg, msg_headers = group[i]
                    i += 1
                    offset = msg.offset() or 0
                    try:
                        # _decode and _decode_key inline (no coroutine per record): the registry is
                        # awaited only for a schema id seen for the first time.
                        value = _as_bytes(msg.value())
                        try:
                            event = decode(topic, value)
                        except SchemaNotCached as exc:
                            await serde.reader_for(exc.schema_id)
                            event = decode(topic, value)
                        key_data = _as_bytes(msg.key())
                        try:
                            key = decode_key(key_data)
                        except SchemaNotCached as exc:
                            await serde.reader_for(exc.schema_id)
                            key = decode_key(key_data)
                    except PoisonMessage as exc:
                        await self._flush(held_by, held, span, outcomes)
                        await self._dead_letter(Incoming.of(msg), exc.stage, exc.reason, "PoisonMessage", 0)
                        span.set_status(Status(StatusCode.ERROR, exc.reason))
                        self._done(topic_name, partition, offset)
                        continue
                    except (ConsumerDied, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # e.g. from_record refusing a value: poison as well
                        await self._flush(held_by, held, span, outcomes)
                        await self._handler_error(msg, "decode", exc, 0, span)
                        self._done(topic_name, partition, offset)
                        continue
                    name = event.SCHEMA_NAME
                    kinds.add(name)
                    if single:
                        span.set_attribute(ATTR_EVENT_TYPE, name)
                        span.set_attribute(ATTR_EVENT_ID, str(event.event_id))
                    handler = handlers.get(name)
                    record = _make_record(topic_name, partition, offset, key, msg_headers, msg.timestamp()[1])
                    if isinstance(handler, Batched):
                        if held.pairs and held_by is not handler:
                            await self._flush(held_by, held, span, outcomes)
                        held_by = handler
                        held.pairs.append((event, record))
                        held.msgs.append(msg)
                        continue
                    await self._flush(held_by, held, span, outcomes)
                    if handler is None:
                        # Declared on the topic, but this service does not care about it: done.
                        outcomes["ignored"] = outcomes.get("ignored", 0) + 1
                    else:
                        await self._handle_one(handler, event, record, msg, span, outcomes)
                    self._done(topic_name, partition, offset)
                await self._flush(held_by, held, span, outcomes)
            finally:
                if not single and len(kinds) == 1:
                    span.set_attribute(ATTR_EVENT_TYPE, next(iter(kinds)))
                for outcome, count in outcomes.items():
                    self._count(topic_name, outcome, count)

    def _done(self, topic: str, partition: int, offset: int) -> None:
        self._pending[(topic, partition)] = offset + 1

    async def _decode(self, topic: Topic | None, msg: Message) -> AvroEvent:
        value = _as_bytes(msg.value())
        try:
            return self.serde.decode_event_nowait(topic, value)
        except SchemaNotCached as exc:
            await self.serde.reader_for(exc.schema_id)
        return self.serde.decode_event_nowait(topic, value)

    async def _decode_key(self, msg: Message) -> Any:
        data = _as_bytes(msg.key())
        try:
            return self.serde.decode_key_nowait(data)
        except SchemaNotCached as exc:
            await self.serde.reader_for(exc.schema_id)
        return self.serde.decode_key_nowait(data)

    # -- metrics ------------------------------------------------------------------------------

    def _count(self, topic: str, outcome: str, n: int = 1) -> None:
        child = self._consumed.get((topic, outcome))
        if child is None:
            child = self._consumed[(topic, outcome)] = metrics.CONSUMED.labels(topic, outcome)
        child.inc(n)

    def _seconds(self, event_type: str) -> Any:
        child = self._handler_seconds.get(event_type)
        if child is None:
            child = self._handler_seconds[event_type] = metrics.HANDLER_SECONDS.labels(event_type)
        return child

    # -- one record, one handler call -----------------------------------------------------------

    async def _handle_one(
        self,
        handler: Handler,
        event: AvroEvent,
        record: Record,
        msg: Message,
        span: Span,
        outcomes: dict[str, int],
    ) -> None:
        attempts = 0
        try:
            attempts = await self._call(handler, event, record)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except _Exhausted as exc:
            reason = f"retries exhausted after {exc.attempts} attempts: {exc.cause!r}"
            await self._dead_letter(
                Incoming.of(msg), "handler", reason, type(exc.cause).__name__, exc.attempts
            )
            span.set_status(Status(StatusCode.ERROR, reason))
        except (ConsumerDied, asyncio.CancelledError):
            raise
        except Exception as exc:  # a non-retryable handler error: poison for this service
            await self._handler_error(msg, "handler", exc, attempts, span)

    async def _handler_error(
        self, msg: Message, stage: str, exc: Exception, attempts: int, span: Span
    ) -> None:
        reason = "".join(traceback.format_exception_only(exc)).strip()
        await self._dead_letter(Incoming.of(msg), stage, reason, type(exc).__name__, max(attempts, 1))
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, reason))

    async def _call(self, handler: Handler, event: AvroEvent, record: Record) -> int:
        """The first attempt inline (no extra coroutine); retries, if any, in ``_retry``."""
        seconds = self._seconds(event.SCHEMA_NAME)
        started = time.perf_counter()
        try:
            await handler(event, record)
            return 1
        except RETRYABLE as exc:
            failure: BaseException = exc
        finally:
            seconds.observe(time.perf_counter() - started)
        return await self._retry(handler, event, record, failure)

    async def _retry(self, handler: Handler, event: AvroEvent, record: Record, failure: BaseException) -> int:
        policy = self.config.retry
        if policy.attempts <= 1:
            raise _Exhausted(1, failure) from failure
        self._note_retry(record.topic, event.SCHEMA_NAME, 1, failure)
        await asyncio.sleep(policy.backoff(1))
        seconds = self._seconds(event.SCHEMA_NAME)
        for attempt in range(2, policy.attempts + 1):
            started = time.perf_counter()
            try:
                await handler(event, record)
            except RETRYABLE as exc:
                if attempt == policy.attempts:
                    raise _Exhausted(attempt, exc) from exc
                self._note_retry(record.topic, event.SCHEMA_NAME, attempt, exc)
                await asyncio.sleep(policy.backoff(attempt))
                continue
            finally:
                seconds.observe(time.perf_counter() - started)
            return attempt
        raise AssertionError("unreachable")

    def _note_retry(self, topic: str, event_type: str, attempt: int, exc: BaseException) -> None:
        self._count(topic, "retried")
        log.warning(
            "retryable failure in %s (attempt %d, retry in %.2fs): %r",
            event_type,
            attempt,
            self.config.retry.backoff(attempt),
            exc,
        )

    async def _handle_with_retries(self, handler: Handler, event: AvroEvent, record: Record) -> int:
        return await self._call(handler, event, record)

    # -- a run of records, one batch handler call -------------------------------------------------

    async def _flush(
        self, handler: Batched | None, held: _Held, span: Span, outcomes: dict[str, int]
    ) -> None:
        """Hand the held run to its batch handler; each record's offset counts as done after it."""
        pairs = held.pairs
        if not pairs:
            return
        msgs = held.msgs
        held.pairs, held.msgs = [], []
        assert handler is not None
        await self._handle_run(handler, pairs, msgs, span, outcomes)
        last = pairs[-1][1]
        self._done(last.topic, last.partition, last.offset)

    async def _handle_run(
        self,
        handler: Batched,
        pairs: list[tuple[Any, Record]],
        msgs: list[Message],
        span: Span,
        outcomes: dict[str, int],
    ) -> None:
        policy = self.config.retry
        event_type = pairs[0][0].SCHEMA_NAME
        seconds = self._seconds(event_type)
        batch = list(pairs)
        failure: BaseException | None = None
        attempt = 0
        for attempt in range(1, policy.attempts + 1):
            started = time.perf_counter()
            try:
                await handler.fn(batch)
            except RETRYABLE as exc:
                failure = exc
                if attempt == policy.attempts:
                    break
                self._note_retry(pairs[0][1].topic, event_type, attempt, exc)
                await asyncio.sleep(policy.backoff(attempt))
                continue
            except (ConsumerDied, asyncio.CancelledError):
                raise
            except Exception as exc:
                failure = exc
                break
            finally:
                seconds.observe(time.perf_counter() - started)
            outcomes["ok"] = outcomes.get("ok", 0) + len(pairs)
            return
        assert failure is not None
        if len(pairs) > 1:
            # Find the culprit: one record at a time, each with its own retries.
            for pair, msg in zip(pairs, msgs, strict=True):
                await self._handle_run(handler, [pair], [msg], span, outcomes)
            return
        msg = msgs[0]
        if isinstance(failure, RETRYABLE):
            reason = f"retries exhausted after {attempt} attempts: {failure!r}"
            await self._dead_letter(Incoming.of(msg), "handler", reason, type(failure).__name__, attempt)
            span.set_status(Status(StatusCode.ERROR, reason))
        else:
            assert isinstance(failure, Exception)
            await self._handler_error(msg, "handler", failure, attempt, span)

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
        self._count(topic, "dead_lettered")

    # -- lag ------------------------------------------------------------------------------

    def lag(self) -> dict[tuple[str, int], int]:
        """High watermark minus committed offset, per assigned partition. Blocking, but cheap: the
        watermarks librdkafka learnt from its fetches and the offsets this consumer committed; the
        broker is asked only about partitions it has not committed yet, or whose watermark is unknown."""
        consumer = self._kafka
        if consumer is None or not self._assigned:
            return {}
        assigned = sorted(self._assigned)
        unknown = [TopicPartition(t, p) for t, p in assigned if (t, p) not in self._committed]
        if unknown:
            for tp in consumer.committed(unknown, timeout=5.0):
                if tp.offset != OFFSET_INVALID and tp.offset >= 0:
                    self._committed.setdefault((tp.topic, tp.partition), tp.offset)
        result: dict[tuple[str, int], int] = {}
        for topic, partition in assigned:
            tp = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                low, high = consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            offset = self._committed.get((topic, partition), low)
            result[(topic, partition)] = max(0, high - offset)
            metrics.CONSUMER_LAG.labels(self.config.group_id, topic, str(partition)).set(
                result[(topic, partition)]
            )
        return result


class _Exhausted(Exception):
    def __init__(self, attempts: int, cause: BaseException) -> None:
        super().__init__(f"{attempts} attempts")
        self.attempts = attempts
        self.cause = cause
