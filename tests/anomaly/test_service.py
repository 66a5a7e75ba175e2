"""The anomaly detector as a process on the real broker, on private copies of its topics and changelogs:
every kind fires on a planted case and stays quiet on a clean stream, the outputs are the ones the pure
handlers compute for the same inputs, redelivered input changes nothing, and a worker killed (-9) in the
middle of the stream ends, after a restart, with the outputs of a run without the kill."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from services.anomaly_detector.app import ACCOUNTS_TOPIC, DECLINES_TOPIC, INPUTS, NAME, topic_names
from services.bus.admin import Admin
from services.bus.contracts import Contracts
from services.bus.events import AnomalyDetected
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.streams import prefixed_contracts
from services.cli.infra import Layout
from services.cli.tail import read
from tests.anomaly import planted
from tests.anomaly.test_handlers import FakeTopics
from tests.conftest import ServiceProcess, SpawnService, http_json, unique, wait_for

PREFIX_ENV = "ANOMALY_DETECTOR_"
ANOMALIES = "anomalies.detected"


@dataclass
class Copies:
    """Private copies of every topic the service uses (its changelogs included), under one prefix."""

    prefix: str
    contracts: Contracts
    layout: Layout

    def name(self, declared: str) -> str:
        return self.prefix + declared


@pytest.fixture
async def copies(bus_infra: Layout, contracts: Contracts, admin: Admin) -> AsyncIterator[Copies]:
    prefix = f"test.{uuid.uuid4().hex[:10]}."
    names = [prefix + n for n in topic_names()]
    extended = prefixed_contracts(contracts, prefix, topic_names())
    plan = await asyncio.to_thread(admin.apply, extended, names)
    assert not plan.refusals, plan.refusals
    try:
        yield Copies(prefix, extended, bus_infra)
    finally:
        dlqs = [n + ".dlq" for n in names]
        await asyncio.to_thread(admin.delete_topics, names + dlqs)


@pytest.fixture
async def producer(copies: Copies) -> AsyncIterator[Producer]:
    serde = Serde(copies.contracts, RegistryClient(copies.layout.registry_url))
    p = Producer(
        ProducerConfig(copies.layout.bootstrap_servers, client_id=unique("anomaly-test")),
        copies.contracts,
        serde,
    )
    await p.start([copies.name(t) for t in INPUTS])
    try:
        yield p
    finally:
        await p.close()


Start = Callable[..., Awaitable[ServiceProcess]]


@pytest.fixture
def start_detector(spawn_service: SpawnService, copies: Copies, tmp_path: Path) -> Start:
    async def start(data: str = "rocksdb", instance: str = f"{NAME}-0") -> ServiceProcess:
        svc = spawn_service(
            "services.anomaly_detector",
            PREFIX_ENV,
            ANOMALY_DETECTOR_TOPIC_PREFIX=copies.prefix,
            ANOMALY_DETECTOR_DATA_DIR=str(tmp_path / data),
            ANOMALY_DETECTOR_INSTANCE_ID=instance,
            ANOMALY_DETECTOR_LOAD_SAMPLE_INTERVAL_S="0",
        )
        await svc.wait_ready(90)
        return svc

    return start


async def publish(producer: Producer, copies: Copies, events: list[planted.Published]) -> None:
    for topic, key, event in events:
        await producer.send(copies.name(topic), key, event)  # type: ignore[arg-type]


async def outputs(copies: Copies) -> list[AnomalyDetected]:
    topic = copies.contracts.topic(copies.name(ANOMALIES))
    serde = Serde(copies.contracts, RegistryClient(copies.layout.registry_url))
    messages = await asyncio.to_thread(
        lambda: list(read(copies.layout.bootstrap_servers, topic.name, None, None, follow=False, limit=None))
    )
    found: list[AnomalyDetected] = []
    for msg in messages:
        event = await serde.decode_event(topic, msg.value)
        assert isinstance(event, AnomalyDetected)
        assert await serde.decode_key(msg.key) == event.subject
        found.append(event)
    return found


def _lag(copies: Copies) -> int:
    """Records of the inputs and the internal topics not yet committed by the service's group."""
    names = [copies.name(t) for t in (*INPUTS, ACCOUNTS_TOPIC, DECLINES_TOPIC)]
    consumer = Consumer(
        {
            "bootstrap.servers": copies.layout.bootstrap_servers,
            "group.id": copies.prefix + NAME,
            "log_level": 3,
        }
    )
    try:
        total = 0
        for name in names:
            parts = [TopicPartition(name, p) for p in range(copies.contracts.topic(name).partitions)]
            committed = consumer.committed(parts, timeout=10)
            for tp in committed:
                _, high = consumer.get_watermark_offsets(TopicPartition(name, tp.partition), timeout=10)
                total += high - max(tp.offset, 0)
        return total
    finally:
        consumer.close()


async def drained(copies: Copies, what: str, timeout: float = 60.0) -> None:
    async def probe() -> bool:
        return await asyncio.to_thread(_lag, copies) == 0

    await wait_for(probe, what, timeout, 0.3)


def scenario() -> tuple[list[planted.Published], dict[str, list[str]]]:
    """Planted and clean cases of every kind, and per service and node subject the kinds expected."""
    svc_bad, svc_ok = unique("svc-planted"), unique("svc-clean")
    node_bad, node_ok = unique("node-planted"), unique("node-clean")
    cases = {
        "sharing": (planted.sharing(True), planted.sharing(False)),
        "travel": (planted.travel(True), planted.travel(False)),
        "declines": (planted.declines(True), planted.declines(False)),
        "load": (planted.service_load(svc_bad, True), planted.service_load(svc_ok, False, seed=3)),
        "mounts": (planted.mount_stall(node_bad, True), planted.mount_stall(node_ok, False)),
    }
    events: list[planted.Published] = []
    for bad, ok in cases.values():
        events += bad + ok
    return events, {
        f"service:{svc_bad}": ["ERROR_RATE", "LATENCY"],
        f"service:{svc_ok}": [],
        f"node:{node_bad}": ["MOUNT_STALL"],
        f"node:{node_ok}": [],
    }


async def expected(events: list[planted.Published]) -> list[tuple[str, str]]:
    """(kind, subject) of the anomalies the pure handlers find in the same events, in one process."""
    return sorted((f.kind, f.subject) for f in await FakeTopics().feed(events))


def kinds(found: list[AnomalyDetected]) -> list[tuple[str, str]]:
    """(kind, subject) of each distinct anomaly (by id) on the output topic."""
    return sorted({e.event_id: (e.kind.value, e.subject) for e in found}.values())


async def test_each_kind_fires_on_planted_cases_and_redelivery_changes_nothing(
    copies: Copies, producer: Producer, start_detector: Start
) -> None:
    events, subjects = scenario()
    want = await expected(events)
    assert {k for k, _ in want} == {
        "ACCOUNT_SHARING",
        "IMPOSSIBLE_TRAVEL",
        "PAYMENT_FRAUD",
        "LATENCY",
        "ERROR_RATE",
        "MOUNT_STALL",
    }
    await start_detector()
    await publish(producer, copies, events)

    async def all_out() -> list[AnomalyDetected] | None:
        found = await outputs(copies)
        return found if len(kinds(found)) >= len(want) else None

    await wait_for(all_out, "every planted anomaly on the output topic", 90, 0.5)
    await drained(copies, "the service to commit every input")
    first = await outputs(copies)
    # The processes's anomalies are the ones the pure rules find, whatever the order the partitions
    # were read in (the card's declines come from three accounts' partitions), one record each.
    assert kinds(first) == want
    assert len(first) == len(want), "one record per anomaly"
    for subject, kind in subjects.items():
        assert sorted({e.kind.value for e in first if e.subject == subject}) == kind
    for e in first:
        assert e.evidence and 0.0 <= e.score <= 1.0 and e.window_start <= e.event_time < e.window_end

    # Every input again, as a redelivery: the same records (same event ids).
    await publish(producer, copies, events)
    await drained(copies, "the service to commit the redelivered inputs")
    again = await outputs(copies)
    assert kinds(again) == want
    by_id = {e.event_id: e for e in first}
    assert set(by_id) == {e.event_id for e in again}, "no new anomaly ids"
    assert all(e == by_id[e.event_id] for e in again), "a redelivered anomaly is the same record"


@pytest.mark.timeout(300)  # the restart waits out the dead member's session, then recovers from changelogs
async def test_killed_worker_recovers_its_tables_and_outputs_match(
    copies: Copies, producer: Producer, start_detector: Start
) -> None:
    events, _ = scenario()
    want = await expected(events)
    half = len(events) // 2
    svc = await start_detector()
    await publish(producer, copies, events[:half])

    async def some_out() -> bool:
        return len(await outputs(copies)) > 0

    await wait_for(some_out, "a first anomaly", 60, 0.3)
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait(10)
    await publish(producer, copies, events[half:])
    # A new pod (a new name, so a new static member; the dead one leaves at its session timeout) with
    # an empty data directory: its tables come from the changelogs only.
    restarted = await start_detector("rocksdb-fresh", f"{NAME}-1")
    try:
        await drained(copies, "the restarted service to commit every input", 200)
    except AssertionError:
        print(restarted.output()[-20_000:])  # what the restarted worker was doing, for the report
        raise
    assert kinds(await outputs(copies)) == want


async def test_undecodable_record_goes_to_the_dlq(
    copies: Copies, producer: Producer, start_detector: Start
) -> None:
    await start_detector()
    topic = copies.name("scaling.load")
    await producer.send_raw(topic, b"svc", b"not avro", [])
    await drained(copies, "the poison record to be committed")
    dead = await asyncio.to_thread(
        lambda: list(read(copies.layout.bootstrap_servers, topic + ".dlq", None, None, False, None))
    )
    assert [m.value for m in dead] == [b"not avro"]
    headers: dict[str, Any] = dict(dead[0].headers)
    assert "reelbus.dlq.reason" in headers


async def test_two_workers_split_the_partitions_and_the_union_is_right(
    copies: Copies, producer: Producer, start_detector: Start
) -> None:
    events, _ = scenario()
    want = await expected(events)
    half = len(events) // 2
    first = await start_detector("rocksdb-a", f"{NAME}-a")
    await publish(producer, copies, events[:half])
    second = await start_detector("rocksdb-b", f"{NAME}-b")  # joins the group: a rebalance
    await publish(producer, copies, events[half:])
    await drained(copies, "the two workers to commit every input", 90)
    assert kinds(await outputs(copies)) == want
    for worker in (first, second):
        ready = await asyncio.to_thread(http_json, f"{worker.url}/readyz")
        assert ready["checks"]["partitions_assigned"], f"{worker.log.stem} has no partitions"
