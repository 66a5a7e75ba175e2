"""``reelbus bench anomaly``: the anomaly detector's throughput and end-to-end lag next to a bare
aiokafka consumer reading the same topic, in the same run.

On private copies of the detector's topics and changelogs (``bench.<run id>.<name>``, deleted at the
end), against the running bus (``reelbus up``):

1. **Backlog.** ``--records`` ``LoadSample`` records of ``--services`` services (5 s apart in event
   time, p99 latency and error rate with noise) are published to the copy of ``scaling.load``: the
   detector's heaviest path (two streaming detectors per record, their state in a RocksDB table with
   a changelog).
2. **Bare consumer.** An ``AIOKafkaConsumer`` (no group, all partitions from the beginning, no
   decoding) reads the whole backlog: events/s from its first record to its last.
3. **Detector, one worker.** ``python -m services.anomaly_detector`` on the copies, started after
   the backlog is in: events/s from the moment it is ready (``/readyz``) to the moment its group has
   committed every record of the backlog (polled every 0.1 s; commits every second, so short runs
   understate it).
4. **Lag.** ``--probes`` nodes each send two stalled ``MountStallSample`` records with the current
   time as event time, ``--probe-rate`` nodes a second; the second one of each makes an anomaly. The
   lag is the time from the input's event time to the ``AnomalyDetected`` reaching a consumer of the
   output topic; the bare consumer's lag is from the same input's event time to its arrival on the
   input topic (what any consumer pays for the broker).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.bus.admin import Admin
from services.bus.contracts import Contracts
from services.bus.events import AnomalyDetected, LoadSample, MountStallSample
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.streams import prefixed_contracts
from services.cli import infra

NAME = "anomaly-detector"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", type=int, default=20_000, help="LoadSample records in the backlog")
    p.add_argument("--services", type=int, default=20, help="services the samples are spread over")
    p.add_argument("--probes", type=int, default=100, help="planted mount stalls for the lag")
    p.add_argument("--probe-rate", type=float, default=20.0, help="planted stalls per second")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


@dataclass
class Result:
    records: int
    services: int
    bare_events_per_s: float
    detector_events_per_s: float
    ratio: float
    probes: int
    detector_lag_p50_ms: float
    detector_lag_p99_ms: float
    bare_lag_p50_ms: float
    bare_lag_p99_ms: float
    anomalies_seen: int
    date: str
    machine: str


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{cpus} CPUs {model}".strip()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return bool(json.loads(resp.read())["ready"])
    except (OSError, ValueError, KeyError):
        return False


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in parts)
    finally:
        consumer.close()


def _start_detector(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.anomaly_detector"],
            cwd=infra.REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def backlog(records: int, services: int, seed: int = 5) -> list[tuple[str, LoadSample]]:
    rng = random.Random(seed)
    names = [f"bench-svc-{i}" for i in range(services)]
    out: list[tuple[str, LoadSample]] = []
    for i in range(records):
        service = names[i % services]
        t = T0 + timedelta(seconds=5 * (i // services))
        sample = LoadSample(
            event_time=t,
            service=service,
            instance=f"{service}-0",
            cpu_utilization=0.4,
            in_flight=3,
            request_rate=100.0,
            consumer_lag=0,
            window_ms=5000,
            error_rate=max(0.0, 0.002 + rng.gauss(0, 0.001)),
            latency_p99_ms=50.0 + rng.gauss(0, 4.0),
        )
        out.append((service, sample))
    return out


async def bare_read(bootstrap: str, topic: str, partitions: int, count: int, timeout: float) -> float:
    """Events/s of a bare aiokafka consumer reading ``count`` records of ``topic`` from the start."""
    from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first, last = 0, 0.0, 0.0
        deadline = time.monotonic() + timeout
        while seen < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for messages in batches.values():
                if messages and not first:
                    first = time.monotonic()
                seen += len(messages)
            last = time.monotonic()
        if seen < count:
            raise RuntimeError(f"the bare consumer read {seen} of {count} records")
        return count / max(last - first, 1e-9)
    finally:
        await consumer.stop()


async def tail_lags(
    bootstrap: str,
    topic: str,
    serde: Serde | None,
    contracts: Contracts,
    want: int,
    positioned: asyncio.Event,
) -> list[float]:
    """Lags (ms) of records arriving on ``topic`` from now on: arrival minus the input's event time
    (the AnomalyDetected's event_time when ``serde`` is given, else the record's create time)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    lags: list[float] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(contracts.topic(topic).partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        positioned.set()  # the probes may start
        declared = contracts.topic(topic)
        while len(lags) < want:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            now = time.time() * 1000
            for messages in batches.values():
                for msg in messages:
                    if serde is None:
                        if msg.key and b"stall" in msg.key:
                            lags.append(now - msg.timestamp)
                        continue
                    event = await serde.decode_event(declared, msg.value)
                    if isinstance(event, AnomalyDetected) and event.subject.startswith("node:bench-stall"):
                        lags.append(now - event.event_time.timestamp() * 1000)
    finally:
        await consumer.stop()
    return lags


async def bench(args: argparse.Namespace) -> Result:
    layout = infra.Layout.from_env()
    bootstrap = layout.bootstrap_servers
    registry = RegistryClient(layout.registry_url)
    from services.anomaly_detector.app import topic_names

    prefix = f"bench.{uuid.uuid4().hex[:8]}."
    names = [prefix + n for n in topic_names()]
    contracts = prefixed_contracts(Contracts.load(), prefix, topic_names())
    admin = Admin(bootstrap, registry)
    plan = await asyncio.to_thread(admin.apply, contracts, names)
    if plan.refusals:
        raise RuntimeError(f"cannot make the topic copies: {plan.refusals}")
    serde = Serde(contracts, registry)
    producer = Producer(ProducerConfig(bootstrap, client_id=f"bench-anomaly-{prefix}"), contracts, serde)
    load_topic, mount_topic, out_topic = (
        prefix + n for n in ("scaling.load", "nodes.mount-stall", "anomalies.detected")
    )
    data_dir = layout.home / "data" / f"bench-anomaly-{prefix.strip('.')}"
    proc: subprocess.Popen[bytes] | None = None
    try:
        await producer.start([load_topic, mount_topic])
        items = backlog(args.records, args.services)
        for i in range(0, len(items), 5000):
            await producer.send_batch(load_topic, items[i : i + 5000])
        print(f"backlog: {len(items)} LoadSample records on {load_topic}", flush=True)

        load_partitions = contracts.topic(load_topic).partitions
        bare_rate = await bare_read(bootstrap, load_topic, load_partitions, len(items), args.timeout)
        print(f"bare aiokafka consumer: {bare_rate:,.0f} events/s", flush=True)

        port = _free_port()
        env = {
            **os.environ,
            "ANOMALY_DETECTOR_TOPIC_PREFIX": prefix,
            "ANOMALY_DETECTOR_DATA_DIR": str(data_dir),
            "ANOMALY_DETECTOR_HTTP_PORT": str(port),
            "ANOMALY_DETECTOR_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ANOMALY_DETECTOR_REGISTRY_URL": layout.registry_url,
            "ANOMALY_DETECTOR_INSTANCE_ID": f"bench-{prefix}",
            "ANOMALY_DETECTOR_LOAD_SAMPLE_INTERVAL_S": "0",
            "ANOMALY_DETECTOR_LOG_LEVEL": "WARNING",
            "OTEL_TRACES_EXPORTER": "none",
            "REELBUS_HOME": str(layout.home),
        }
        log = layout.log_file("bench-anomaly")
        proc = _start_detector(env, log)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.timeout
        while not await asyncio.to_thread(_ready, url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the detector did not get ready; see {log}")
            await asyncio.sleep(0.1)
        started = time.monotonic()
        group = prefix + NAME
        partitions = contracts.topic(load_topic).partitions
        while True:
            done = await asyncio.to_thread(_committed, bootstrap, group, load_topic, partitions)
            if done >= len(items):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the detector committed {done} of {len(items)}; see {log}")
            await asyncio.sleep(0.1)
        detector_rate = len(items) / (time.monotonic() - started)
        print(f"anomaly detector, one worker: {detector_rate:,.0f} events/s", flush=True)

        # Lag: planted stalls, paced.
        positioned = [asyncio.Event(), asyncio.Event()]
        detector_task = asyncio.create_task(
            tail_lags(bootstrap, out_topic, serde, contracts, args.probes, positioned[0])
        )
        bare_task = asyncio.create_task(
            tail_lags(bootstrap, mount_topic, None, contracts, args.probes, positioned[1])
        )
        await asyncio.wait_for(asyncio.gather(positioned[0].wait(), positioned[1].wait()), 60)
        for i in range(args.probes):
            node = f"bench-stall-{i}"
            for k in range(2):
                now = datetime.now(UTC)
                now = now.replace(microsecond=now.microsecond // 1000 * 1000)
                sample = MountStallSample(
                    event_time=now,
                    node=node,
                    probe_id=f"bench-{k}",
                    mount_op_latency_ms=900.0,
                    mount_table_size=100,
                    mount_table_read_ms=1.0,
                    probe_latency_ms=950.0,
                    stalled=True,
                    concurrent_mounts=8,
                )
                producer.produce(contracts.topic(mount_topic), node, sample)
            await asyncio.sleep(1.0 / args.probe_rate)
        await producer.flush()
        detector_lags, bare_lags = await asyncio.wait_for(
            asyncio.gather(detector_task, bare_task), timeout=max(60.0, args.probes / args.probe_rate * 3)
        )
        return Result(
            records=len(items),
            services=args.services,
            bare_events_per_s=bare_rate,
            detector_events_per_s=detector_rate,
            ratio=detector_rate / bare_rate,
            probes=args.probes,
            detector_lag_p50_ms=percentile(detector_lags, 50),
            detector_lag_p99_ms=percentile(detector_lags, 99),
            bare_lag_p50_ms=percentile(bare_lags, 50),
            bare_lag_p99_ms=percentile(bare_lags, 99),
            anomalies_seen=len(detector_lags),
            date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            machine=_machine(),
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        await producer.close()
        dlqs = [n + ".dlq" for n in names]
        await asyncio.to_thread(admin.delete_topics, names + dlqs)
        shutil.rmtree(data_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return 0
    r = result
    print()
    print(f"reelbus bench anomaly, {r.date}, {r.machine}")
    print(f"  {r.records} LoadSample records of {r.services} services (scaling.load copy)")
    print(f"  {'':34}{'events/s':>12}")
    print(f"  {'bare aiokafka consumer (no decode)':34}{r.bare_events_per_s:>12,.0f}")
    print(f"  {'anomaly detector, one worker':34}{r.detector_events_per_s:>12,.0f}")
    print(f"  ratio detector / bare: {r.ratio:.3f}")
    print(f"  end-to-end lag, {r.probes} planted mount stalls ({r.anomalies_seen} anomalies seen):")
    print(f"    detector (input event time -> AnomalyDetected consumed): p50 {r.detector_lag_p50_ms:.0f} ms, "
          f"p99 {r.detector_lag_p99_ms:.0f} ms")  # fmt: skip
    print(f"    bare consumer (input event time -> input consumed):     p50 {r.bare_lag_p50_ms:.0f} ms, "
          f"p99 {r.bare_lag_p99_ms:.0f} ms")  # fmt: skip
    return 0
