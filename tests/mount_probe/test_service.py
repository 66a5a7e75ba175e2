"""The mount probe as a process on the real bus: it measures a baseline, then publishes real
``MountStallSample`` events on a private copy of nodes.mount-stall, and serves its gauges."""

from __future__ import annotations

import asyncio
import os
import urllib.request
from typing import Any

import pytest

from services.bus.consumer import Record
from services.bus.events import MountProbeMode, MountStallSample
from services.cli.infra import Layout
from tests.bus.test_bus import consuming, producer_for
from tests.conftest import SpawnService, TopicFactory, unique, until

pytestmark = pytest.mark.infra


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


async def test_the_service_publishes_samples_a_consumer_reads(
    bus_infra: Layout, make_topic: TopicFactory, spawn_service: SpawnService
) -> None:
    contracts, topic = await make_topic(like="nodes.mount-stall", partitions=1)
    node = unique("node")
    before = host_mounts()
    seen: list[tuple[MountStallSample, Record]] = []

    async def handle(event: Any, record: Record) -> None:
        seen.append((event, record))

    async with (
        producer_for(bus_infra, contracts, topic) as dlq,
        consuming(bus_infra, contracts, topic, {MountStallSample.SCHEMA_NAME: handle}, dlq) as consumer,
    ):
        await until(lambda: consumer.ready, "the test consumer's assignment")
        service = spawn_service(
            "services.mount_probe",
            "MOUNT_PROBE_",
            MOUNT_PROBE_TOPIC=topic.name,
            MOUNT_PROBE_NODE_NAME=node,
            MOUNT_PROBE_LAYERS="10",
            MOUNT_PROBE_CONCURRENCY="2",
            MOUNT_PROBE_BASELINE_ROUNDS="2",
            MOUNT_PROBE_STALL_ROUNDS="1",
            MOUNT_PROBE_INTERVAL="0.2",
            MOUNT_PROBE_SHUTDOWN_GRACE_SECONDS="10",
        )
        await service.wait_ready(60)
        await until(lambda: len(seen) >= 2, "two samples on the private topic", timeout=60)
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{service.url}/metrics", timeout=5).read().decode()
        )
        service.proc.terminate()
        assert await asyncio.to_thread(service.proc.wait, 20) == 0, service.output()[-3000:]

    sample, record = seen[0]
    assert record.key == node and sample.node == node
    assert sample.probe_id == f"mount-probe@{node}"
    assert sample.kernel_version == os.uname().release
    assert sample.mount_table_size > 0 and sample.mount_table_read_ms > 0 and sample.probe_latency_ms > 0
    assert sample.baseline_mount_table_read_ms is not None
    if os.geteuid() != 0:  # not privileged: passive, and why
        assert sample.probe_mode is MountProbeMode.PASSIVE and sample.privileged is False
        assert sample.probe_note is not None and "CAP_SYS_ADMIN" in sample.probe_note
        return
    assert sample.probe_mode is MountProbeMode.PER_LAYER and sample.privileged is True
    assert sample.idmapped is True or "refused" in (sample.probe_note or "")
    assert (sample.layers, sample.mount_ops_per_start, sample.concurrent_mounts) == (10, 42, 2)
    assert sample.mount_op_latency_ms > 0
    assert sample.container_start_p50_ms is not None and sample.container_start_p50_ms > 0
    assert sample.container_start_p99_ms is not None
    assert sample.container_start_p99_ms >= sample.container_start_p50_ms
    assert sample.health_probe_p99_ms is not None and sample.health_probe_p99_ms > 0
    assert sample.baseline_container_start_p50_ms is not None and sample.baseline_container_start_p50_ms > 0
    # The rule as published (one round suffices with STALL_ROUNDS=1, factor 3 by default).
    for s, _ in seen:
        assert s.stall_ratio is not None and s.stall_figure is not None
        assert s.stalled == (s.stall_ratio >= 3.0)
    assert f'mount_probe_mount_ops_per_start{{mode="per-layer",node="{node}"}} 42.0' in metrics
    assert f'mount_probe_privileged{{node="{node}"}} 1.0' in metrics
    assert 'mount_probe_container_start_ms{mode="per-layer",node="' + node + '",quantile="0.5"}' in metrics
    assert host_mounts() == before  # the node's mount table never saw the probe's mounts
