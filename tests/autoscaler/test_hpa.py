"""The replica arithmetic (services/autoscaler/hpa.py) against the Kubernetes documentation's cases."""

from __future__ import annotations

import random

import pytest

from services.autoscaler.hpa import (
    Observation,
    ScalingPolicy,
    Stabilizer,
    decide,
    hpa_desired,
    lag_desired,
    recommend,
)
from services.autoscaler.state import BadSample, ServiceState

CPU_ONLY = ScalingPolicy(cpu_target=0.7, lag_target=None)


def test_docs_example_200m_against_100m_doubles() -> None:
    # "if the current metric value is 200m, and the desired value is 100m, the number of replicas
    # will be doubled, since 200.0 / 100.0 == 2.0"
    assert hpa_desired(1, 200, 100) == 2
    assert hpa_desired(3, 200, 100) == 6


def test_docs_example_50m_against_100m_halves() -> None:
    assert hpa_desired(4, 50, 100) == 2


def test_docs_walkthrough_305_percent_against_50_percent_is_7() -> None:
    # The HPA walkthrough (php-apache): one replica at 305% CPU against a 50% target.
    assert hpa_desired(1, 3.05, 0.5) == 7


@pytest.mark.parametrize("metric", [91, 95, 100, 105, 109])
def test_within_the_tolerance_nothing_changes(metric: float) -> None:
    assert hpa_desired(4, metric, 100) == 4


def test_just_outside_the_tolerance_scales() -> None:
    assert hpa_desired(4, 115, 100) == 5  # ceil(4.6)
    assert hpa_desired(4, 85, 100) == 4  # ceil(3.4) = 4: a fall rounds up
    assert hpa_desired(10, 85, 100) == 9


def test_exact_ratios_do_not_round_up_from_float_noise() -> None:
    assert hpa_desired(3, 0.7 * 2, 0.7) == 6


def test_lag_scaling_is_total_lag_over_lag_per_replica() -> None:
    assert lag_desired(1, 5000, 1000, partitions=None) == 5
    assert lag_desired(2, 5000, 1000, partitions=None) == 5
    assert lag_desired(5, 5200, 1000, partitions=None) == 5  # within the tolerance
    assert lag_desired(5, 0, 1000, partitions=None) == 0


def test_lag_scaling_never_exceeds_the_partitions() -> None:
    assert lag_desired(1, 1_000_000, 10, partitions=6) == 6
    rng = random.Random(6)
    for _ in range(2000):
        partitions = rng.randint(1, 64)
        got = lag_desired(rng.randint(0, 100), rng.uniform(0, 1e7), rng.uniform(1, 1e4), partitions)
        assert 0 <= got <= partitions
    policy = ScalingPolicy(cpu_target=None, lag_target=100, max_replicas=50)
    out = decide(policy, Stabilizer(), Observation(ready=2, lag=1e6, partitions=3), 2, now=0)
    assert out.to_replicas == 3
    assert "at most 3 partitions" in out.reason


def test_several_metrics_take_the_largest() -> None:
    policy = ScalingPolicy(cpu_target=0.5, lag_target=100, in_flight_target=10)
    rec = recommend(policy, Observation(ready=2, cpu=0.75, in_flight=5, lag=800, partitions=6), 2)
    assert rec.per_metric == {"cpu_utilization": 3, "in_flight": 1, "consumer_lag": 6}
    assert rec.replicas == 6


def test_scale_down_waits_for_the_down_window() -> None:
    policy = ScalingPolicy(cpu_target=0.5, lag_target=None, scale_down_window_s=300)
    stab = Stabilizer(policy.scale_up_window_s, policy.scale_down_window_s)
    assert decide(policy, stab, Observation(ready=2, cpu=1.0), 2, now=0).to_replicas == 4
    # Load drops at once: the recommendation is 1, but 4 was recommended within the last 300 s.
    for t in (30, 120, 299):
        out = decide(policy, stab, Observation(ready=4, cpu=0.1), 4, now=t)
        assert out.to_replicas == 4, t
        assert "stabilised to 4" in out.reason
    # 301 s after the high recommendation only low ones remain in the window.
    assert decide(policy, stab, Observation(ready=4, cpu=0.1), 4, now=301).to_replicas == 1


def test_scale_up_is_immediate_with_the_default_up_window() -> None:
    policy = ScalingPolicy(cpu_target=0.5, lag_target=None)
    stab = Stabilizer(policy.scale_up_window_s, policy.scale_down_window_s)
    assert decide(policy, stab, Observation(ready=2, cpu=0.5), 2, now=0).to_replicas == 2
    assert decide(policy, stab, Observation(ready=2, cpu=1.0), 2, now=1).to_replicas == 4


def test_an_up_window_takes_the_smallest_recent_recommendation() -> None:
    policy = ScalingPolicy(cpu_target=0.5, lag_target=None, scale_up_window_s=60, scale_down_window_s=0)
    stab = Stabilizer(policy.scale_up_window_s, policy.scale_down_window_s)
    assert decide(policy, stab, Observation(ready=2, cpu=0.5), 2, now=0).to_replicas == 2
    out = decide(policy, stab, Observation(ready=2, cpu=1.5), 2, now=10)  # recommends 6
    assert out.to_replicas == 2  # the 2 recommended 10 s ago caps the rise
    assert decide(policy, stab, Observation(ready=2, cpu=1.5), 2, now=40).to_replicas == 2
    assert decide(policy, stab, Observation(ready=2, cpu=1.5), 2, now=61).to_replicas == 6


def test_min_and_max_replicas_bound_the_decision() -> None:
    policy = ScalingPolicy(
        cpu_target=0.5, lag_target=None, min_replicas=2, max_replicas=5, scale_down_window_s=0
    )
    assert decide(policy, Stabilizer(0, 0), Observation(ready=4, cpu=2.0), 4, now=0).to_replicas == 5
    assert decide(policy, Stabilizer(0, 0), Observation(ready=4, cpu=0.01), 4, now=0).to_replicas == 2


def test_function_style_scales_to_zero_when_idle_and_wakes_on_lag() -> None:
    policy = ScalingPolicy(function=True, idle_s=120, lag_target=100, cpu_target=0.7)
    stab = Stabilizer()
    busy = decide(policy, stab, Observation(ready=1, cpu=0.0, lag=0, partitions=3, idle_for_s=60), 1, now=0)
    assert busy.to_replicas == 1
    idle = decide(policy, stab, Observation(ready=1, cpu=0.0, lag=0, partitions=3, idle_for_s=121), 1, now=1)
    assert (idle.to_replicas, idle.action) == (0, "SCALE_IN")
    assert "scale to zero" in idle.reason
    asleep = decide(policy, stab, Observation(ready=0, lag=0, partitions=3), 0, now=2)
    assert asleep.to_replicas == 0
    woken = decide(policy, stab, Observation(ready=0, lag=1, partitions=3), 0, now=3)
    assert (woken.to_replicas, woken.action) == (1, "SCALE_OUT")
    assert woken.signals["consumer_lag"] == 1


def test_a_non_function_service_never_goes_to_zero() -> None:
    policy = ScalingPolicy(idle_s=1, lag_target=100, scale_down_window_s=0)
    out = decide(policy, Stabilizer(0, 0), Observation(ready=3, cpu=0.0, lag=0, idle_for_s=1e6), 3, now=0)
    assert out.to_replicas == 1


def test_decisions_carry_their_inputs() -> None:
    out = decide(CPU_ONLY, Stabilizer(), Observation(ready=1, cpu=0.9), 1, now=0)
    assert out.signals["cpu_utilization"] == 0.9
    assert out.signals["desired.cpu_utilization"] == 2
    assert out.signals["ready_replicas"] == 1
    assert "cpu_utilization 0.9 vs target 0.7 -> 2" in out.reason


def test_state_counts_fresh_instances_and_takes_the_newest_lag_per_partition() -> None:
    state = ServiceState("history", Stabilizer())
    common = {"in_flight": 0, "request_rate": 1.0, "group": "history"}
    state.observe(instance="a", at=0, cpu=0.2, lag=30, partition_lag={"t/0": 10, "t/1": 20}, **common)  # type: ignore[arg-type]
    state.observe(instance="b", at=5, cpu=0.6, lag=25, partition_lag={"t/1": 5, "t/2": 20}, **common)  # type: ignore[arg-type]
    obs = state.observation(now=10, ttl=30, partitions=3)
    assert obs.ready == 2
    assert obs.cpu == pytest.approx(0.4)
    assert obs.lag == 10 + 5 + 20  # t/1 moved to b: b's newer report counts, not both
    assert state.observation(now=32, ttl=30, partitions=3).ready == 1  # a is gone


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu", -0.1),
        ("cpu", float("nan")),
        ("cpu", 7.0),
        ("in_flight", -1),
        ("request_rate", -2.0),
        ("lag", -5),
    ],
)
def test_state_refuses_impossible_samples(field: str, value: float) -> None:
    state = ServiceState("x", Stabilizer())
    sample = {"cpu": 0.1, "in_flight": 0, "request_rate": 0.0, "lag": 0, field: value}
    with pytest.raises(
        BadSample, match=field.replace("cpu", "cpu_utilization").replace("lag", "consumer_lag")
    ):
        state.observe(instance="i", at=0, partition_lag={}, group=None, **sample)  # type: ignore[arg-type]
    assert not state.instances
