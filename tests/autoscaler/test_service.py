"""The autoscaler as a process on the real bus, on private copies of its topics: mount-stall samples
become node start throttles, load samples become scaling decisions, and the runtime's own load
samples arrive with their per-partition lag."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from services.bus.consumer import BusConsumer, ConsumerConfig, Record
from services.bus.contracts import Contracts, Topic
from services.bus.events import (
    LoadSample,
    MountStallSample,
    NodeMountState,
    NodeStartThrottle,
    ScalingAction,
    ScalingDecision,
)
from services.bus.producer import Producer
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from tests.bus.test_bus import producer_for, view
from tests.conftest import ServiceProcess, SpawnService, TopicFactory, unique, until

ENV = "AUTOSCALER_"


@asynccontextmanager
async def collecting(
    layout: Layout, contracts: Contracts, topic: Topic, types: list[str], dead_letters: Producer
) -> AsyncIterator[list[Any]]:
    seen: list[Any] = []

    async def handle(event: Any, record: Record) -> None:
        seen.append(event)

    consumer = BusConsumer(
        ConsumerConfig(layout.bootstrap_servers, group_id=unique("as-test"), topics=[topic.name]),
        contracts,
        Serde(contracts, RegistryClient(layout.registry_url)),
        dict.fromkeys(types, handle),
        dead_letters,
    )
    task = asyncio.create_task(consumer.run())
    try:
        yield seen
    finally:
        consumer.stop()
        await asyncio.wait_for(task, 20)


async def start_autoscaler(
    spawn_service: SpawnService, make_topic: TopicFactory, extra: str = "", **env: str
) -> tuple[ServiceProcess, Contracts, dict[str, Topic]]:
    _, load = await make_topic("scaling.load", partitions=3)
    # One partition: the tests send one node's sample before another's and expect them seen in that order.
    _, mount = await make_topic("nodes.mount-stall", partitions=1)
    contracts, decisions = await make_topic("scaling.decisions", partitions=3)
    contracts = contracts.with_topics([load, mount])
    topics = {"load": load, "mount": mount, "decisions": decisions}
    proc = spawn_service(
        "tests.autoscaler.autoscaler_process",
        ENV,
        AUTOSCALER_TEST_TOPICS=f"{load.name}=scaling.load:3,{mount.name}=nodes.mount-stall:3,"
        f"{decisions.name}=scaling.decisions:3{extra}",
        AUTOSCALER_LOAD_TOPIC=load.name,
        AUTOSCALER_MOUNT_TOPIC=mount.name,
        AUTOSCALER_DECISIONS_TOPIC=decisions.name,
        AUTOSCALER_GROUP_ID=unique("autoscaler"),
        AUTOSCALER_LOAD_SAMPLE_TOPIC=load.name,
        **env,
    )
    await proc.wait_ready()
    return proc, contracts, topics


def metric(url: str, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_a_stalled_node_is_throttled_and_healthy_nodes_preferred(
    bus_infra: Layout, spawn_service: SpawnService, make_topic: TopicFactory
) -> None:
    proc, contracts, topics = await start_autoscaler(
        spawn_service, make_topic, AUTOSCALER_LOAD_SAMPLE_INTERVAL_S="0", AUTOSCALER_NODE_MAX_STARTS="8"
    )
    healthy = unique("node-ok")
    stalled = unique("node-stalled")
    async with (
        producer_for(bus_infra, contracts, topics["mount"]) as producer,
        collecting(
            bus_infra, contracts, topics["decisions"], [NodeStartThrottle.SCHEMA_NAME], producer
        ) as seen,
    ):

        def sample(node: str, **changes: Any) -> MountStallSample:
            values: dict[str, Any] = {
                "node": node,
                "probe_id": "test",
                "mount_op_latency_ms": 2.0,
                "mount_table_size": 40,
                "mount_table_read_ms": 0.3,
                "probe_latency_ms": 4.0,
                "stalled": False,
                "concurrent_mounts": 0,
            }
            return MountStallSample(**{**values, **changes})

        mount = topics["mount"].name
        await producer.send(mount, healthy, sample(healthy))
        await producer.send(mount, stalled, sample(stalled, stalled=True, probe_latency_ms=2500.0))
        await producer.send(mount, stalled, sample(stalled, mount_op_latency_ms=-3.0))  # bad: dropped

        def throttled() -> NodeStartThrottle | None:
            return next((e for e in seen if e.node == stalled), None)

        event = await until(throttled, "a throttle event for the stalled node")
        assert event.state == NodeMountState.STALLED
        assert (event.previous_max_concurrent_starts, event.max_concurrent_starts) == (8, 4)
        assert event.preferred_nodes == [healthy, stalled]
        assert event.signals["stalled"] == 1.0
        assert event.signals["probe_latency_ms"] == 2500.0
        assert "stalled" in event.reason
        await until(
            lambda: metric(proc.url, "reelbus_autoscaler_dropped_total", 'kind="mount"') == 1.0,
            "the bad sample counted as dropped",
        )
        assert [e.node for e in seen].count(stalled) == 1  # the dropped sample decided nothing


async def test_load_samples_lead_to_a_scaling_decision_with_its_inputs(
    bus_infra: Layout, spawn_service: SpawnService, make_topic: TopicFactory
) -> None:
    proc, contracts, topics = await start_autoscaler(
        spawn_service,
        make_topic,
        AUTOSCALER_LOAD_SAMPLE_INTERVAL_S="0.5",
        AUTOSCALER_CPU_TARGET="0.5",
        AUTOSCALER_HOLD_EVERY_S="0",
    )
    load = topics["load"]
    service = unique("svc")
    # The autoscaler's own runtime publishes its load samples on the private load topic too.
    async with (
        producer_for(bus_infra, contracts, load) as producer,
        collecting(
            bus_infra, contracts, topics["decisions"], [ScalingDecision.SCHEMA_NAME], producer
        ) as seen,
        collecting(bus_infra, contracts, load, [LoadSample.SCHEMA_NAME], producer) as samples,
    ):
        for instance, cpu in (("a", 0.9), ("b", 0.7)):
            event = LoadSample(
                service=service,
                instance=instance,
                cpu_utilization=cpu,
                in_flight=1,
                request_rate=10.0,
                consumer_lag=0,
                window_ms=5000,
            )
            await producer.send(load.name, service, event)
        bad = LoadSample(
            service=service,
            instance="c",
            cpu_utilization=-1.0,
            in_flight=0,
            request_rate=0,
            consumer_lag=0,
            window_ms=1,
        )
        await producer.send(load.name, service, bad)

        def scaled_out() -> ScalingDecision | None:
            return next((e for e in seen if e.service == service and e.to_replicas == 4), None)

        decision = await until(scaled_out, "a SCALE_OUT decision to 4 replicas")
        assert decision.action == ScalingAction.SCALE_OUT
        assert decision.from_replicas == 2
        assert decision.signals["cpu_utilization"] == 0.8  # the mean of the two instances
        assert decision.signals["ready_replicas"] == 2
        assert "cpu_utilization 0.8 vs target 0.5 -> 4" in decision.reason
        ids = [e.event_id for e in seen if e.service == service]
        assert len(ids) == len(set(ids))
        await until(
            lambda: metric(proc.url, "reelbus_autoscaler_dropped_total", 'kind="load"') == 1.0,
            "the bad load sample counted as dropped",
        )

        # The runtime's own samples: the autoscaler's lag per partition of the topics it reads.
        def own() -> LoadSample | None:
            mine = [s for s in samples if s.service == "autoscaler" and s.consumer_group]
            return next((s for s in mine if s.request_rate > 0), None)

        sample = await until(own, "a load sample of the autoscaler itself with a request rate")
        assert set(sample.partition_lag) == {f"{load.name}/{p}" for p in range(3)} | {
            f"{topics['mount'].name}/0"
        }
        assert sample.consumer_lag == sum(sample.partition_lag.values())
        assert sample.cpu_cores >= 1.0
        assert 0.0 <= sample.cpu_utilization <= 1.0
        assert 300 <= sample.window_ms <= 5000


async def test_a_function_at_zero_replicas_is_woken_by_its_first_event(
    bus_infra: Layout, spawn_service: SpawnService, make_topic: TopicFactory
) -> None:
    function = unique("fn")
    _, inbox = await make_topic("history.views", partitions=3, consumers=(function,))
    _, contracts, topics = await start_autoscaler(
        spawn_service,
        make_topic,
        extra=f",{inbox.name}=history.views:3:{function}",
        AUTOSCALER_LOAD_SAMPLE_INTERVAL_S="0",
        AUTOSCALER_FUNCTION_SERVICES=f'["{function}"]',
        AUTOSCALER_WAKE_CHECK_S="0.5",
    )
    contracts = contracts.with_topics([inbox])
    async with (
        producer_for(bus_infra, contracts, inbox) as producer,
        collecting(
            bus_infra, contracts, topics["decisions"], [ScalingDecision.SCHEMA_NAME], producer
        ) as seen,
    ):

        def for_function(to: int) -> ScalingDecision | None:
            return next((e for e in seen if e.service == function and e.to_replicas == to), None)

        asleep = await until(lambda: for_function(0), "the function's decision: stay at 0")
        assert asleep.action == ScalingAction.HOLD
        assert asleep.signals["consumer_lag"] == 0
        assert not for_function(1), "woken with nothing to do"
        event = view()
        await producer.send(inbox.name, str(event.profile_id), event)
        woken = await until(lambda: for_function(1), "a wake-up decision after the first event")
        assert (woken.from_replicas, woken.action) == (0, ScalingAction.SCALE_OUT)
        assert woken.signals["consumer_lag"] == 1
        assert woken.reason.startswith("wake")
