"""The replica arithmetic of the autoscaler, pure: no clock, no I/O.

It is the Kubernetes HorizontalPodAutoscaler's algorithm
(https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details):

- per metric, ``desired = ceil(current * metric / target)``, where ``metric`` is the per-replica
  average and ``current`` the replicas that reported it; when ``metric / target`` is within the
  tolerance (0.1) of 1.0 nothing changes;
- with several metrics the largest recommendation wins;
- the recommendation is stabilised as the controller's ``stabilizeRecommendationWithBehaviors``
  does: over the scale-up window the smallest recent recommendation caps a rise, over the
  scale-down window the largest recent one caps a fall (defaults 0 s and 300 s), then the result is
  clamped to ``[min_replicas, max_replicas]``;
- consumer lag is a total over the group, scaled as KEDA's Kafka scaler feeds it to the HPA (an
  ``AverageValue`` target of lag per replica): ``desired = ceil(total_lag / lag_per_replica)``, the
  same tolerance, and never more replicas than the input topic has partitions (more would sit idle);
- a function-style service scales to zero once it has been idle (no requests, nothing in flight,
  no lag) for ``idle_s``, and is woken (0 -> 1) by the first event waiting for it (lag > 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TOLERANCE = 0.1


@dataclass(frozen=True)
class ScalingPolicy:
    """How one service scales. Targets are per replica; ``None`` leaves a metric out."""

    min_replicas: int = 1
    max_replicas: int = 10
    cpu_target: float | None = 0.7  # mean CPU utilization, fraction of the allotted CPUs
    in_flight_target: float | None = None  # mean in-flight requests
    request_rate_target: float | None = None  # mean requests (or records) per second
    lag_target: float | None = 1000.0  # consumer-group lag, messages per replica
    tolerance: float = TOLERANCE
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    function: bool = False  # scale to zero when idle, wake on the first event
    idle_s: float = 300.0


def hpa_desired(current: int, metric: float, target: float, tolerance: float = TOLERANCE) -> int:
    """``ceil(current * metric / target)``, or ``current`` within the tolerance."""
    if target <= 0:
        raise ValueError("target must be positive")
    ratio = metric / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(current * ratio - 1e-9)  # 2.0000000001 is 2, as for the controller's float64


def lag_desired(
    current: int,
    total_lag: float,
    lag_per_replica: float,
    partitions: int | None,
    tolerance: float = TOLERANCE,
) -> int:
    """Replicas for a consumer-group lag (an ``AverageValue`` target), capped by the partitions."""
    if lag_per_replica <= 0:
        raise ValueError("lag_per_replica must be positive")
    if current <= 0:
        desired = math.ceil(total_lag / lag_per_replica - 1e-9)
    else:
        desired = hpa_desired(current, total_lag / current, lag_per_replica, tolerance)
    if partitions is not None:
        desired = min(desired, partitions)
    return max(0, desired)


@dataclass(frozen=True)
class Observation:
    """What the autoscaler knows about a service at one evaluation."""

    ready: int  # replicas that reported recently (the HPA's ready pods)
    cpu: float | None = None  # mean over them
    in_flight: float | None = None
    request_rate: float | None = None
    lag: float | None = None  # total over the group's partitions; None for a non-consumer
    partitions: int | None = None  # the ceiling for lag scaling
    idle_for_s: float = 0.0  # how long the service has had nothing to do (function-style)


@dataclass(frozen=True)
class Recommendation:
    """A raw recommendation and why: the per-metric replicas, and the signals they came from."""

    replicas: int
    reason: str
    per_metric: Mapping[str, int] = field(default_factory=dict)
    signals: Mapping[str, float] = field(default_factory=dict)
    bypass: bool = False  # scale-to-zero and wake skip the stabilisation windows (KEDA's activation)


def recommend(policy: ScalingPolicy, obs: Observation, current: int) -> Recommendation:
    """The unstabilised recommendation for a service that has ``current`` replicas (desired count)."""
    signals: dict[str, float] = {"ready_replicas": float(obs.ready), "current_replicas": float(current)}
    for name, value in (
        ("cpu_utilization", obs.cpu),
        ("in_flight", obs.in_flight),
        ("request_rate", obs.request_rate),
        ("consumer_lag", obs.lag),
        ("partitions", obs.partitions),
    ):
        if value is not None:
            signals[name] = float(value)
    if policy.function:
        signals["idle_s"] = obs.idle_for_s
        if obs.ready == 0 and current == 0:
            if obs.lag:
                reason = f"wake: lag {obs.lag:.0f} waiting at 0 replicas"
                return Recommendation(1, reason, signals=signals, bypass=True)
            return Recommendation(0, "idle at 0 replicas", signals=signals, bypass=True)
        if obs.idle_for_s >= policy.idle_s and not obs.lag:
            reason = f"idle for {obs.idle_for_s:.0f}s >= {policy.idle_s:.0f}s: scale to zero"
            return Recommendation(0, reason, signals=signals, bypass=True)
    ready = obs.ready or current
    per_metric: dict[str, int] = {}
    reasons: list[str] = []
    targets = (
        ("cpu_utilization", obs.cpu, policy.cpu_target),
        ("in_flight", obs.in_flight, policy.in_flight_target),
        ("request_rate", obs.request_rate, policy.request_rate_target),
    )
    for name, value, target in targets:
        if value is None or target is None or ready <= 0:
            continue
        per_metric[name] = hpa_desired(ready, value, target, policy.tolerance)
        reasons.append(f"{name} {value:.3g} vs target {target:.3g} -> {per_metric[name]}")
    if obs.lag is not None and policy.lag_target is not None:
        per_metric["consumer_lag"] = lag_desired(
            ready, obs.lag, policy.lag_target, obs.partitions, policy.tolerance
        )
        cap = f", at most {obs.partitions} partitions" if obs.partitions is not None else ""
        reasons.append(
            f"lag {obs.lag:.0f} vs {policy.lag_target:.0f}/replica{cap} -> {per_metric['consumer_lag']}"
        )
    if not per_metric:
        return Recommendation(current, "no metric with a target: hold", signals=signals)
    best = max(per_metric.values())
    return Recommendation(best, "; ".join(reasons), per_metric, signals)


@dataclass
class Stabilizer:
    """One service's recommendation history, as the HPA controller keeps it
    (``stabilizeRecommendationWithBehaviors``)."""

    up_window_s: float = 0.0
    down_window_s: float = 300.0
    history: list[tuple[float, int]] = field(default_factory=list)

    def stabilize(self, now: float, recommended: int, current: int) -> int:
        up_cutoff = now - self.up_window_s
        down_cutoff = now - self.down_window_s
        up = down = recommended
        for at, rec in self.history:
            if at > up_cutoff:
                up = min(up, rec)
            if at > down_cutoff:
                down = max(down, rec)
        result = current
        result = max(result, up)  # a rise no higher than the smallest recent recommendation
        result = min(result, down)  # a fall no lower than the largest recent one
        # Keep only what a window can still see, then record this (unstabilised) recommendation.
        horizon = min(up_cutoff, down_cutoff)
        self.history = [(at, rec) for at, rec in self.history if at > horizon]
        self.history.append((now, recommended))
        return result


def clamp(replicas: int, policy: ScalingPolicy) -> int:
    """Into ``[min_replicas, max_replicas]``; never 0 here (as the HPA's minReplicas >= 1): only an
    idle function-style service goes to zero, and not by this arithmetic."""
    low = max(1, policy.min_replicas)
    return max(low, min(policy.max_replicas, replicas))


@dataclass(frozen=True)
class Outcome:
    """The decision for one evaluation: where the service goes, and why."""

    from_replicas: int
    to_replicas: int
    reason: str
    signals: Mapping[str, float]

    @property
    def action(self) -> str:
        if self.to_replicas > self.from_replicas:
            return "SCALE_OUT"
        if self.to_replicas < self.from_replicas:
            return "SCALE_IN"
        return "HOLD"


def decide(
    policy: ScalingPolicy, stabilizer: Stabilizer, obs: Observation, current: int, now: float
) -> Outcome:
    """One evaluation: recommend, stabilise (unless waking or going to zero), clamp."""
    rec = recommend(policy, obs, current)
    signals = dict(rec.signals)
    for name, replicas in rec.per_metric.items():
        signals[f"desired.{name}"] = float(replicas)
    signals["recommended"] = float(rec.replicas)
    if rec.bypass:
        stabilizer.history.append((now, rec.replicas))
        return Outcome(current, rec.replicas, rec.reason, signals)
    stable = stabilizer.stabilize(now, rec.replicas, current)
    final = clamp(stable, policy)
    reason = rec.reason
    if stable != rec.replicas:
        window = policy.scale_down_window_s if stable > rec.replicas else policy.scale_up_window_s
        reason += f"; stabilised to {stable} (window {window:.0f}s)"
    if final != stable:
        reason += f"; clamped to [{clamp(0, policy)}, {policy.max_replicas}]"
    return Outcome(current, final, reason, signals)


def partitions_ceiling(topics: Sequence[str], partitions: Mapping[str, int]) -> int | None:
    """The most partitions of the topics a group reads (a group cannot use more consumers)."""
    known = [partitions[t] for t in topics if t in partitions]
    return max(known) if known else None
