"""The autoscaler's handlers: a load sample re-evaluates its service, a mount-stall sample its node.

Decisions are published on the decisions topic with the signals they came from and a reason. A
decision's id is derived from what triggered it (the sample's event id, or the group's committed
offsets for a wake-up) and its outcome, so a redelivered sample or a replay yields the same ids and
consumers deduplicate. A decision is published when the replica count changes, and an unchanged
one (HOLD) again every ``hold_every_s`` of event time.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from prometheus_client import Counter

from services.autoscaler import throttle
from services.autoscaler.hpa import ScalingPolicy, Stabilizer, decide, partitions_ceiling
from services.autoscaler.state import BadSample, ServiceState
from services.bus.consumer import Record, Retryable
from services.bus.events import (
    LoadSample,
    MountStallSample,
    NodeMountState,
    NodeStartThrottle,
    ScalingAction,
    ScalingDecision,
)
from services.bus.producer import DeliveryFailed

log = logging.getLogger("reelbus.autoscaler")

NAMESPACE = uuid.UUID("5b0c1e7e-8f4e-4f0a-9d1c-2a6e3c4b5d60")
DROPPED = Counter("reelbus_autoscaler_dropped_total", "Samples dropped as invalid", ["kind"])
DECISIONS = Counter("reelbus_autoscaler_decisions_total", "Decisions published", ["action"])

Publish = Callable[[str, ScalingDecision | NodeStartThrottle], Awaitable[None]]


@dataclass
class Dependencies:
    policy: Callable[[str], ScalingPolicy]
    throttle_policy: throttle.ThrottlePolicy
    partitions: dict[str, int]  # topic -> partitions, from the topics file
    consumed_by: Callable[[str], Sequence[str]]  # service -> the topics its group reads
    publish: Publish
    actuate: Callable[[str, int], None]
    instance_ttl_s: float = 30.0
    hold_every_s: float = 60.0
    services: dict[str, ServiceState] = field(default_factory=dict)
    nodes: dict[str, throttle.NodeThrottle] = field(default_factory=dict)

    def service(self, name: str) -> ServiceState:
        found = self.services.get(name)
        if found is None:
            policy = self.policy(name)
            found = self.services[name] = ServiceState(
                name, Stabilizer(policy.scale_up_window_s, policy.scale_down_window_s)
            )
        return found


def decision_id(*parts: object) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, "|".join(str(p) for p in parts))


def _seconds(at: datetime) -> float:
    return at.timestamp()


async def on_load_sample(event: LoadSample, record: Record, deps: Dependencies) -> None:
    state = deps.service(event.service)
    try:
        fresh = state.observe(
            instance=event.instance,
            at=_seconds(event.event_time),
            cpu=event.cpu_utilization,
            in_flight=event.in_flight,
            request_rate=event.request_rate,
            lag=event.consumer_lag,
            partition_lag=dict(event.partition_lag),
            group=event.consumer_group,
        )
    except BadSample as exc:
        DROPPED.labels("load").inc()
        log.warning("dropped load sample %s of %s/%s: %s", event.event_id, event.service, event.instance, exc)
        return
    if fresh:  # an older sample than the instance's newest one changes nothing
        await evaluate(deps, state, _seconds(event.event_time), str(event.event_id))


async def evaluate(
    deps: Dependencies, state: ServiceState, now: float, trigger: str
) -> ScalingDecision | None:
    """Decide for one service at event time ``now``; publish if it changed or a HOLD is due."""
    policy = deps.policy(state.name)
    topics = sorted(state.topics) or list(deps.consumed_by(state.name))
    obs = state.observation(now, deps.instance_ttl_s, partitions_ceiling(topics, deps.partitions))
    current = state.desired if state.desired is not None else obs.ready
    outcome = decide(policy, state.stabilizer, obs, current, now)
    changed = state.desired != outcome.to_replicas
    hold_due = (
        deps.hold_every_s > 0
        and state.published_at is not None
        and now - state.published_at >= deps.hold_every_s
    )
    if not changed and not hold_due:
        state.desired = outcome.to_replicas
        return None
    decision = ScalingDecision(
        event_id=decision_id("scale", state.name, trigger, outcome.from_replicas, outcome.to_replicas),
        event_time=datetime.fromtimestamp(now, UTC),
        service=state.name,
        from_replicas=outcome.from_replicas,
        to_replicas=outcome.to_replicas,
        action=ScalingAction(outcome.action),
        reason=outcome.reason,
        signals=dict(outcome.signals),
    )
    try:
        await deps.publish(state.name, decision)
    except DeliveryFailed as exc:
        raise Retryable(str(exc)) from exc
    DECISIONS.labels(outcome.action).inc()
    log.info(
        "%s: %s %d -> %d (%s)",
        state.name,
        outcome.action,
        outcome.from_replicas,
        outcome.to_replicas,
        outcome.reason,
    )
    state.desired = outcome.to_replicas
    state.published_at = now
    if changed:
        deps.actuate(state.name, outcome.to_replicas)
    return decision


async def on_mount_sample(event: MountStallSample, record: Record, deps: Dependencies) -> None:
    values = (event.mount_op_latency_ms, event.probe_latency_ms, event.mount_table_read_ms)
    if any(not math.isfinite(v) or v < 0 for v in values) or event.mount_table_size < 0:
        DROPPED.labels("mount").inc()
        log.warning(
            "dropped mount-stall sample %s of %s: negative or non-finite values", event.event_id, event.node
        )
        return
    policy = deps.throttle_policy
    known = deps.nodes.get(event.node)
    at = _seconds(event.event_time)
    if known is not None and known.last_at is not None and at <= known.last_at:
        return  # not newer than the last sample applied: a redelivery changes nothing
    # Work on a copy: the node's state moves only once its decision is published (a retry sees the same).
    node = replace(known) if known is not None else throttle.NodeThrottle(event.node, policy.max_starts)
    reading = throttle.MountReading(
        stalled=event.stalled,
        mount_op_latency_ms=event.mount_op_latency_ms,
        probe_latency_ms=event.probe_latency_ms,
        mount_table_size=event.mount_table_size,
    )
    change = throttle.apply(policy, node, reading)
    node.last_at = at
    if change is None:
        deps.nodes[event.node] = node
        return
    decision = NodeStartThrottle(
        event_id=decision_id("throttle", event.node, event.event_id, change.limit, change.state),
        event_time=event.event_time,
        node=event.node,
        state=NodeMountState(change.state),
        max_concurrent_starts=change.limit,
        previous_max_concurrent_starts=change.previous_limit,
        preferred_nodes=throttle.preference({**deps.nodes, event.node: node}.values()),
        reason=change.reason,
        signals={
            "stalled": 1.0 if event.stalled else 0.0,
            "mount_op_latency_ms": event.mount_op_latency_ms,
            "probe_latency_ms": event.probe_latency_ms,
            "mount_table_read_ms": event.mount_table_read_ms,
            "mount_table_size": float(event.mount_table_size),
            "concurrent_mounts": float(event.concurrent_mounts),
        },
    )
    try:
        await deps.publish(event.node, decision)
    except DeliveryFailed as exc:
        raise Retryable(str(exc)) from exc
    deps.nodes[event.node] = node
    log.info("node %s: %s", event.node, change.reason)
