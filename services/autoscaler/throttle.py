"""Concurrent container starts per node, from the node's mount-stall samples: pure, no I/O.

The rule is additive-increase / multiplicative-decrease, as TCP backs off a congested path:

- a sample that says ``stalled`` (or whose mount operation took ``stalled_ms`` or more) halves the
  node's limit on concurrent container starts, down to ``min_starts``; the node is STALLED;
- a sample whose mount operation or health probe took ``degraded_ms`` or more holds the limit; the
  node is DEGRADED;
- ``recover_after`` healthy samples in a row raise the limit by one, up to ``max_starts``; the
  node is HEALTHY.

Starts should go to nodes in the order of :func:`preference`: healthy nodes first, then by their
limit and their mount latency, stalled nodes last. (Netflix, "Mount Mayhem at Netflix: Scaling
Containers on Modern CPUs", Nov 2025: container starts piling onto a node whose kernel mount lock is
contended make every start on it slower.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

HEALTHY, DEGRADED, STALLED, UNKNOWN = "HEALTHY", "DEGRADED", "STALLED", "UNKNOWN"
_RANK = {HEALTHY: 0, UNKNOWN: 1, DEGRADED: 2, STALLED: 3}


@dataclass(frozen=True)
class ThrottlePolicy:
    max_starts: int = 8
    min_starts: int = 1
    degraded_ms: float = 100.0
    stalled_ms: float = 1000.0
    recover_after: int = 3


@dataclass(frozen=True)
class MountReading:
    """The parts of a mount-stall sample the rule looks at."""

    stalled: bool
    mount_op_latency_ms: float
    probe_latency_ms: float
    mount_table_size: int = 0


@dataclass
class NodeThrottle:
    """One node's current limit and state."""

    node: str
    limit: int
    state: str = UNKNOWN
    healthy_run: int = 0
    mount_op_latency_ms: float = 0.0
    last_at: float | None = None  # event time of the newest sample applied (older ones are redeliveries)


@dataclass(frozen=True)
class ThrottleChange:
    node: str
    state: str
    previous_limit: int
    limit: int
    reason: str


def classify(policy: ThrottlePolicy, reading: MountReading) -> str:
    if reading.stalled or reading.mount_op_latency_ms >= policy.stalled_ms:
        return STALLED
    if max(reading.mount_op_latency_ms, reading.probe_latency_ms) >= policy.degraded_ms:
        return DEGRADED
    return HEALTHY


def apply(policy: ThrottlePolicy, node: NodeThrottle, reading: MountReading) -> ThrottleChange | None:
    """Update ``node`` with one reading; the change, if its limit or state moved."""
    state = classify(policy, reading)
    before_limit, before_state = node.limit, node.state
    node.mount_op_latency_ms = reading.mount_op_latency_ms
    if state == STALLED:
        node.healthy_run = 0
        node.limit = max(policy.min_starts, node.limit // 2)
        why = (
            "stalled flag set"
            if reading.stalled
            else f"mount op {reading.mount_op_latency_ms:.0f} ms >= {policy.stalled_ms:.0f} ms"
        )
    elif state == DEGRADED:
        node.healthy_run = 0
        why = (
            f"slow: mount op {reading.mount_op_latency_ms:.0f} ms, probe {reading.probe_latency_ms:.0f} ms"
            f" >= {policy.degraded_ms:.0f} ms; limit held"
        )
    else:
        node.healthy_run += 1
        if node.healthy_run >= policy.recover_after and node.limit < policy.max_starts:
            node.limit += 1
            node.healthy_run = 0
        why = f"healthy: mount op {reading.mount_op_latency_ms:.1f} ms"
    node.state = state
    if node.limit == before_limit and state == before_state:
        return None
    reason = f"{why}; limit {before_limit} -> {node.limit}"
    return ThrottleChange(node.node, state, before_limit, node.limit, reason)


def preference(nodes: Iterable[NodeThrottle]) -> list[str]:
    """Node names in the order new container starts should go to them."""
    ordered = sorted(nodes, key=lambda n: (_RANK.get(n.state, 1), -n.limit, n.mount_op_latency_ms, n.node))
    return [n.node for n in ordered]
