"""``reelbus bench``: measurements against the running bus.

``reelbus bench bus`` puts the bus library next to Kafka's own performance tools, in one run against
the same broker:

- **produce**: ``org.apache.kafka.tools.ProducerPerformance`` (settings as close as Java allows to the
  bus producer's: ``acks=all``, idempotence, ``linger.ms=5``, lz4, 1 MB batches) sending records of N
  bytes, versus ``Producer.produce_batch`` sending typed ``Heartbeat`` events, ``--batch`` per call:
  each event is built and Avro encoded on its own (5-byte header + body = N bytes) with its own key
  and ``reelbus.event-id`` header; each call makes one PRODUCER span whose ``traceparent`` every
  record carries, as a service that sends a batch does (``--batch 1``: ``Producer.produce``, one span
  and one future per record). Both are timed until the last record is acknowledged.
- **consume**: ``org.apache.kafka.tools.ConsumerPerformance`` reading the records the bus producer
  wrote (its ``fetch.nMsg.sec``: the group join is not counted), versus a ``BusConsumer`` decoding
  each record into a typed event for a handler that only counts (``--handler batch``, the default: a
  ``batched`` handler, called once per span group; ``record``: called once per record), with its
  CONSUMER spans (one per produced batch fetched together) and commits, timed from the first
  handler call to the last.

Tracing (``--tracing``): ``exported`` (default) sets tracing up as a service does (``setup_tracing``:
the ``OTEL_*`` variables, Zipkin by default, spans exported in the background); ``recorded`` makes
every span but exports none; ``off`` is the no-op API (no spans, no ``traceparent``).

Codec: the bus encodes and decodes with its native codec (``services/bus/native``, built by ``make
install``) when it is installed, else with the generated Python codecs; the table's first line says
which. ``REELBUS_NATIVE_CODEC=0 reelbus bench bus`` measures the Python codecs.

The bus side is warmed up first on a topic of its own (not counted); the JVM tools count their own
JIT warm-up (their 4.1 versions have no warm-up option), not the JVM's start. The bench topics are
``bench.<run id>.*``, made through ``Admin.apply`` like any declared topic and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import Consumer, KafkaException
from confluent_kafka import Producer as KafkaProducer
from confluent_kafka.admin import NewTopic
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from services.bus import wire
from services.bus.admin import Admin
from services.bus.consumer import AnyHandler, BusConsumer, ConsumerConfig, ConsumerDied, Record, batched
from services.bus.contracts import ContractError, Contracts, Topic
from services.bus.events import Heartbeat
from services.bus.producer import (
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_PRODUCER,
    Delivered,
    DeliveryFailed,
    Producer,
    ProducerConfig,
)
from services.bus.registry import RegistryClient, RegistryError, RegistryUnavailable
from services.bus.serde import Serde
from services.bus.tracing import setup_tracing
from services.cli import infra

PRODUCER_PERF = "org.apache.kafka.tools.ProducerPerformance"
CONSUMER_PERF = "org.apache.kafka.tools.ConsumerPerformance"
MODEL_TOPIC = "playback.events"  # the declared topic that carries Heartbeat
MIB = 1024 * 1024
# ProducerPerformance's settings, matched to ProducerConfig.librdkafka() where Java has the same knob.
KAFKA_PRODUCER_PROPS = (
    "acks=all",
    "enable.idempotence=true",
    "linger.ms=5",
    "compression.type=lz4",
    "batch.size=1000000",
    "delivery.timeout.ms=120000",
)

Say = Callable[[str], None]


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why."""


# --- the Java tools' output ------------------------------------------------------------------

_NUM = r"(-?[\d.]+|NaN|Infinity)"

# ProducerPerformance's last line (the interim lines every 5 s have no percentiles):
# "200000 records sent, 98765.4 records/sec (13.56 MB/sec), 120.34 ms avg latency,
#  456.00 ms max latency, 110 ms 50th, 300 ms 95th, 400 ms 99th, 450 ms 99.9th."
_PRODUCER_TOTAL = re.compile(
    r"^(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\), ([\d.]+) ms avg latency, "
    r"([\d.]+) ms max latency, (\d+) ms 50th, (\d+) ms 95th, (\d+) ms 99th, (\d+) ms 99\.9th\.$"
)

# ConsumerPerformance's result line, after its header "start.time, end.time, data.consumed.in.MB,
# MB.sec, data.consumed.in.nMsg, nMsg.sec, rebalance.time.ms, fetch.time.ms, fetch.MB.sec,
# fetch.nMsg.sec"; the times are in its default date format, yyyy-MM-dd HH:mm:ss:SSS.
_CONSUMER_TOTAL = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:\d{3}), (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:\d{3}), "
    rf"{_NUM}, {_NUM}, (\d+), {_NUM}, (-?\d+), (-?\d+), {_NUM}, {_NUM}$"
)


@dataclass(frozen=True)
class ProducerPerfLine:
    """ProducerPerformance's final summary (its MB are MiB of values)."""

    records: int
    records_per_s: float
    mb_per_s: float
    avg_latency_ms: float
    max_latency_ms: float
    p50_ms: int
    p95_ms: int
    p99_ms: int
    p999_ms: int
    raw: str


@dataclass(frozen=True)
class ConsumerPerfLine:
    """ConsumerPerformance's result (its MB are MiB of keys and values)."""

    start: str
    end: str
    mb: float
    mb_per_s: float
    records: int
    records_per_s: float
    rebalance_ms: int
    fetch_ms: int
    fetch_mb_per_s: float
    fetch_records_per_s: float
    raw: str


def parse_producer_perf(lines: Sequence[str]) -> ProducerPerfLine | None:
    """The last summary line of ProducerPerformance's output, or None if there is none."""
    for line in reversed(lines):
        m = _PRODUCER_TOTAL.match(line.strip())
        if m:
            g = m.groups()
            return ProducerPerfLine(
                records=int(g[0]),
                records_per_s=float(g[1]),
                mb_per_s=float(g[2]),
                avg_latency_ms=float(g[3]),
                max_latency_ms=float(g[4]),
                p50_ms=int(g[5]),
                p95_ms=int(g[6]),
                p99_ms=int(g[7]),
                p999_ms=int(g[8]),
                raw=line.strip(),
            )
    return None


def parse_consumer_perf(lines: Sequence[str]) -> ConsumerPerfLine | None:
    """The result line of ConsumerPerformance's output, or None if there is none."""
    for line in reversed(lines):
        m = _CONSUMER_TOTAL.match(line.strip())
        if m:
            g = m.groups()
            return ConsumerPerfLine(
                start=g[0],
                end=g[1],
                mb=float(g[2]),
                mb_per_s=float(g[3]),
                records=int(g[4]),
                records_per_s=float(g[5]),
                rebalance_ms=int(g[6]),
                fetch_ms=int(g[7]),
                fetch_mb_per_s=float(g[8]),
                fetch_records_per_s=float(g[9]),
                raw=line.strip(),
            )
    return None


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    side: str  # produce | consume
    tool: str
    records: int
    seconds: float
    record_size: int

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """MiB/s of record values (N bytes each), the same measure for every tool."""
        return self.records_per_s * self.record_size / MIB

    def as_dict(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "tool": self.tool,
            "records": self.records,
            "seconds": round(self.seconds, 4),
            "records_per_s": round(self.records_per_s, 1),
            "mb_per_s": round(self.mb_per_s, 2),
        }


@dataclass
class BenchResult:
    machine: dict[str, Any]
    settings: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    raw: dict[str, str] = field(default_factory=dict)

    def ratio(self, side: str) -> float | None:
        rates = {m.tool.split()[0]: m.records_per_s for m in self.measurements if m.side == side}
        kafka, bus = rates.get("kafka"), rates.get("reelbus")
        return bus / kafka if kafka and bus is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "results": [m.as_dict() for m in self.measurements],
            "ratio_bus_over_kafka": {s: _round(self.ratio(s), 4) for s in ("produce", "consume")},
            "kafka_tool_output": self.raw,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def render_table(result: BenchResult) -> str:
    s = result.settings
    m = result.machine
    lines = [
        f"reelbus bench bus: {s['records']} records of {s['record_size']} B "
        f"({s['event_type']}, 5-byte header + {s['record_size'] - 5}-byte Avro body), "
        f"{s['partitions']} partitions, warm-up {s['warmup']} records (not counted), tracing {s['tracing']}, "
        f"{s.get('batch', 1)} records per produce call, {s.get('handler', 'record')} handler, "
        f"{s.get('codec', 'python')} Avro codec",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, {m['os']}, {m['date']}",
        f"versions: Kafka {m['kafka']}, Java {m['java']}, Python {m['python']}, "
        f"confluent-kafka {m['confluent_kafka']} (librdkafka {m['librdkafka']})",
        "",
    ]
    header = ("side", "tool", "records", "seconds", "records/s", "MB/s", "bus/kafka")
    rows: list[tuple[str, ...]] = [header]
    for meas in result.measurements:
        ratio = result.ratio(meas.side) if meas.tool.startswith("reelbus") else None
        rows.append(
            (
                meas.side,
                meas.tool,
                str(meas.records),
                f"{meas.seconds:.2f}",
                f"{meas.records_per_s:,.0f}",
                f"{meas.mb_per_s:.2f}",
                f"{ratio:.3f}" if ratio is not None else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4, 5, 6}
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines += [
        "",
        "MB/s = records/s x record size (MiB of values); the bus records also carry a "
        f"{s['key_size']}-byte key and ~{s['header_bytes']} bytes of headers, ProducerPerformance's none.",
        "kafka consume = ConsumerPerformance fetch.nMsg.sec (group join excluded); "
        "reelbus consume = first handler call to last (the records of the first call not counted).",
        "confluent-kafka reading value+key+headers = the Python client alone, touching each record's "
        "value, key and headers once (no decoding): the most any Python consumer on it can reach here.",
        "confluent-kafka, one ready-made record = the Python client alone producing the same bytes (value, "
        "key, the bus's headers) again and again with the bus's settings: the most a Python producer on it "
        "can reach here.",
        "reelbus produce = typed events built before the clock starts, as ProducerPerformance makes its "
        "payload first; a service's loop = the same, each event built (new id, current time) as it is sent.",
    ]
    for name, raw in result.raw.items():
        lines.append(f"{name}: {raw}")
    return "\n".join(lines)


# --- machine ---------------------------------------------------------------------------------


def machine_info(layout: infra.Layout) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib: float | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    kafka_jars = sorted((layout.lib / "kafka").glob("kafka-clients-*.jar"))
    kafka = kafka_jars[-1].stem.removeprefix("kafka-clients-") if kafka_jars else "unknown"
    java = infra.find_java(17, "REELBUS_KAFKA_JAVA_HOME")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kafka": kafka,
        "java": str(infra.java_major(java) or "unknown"),
        "python": platform.python_version(),
        "confluent_kafka": _first(confluent_kafka.version()),
        "librdkafka": _first(confluent_kafka.libversion()),
    }


def _first(version: Any) -> str:
    """confluent-kafka's ``version()`` is a string in some releases, a (string, int) pair in others."""
    return str(version[0] if isinstance(version, tuple) else version)


# --- the events ------------------------------------------------------------------------------


class HeartbeatSource:
    """Builds a new Heartbeat per record (new event id, current time), as a playback service would.

    Field values are chosen so that every record encodes to the same size: the numbers stay within
    one zig-zag varint width and the ids are UUID strings.
    """

    BITRATES = (2350, 3000, 4300, 5800)

    def __init__(self, pool: int = 1024) -> None:
        self.sessions = [uuid.uuid4() for _ in range(pool)]
        self.profiles = [uuid.uuid4() for _ in range(pool)]
        self.titles = [f"tt{1_000_000 + i:07d}" for i in range(pool)]
        self._keys = [str(s) for s in self.sessions]

    def event(self, i: int) -> Heartbeat:
        n = len(self.sessions)
        return Heartbeat(
            session_id=self.sessions[i % n],
            profile_id=self.profiles[(i * 7) % n],
            title_id=self.titles[(i * 13) % n],
            sequence=2_000_000 + i,
            position_ms=2_000_000 + (i % 100_000) * 10,
            bitrate_kbps=self.BITRATES[i % len(self.BITRATES)],
            buffer_ms=10_000 + i % 20_000,
            throughput_kbps=9_000 + (i * 7) % 20_000,
            rebuffer_ms=0,
        )

    def key(self, event: Heartbeat) -> str:
        return str(event.session_id)

    def items(self, start: int, count: int) -> list[tuple[str, Heartbeat]]:
        """``(key, event)`` of events ``start`` to ``start + count`` (a service holds its keys as text)."""
        keys = self._keys
        n = len(self.sessions)
        return [(keys[i % n], self.event(i)) for i in range(start, start + count)]


# --- the bench -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    records: int
    warmup: int
    partitions: int
    window: int
    tracing: str  # exported | recorded | off
    batch: int = 1000  # records per produce_batch call; 1: Producer.produce per record
    handler: str = "batch"  # batch | record


def check_bus(layout: infra.Layout) -> None:
    for name in ("kafka", "registry"):
        comp = infra.BY_NAME[name]
        if not comp.healthy(layout):
            raise BenchError(
                f"the bus is not up: {name} does not answer at {comp.address(layout)}; "
                "start it with `reelbus up` (see `reelbus status`)"
            )
    if not any((layout.lib / "kafka").glob("kafka-tools-*.jar")):
        raise BenchError(f"Kafka's tools are not in {layout.lib / 'kafka'}; run `reelbus up` to install them")


async def run_java(layout: infra.Layout, label: str, main: str, args: Sequence[str], say: Say) -> list[str]:
    """Run one of Kafka's tools, showing its output as progress; returns its output lines."""
    cmd = infra.kafka_java_cmd(layout, main, *args, heap="512m")
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            say(f"{label} | {line}")
        code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if code != 0:
        tail = "\n".join(lines[-10:])
        raise BenchError(f"{label} exited with code {code}:\n{tail}")
    return lines


def _setup_tracing(mode: str, layout: infra.Layout) -> TracerProvider | None:
    """``exported``: what a service runs (``setup_tracing``: the ``OTEL_*`` variables, by default a
    batching Zipkin exporter to this bus's Zipkin); ``recorded``: an SDK tracer provider with no
    exporter, so every span is made, sampled and ended and every record carries its traceparent, but
    nothing is sent; ``off``: the no-op API (no spans, no traceparent). With ``--batch 1`` and
    ``exported``, the exporter's queue drops what Zipkin cannot take, as it would in a service."""
    if mode == "off":
        return None
    if mode == "exported":
        os.environ.setdefault("OTEL_EXPORTER_ZIPKIN_ENDPOINT", f"{layout.zipkin_url}/api/v2/spans")
        return setup_tracing("reelbus-bench")
    provider = TracerProvider(resource=Resource.create({"service.name": "reelbus-bench"}))
    trace.set_tracer_provider(provider)
    return provider


async def produce_events(
    producer: Producer,
    topic: Topic,
    source: HeartbeatSource,
    count: int,
    window: int,
    label: str,
    say: Say,
    batch: int = 1,
    prebuilt: bool = False,
) -> float:
    """Send ``count`` new events, ``batch`` per ``Producer.produce_batch`` call (``Producer.produce``
    per event for 1); at most ``window`` records unacknowledged. ``prebuilt``: every event is built
    before the clock starts (as ``ProducerPerformance`` makes its payload before it starts), else each
    is built in the loop, as a service builds what it sends. Returns the seconds from the first event
    sent (or built) to the last one acknowledged."""
    pending: collections.deque[tuple[asyncio.Future[Delivered] | asyncio.Future[int], int]] = (
        collections.deque()
    )
    ready = [source.items(i, min(batch, count - i)) for i in range(0, count, batch)] if prebuilt else []
    in_flight = 0
    started = time.perf_counter()
    next_report = started + 2.0
    i = 0
    for n_batch in range(len(ready) if prebuilt else (count + batch - 1) // batch):
        items = ready[n_batch] if prebuilt else source.items(i, min(batch, count - i))
        n = len(items)
        if batch == 1:
            key, event = items[0]
            pending.append((producer.produce(topic, key, event), 1))
        else:
            pending.append((producer.produce_batch(topic, items), n))
        i += n
        in_flight += n
        while in_flight >= window:
            future, sent = pending.popleft()
            await future
            in_flight -= sent
            now = time.perf_counter()
            if now >= next_report:
                say(f"{label}: {i}/{count} queued, {i / (now - started):,.0f} records/s so far")
                next_report = now + 2.0
    while pending:
        await pending.popleft()[0]
    return time.perf_counter() - started


async def consume_events(
    layout: infra.Layout,
    contracts: Contracts,
    serde: Serde,
    topic_name: str,
    expected: int,
    group: str,
    dead_letters: Producer,
    label: str,
    say: Say,
    stall_timeout: float = 60.0,
    handler_mode: str = "record",
) -> tuple[int, float]:
    """A BusConsumer with a counting handler (``handler_mode`` record or batch); returns the records
    handled after the first handler call and the seconds from that call to the one that handled the
    ``expected``-th record."""
    count = 0
    first_size = 0
    first = last = 0.0
    consumer: BusConsumer | None = None

    def handled(n: int) -> None:
        nonlocal count, first, last, first_size
        if count == 0:
            first = time.perf_counter()
            first_size = n
        count += n
        if count >= expected and not last:
            last = time.perf_counter()
            assert consumer is not None
            consumer.stop()

    async def handle(event: Any, record: Record) -> None:
        handled(1)

    async def handle_many(items: list[tuple[Any, Record]]) -> None:
        handled(len(items))

    handler: AnyHandler = batched(handle_many) if handler_mode == "batch" else handle
    consumer = BusConsumer(
        ConsumerConfig(layout.bootstrap_servers, group_id=group, topics=[topic_name], client_id=group),
        contracts,
        serde,
        {Heartbeat.SCHEMA_NAME: handler},
        dead_letters,
    )
    task = asyncio.create_task(consumer.run(), name=group)
    seen, seen_at = 0, time.monotonic()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=2.0)
            if count != seen:
                seen, seen_at = count, time.monotonic()
                if count < expected:
                    say(f"{label}: {count}/{expected} handled")
            elif time.monotonic() - seen_at > stall_timeout:
                raise BenchError(
                    f"{label}: no progress for {stall_timeout:.0f}s at {count}/{expected} records"
                )
        task.result()
    finally:
        if not task.done():
            consumer.stop()
            await asyncio.wait_for(task, 30)
    if count < expected:
        raise BenchError(f"{label}: the consumer stopped at {count}/{expected} records")
    return expected - first_size, last - first


READER = "confluent-kafka, reading value+key+headers"
WRITER = "confluent-kafka, one ready-made record"
IN_LOOP = "a service's loop: build each event, produce_batch"


def write_records(
    config: dict[str, Any],
    topic_name: str,
    value: bytes,
    key: bytes,
    headers: list[tuple[str, str | bytes | None]],
    count: int,
) -> float:
    """confluent-kafka's own floor for a Python producer: ``produce`` the same ready-made value, key and
    headers ``count`` times with the bus producer's settings, no event built, no encoding, no span, no
    delivery callback; timed until every record is acknowledged. Blocking."""
    producer = KafkaProducer(config)
    started = time.perf_counter()
    for _ in range(count):
        while True:
            try:
                producer.produce(topic_name, value, key, headers=headers)
                break
            except BufferError:  # the local queue is full: let librdkafka deliver some
                producer.poll(0.01)
    left = producer.flush(120)
    if left:
        raise BenchError(f"confluent-kafka writer: {left} records not acknowledged within 120 s")
    return time.perf_counter() - started


def read_records(bootstrap_servers: str, topic_name: str, expected: int, group: str) -> tuple[int, float]:
    """confluent-kafka's own floor for a Python consumer: consume in batches as the bus does and read
    each record's value, key and headers, nothing more (no decoding, no handler, no commit). Blocking.
    Returns the records after the first batch and the seconds from that batch to the last record."""
    config = ConsumerConfig(bootstrap_servers, group_id=group, topics=[topic_name], client_id=group)
    consumer = Consumer(config.librdkafka())
    consumer.subscribe([topic_name])
    try:
        count = first_size = 0
        first = 0.0
        deadline = time.monotonic() + 60
        while count < expected:
            batch = consumer.consume(config.batch_size, 1.0)
            if not batch:
                if time.monotonic() > deadline:
                    raise BenchError(f"confluent-kafka reader: stopped at {count}/{expected} records")
                continue
            if count == 0:
                first, first_size = time.perf_counter(), len(batch)
            for msg in batch:
                msg.value()
                msg.key()
                msg.headers()
            count += len(batch)
            deadline = time.monotonic() + 60
        return count - first_size, time.perf_counter() - first
    finally:
        consumer.close()


async def bench_bus(layout: infra.Layout, opts: Options, say: Say) -> BenchResult:
    check_bus(layout)
    machine = machine_info(layout)
    run_id = uuid.uuid4().hex[:10]
    base = Contracts.load()
    model = base.topic(MODEL_TOPIC)
    topic = dataclasses.replace(
        model, name=f"bench.{run_id}.heartbeats", partitions=opts.partitions, values=(Heartbeat.SCHEMA_NAME,)
    )
    warm = dataclasses.replace(topic, name=f"bench.{run_id}.warmup")
    loop_topic = dataclasses.replace(topic, name=f"bench.{run_id}.in-loop")
    raw_topic = f"bench.{run_id}.kafka-perf"  # ProducerPerformance's bytes: not Avro, so no schemas
    contracts = base.with_topics([topic, warm, loop_topic])
    registry = RegistryClient(layout.registry_url)
    admin = Admin(layout.bootstrap_servers, registry)
    groups = [f"bench-{run_id}-{name}" for name in ("kafka", "warmup", "bus", "reader")]
    floor_topic = f"bench.{run_id}.client-floor"  # confluent-kafka alone: the same bytes, no Avro
    ours = [
        topic.name,
        topic.dlq,
        warm.name,
        warm.dlq,
        loop_topic.name,
        loop_topic.dlq,
        raw_topic,
        floor_topic,
    ]
    provider = _setup_tracing(opts.tracing, layout)
    source = HeartbeatSource()
    gc.freeze()  # as services.bus.runtime.serve() does once a service has started
    try:
        say(f"run {run_id}: creating {topic.name}, {warm.name} (with .dlq) and {raw_topic}")
        plan = await asyncio.to_thread(admin.apply, contracts, [topic.name, warm.name, loop_topic.name])
        if plan.refusals:
            raise BenchError("cannot create the bench topics: " + "; ".join(plan.refusals))
        config = dict(model.config)
        futures = admin.kafka.create_topics(
            [
                NewTopic(
                    name, num_partitions=opts.partitions, replication_factor=1, config=dict(model.config)
                )
                for name in (raw_topic, floor_topic)
            ]
        )
        for future in futures.values():
            await asyncio.to_thread(future.result, 30)

        producer_serde = Serde(contracts, registry)
        producer = Producer(
            ProducerConfig(layout.bootstrap_servers, client_id=f"bench-{run_id}"), contracts, producer_serde
        )
        await producer.start([topic.name, warm.name, loop_topic.name])
        try:
            sizes = {
                len(producer_serde.encode_value(topic, source.event(i)))
                for i in (0, 1, 2, 3, opts.records // 2, opts.records - 1, opts.records + opts.warmup)
            }
            if len(sizes) != 1:
                raise BenchError(f"the bench events do not encode to one size: {sorted(sizes)}")
            record_size = sizes.pop()
            sample = source.event(0)
            key_size = len(producer_serde.encode_key(topic, source.key(sample)))
            result = BenchResult(
                machine=machine,
                settings={
                    "records": opts.records,
                    "warmup": opts.warmup,
                    "record_size": record_size,
                    "key_size": key_size,
                    "header_bytes": _header_bytes(producer, sample, opts.tracing),
                    "event_type": Heartbeat.SCHEMA_NAME,
                    "partitions": opts.partitions,
                    "window": opts.window,
                    "tracing": opts.tracing,
                    "batch": opts.batch,
                    "handler": opts.handler,
                    # services/bus/native when built (`make install`), else the generated Python codecs
                    "codec": "native" if wire.NATIVE is not None else "python",
                    "run_id": run_id,
                    "kafka_producer_props": list(KAFKA_PRODUCER_PROPS),
                    "producer": {
                        k: v
                        for k, v in ProducerConfig(layout.bootstrap_servers, "x").librdkafka().items()
                        if k not in {"bootstrap.servers", "client.id", "log_level"}
                    },
                },
            )
            say(f"record size {record_size} B (5-byte header + {record_size - 5}-byte Avro body)")

            # -- produce ----------------------------------------------------------------------
            say(f"kafka ProducerPerformance: {opts.records} records of {record_size} B to {raw_topic}")
            lines = await run_java(
                layout,
                "producer-perf",
                PRODUCER_PERF,
                [
                    "--topic",
                    raw_topic,
                    "--num-records",
                    str(opts.records),
                    "--record-size",
                    str(record_size),
                    "--throughput",
                    "-1",
                    "--producer-props",
                    f"bootstrap.servers={layout.bootstrap_servers}",
                    f"client.id=bench-{run_id}-kafka",
                    *KAFKA_PRODUCER_PROPS,
                ],
                say,
            )
            pp = parse_producer_perf(lines)
            if pp is None:
                raise BenchError(
                    "no summary line in ProducerPerformance's output:\n" + "\n".join(lines[-10:])
                )
            result.raw["kafka ProducerPerformance"] = pp.raw
            result.measurements.append(
                Measurement(
                    "produce",
                    "kafka ProducerPerformance",
                    pp.records,
                    pp.records / pp.records_per_s,
                    record_size,
                )
            )

            say(f"reelbus producer: warm-up, {opts.warmup} events to {warm.name}")
            await produce_events(
                producer, warm, source, opts.warmup, opts.window, "warm-up", say, batch=opts.batch
            )
            api = "Producer.produce_batch" if opts.batch > 1 else "Producer.produce"
            say(f"reelbus producer: {opts.records} Heartbeat events to {topic.name}, built beforehand")
            seconds = await produce_events(
                producer,
                topic,
                source,
                opts.records,
                opts.window,
                "reelbus producer",
                say,
                batch=opts.batch,
                prebuilt=True,
            )
            result.measurements.append(
                Measurement("produce", f"reelbus {api}", opts.records, seconds, record_size)
            )
            say(f"reelbus producer: {opts.records / seconds:,.0f} records/s")
            say(f"a service's loop: {opts.records} Heartbeat events to {loop_topic.name}, each built as sent")
            seconds = await produce_events(
                producer, loop_topic, source, opts.records, opts.window, "service loop", say, batch=opts.batch
            )
            result.measurements.append(Measurement("produce", IN_LOOP, opts.records, seconds, record_size))
            say(f"a service's loop: {opts.records / seconds:,.0f} records/s")

            say(f"confluent-kafka writer: {opts.records} ready-made records to {floor_topic}")
            value = producer_serde.encode_value(topic, sample)
            key = producer_serde.encode_key(topic, source.key(sample))
            headers: list[tuple[str, str | bytes | None]] = [
                (HEADER_EVENT_TYPE, sample.SCHEMA_NAME.encode()),
                (HEADER_EVENT_ID, str(sample.event_id).encode()),
                (HEADER_PRODUCER, producer.config.client_id.encode()),
                ("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
            ]
            config = ProducerConfig(layout.bootstrap_servers, client_id=f"bench-{run_id}-floor").librdkafka()
            seconds = await asyncio.to_thread(
                write_records, config, floor_topic, value, key, headers, opts.records
            )
            result.measurements.append(Measurement("produce", WRITER, opts.records, seconds, record_size))

            # -- consume ----------------------------------------------------------------------
            say(f"kafka ConsumerPerformance: {opts.records} records from {topic.name}")
            lines = await run_java(
                layout,
                "consumer-perf",
                CONSUMER_PERF,
                [
                    "--bootstrap-server",
                    layout.bootstrap_servers,
                    "--topic",
                    topic.name,
                    "--messages",
                    str(opts.records),
                    "--group",
                    groups[0],
                    "--timeout",
                    "30000",
                ],
                say,
            )
            if any(line.startswith("WARNING: Exiting before") for line in lines):
                raise BenchError("ConsumerPerformance timed out before reading every record")
            cp = parse_consumer_perf(lines)
            if cp is None:
                raise BenchError("no result line in ConsumerPerformance's output:\n" + "\n".join(lines[-10:]))
            result.raw["kafka ConsumerPerformance"] = cp.raw
            result.measurements.append(
                Measurement(
                    "consume", "kafka ConsumerPerformance", cp.records, cp.fetch_ms / 1000, record_size
                )
            )

            consumer_serde = Serde(contracts, registry)
            say(f"reelbus consumer: warm-up, {opts.warmup} events from {warm.name}")
            await consume_events(
                layout,
                contracts,
                consumer_serde,
                warm.name,
                opts.warmup,
                groups[1],
                producer,
                "warm-up",
                say,
                handler_mode=opts.handler,
            )
            say(f"reelbus consumer: {opts.records} events from {topic.name}")
            counted, seconds = await consume_events(
                layout,
                contracts,
                consumer_serde,
                topic.name,
                opts.records,
                groups[2],
                producer,
                "reelbus consumer",
                say,
                handler_mode=opts.handler,
            )
            # From the first handler call to the last: the records of the first call are not counted.
            tool = "reelbus BusConsumer" + (" (batched handler)" if opts.handler == "batch" else "")
            result.measurements.append(Measurement("consume", tool, counted, seconds, record_size))
            say(f"reelbus consumer: {counted / seconds:,.0f} records/s")

            say(f"confluent-kafka reader: {opts.records} records from {topic.name} (value, key, headers)")
            counted, seconds = await asyncio.to_thread(
                read_records, layout.bootstrap_servers, topic.name, opts.records, groups[3]
            )
            result.measurements.append(
                Measurement(
                    "consume", "confluent-kafka, reading value+key+headers", counted, seconds, record_size
                )
            )
        finally:
            await producer.close()
        return result
    finally:
        if provider is not None:
            provider.shutdown()
        try:
            existing = await asyncio.to_thread(admin.existing_topics)
            made = [name for name in ours if name in existing]
            say(f"run {run_id}: deleting {', '.join(made) or 'no topics'}, its consumer groups and subjects")
            await asyncio.to_thread(admin.delete_topics, made)
        except Exception as exc:
            say(f"could not delete the bench topics ({', '.join(ours)}): {exc}")
        await asyncio.to_thread(_delete_groups, admin, groups)
        subjects = [
            s
            for t in (topic, warm, loop_topic)
            for s in (t.key_subject, t.value_subject(Heartbeat.SCHEMA_NAME))
        ]
        await asyncio.to_thread(_delete_subjects, layout.registry_url, subjects, say)


def _header_bytes(producer: Producer, event: Heartbeat, tracing: str) -> int:
    """Bytes of the headers the bus puts on a record (names and values), traceparent included."""
    size = len(HEADER_EVENT_TYPE) + len(event.SCHEMA_NAME)
    size += len(HEADER_EVENT_ID) + len(str(event.event_id))
    size += len(HEADER_PRODUCER) + len(producer.config.client_id)
    if tracing != "off":
        size += len("traceparent") + 55
    return size


def _delete_groups(admin: Admin, groups: list[str]) -> None:
    try:
        futures = admin.kafka.delete_consumer_groups(groups, request_timeout=10)
    except Exception:
        return
    for future in futures.values():
        # A group that never committed does not exist: nothing to delete.
        with contextlib.suppress(Exception):
            future.result(10)


def _delete_subjects(registry_url: str, subjects: list[str], say: Say) -> None:
    """Soft-delete, then permanently delete, the registry subjects the bench topics registered."""
    for subject in subjects:
        path = f"{registry_url.rstrip('/')}/subjects/{urllib.parse.quote(subject, safe='')}"
        for url in (path, path + "?permanent=true"):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10):
                    pass
            except urllib.error.HTTPError as exc:
                if exc.code != 404:  # 404: never registered (the run stopped early)
                    say(f"could not delete subject {subject}: HTTP {exc.code}")
                break
            except (urllib.error.URLError, OSError) as exc:
                say(f"could not delete subject {subject}: {exc}")
                return


# --- the command -----------------------------------------------------------------------------


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def cmd_bench_bus(args: argparse.Namespace) -> int:
    layout = infra.Layout.from_env()
    warmup = args.warmup if args.warmup is not None else max(1, min(20_000, args.records // 10))
    opts = Options(
        records=args.records,
        warmup=warmup,
        partitions=args.partitions,
        window=args.window,
        tracing=args.tracing,
        batch=args.batch,
        handler=args.handler,
    )
    try:
        result = asyncio.run(bench_bus(layout, opts, _progress))
    except BenchError as exc:
        print(f"reelbus bench: {exc}", file=sys.stderr)
        return 1
    except (
        ContractError,
        ConsumerDied,
        DeliveryFailed,
        KafkaException,
        RegistryError,
        RegistryUnavailable,
    ) as exc:
        print(f"reelbus bench: the bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(render_table(result))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure the bus and the playback path against baselines")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")

    from services.cli import bench_recommender

    bench_recommender.register(benches)

    b = benches.add_parser(
        "bus",
        help="bus producer and consumer versus Kafka's ProducerPerformance and ConsumerPerformance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--records", type=_positive, default=200_000, help="records per tool (default 200000)")
    b.add_argument(
        "--warmup",
        type=_positive,
        help="bus warm-up records, not counted (default records/10, at most 20000)",
    )
    b.add_argument(
        "--partitions", type=_positive, default=3, help="partitions of the bench topics (default 3)"
    )
    b.add_argument(
        "--window",
        type=_positive,
        default=50_000,
        help="bus producer: most records sent but not yet acknowledged (default 50000)",
    )
    b.add_argument(
        "--batch",
        type=_positive,
        default=1000,
        help="bus producer: events per Producer.produce_batch call (default 1000); "
        "1: Producer.produce per event",
    )
    b.add_argument(
        "--handler",
        choices=("batch", "record"),
        default="batch",
        help="bus consumer: a batched handler (default) or one called per record",
    )
    b.add_argument(
        "--tracing",
        choices=("exported", "recorded", "off"),
        default="exported",
        help="exported (default): tracing as a service sets it up (OTEL_* variables, Zipkin by "
        "default); recorded: spans made and traceparent sent, nothing exported; "
        "off: the no-op tracing API, no spans and no traceparent",
    )
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=cmd_bench_bus)

    from services.cli import bench_playback

    pb = benches.add_parser(
        "playback",
        help="heartbeats through gateway, playback, Kafka, history, Cassandra vs a bare aiohttp handler",
        description=bench_playback.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_playback.add_arguments(pb)
    pb.set_defaults(func=bench_playback.run)

    from services.cli import bench_billing

    bb = benches.add_parser(
        "billing",
        help="charges/s through the Galera cluster versus a single non-replicated MariaDB",
        description=bench_billing.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_billing.add_arguments(bb)
    bb.set_defaults(func=bench_billing.run)

    from services.cli import bench_mounts

    bm = benches.add_parser(
        "mounts",
        help="container-start and health-probe latency against concurrent starts, per-layer vs common-parent",
        description=bench_mounts.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_mounts.add_arguments(bm)
    bm.set_defaults(func=bench_mounts.run)

    from services.cli import bench_anomaly

    ba = benches.add_parser(
        "anomaly",
        help="anomaly detector events/s per worker and end-to-end lag vs a bare aiokafka consumer",
        description=bench_anomaly.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_anomaly.add_arguments(ba)
    ba.set_defaults(func=bench_anomaly.run)
