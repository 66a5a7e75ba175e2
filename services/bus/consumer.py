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

from confluent_kafka import OFFSET_INVALID, Message
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.bus import metrics, wire
from services.bus.contracts import DLQ_SUFFIX, ContractError, Contracts, Topic
from services.bus.events import AvroEvent
from services.bus.fetch import KAFKA_ERRORS, Fetch, MessageFetch, Partitions, Source, open_source
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
)

log = logging.getLogger("reelbus.bus.consumer")

DLQ_PREFIX = "reelbus.dlq."


class Retryable(Exception):
    """A transient failure: the record is retried with backoff, then dead-lettered."""


RETRYABLE: tuple[type[BaseException], ...] = (Retryable, ConnectionError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Record:
    """What a handler learns about the record besides the event. From the native consumer,
    ``headers`` is a ``reelbus_native.Headers``: a sequence read from the fetch when asked."""

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
        return cls.at(MessageFetch([msg]), 0)

    @classmethod
    def at(cls, fetch: Fetch, i: int) -> Incoming:
        """Record ``i`` of a fetch."""
        return cls(
            topic=fetch.topic(i),
            partition=fetch.partition(i),
            offset=fetch.offset(i),
            key=fetch.key(i),
            value=fetch.value(i),
            headers=normalize_headers(fetch.headers(i)),
            timestamp_ms=fetch.timestamp(i),
        )


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


# When a partition's local queue is full (queued.min.messages), librdkafka waits this long before
# fetching it again: 1000 ms by default, which held every consumer reading a backlog to about 160k
# records/s here (the queue drains in a fraction of that second, then idles). With 10 ms a bare read
# of the same topic measured 1.1M records/s natively and 1.07M through confluent-kafka.
FETCH_QUEUE_BACKOFF_MS = 10


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
    # The Kafka client (services/bus/fetch.py): the native one when built (None), or say which.
    native: bool | None = None

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
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
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
    pairs the handler gets (their records, should one go to the dead letters, are read again from
    the fetch by offset)."""

    pairs: list[tuple[Any, Record]] = field(default_factory=list)


_NOTHING = MessageFetch([])

# Record(...) without the frozen dataclass's per-field object.__setattr__ calls (natively, when the
# extension is there): the same object, built once per consumed record.
_make_record = wire.builder(Record)


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
        self._kafka: Source | None = None
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

    def _on_assign(self, partitions: Partitions) -> None:
        self._assigned |= set(partitions)
        metrics.ASSIGNED.labels(self.config.group_id).set(len(self._assigned))
        log.info("assigned %s", sorted(self._assigned))

    def _on_revoke(self, partitions: Partitions) -> None:
        revoked = set(partitions)
        if self._kafka is not None:
            self._commit_sync(self._kafka, only=revoked)
        self._assigned -= revoked
        for tp in revoked:  # another member commits these from now on
            self._committed.pop(tp, None)
        metrics.ASSIGNED.labels(self.config.group_id).set(len(self._assigned))
        log.info("revoked %s", sorted(revoked))

    def _commit_sync(self, consumer: Source, only: set[tuple[str, int]] | None = None) -> None:
        with self._commit_lock:
            items = [(tp, off) for tp, off in self._pending.items() if only is None or tp in only]
            if not items:
                return
            consumer.commit([(t, p, off) for (t, p), off in items])
            self._committed.update(items)
            for tp, off in items:
                if self._pending.get(tp) == off:
                    del self._pending[tp]

    def _commit_offsets(self, consumer: Source, items: list[tuple[tuple[str, int], int]]) -> None:
        """Commit these offsets (worker thread); the loop forgets them once this returns."""
        with self._commit_lock:
            consumer.commit([(t, p, off) for (t, p), off in items])
            self._committed.update(items)

    def _forget(self, items: list[tuple[tuple[str, int], int]]) -> None:
        """Committed: drop what has not moved on since (on the loop, where ``_pending`` is written)."""
        for tp, off in items:
            if self._pending.get(tp) == off:
                del self._pending[tp]

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until ``stop()``; raises ``ConsumerDied`` when it cannot go on."""
        try:
            consumer = open_source(self.config.librdkafka(), self.config.native)
        except KAFKA_ERRORS as exc:
            raise ConsumerDied(f"consumer of group {self.config.group_id} cannot start: {exc}") from exc
        self._kafka = consumer
        try:
            consumer.subscribe(list(self.topics), self._on_assign, self._on_revoke, self._on_revoke)
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
                    batch = consumer.fetch(self.config.batch_size, 0) if self._assigned else _NOTHING
                    if len(batch):
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
        except KAFKA_ERRORS as exc:
            raise ConsumerDied(f"consumer of group {self.config.group_id} failed: {exc}") from exc
        finally:
            await asyncio.to_thread(self._close, consumer)

    def _fetch(self, consumer: Source, wait: float | None = None) -> Fetch:
        """The next records: wait up to ``poll_timeout`` (or ``wait``, if shorter) for one, then take
        what else is already fetched, up to ``batch_size`` (at a low rate no record waits out the
        timeout for others). Blocking: on a worker thread."""
        timeout = self.config.poll_timeout if wait is None else min(wait, self.config.poll_timeout)
        return consumer.fetch(self.config.batch_size, timeout)

    def _close(self, consumer: Source) -> None:
        try:
            self._commit_sync(consumer)
        finally:
            consumer.close()
            self._assigned.clear()
            self._kafka = None

    def _on_error(self, text: str, fatal: bool) -> None:
        if fatal:
            raise ConsumerDied(f"fatal consumer error: {text}")
        log.warning("consumer error (librdkafka retries): %s", text)

    async def _process_batch(self, batch: Fetch) -> None:
        """Split a fetch into span groups (module doc) and handle them in order."""
        fields = sorted(propagation_fields())
        n = len(batch)
        i = 0
        while i < n:
            if self._stopping.is_set():
                return  # the rest of the batch is not committed: it is fetched again later
            err = batch.error(i)
            if err is not None:
                self._on_error(*err)
                i += 1
                continue
            end = batch.group_end(i, fields)
            await self._process_group(batch, i, end)
            i = end

    async def _process_group(self, batch: Fetch, start: int, end: int) -> None:
        """Records ``start`` to ``end`` of a fetch: one span group."""
        topic_name = batch.topic(start)
        partition = batch.partition(start)
        headers = batch.headers(start)
        topic = self.topics.get(topic_name)
        single = end - start == 1
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.destination.name": topic_name,
            "messaging.operation.type": "process",
            "messaging.kafka.message.offset": batch.offset(start),
            "messaging.destination.partition.id": str(partition),
            "messaging.consumer.group.name": self.config.group_id,
        }
        if not single:
            attributes[ATTR_BATCH_COUNT] = end - start
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
            i = start
            try:
                while i < end:
                    if stopping.is_set():
                        break  # what was not handled is not committed: it is fetched again later
                    # The common case in one native call: a run of records of one event type that
                    # decode through the serde's fast paths, handled as the loop below would handle
                    # them one by one; the record that ends the run goes the way below.
                    pairs, stop = serde.decode_run(batch, i, end, topic, _make_record)
                    if pairs:
                        i = stop
                        first_event = pairs[0][0]
                        name = first_event.SCHEMA_NAME
                        kinds.add(name)
                        if single:
                            span.set_attribute(ATTR_EVENT_TYPE, name)
                            span.set_attribute(ATTR_EVENT_ID, str(first_event.event_id))
                        handler = handlers.get(name)
                        if isinstance(handler, Batched):
                            if held.pairs and held_by is not handler:
                                await self._flush(held_by, held, batch, span, outcomes)
                            held_by = handler
                            held.pairs += pairs
                            continue
                        for event, record in pairs:
                            if stopping.is_set():
                                break
                            await self._flush(held_by, held, batch, span, outcomes)
                            if handler is None:
                                outcomes["ignored"] = outcomes.get("ignored", 0) + 1
                            else:
                                await self._handle_one(handler, event, record, batch, span, outcomes)
                            self._done(topic_name, partition, record.offset)
                        continue
                    offset = batch.offset(i)
                    at = i
                    i += 1
                    try:
                        # _decode and _decode_key inline (no coroutine per record): the registry is
                        # awaited only for a schema id seen for the first time.
                        value = batch.value(at)
                        try:
                            event = decode(topic, value)
                        except SchemaNotCached as exc:
                            await serde.reader_for(exc.schema_id)
                            event = decode(topic, value)
                        key_data = batch.key(at)
                        try:
                            key = decode_key(key_data)
                        except SchemaNotCached as exc:
                            await serde.reader_for(exc.schema_id)
                            key = decode_key(key_data)
                    except PoisonMessage as exc:
                        await self._flush(held_by, held, batch, span, outcomes)
                        await self._dead_letter(
                            Incoming.at(batch, at), exc.stage, exc.reason, "PoisonMessage", 0
                        )
                        span.set_status(Status(StatusCode.ERROR, exc.reason))
                        self._done(topic_name, partition, offset)
                        continue
                    except (ConsumerDied, asyncio.CancelledError):
                        raise
                    except Exception as exc:  # e.g. from_record refusing a value: poison as well
                        await self._flush(held_by, held, batch, span, outcomes)
                        await self._handler_error(Incoming.at(batch, at), "decode", exc, 0, span)
                        self._done(topic_name, partition, offset)
                        continue
                    name = event.SCHEMA_NAME
                    kinds.add(name)
                    if single:
                        span.set_attribute(ATTR_EVENT_TYPE, name)
                        span.set_attribute(ATTR_EVENT_ID, str(event.event_id))
                    handler = handlers.get(name)
                    record = _make_record(
                        topic_name, partition, offset, key, batch.headers(at), batch.timestamp(at)
                    )
                    if isinstance(handler, Batched):
                        if held.pairs and held_by is not handler:
                            await self._flush(held_by, held, batch, span, outcomes)
                        held_by = handler
                        held.pairs.append((event, record))
                        continue
                    await self._flush(held_by, held, batch, span, outcomes)
                    if handler is None:
                        # Declared on the topic, but this service does not care about it: done.
                        outcomes["ignored"] = outcomes.get("ignored", 0) + 1
                    else:
                        await self._handle_one(handler, event, record, batch, span, outcomes)
                    self._done(topic_name, partition, offset)
                await self._flush(held_by, held, batch, span, outcomes)
            finally:
                if not single and len(kinds) == 1:
                    span.set_attribute(ATTR_EVENT_TYPE, next(iter(kinds)))
                for outcome, count in outcomes.items():
                    self._count(topic_name, outcome, count)

    def _done(self, topic: str, partition: int, offset: int) -> None:
        self._pending[(topic, partition)] = offset + 1

    @staticmethod
    def _incoming(batch: Fetch, record: Record) -> Incoming:
        """The fetched record a handler got ``record`` of (for its dead letter)."""
        for i in range(len(batch)):
            if (
                batch.offset(i) == record.offset
                and batch.partition(i) == record.partition
                and batch.topic(i) == record.topic
                and batch.error(i) is None
            ):
                return Incoming.at(batch, i)
        raise ConsumerDied(f"{record.topic}[{record.partition}]@{record.offset} is not in its fetch")

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
        batch: Fetch,
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
                self._incoming(batch, record), "handler", reason, type(exc.cause).__name__, exc.attempts
            )
            span.set_status(Status(StatusCode.ERROR, reason))
        except (ConsumerDied, asyncio.CancelledError):
            raise
        except Exception as exc:  # a non-retryable handler error: poison for this service
            await self._handler_error(self._incoming(batch, record), "handler", exc, attempts, span)

    async def _handler_error(
        self, msg: Incoming, stage: str, exc: Exception, attempts: int, span: Span
    ) -> None:
        reason = "".join(traceback.format_exception_only(exc)).strip()
        await self._dead_letter(msg, stage, reason, type(exc).__name__, max(attempts, 1))
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

    # -- a run of records, one batch handler call -------------------------------------------------

    async def _flush(
        self, handler: Batched | None, held: _Held, batch: Fetch, span: Span, outcomes: dict[str, int]
    ) -> None:
        """Hand the held run to its batch handler; each record's offset counts as done after it."""
        pairs = held.pairs
        if not pairs:
            return
        held.pairs = []
        assert handler is not None
        await self._handle_run(handler, pairs, batch, span, outcomes)
        last = pairs[-1][1]
        self._done(last.topic, last.partition, last.offset)

    async def _handle_run(
        self,
        handler: Batched,
        pairs: list[tuple[Any, Record]],
        batch: Fetch,
        span: Span,
        outcomes: dict[str, int],
    ) -> None:
        policy = self.config.retry
        event_type = pairs[0][0].SCHEMA_NAME
        seconds = self._seconds(event_type)
        items = list(pairs)
        failure: BaseException | None = None
        attempt = 0
        for attempt in range(1, policy.attempts + 1):
            started = time.perf_counter()
            try:
                await handler.fn(items)
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
            for pair in pairs:
                await self._handle_run(handler, [pair], batch, span, outcomes)
            return
        msg = self._incoming(batch, pairs[0][1])
        if isinstance(failure, RETRYABLE):
            reason = f"retries exhausted after {attempt} attempts: {failure!r}"
            await self._dead_letter(msg, "handler", reason, type(failure).__name__, attempt)
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
        unknown = [tp for tp in assigned if tp not in self._committed]
        if unknown:
            for topic, partition, offset in consumer.committed(unknown, timeout=5.0):
                if offset != OFFSET_INVALID and offset >= 0:
                    self._committed.setdefault((topic, partition), offset)
        result: dict[tuple[str, int], int] = {}
        for topic, partition in assigned:
            low, high = consumer.watermarks(topic, partition, cached=True)
            if high < 0:
                low, high = consumer.watermarks(topic, partition, cached=False, timeout=5.0)
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
