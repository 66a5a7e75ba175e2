"""Faust stream processors on the bus: Avro through the registry, RocksDB tables with declared
changelogs, traces carried across, dead letters, and a runtime with the bus's probes and shutdown.

A stream service (the recommender, the anomaly detector) is a ``faust.App`` made by :func:`make_app`
plus, around it, what every bus service has (``StreamService``): ``/livez``, ``/readyz``, ``/metrics``,
token-verified routes, JSON logs, root tasks that fail together, a staged SIGTERM shutdown.

- **Processing guarantee**: at-least-once (faust's exactly-once duplicates and crashes on rebalance).
  Faust commits an offset only after the agent is done with the record and after flushing the
  producer, so every output and changelog record of a handled record is on the broker before its
  offset is committed. Handlers make their effects idempotent (event ids, keyed compacted topics).
- **Avro, no pickle or JSON**: topics are read and written as raw bytes, and :class:`StreamBus`
  encodes and decodes them with the bus's :class:`~services.bus.serde.Serde` (the Confluent wire
  format, schema ids from the registry, the generated typed events). Tables use :class:`AvroCodec`,
  the same encoding under the changelog topic's subjects, for the changelog and for RocksDB.
- **Tables**: RocksDB through ``rocksdict`` (faust-streaming 0.15 picks rocksdict when it is installed:
  ``faust/stores/rocksdb.py``). Their changelog topics (``<app id>-<table>-changelog``) must be
  declared in ``topics/topics.yaml``: faust may not create topics (``topic_allow_declare=False``),
  ``reelbus topics apply`` does, and :meth:`StreamBus.table` refuses a table whose changelog is not
  declared with the table's value type.
- **Static membership**: ``consumer_group_instance_id`` is the service's ``INSTANCE_ID`` when set (a
  restarted replica gets its partitions back without a rebalance).
- **Traces**: :meth:`StreamBus.consuming` opens a CONSUMER span whose parent is the producer's span
  from the record's W3C headers; :meth:`StreamBus.send` opens a PRODUCER span (a child of the current
  one) and carries it in the outgoing record's headers, with the bus's event-type/id headers.
- **Dead letters**: a record that is not Avro in the wire format, names an unknown schema id or a type
  its topic does not declare goes to ``<topic>.dlq`` with the original key, value and headers and the
  ``reelbus.dlq.*`` headers of ``services.bus.consumer``; the agent goes on.
- **Replicas** (:class:`Replica`): a whole topic folded into memory by every worker (not a consumer
  group: all partitions, from the beginning), for what every worker needs whole: a catalog, the
  profiles' owners, a model folded from a log. ``ready`` once it reached the end offsets seen at start.
- **Copies of topics**: ``<NAME>_TOPIC_PREFIX`` runs the service on copies of its declared topics
  named ``<prefix><declared name>`` (tests and evaluations make such copies, each with its own app id,
  consumer group and changelogs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faust
from aiohttp import web
from faust.serializers.codecs import Codec
from faust.transport.drivers.aiokafka import ensure_aiokafka_TP
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest
from pydantic import Field

from services.bus import metrics
from services.bus.auth import TokenVerifier, auth_middleware, load_public_key
from services.bus.consumer import DLQ_PREFIX
from services.bus.contracts import DLQ_SUFFIX, ContractError, Contracts, Topic
from services.bus.events import AvroEvent
from services.bus.http import MAX_BODY_BYTES, errors_middleware, tracing_middleware
from services.bus.producer import HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_PRODUCER
from services.bus.registry import RegistryUnavailable
from services.bus.runtime import (
    EXIT_BAD_SETTING,
    EXIT_FAILED,
    BusSettings,
    default_keys_dir,
    setup_logging,
    start_http,
)
from services.bus.serde import PoisonMessage, SchemaNotCached, Serde
from services.bus.tracing import (
    ATTR_DLQ_REASON,
    ATTR_EVENT_ID,
    ATTR_EVENT_TYPE,
    KafkaHeaders,
    context_headers,
    extract_context,
    setup_tracing,
)

log = logging.getLogger("reelbus.bus.streams")

SKIPPED = Counter(
    "reelbus_stream_skipped_total",
    "Records a stream processor counted and skipped, by reason (unknown_title, late, duplicate, ...)",
    ["topic", "reason"],
)
REPLICA_APPLIED = Counter("reelbus_replica_applied_total", "Records folded into a replica", ["topic"])
UNCOMMITTED = Gauge(
    "reelbus_stream_uncommitted_seconds",
    "Seconds since a stream app last advanced its committed offsets while handled records waited",
)


class StreamSettings(BusSettings):
    """Settings of every stream service; a service subclasses this with its own ``env_prefix``."""

    # RocksDB tables: <data_dir>/<app id>/ (default: $REELBUS_HOME/data/streams)
    data_dir: Path = Field(default_factory=lambda: default_keys_dir().parent / "data" / "streams")
    topic_prefix: str = ""  # run on copies of the declared topics: "<prefix><declared name>"
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    session_timeout_seconds: float = Field(default=10.0, gt=0, le=60)


# -- topics ---------------------------------------------------------------------------------------


def prefixed_contracts(contracts: Contracts, prefix: str, names: Sequence[str]) -> Contracts:
    """``contracts`` plus copies of the named declared topics called ``<prefix><name>``."""
    if not prefix:
        return contracts
    copies = [replace(contracts.topic(name), name=prefix + name) for name in names]
    return contracts.with_topics([c for c in copies if c.name not in contracts.topics])


def changelog_name(app_id: str, table: str) -> str:
    """What faust names a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


# -- the Avro codec --------------------------------------------------------------------------------


class AvroCodec(Codec):
    """Faust codec for one declared topic's keys (``key=True``) or typed values: Confluent wire format
    through the bus's ``Serde`` (schema ids looked up once by ``Serde.prepare``). Decoding a schema id
    met for the first time asks the registry once, blocking (a changelog written by an older version)."""

    def __init__(self, serde: Serde, topic: Topic, key: bool = False) -> None:
        super().__init__()
        self.serde = serde
        self.topic = topic
        self.key = key

    def _dumps(self, obj: Any) -> bytes:
        if self.key:
            return self.serde.encode_key(self.topic, obj)
        return self.serde.encode_value(self.topic, obj)

    def _loads(self, s: bytes) -> Any:
        for _ in range(2):
            try:
                if self.key:
                    return self.serde.decode_key_nowait(s)
                return self.serde.decode_event_nowait(self.topic, s)
            except SchemaNotCached as exc:
                self.serde._readers[exc.schema_id] = self.serde._reader_for(exc.schema_id)
        raise AssertionError("unreachable")

    def clone(self, *children: Any) -> AvroCodec:
        return self  # one codec per topic; faust clones codecs only to chain them with ``|``


# -- the app -----------------------------------------------------------------------------------------


def make_app(
    name: str,
    settings: StreamSettings,
    *,
    partitions: int,
    **overrides: Any,
) -> faust.App:
    """A faust app configured for the bus (module doc). ``name`` is the service's name; the app id
    (also the consumer group and the changelog topics' prefix) is ``<topic prefix><group or name>``."""
    app_id = settings.topic_prefix + (settings.group_id or name)
    brokers = [f"kafka://{b.strip()}" for b in settings.kafka_bootstrap_servers.split(",") if b.strip()]
    session = settings.session_timeout_seconds
    conf: dict[str, Any] = {
        "broker": brokers,
        "store": "rocksdb://",
        "datadir": str(settings.data_dir / app_id),
        "processing_guarantee": "at_least_once",
        "web_enabled": False,
        "topic_allow_declare": False,  # topics come from topics/topics.yaml through `reelbus topics apply`
        "topic_disable_leader": True,  # no leader-election topic (no on_leader timers)
        "topic_partitions": partitions,
        "consumer_group_instance_id": settings.instance_id or None,
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": session,
        "broker_heartbeat_interval": max(0.5, session / 5),
        "broker_commit_interval": settings.commit_interval_seconds,
        "broker_commit_every": 1000,
        "broker_client_id": settings.instance_id or name,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "table_standby_replicas": 0,
        "producer_acks": -1,
        "producer_compression_type": "lz4",
        "producer_linger": 0.01,
        # aiokafka sends one batch per partition at a time: large batches, or the flush before each
        # commit (at-least-once) waits on many small round trips.
        "producer_max_batch_size": 1_000_000,
    }
    conf.update(overrides)
    app = faust.App(app_id, **conf)
    _seek_before_resuming(app)
    return app


def _seek_before_resuming(app: faust.App) -> None:
    """Close a race in faust-streaming 0.15.3's recovery (its issue 596). Once a worker's tables are
    recovered, ``Recovery.on_recovery_completed`` (``_resume_streams`` without tables) resumes the
    stream partitions, then awaits their seek to the committed offsets, then clears the agents'
    queues and resumes the flow. Records fetched in between are queued and then cleared unprocessed,
    while the fetcher has already moved past them: they are never fetched again, never acked, and no
    offset of their partition is committed past them (the stall seen in CI: the restarted worker went
    on with later records and committed nothing). Here the stream partitions stay paused through that
    method and are resumed when it is done: sought, queues cleared, flow resumed."""
    recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
    for name in ("on_recovery_completed", "_resume_streams"):
        original = getattr(recovery, name)

        async def guarded(generation_id: int = 0, _original: Any = original) -> None:
            consumer: Any = app.consumer
            _seek_uncommitted_to_the_start(app, consumer)
            held: set[Any] = set()
            consumer.resume_partitions = held.update  # for the duration of faust's method
            try:
                await _original(generation_id)
            finally:
                del consumer.resume_partitions  # faust's own method again
            if held and app.consumer_generation_id == generation_id:
                consumer.resume_partitions(held & consumer.assignment())

        setattr(recovery, name, guarded)


def _seek_uncommitted_to_the_start(app: faust.App, consumer: Any) -> None:
    """Make faust's "seek to the committed offsets" seek the input partitions that have no committed
    offset too: to their start (``consumer_auto_offset_reset`` is earliest). aiokafka's
    ``seek_to_committed`` leaves their position where it is, so records fetched and then dropped
    before the seek (a batch cut short when the flow stops, queues cleared on resume) were lost for
    good on such a partition, while on a committed one the seek brings them back (seen after a kill
    -9: two partitions that the dead worker never committed stayed unread). Installed once."""
    if getattr(consumer, "_reelbus_seek_installed", False):
        return
    original = consumer.seek_to_committed

    async def seek_to_committed() -> Any:
        committed = await original()
        if str(app.conf.consumer_auto_offset_reset) == "earliest":
            changelogs = set(app.tables.changelog_topics)
            fresh = [
                tp for tp in consumer.assignment() if tp.topic not in changelogs and not committed.get(tp)
            ]
            if fresh:  # faust's consumer thread, with aiokafka's partition type
                await consumer._thread.seek_to_beginning(*(ensure_aiokafka_TP(tp) for tp in fresh))
        return committed

    consumer.seek_to_committed = seek_to_committed
    consumer._reelbus_seek_installed = True


@dataclass
class Stats:
    """What a stream processor counted, for ``/readyz`` details and the tests."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


class StreamBus:
    """The bus seen from inside a faust app: typed topics, Avro tables, traced sends, dead letters."""

    def __init__(
        self,
        app: faust.App,
        name: str,
        contracts: Contracts,
        serde: Serde,
        prefix: str = "",
    ) -> None:
        self.app = app
        self.name = name
        self.contracts = contracts
        self.serde = serde
        self.prefix = prefix
        self.stats = Stats()
        self._tracer = trace.get_tracer(f"reelbus.{name}")
        self._producer_header = (HEADER_PRODUCER, name.encode())
        self._topics: dict[str, Any] = {}
        self.prepared: list[str] = []

    # -- topics and tables -------------------------------------------------------------------

    def declared(self, name: str) -> Topic:
        """The declared topic ``name`` (or its copy under the prefix)."""
        return self.contracts.topic(self.prefix + name)

    def topic(self, name: str) -> Any:
        """The faust topic for the declared topic ``name``: raw bytes, decoded by :meth:`decode`."""
        declared = self.declared(name)
        found = self._topics.get(declared.name)
        if found is None:
            found = self.app.topic(
                declared.name,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=declared.partitions,
                allow_empty=True,
            )
            self._topics[declared.name] = found
        return found

    def table(self, table: str, *, value: str, like: str, **kwargs: Any) -> Any:
        """A RocksDB table named ``table`` whose values are events of type ``value`` (full name),
        partitioned like the declared topic ``like``; its changelog must be declared (module doc)."""
        changelog_declared = changelog_name(self.app.conf.id, table)
        try:
            changelog = self.contracts.topic(changelog_declared)
        except ContractError:
            raise ContractError(
                f"table {table}: its changelog topic {changelog_declared} is not declared in the topics file"
            ) from None
        if value not in changelog.values:
            raise ContractError(f"table {table}: {changelog.name} does not declare {value}")
        source = self.declared(like)
        if changelog.partitions != source.partitions:
            raise ContractError(
                f"table {table}: {changelog.name} has {changelog.partitions} partitions, "
                f"{source.name} has {source.partitions}"
            )
        self.prepared.append(changelog.name)
        made: Any = self.app.Table(table, partitions=source.partitions, **kwargs)
        # Faust takes a table's serializers from its key and value types (falling back to JSON) and
        # uses them for the changelog and the RocksDB store, both made later: set ours before that.
        made.key_serializer = AvroCodec(self.serde, changelog, key=True)
        made.value_serializer = AvroCodec(self.serde, changelog)
        # Its changelog topic was made at construction with the JSON serializers; recovery reads
        # through it (the topic's channels are only made when the app starts): make it again.
        made.changelog_topic = made._new_changelog_topic()
        return made

    def prepare(self, produces: Sequence[str]) -> None:
        """Look up the schema ids of what this app writes (its outputs and its tables' changelogs).
        Blocking; before the app starts."""
        names = [self.declared(n).name for n in produces] + self.prepared
        for name in names:
            self.serde.prepare(self.contracts.topic(name))

    # -- records in ----------------------------------------------------------------------------

    async def decode(self, event: Any) -> tuple[Any, AvroEvent] | None:
        """The key and typed event of a faust event of a raw topic; None for a record that went to the
        dead letters (it is then done: the agent moves on)."""
        message = event.message
        topic = self.contracts.topics.get(message.topic)
        try:
            value = await self.serde.decode_event(topic, message.value)
            key = await self.serde.decode_key(message.key)
        except PoisonMessage as exc:
            await self.dead_letter(event, exc.stage, exc.reason, "PoisonMessage")
            return None
        except Exception as exc:  # from_record refusing a value: poison as well
            reason = "".join(traceback.format_exception_only(exc)).strip()
            await self.dead_letter(event, "decode", reason, type(exc).__name__)
            return None
        return key, value

    def committed(self, event: Any) -> int | None:
        """The offset faust last committed for the partition of ``event``'s record (None if none yet).
        Faust flushes its producer before every commit, so every output of the records before that
        offset is on the broker. (faust's ``Consumer._committed_offset``: faust-streaming is pinned.)"""
        consumer: Any = self.app.consumer
        found: int | None = consumer._committed_offset.get(event.message.tp)
        return found

    @contextlib.contextmanager
    def consuming(self, event: Any, decoded: AvroEvent | None = None) -> Iterator[Span]:
        """A CONSUMER span for a faust event, a child of the producer's span (W3C headers)."""
        message = event.message
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.destination.name": message.topic,
            "messaging.operation.type": "process",
            "messaging.kafka.message.offset": message.offset,
            "messaging.destination.partition.id": str(message.partition),
            "messaging.consumer.group.name": self.app.conf.id,
        }
        if decoded is not None:
            attributes[ATTR_EVENT_TYPE] = decoded.SCHEMA_NAME
            attributes[ATTR_EVENT_ID] = str(decoded.event_id)
        with self._tracer.start_as_current_span(
            f"process {message.topic}",
            context=extract_context(headers_of(event)),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    def skip(self, topic: str, reason: str, detail: str) -> None:
        """Count and log a record skipped on purpose (unknown title, late, duplicate, ...)."""
        SKIPPED.labels(topic, reason).inc()
        self.stats.add(reason)
        log.info("skipped a record of %s (%s): %s", topic, reason, detail)

    # -- records out ---------------------------------------------------------------------------

    async def send(self, name: str, key: Any, event: AvroEvent, partition: int | None = None) -> None:
        """Queue ``event`` on the declared topic ``name`` under a PRODUCER span (a child of the current
        span), its trace in the headers. Faust flushes its producer before committing the offsets of
        the records being handled, so this need not wait for the broker (at-least-once)."""
        topic = self.declared(name)
        span = self._tracer.start_span(
            f"send {topic.name}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic.name,
                "messaging.operation.type": "send",
                ATTR_EVENT_TYPE: event.SCHEMA_NAME,
                ATTR_EVENT_ID: str(event.event_id),
            },
        )
        try:
            value = self.serde.encode_value(topic, event)
            key_bytes = self.serde.encode_key(topic, key)
            headers: KafkaHeaders = [
                (HEADER_EVENT_TYPE, event.SCHEMA_NAME.encode()),
                (HEADER_EVENT_ID, str(event.event_id).encode()),
                self._producer_header,
                *context_headers(trace.set_span_in_context(span)),
            ]
            await self.app.producer.send(topic.name, key_bytes, value, partition, None, headers)  # type: ignore[arg-type]
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            span.end()
        metrics.PRODUCED.labels(topic.name).inc()

    async def dead_letter(self, event: Any, stage: str, reason: str, error: str) -> None:
        """The record as it came, to ``<topic>.dlq``, with the ``reelbus.dlq.*`` headers of the bus."""
        message = event.message
        headers = [(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in headers_of(event)]
        timestamp_ms = int((message.timestamp or 0) * 1000)
        headers += [
            (DLQ_PREFIX + "reason", reason.encode()),
            (DLQ_PREFIX + "error", error.encode()),
            (DLQ_PREFIX + "stage", stage.encode()),
            (DLQ_PREFIX + "topic", message.topic.encode()),
            (DLQ_PREFIX + "partition", str(message.partition).encode()),
            (DLQ_PREFIX + "offset", str(message.offset).encode()),
            (DLQ_PREFIX + "timestamp", str(timestamp_ms).encode()),
            (DLQ_PREFIX + "group", str(self.app.conf.id).encode()),
            (DLQ_PREFIX + "attempts", b"0" if stage == "decode" else b"1"),
            (DLQ_PREFIX + "failed-at", str(int(time.time() * 1000)).encode()),
        ]
        trace.get_current_span().set_attribute(ATTR_DLQ_REASON, reason)
        log.error(
            "dead-lettering %s[%d]@%d (%s): %s",
            message.topic,
            message.partition,
            message.offset,
            stage,
            reason,
        )
        delivered = await self.app.producer.send(
            message.topic + DLQ_SUFFIX, message.key, message.value, None, None, headers
        )
        await delivered  # the dead letter is on the broker before the offset can be committed
        metrics.CONSUMED.labels(message.topic, "dead_lettered").inc()
        self.stats.add("dead_lettered")


def in_recovery(app: faust.App) -> bool:
    """Whether the app's tables are being rebuilt from their changelogs."""
    return bool(app.tables.recovery.in_recovery)  # type: ignore[attr-defined]


def headers_of(event: Any) -> list[tuple[str, Any]]:
    raw = getattr(event, "headers", None) or getattr(event.message, "headers", None) or []
    if isinstance(raw, Mapping):
        return list(raw.items())
    return [(str(k), v) for k, v in raw]


# -- replicas ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaRecord:
    topic: str
    partition: int
    offset: int
    key: Any
    timestamp_ms: int


Fold = Callable[[AvroEvent, ReplicaRecord], None]


class Replica:
    """A whole declared topic folded into memory by ``fold`` (module doc). Records are folded in
    partition order; a record that does not decode is counted, logged and skipped."""

    def __init__(self, bootstrap_servers: str, serde: Serde, topic: Topic, fold: Fold) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.serde = serde
        self.topic = topic
        self.fold = fold
        self.ready = asyncio.Event()
        self.positions: dict[int, int] = {}
        self.applied = 0
        self._consumer: Any = None

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
        )
        await consumer.start()
        self._consumer = consumer
        try:
            parts = consumer.partitions_for_topic(self.topic.name)
            while not parts:
                await consumer._client.force_metadata_update()  # the topic may be new
                parts = consumer.partitions_for_topic(self.topic.name)
                if not parts:
                    await asyncio.sleep(0.5)
            tps = [TopicPartition(self.topic.name, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            target = await self._ends()
            self._check_ready(target)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=2000)
                for tp, messages in batches.items():
                    for msg in messages:
                        await self._apply(msg)
                        self.positions[tp.partition] = msg.offset + 1
                if not self.ready.is_set():
                    self._check_ready(target)
        finally:
            self._consumer = None
            await consumer.stop()

    async def _apply(self, msg: Any) -> None:
        try:
            event = await self.serde.decode_event(self.topic, msg.value)
            key = await self.serde.decode_key(msg.key)
        except PoisonMessage as exc:
            SKIPPED.labels(self.topic.name, "undecodable").inc()
            log.warning(
                "replica of %s skips %d@%d: %s", self.topic.name, msg.partition, msg.offset, exc.reason
            )
            return
        self.fold(event, ReplicaRecord(self.topic.name, msg.partition, msg.offset, key, msg.timestamp))
        self.applied += 1
        REPLICA_APPLIED.labels(self.topic.name).inc()

    async def _ends(self) -> dict[int, int]:
        from aiokafka import TopicPartition

        consumer = self._consumer
        assert consumer is not None
        tps = [
            TopicPartition(self.topic.name, p) for p in consumer.partitions_for_topic(self.topic.name) or ()
        ]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: int(off) for tp, off in ends.items()}

    def _caught_up(self, target: Mapping[int, int]) -> bool:
        return all(self.positions.get(p, 0) >= end for p, end in target.items() if end > 0)

    def _check_ready(self, target: Mapping[int, int]) -> None:
        if self._caught_up(target):
            self.ready.set()

    async def sync(self, timeout: float = 10.0) -> bool:
        """Wait until everything on the topic now is folded; False if that took over ``timeout``."""
        if self._consumer is None:
            return False
        target = await self._ends()
        deadline = time.monotonic() + timeout
        while not self._caught_up(target):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def caught_up(self) -> bool:
        """Whether everything on the topic now is folded (one look at the end offsets)."""
        if self._consumer is None:
            return False
        return self._caught_up(await self._ends())


# -- the commit watchdog -----------------------------------------------------------------------------


def _stack_of(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=12)
    return "".join(traceback.format_list(traceback.extract_stack(frames[-1]))) if frames else "(no frames)"


class CommitWatchdog:
    """Says, with what is needed to tell why, when a faust app holds handled (acked) records but has
    not advanced its committed offsets for ``after`` seconds (faust commits nothing past an offset that
    was never acked, returns quietly from a commit the group refused, and one commit that never
    finishes holds every later one back), or when its input partitions have records beyond the
    committed offsets while neither what it read nor what it committed moved for ``after`` seconds."""

    def __init__(self, app: faust.App, after: float, every: float = 1.0) -> None:
        self.app = app
        self.after = after
        self.every = every
        self.stalled_for = 0.0
        self._last: dict[Any, int | None] = {}
        self._since = time.monotonic()
        self._reported = 0.0
        self._moved: tuple[dict[Any, Any], dict[Any, Any]] = ({}, {})
        self._moved_at = time.monotonic()
        self._behind_reported = 0.0

    def state(self) -> dict[str, Any]:
        """The consumer's commit bookkeeping (faust's private attributes: diagnostics only)."""
        consumer: Any = self.app.consumer
        thread = getattr(consumer, "_thread", None)
        coordinator = getattr(getattr(thread, "_consumer", None), "_coordinator", None)
        commit_fut = getattr(consumer, "_commit_fut", None)
        return {
            "assignment": sorted(str(tp) for tp in consumer.assignment()),
            "committed": {str(tp): off for tp, off in consumer._committed_offset.items()},
            "read": {str(tp): off for tp, off in consumer._read_offset.items()},
            "acked_head": {str(tp): sorted(a)[:5] for tp, a in consumer._acked.items() if a},
            "acked_count": {str(tp): len(a) for tp, a in consumer._acked.items() if a},
            "gaps": {str(tp): str(g) for tp, g in consumer._gap.items() if g},
            "unacked": sorted((str(m.tp), m.offset, m.refcount) for m in list(consumer._unacked_messages))[
                :10
            ],
            "commit_in_flight": commit_fut is not None and not commit_fut.done(),
            "rebalancing": self.app.rebalancing,
            "in_recovery": in_recovery(self.app),
            "generation": getattr(coordinator, "generation", None),
            "member_id": getattr(coordinator, "member_id", None),
            "paused": sorted(str(tp) for tp in consumer._paused_partitions),
            "flow_active": consumer.flow_active,
        }

    async def behind(self, now: float) -> dict[str, tuple[int | None, int]]:
        """Input partitions with records past the committed offset while nothing moved for ``after``
        seconds (logged, at most every ``after`` seconds): ``{partition: (committed, end)}``."""
        consumer: Any = self.app.consumer
        moved = (dict(consumer._read_offset), dict(consumer._committed_offset))
        if moved != self._moved:
            self._moved, self._moved_at = moved, now
            return {}
        if now - self._moved_at < self.after or now - self._behind_reported < self.after:
            return {}
        changelogs = set(self.app.tables.changelog_topics)
        inputs = [tp for tp in consumer.assignment() if tp.topic not in changelogs]
        if not inputs or self.app.rebalancing or in_recovery(self.app):
            return {}
        ends = await consumer.highwaters(*inputs)
        committed = consumer._committed_offset
        found = {
            str(tp): (committed.get(tp), int(end))
            for tp, end in ends.items()
            if end is not None and int(end) > (committed.get(tp) or 0)
        }
        if found:
            self._behind_reported = now
            log.warning(
                "input partitions behind while nothing was read or committed for %.0fs: %s; %s",
                now - self._moved_at,
                found,
                self.state(),
            )
        return found

    def check(self, now: float) -> bool:
        """One look; True if it is stalled (and then logged, at most every ``after`` seconds)."""
        consumer: Any = self.app.consumer
        committed = dict(consumer._committed_offset)
        waiting = any(consumer._acked.values())
        if committed != self._last or not waiting:
            self._last = committed
            self._since = now
        self.stalled_for = now - self._since if waiting else 0.0
        UNCOMMITTED.set(self.stalled_for)
        if self.stalled_for < self.after:
            return False
        if now - self._reported >= self.after:
            self._reported = now
            stacks = "\n".join(
                f"--- task {t.get_name()}:\n{_stack_of(t)}"
                for t in asyncio.all_tasks()
                if "commit" in repr(t.get_coro()).lower()
            )
            log.warning(
                "no offsets committed for %.0fs while handled records wait: %s\n%s",
                self.stalled_for,
                self.state(),
                stacks,
            )
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                self.check(time.monotonic())
                await self.behind(time.monotonic())
            except Exception as exc:  # diagnostics must not take the service down
                log.debug("commit watchdog: %r", exc)


# -- the runtime ---------------------------------------------------------------------------------------


Routes = Callable[[web.Application], None]
RootTask = Callable[[], Coroutine[Any, Any, None]]
ReadyCheck = Callable[[], Awaitable[bool]]


@dataclass
class StreamSpec:
    """What a stream service is, for :class:`StreamService`."""

    name: str
    app: faust.App
    bus: StreamBus
    produces: Sequence[str] = ()
    replicas: Sequence[Replica] = ()
    routes: Routes | None = None
    public_routes: Sequence[tuple[str, str]] = ()
    root_tasks: Mapping[str, RootTask] = field(default_factory=dict)
    ready_checks: Mapping[str, ReadyCheck] = field(default_factory=dict)


class StreamService:
    """Runs a faust app with its replicas and its HTTP API as one process (module doc)."""

    def __init__(self, spec: StreamSpec, settings: StreamSettings) -> None:
        self.spec = spec
        self.settings = settings
        middlewares: list[Any] = [tracing_middleware, errors_middleware]
        if spec.routes is not None:
            try:
                verifier = TokenVerifier(load_public_key(settings.token_public_key_file))
            except (OSError, ValueError) as exc:
                prefix = str(type(settings).model_config.get("env_prefix", ""))
                key_file = settings.token_public_key_file
                print(f"setting {prefix}TOKEN_PUBLIC_KEY_FILE: cannot load {key_file}: {exc}", flush=True)
                raise SystemExit(EXIT_BAD_SETTING) from None
            middlewares.append(auth_middleware(verifier, spec.public_routes))
        self.http = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
        self.http.router.add_get("/livez", self._livez)
        self.http.router.add_get("/readyz", self._readyz)
        self.http.router.add_get("/metrics", self._metrics)
        if spec.routes is not None:
            spec.routes(self.http)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = False
        self._started_event = asyncio.Event()
        self._shutting_down = False
        self.port: int | None = None

    # -- probes --------------------------------------------------------------------------------

    async def _livez(self, _req: web.Request) -> web.Response:
        dead = [name for name, t in self._tasks.items() if t.done()]
        if self.spec.app._crashed.is_set():
            dead.append("faust")
        return web.json_response({"live": not dead, "dead_tasks": dead}, status=200 if not dead else 503)

    def checks(self) -> dict[str, bool]:
        app = self.spec.app
        checks: dict[str, bool] = {"faust_started": self._started and not app._crashed.is_set()}
        for replica in self.spec.replicas:
            checks[f"replica:{replica.topic.name}"] = replica.ready.is_set()
        if self._started:
            checks["not_rebalancing"] = not app.rebalancing
            checks["tables_recovered"] = not in_recovery(app)
            checks["partitions_assigned"] = bool(app.consumer.assignment())
        checks["not_shutting_down"] = not self._shutting_down
        return checks

    async def _readyz(self, _req: web.Request) -> web.Response:
        checks = self.checks()
        for name, check in self.spec.ready_checks.items():
            try:
                async with asyncio.timeout(2.0):
                    checks[name] = bool(await check())
            except Exception as exc:
                log.warning("readiness check %s failed: %r", name, exc)
                checks[name] = False
        ready = all(checks.values())
        body = {"ready": ready, "checks": checks, "counts": self.spec.bus.stats.counts}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, _req: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- lifecycle -----------------------------------------------------------------------------

    async def _prepare(self) -> None:
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self.spec.bus.prepare, self.spec.produces)
                return
            except RegistryUnavailable as exc:
                log.warning("waiting for the schema registry (%s); retry in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _run_faust(self) -> None:
        await self._prepare()
        for replica in self.spec.replicas:  # what the agents look things up in, first
            await replica.ready.wait()
        await asyncio.to_thread(Path(str(self.spec.app.conf.datadir)).mkdir, parents=True, exist_ok=True)
        await self.spec.app.start()
        watchdog = CommitWatchdog(self.spec.app, after=max(15.0, 10 * self.settings.commit_interval_seconds))
        self._tasks["commit-watchdog"] = asyncio.create_task(watchdog.run(), name="commit-watchdog")
        self._started = True
        self._started_event.set()
        log.info("%s: faust app %s started", self.spec.name, self.spec.app.conf.id)
        await self.spec.app._crashed.wait()
        reason = self.spec.app.crash_reason
        raise RuntimeError(f"the faust app crashed: {reason!r}")

    async def _run_root(self, name: str, fn: RootTask) -> None:
        """A root task of the service, started once the faust app runs; it must not return."""
        await self._started_event.wait()
        await fn()
        if not self._shutting_down:
            raise RuntimeError(f"root task {name} returned while the service was not stopping")

    async def run(self, on_started: Callable[[int], Awaitable[None]] | None = None) -> int:
        stop, runner, self.port = await start_http(self.http, self.settings, self.spec.name)
        if on_started is not None:
            await on_started(self.port)
        for replica in self.spec.replicas:
            self._tasks[f"replica:{replica.topic.name}"] = asyncio.create_task(
                replica.run(), name=f"replica:{replica.topic.name}"
            )
        self._tasks["faust"] = asyncio.create_task(self._run_faust(), name="faust")
        for name, fn in self.spec.root_tasks.items():
            self._tasks[name] = asyncio.create_task(self._run_root(name, fn), name=name)
        stopper = asyncio.create_task(stop.wait(), name="sigterm")
        code = 0
        try:
            done, _ = await asyncio.wait(
                [stopper, *self._tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
            if stopper not in done:
                failed = next(iter(done))
                exc = failed.exception() if not failed.cancelled() else None
                log.error(
                    "root task %s ended unexpectedly: %r; stopping the service",
                    failed.get_name(),
                    exc,
                    exc_info=exc,
                )
                code = EXIT_FAILED
        finally:
            stopper.cancel()
            code = max(code, await self._shutdown(runner))
        return code

    async def _shutdown(self, runner: web.AppRunner) -> int:
        """Not ready; stop the root tasks; stop faust (it stops fetching, finishes the record in hand,
        flushes its producer and commits); stop the replicas; close the HTTP site."""
        started = time.monotonic()
        self._shutting_down = True
        code = 0
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_seconds):
                for name, task in self._tasks.items():
                    if name != "faust" and not name.startswith("replica:"):
                        await _cancel(task)
                if self._started:
                    await self.spec.app.stop()
                await _cancel(self._tasks["faust"])
                for name, task in self._tasks.items():
                    if name.startswith("replica:"):
                        await _cancel(task)
                await runner.cleanup()
        except TimeoutError:
            log.error(
                "shutdown did not finish within %.1fs; exiting anyway", self.settings.shutdown_grace_seconds
            )
            return EXIT_FAILED
        log.info("shutdown complete in %.2fs", time.monotonic() - started)
        return code


async def _cancel(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def serve_stream(build: Callable[[], StreamSpec], settings: StreamSettings, name: str) -> None:
    """The whole of a stream service's ``__main__`` after its settings: logs, traces, run, exit."""
    setup_logging(name, settings.log_level)
    for noisy in ("faust", "mode", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # Group joins, assignments and refused commits are rare and what an SRE needs after a restart.
    logging.getLogger("aiokafka.consumer.group_coordinator").setLevel(logging.getLogger().level)
    provider = setup_tracing(name)

    async def main() -> int:
        return await StreamService(build(), settings).run()

    try:
        code = asyncio.run(main())
    finally:
        provider.shutdown()
    raise SystemExit(code)
