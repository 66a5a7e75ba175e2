"""The node start-throttle rule (services/autoscaler/throttle.py)."""

from __future__ import annotations

from services.autoscaler.throttle import (
    DEGRADED,
    HEALTHY,
    STALLED,
    MountReading,
    NodeThrottle,
    ThrottlePolicy,
    apply,
    preference,
)

POLICY = ThrottlePolicy(max_starts=8, min_starts=1, degraded_ms=100, stalled_ms=1000, recover_after=3)
OK = MountReading(stalled=False, mount_op_latency_ms=3.0, probe_latency_ms=5.0)
SLOW = MountReading(stalled=False, mount_op_latency_ms=250.0, probe_latency_ms=300.0)
STALL = MountReading(stalled=True, mount_op_latency_ms=40.0, probe_latency_ms=2000.0)


def test_a_stalled_sample_halves_the_limit_down_to_the_minimum() -> None:
    node = NodeThrottle("n1", POLICY.max_starts)
    limits = []
    for _ in range(5):
        change = apply(POLICY, node, STALL)
        limits.append(node.limit)
        assert node.state == STALLED
    assert limits == [4, 2, 1, 1, 1]
    assert change is None  # at the floor, still stalled: nothing new to say


def test_a_slow_mount_op_counts_as_stalled_even_without_the_flag() -> None:
    node = NodeThrottle("n1", 8)
    change = apply(POLICY, node, MountReading(stalled=False, mount_op_latency_ms=1500, probe_latency_ms=10))
    assert change is not None and change.state == STALLED and change.limit == 4
    assert "1500 ms >= 1000 ms" in change.reason


def test_degraded_holds_and_healthy_recovers_one_step_per_run() -> None:
    node = NodeThrottle("n1", 8)
    apply(POLICY, node, STALL)
    apply(POLICY, node, STALL)
    assert node.limit == 2
    change = apply(POLICY, node, SLOW)
    assert change is not None and change.state == DEGRADED and node.limit == 2
    assert apply(POLICY, node, OK) is not None  # state DEGRADED -> HEALTHY, limit held
    assert apply(POLICY, node, OK) is None
    change = apply(POLICY, node, OK)
    assert change is not None and (change.previous_limit, change.limit) == (2, 3)
    for _ in range(3 * 10):
        apply(POLICY, node, OK)
    assert node.limit == POLICY.max_starts
    assert node.state == HEALTHY


def test_healthy_nodes_come_first() -> None:
    a, b, c = NodeThrottle("a", 8), NodeThrottle("b", 8), NodeThrottle("c", 8)
    apply(POLICY, a, STALL)
    apply(POLICY, b, OK)
    apply(POLICY, c, SLOW)
    assert preference([a, b, c]) == ["b", "c", "a"]
