"""What the autoscaler remembers per service and instance between evaluations: pure, no I/O.

Each instance's newest load sample is kept, with its time; an instance that has not reported for
``instance_ttl_s`` no longer counts as a replica. Lag is kept per partition (the newest report of
each partition wins, so a partition that moved to another instance in a rebalance is not counted
twice), and the group's total is their sum. Times are event times (the samples'), in seconds, so
replaying the same samples gives the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.autoscaler.hpa import Observation, Stabilizer


class BadSample(ValueError):
    """A load sample with values no instance can have; it is counted and dropped."""


@dataclass(frozen=True)
class InstanceLoad:
    at: float
    cpu: float
    in_flight: int
    request_rate: float
    lag: int


@dataclass
class ServiceState:
    name: str
    stabilizer: Stabilizer
    instances: dict[str, InstanceLoad] = field(default_factory=dict)
    partition_lag: dict[str, tuple[float, int]] = field(default_factory=dict)
    group: str | None = None
    topics: set[str] = field(default_factory=set)
    first_seen: float | None = None
    last_busy: float | None = None
    desired: int | None = None  # the last decision's replicas (the HPA's scale spec.replicas)
    published_at: float | None = None

    def observe(
        self,
        *,
        instance: str,
        at: float,
        cpu: float,
        in_flight: int,
        request_rate: float,
        lag: int,
        partition_lag: dict[str, int],
        group: str | None,
    ) -> bool:
        """Keep the sample; False if it is older than the one kept for its instance (a redelivery)."""
        check(cpu=cpu, in_flight=in_flight, request_rate=request_rate, lag=lag, partition_lag=partition_lag)
        previous = self.instances.get(instance)
        if previous is not None and previous.at > at:
            return False
        self.instances[instance] = InstanceLoad(at, cpu, in_flight, request_rate, lag)
        for key, value in partition_lag.items():
            old = self.partition_lag.get(key)
            if old is None or old[0] <= at:
                self.partition_lag[key] = (at, value)
            self.topics.add(key.rsplit("/", 1)[0])
        if group:
            self.group = group
        if self.first_seen is None:
            self.first_seen = at
        if in_flight > 0 or request_rate > 0 or lag > 0:
            self.last_busy = max(self.last_busy or at, at)
        return True

    def fresh(self, now: float, ttl: float) -> dict[str, InstanceLoad]:
        return {name: load for name, load in self.instances.items() if now - load.at <= ttl}

    def forget_stale(self, now: float, ttl: float) -> None:
        self.instances = self.fresh(now, ttl)
        self.partition_lag = {k: v for k, v in self.partition_lag.items() if now - v[0] <= ttl}

    def observation(self, now: float, ttl: float, partitions: int | None) -> Observation:
        self.forget_stale(now, ttl)
        live = list(self.instances.values())
        n = len(live)
        lag: float | None = None
        if self.partition_lag:
            lag = float(sum(v for _, v in self.partition_lag.values()))
        elif self.group is not None:
            lag = float(sum(i.lag for i in live))
        since = self.last_busy if self.last_busy is not None else self.first_seen
        return Observation(
            ready=n,
            cpu=sum(i.cpu for i in live) / n if n else None,
            in_flight=sum(i.in_flight for i in live) / n if n else None,
            request_rate=sum(i.request_rate for i in live) / n if n else None,
            lag=lag,
            partitions=partitions if lag is not None else None,
            idle_for_s=max(0.0, now - since) if since is not None else 0.0,
        )


def check(
    *, cpu: float, in_flight: int, request_rate: float, lag: int, partition_lag: dict[str, int]
) -> None:
    """Refuse values no instance can report (the field named)."""
    if not math.isfinite(cpu) or not 0.0 <= cpu <= 1.0:
        raise BadSample(f"cpu_utilization {cpu!r} is outside 0..1")
    if in_flight < 0:
        raise BadSample(f"in_flight {in_flight} is negative")
    if not math.isfinite(request_rate) or request_rate < 0:
        raise BadSample(f"request_rate {request_rate!r} is negative or not finite")
    if lag < 0:
        raise BadSample(f"consumer_lag {lag} is negative")
    for key, value in partition_lag.items():
        if value < 0:
            raise BadSample(f"partition_lag[{key}] {value} is negative")
        if "/" not in key:
            raise BadSample(f"partition_lag key {key!r} is not <topic>/<partition>")
