"""``reelbus bench recommender``: viewings per second of one recommender worker, and end-to-end lag,
against a bare aiokafka consumer reading the same topic in the same run.

On private copies of the recommender's topics (``bench.<run>.<name>``):

1. a backlog of ``--events`` viewings (a synthetic log with planted co-watch structure) is published;
2. a bare ``aiokafka`` consumer reads the whole backlog (no decoding, no work): its records/s is the
   baseline;
3. one recommender worker (``python -m services.recommender``) starts on the backlog; its rate is the
   backlog over the time from its readiness until its group has committed every viewing;
4. with the worker caught up, ``--rate`` viewings/s are published for ``--seconds`` with their event
   time set to the moment they are sent; end-to-end lag is each resulting list's Kafka timestamp on
   ``recommendations.profiles`` minus the viewing's event time (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from services.bus.admin import Admin
from services.bus.contracts import Contracts
from services.bus.events import ViewRecorded
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import eval_recommender as ev
from services.cli.infra import Layout
from services.recommender import offline, scoring
from services.recommender.handlers import LISTS, VIEWS


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


async def bare_consumer(layout: Layout, topic: str, total: int) -> float:
    """Records/s of a bare aiokafka consumer reading ``total`` records of ``topic`` from the start."""
    import aiokafka  # type: ignore[import-untyped]

    consumer = aiokafka.AIOKafkaConsumer(
        bootstrap_servers=layout.bootstrap_servers, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        while not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        tps = [aiokafka.TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        started = time.perf_counter()
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            seen += sum(len(b) for b in batches.values())
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def lags(layout: Layout, serde: Serde, topic: str, since_ms: int) -> list[float]:
    """Each list record sent after ``since_ms``: its Kafka timestamp minus its event time, in ms."""
    consumer = Consumer(
        {
            "bootstrap.servers": layout.bootstrap_servers,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "log_level": 3,
        }
    )
    out: list[float] = []
    first: set[tuple[Any, int]] = set()  # the list a viewing caused, not later refreshes of it
    try:
        ends = {p: e for p, e in ev._ends(consumer, topic).items() if e > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        position = dict.fromkeys(ends, 0)
        while any(position[p] < e for p, e in ends.items()):
            msg = consumer.poll(10.0)
            if msg is None:
                break
            if msg.error():
                continue
            position[msg.partition() or 0] = (msg.offset() or 0) + 1
            event = ev._decode(serde, msg.value())
            event_ms = scoring.ms(event.event_time)
            if event_ms >= since_ms and (event.profile_id, event_ms) not in first:
                first.add((event.profile_id, event_ms))
                out.append(float(msg.timestamp()[1] - event_ms))
    finally:
        consumer.close()
    return out


async def paced(
    layout: Layout,
    contracts: Contracts,
    serde: Serde,
    prefix: str,
    log: list[offline.Rating],
    rate: int,
    seconds: float,
) -> int:
    producer = Producer(
        ProducerConfig(layout.bootstrap_servers, client_id=f"{prefix}bench"), contracts, serde
    )
    await producer.start([prefix + VIEWS])
    sent = 0
    try:
        started = time.monotonic()
        pending = []
        while time.monotonic() - started < seconds and sent < len(log):
            due = int((time.monotonic() - started) * rate)
            while sent < min(due, len(log)):
                r = log[sent]
                now = scoring.at_ms(int(time.time() * 1000))
                event = ViewRecorded(
                    event_time=now,
                    profile_id=r.profile_id,
                    account_id=r.account_id,
                    title_id=r.item,
                    session_id=uuid.uuid4(),
                    position_ms=0,
                    duration_ms=0,
                    watched_ms=0,
                    watched_at=now,
                    completed=True,
                )
                pending.append(producer.produce(contracts.topic(prefix + VIEWS), str(r.profile_id), event))
                sent += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*pending)
    finally:
        await producer.close()
    return sent


def cmd_bench(args: argparse.Namespace) -> int:
    layout = Layout.from_env()
    log = offline.synthetic(args.events, seed=3)
    backlog = offline.Split(train=offline.time_order(log), test={}, users=0, items=0)
    contracts = Contracts.load()
    prefix = f"bench.{uuid.uuid4().hex[:10]}."
    copies = [replace(contracts.topic(n), name=prefix + n) for n in ev.NAMES]
    extended = contracts.with_topics(copies)
    admin = Admin(layout.bootstrap_servers, RegistryClient(layout.registry_url))
    plan = admin.apply(extended, [c.name for c in copies])
    if plan.refusals:
        raise SystemExit(f"reelbus bench recommender: cannot make the topics: {plan.refusals}")
    serde = Serde(extended, RegistryClient(layout.registry_url))
    try:
        _say(f"publishing a backlog of {len(log)} viewings ...")
        ev.publish(layout, extended, serde, prefix, backlog)
        bare = asyncio.run(bare_consumer(layout, prefix + VIEWS, len(log)))
        _say(f"bare aiokafka consumer: {bare:,.0f} records/s")
        with tempfile.TemporaryDirectory(prefix="reelbus-bench-") as tmp:
            log_file = Path(tmp) / "recommender.log"
            env = {"RECOMMENDER_LOG_LEVEL": "WARNING", "RECOMMENDER_REFRESH_INTERVAL_SECONDS": "5"}
            with ev.worker(layout, prefix, Path(tmp) / "data", log_file, env) as url:
                ev._wait(
                    "the worker to be ready", lambda: ev._http_json(f"{url}/readyz")["ready"], 120, log_file
                )
                started = time.monotonic()
                group = prefix + "recommender"
                ev._wait(
                    "the worker to commit the backlog",
                    lambda: ev._committed_all(layout, group, prefix + VIEWS),
                    3600,
                    log_file,
                )
                worker_rate = len(log) / (time.monotonic() - started)
                _say(f"recommender worker: {worker_rate:,.0f} viewings/s")
                # New profiles for the paced phase: each one's first viewing (an old event time) makes it
                # known; the rest are sent with their event time set to the moment they are sent.
                fresh = [
                    replace(r, user=f"paced-{r.user}")
                    for r in offline.time_order(offline.synthetic(args.events, seed=9))
                ]
                firsts: dict[str, offline.Rating] = {}
                for r in fresh:
                    firsts.setdefault(r.user, r)
                seed = offline.Split(train=list(firsts.values()), test={}, users=0, items=0)
                ev.publish(layout, extended, serde, prefix, seed)
                rest = [r for r in fresh if firsts[r.user] is not r]
                since = int(time.time() * 1000)
                sent = asyncio.run(paced(layout, extended, serde, prefix, rest, args.rate, args.seconds))
                ev._wait(
                    "the worker to commit the paced viewings",
                    lambda: ev._committed_all(layout, group, prefix + VIEWS),
                    600,
                    log_file,
                )
                measured = lags(layout, serde, prefix + LISTS, since)
    finally:
        admin.delete_topics([n for c in copies for n in (c.name, c.dlq)])
    measured.sort()
    p50 = statistics.median(measured) if measured else float("nan")
    p99 = measured[min(len(measured) - 1, int(len(measured) * 0.99))] if measured else float("nan")
    print(f"backlog of {len(log)} viewings, 3 partitions, one worker, on this machine")
    print(f"bare aiokafka consumer (no decoding, no work): {bare:10,.0f} records/s")
    print(f"recommender worker (decode, table, co-watch, list): {worker_rate:10,.0f} viewings/s")
    print(f"ratio worker / bare consumer: {worker_rate / bare:.4f}")
    print(
        f"end-to-end lag at {args.rate}/s for {args.seconds:.0f} s ({sent} viewings, {len(measured)} lists): "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"
    )
    return 0


def register(benches: Any) -> None:
    b = benches.add_parser(
        "recommender",
        help="recommender worker viewings/s and lag vs a bare aiokafka consumer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--events", type=int, default=20_000, help="backlog of viewings (default 20000)")
    b.add_argument("--rate", type=int, default=100, help="paced viewings/s for the lag (default 100)")
    b.add_argument("--seconds", type=float, default=15.0, help="paced phase length (default 15)")
    b.set_defaults(func=cmd_bench)
