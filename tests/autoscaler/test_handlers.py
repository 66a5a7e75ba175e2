"""The autoscaler's handlers with a FAKE publisher (a list) and fake records: what is published,
when, and under which ids."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.autoscaler import handlers
from services.autoscaler.handlers import Dependencies
from services.autoscaler.hpa import ScalingPolicy
from services.autoscaler.throttle import ThrottlePolicy
from services.bus.consumer import Record, Retryable
from services.bus.events import (
    LoadSample,
    MountStallSample,
    NodeStartThrottle,
    ScalingAction,
    ScalingDecision,
)
from services.bus.producer import DeliveryFailed

T0 = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
RECORD = Record("scaling.load", 0, 0, "svc", [], 0)


def deps(published: list[Any], fail: bool = False, **changes: Any) -> Dependencies:
    async def publish(key: str, event: ScalingDecision | NodeStartThrottle) -> None:
        if fail:
            raise DeliveryFailed("broker away")
        published.append(event)

    policy = ScalingPolicy(cpu_target=0.5, lag_target=None)
    return Dependencies(
        policy=lambda _s: policy,
        throttle_policy=ThrottlePolicy(),
        partitions={},
        consumed_by=lambda _s: [],
        publish=publish,
        actuate=lambda _s, _n: None,
        **changes,
    )


def load(instance: str, cpu: float, at: float) -> LoadSample:
    return LoadSample(
        service="svc",
        instance=instance,
        cpu_utilization=cpu,
        in_flight=0,
        request_rate=1.0,
        consumer_lag=0,
        window_ms=5000,
        event_time=T0 + timedelta(seconds=at),
    )


async def feed(d: Dependencies, samples: list[LoadSample]) -> None:
    for s in samples:
        await handlers.on_load_sample(s, RECORD, d)


async def test_a_change_is_published_once_and_replays_give_the_same_ids() -> None:
    samples = [load("a", 0.5, 0), load("a", 1.0, 5), load("a", 1.0, 10)]
    first: list[ScalingDecision] = []
    await feed(deps(first), samples)
    assert [(e.action, e.from_replicas, e.to_replicas) for e in first] == [
        (ScalingAction.HOLD, 1, 1),  # the first evaluation says where it stands
        (ScalingAction.SCALE_OUT, 1, 2),
    ]
    again: list[ScalingDecision] = []
    await feed(deps(again), samples)
    assert [e.event_id for e in again] == [e.event_id for e in first]
    assert first[1].event_time == T0 + timedelta(seconds=5)


async def test_a_redelivered_older_sample_decides_nothing() -> None:
    published: list[ScalingDecision] = []
    d = deps(published)
    await feed(d, [load("a", 0.5, 0), load("a", 0.5, 10), load("a", 1.0, 5)])
    assert len(published) == 1


async def test_an_unchanged_decision_is_republished_as_hold_after_hold_every() -> None:
    published: list[ScalingDecision] = []
    d = deps(published, hold_every_s=60.0)
    await feed(d, [load("a", 0.5, t) for t in range(0, 125, 5)])
    assert [round((e.event_time - T0).total_seconds()) for e in published] == [0, 60, 120]
    assert all(e.action == ScalingAction.HOLD for e in published)


async def test_a_failed_publish_is_retryable_and_the_node_state_does_not_move() -> None:
    published: list[NodeStartThrottle] = []
    failing = deps(published, fail=True)
    sample = MountStallSample(
        node="n1",
        probe_id="p",
        mount_op_latency_ms=5.0,
        mount_table_size=10,
        mount_table_read_ms=0.1,
        probe_latency_ms=3000.0,
        stalled=True,
        concurrent_mounts=4,
    )
    with pytest.raises(Retryable):
        await handlers.on_mount_sample(sample, RECORD, failing)
    assert "n1" not in failing.nodes
    ok = deps(published)
    ok.nodes = failing.nodes
    await handlers.on_mount_sample(sample, RECORD, ok)
    await handlers.on_mount_sample(sample, RECORD, ok)  # redelivered: no new decision
    assert len(published) == 1
    later = replace(sample, event_id=uuid.uuid4(), event_time=sample.event_time + timedelta(seconds=10))
    await handlers.on_mount_sample(later, RECORD, ok)
    assert [(e.previous_max_concurrent_starts, e.max_concurrent_starts) for e in published] == [
        (8, 4),
        (4, 2),
    ]
    assert published[0].event_id != published[1].event_id
