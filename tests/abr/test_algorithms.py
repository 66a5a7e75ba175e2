"""BBA-0, BOLA-BASIC and RobustMPC decisions checked against their definitions."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from services.abr.algorithms import (
    ALGORITHMS,
    BBA,
    BOLA,
    AbrState,
    RobustMPC,
    best_plan,
    harmonic_mean,
    make_algorithm,
    plan_value,
)
from services.abr.simulator import PENSIEVE_LADDER_KBPS

LADDER = PENSIEVE_LADDER_KBPS
CBR = tuple(round(b * 1000 / 8 * 4) for b in LADDER)


def state(
    buffer_s: float = 10.0,
    last: int | None = 2,
    throughputs: tuple[float, ...] = (2000.0,) * 5,
    remaining: int = 20,
) -> AbrState:
    return AbrState(
        ladder_kbps=LADDER,
        chunk_duration_s=4.0,
        buffer_s=buffer_s,
        last_index=last,
        throughputs_kbps=throughputs,
        download_times_s=tuple(4.0 for _ in throughputs),
        next_chunk_sizes=(CBR,) * remaining,
        remaining_chunks=remaining,
    )


# BBA-0


@pytest.mark.parametrize("buffer_s", [0.0, 3.0, 5.0])
def test_bba_fetches_the_bottom_rung_in_the_reservoir(buffer_s: float) -> None:
    assert BBA().choose(state(buffer_s, last=5)) == 0


@pytest.mark.parametrize("buffer_s", [15.0, 30.0, 60.0])
def test_bba_fetches_the_top_rung_past_the_cushion(buffer_s: float) -> None:
    assert BBA().choose(state(buffer_s, last=0)) == 5


def test_bba_rate_map_is_linear_in_bitrate_over_the_cushion() -> None:
    assert BBA().rate_map_kbps(LADDER, 10.0) == pytest.approx(300 + 4000 * 0.5)  # 2300
    assert BBA().rate_map_kbps(LADDER, 7.5) == pytest.approx(1300)


def test_bba_moves_only_when_the_map_crosses_the_next_rung() -> None:
    # f(10 s) = 2300 kbit/s: between 1850 (rung 3) and 2850 (rung 4)
    assert BBA().choose(state(10.0, last=3)) == 3  # 1200 < f < 2850: stay
    assert BBA().choose(state(10.0, last=0)) == 3  # f >= 750: highest rung below f
    assert BBA().choose(state(10.0, last=5)) == 4  # f <= 2850: lowest rung above f
    assert BBA().choose(state(10.0, last=4)) == 4  # 1850 < f < 4300: stay


def test_bba_index_is_pensieves_bb_py() -> None:
    assert BBA(mapping="index").choose(state(10.0, last=0)) == 2  # int(5 * 5 / 10)
    assert BBA(mapping="index").choose(state(14.9, last=0)) == 4
    assert BBA(mapping="index").name == "bba-index"


# BOLA-BASIC


def bola_thresholds(bola: BOLA) -> list[float]:
    """Buffer levels where BOLA's argmax moves from rung m to m+1 (the paper's switching points)."""
    v = bola.control_v(LADDER, 4.0)
    u = [math.log(b / LADDER[0]) for b in LADDER]
    s = LADDER
    return [
        v * (bola.gamma_p_s + (s[m + 1] * u[m] - s[m] * u[m + 1]) / (s[m + 1] - s[m]))
        for m in range(len(s) - 1)
    ]


def test_bola_v_comes_from_the_buffer_size() -> None:
    bola = BOLA()
    assert bola.control_v(LADDER, 4.0) == pytest.approx((25 - 4) / (math.log(4300 / 300) + 5))
    # at Q = Q_max - p every score is zero for the top rung: the buffer need not grow further
    v = bola.control_v(LADDER, 4.0)
    assert v * (math.log(4300 / 300) + 5) == pytest.approx(21.0)


def test_bola_climbs_one_rung_at_each_threshold() -> None:
    bola = BOLA()
    thresholds = bola_thresholds(bola)
    assert thresholds == pytest.approx([12.0, 14.1, 15.3, 16.5, 17.7], abs=0.05)
    assert bola.choose(state(0.0)) == 0
    for m, q in enumerate(thresholds):
        assert bola.choose(state(q - 0.01)) == m
        assert bola.choose(state(q + 0.01)) == m + 1
    assert bola.choose(state(59.0)) == 5  # above Q_max the argmax is the top rung


def test_bola_ignores_throughput_and_the_last_rung() -> None:
    slow = state(13.0, last=5, throughputs=(100.0,) * 5)
    fast = state(13.0, last=0, throughputs=(50_000.0,) * 5)
    assert BOLA().choose(slow) == BOLA().choose(fast) == 1


# RobustMPC


def test_robustmpc_prediction_is_the_discounted_harmonic_mean() -> None:
    mpc = RobustMPC()
    assert mpc.predicted_throughput_kbps(()) is None
    assert mpc.predicted_throughput_kbps((1000.0,)) == pytest.approx(1000.0)  # no error yet
    assert mpc.predicted_throughput_kbps((1500.0,) * 7) == pytest.approx(1500.0)
    # chunk 2 was predicted 1000 and came at 2000: error 0.5; harmonic mean 1333.3
    assert mpc.predicted_throughput_kbps((1000.0, 2000.0)) == pytest.approx(harmonic_mean([1000, 2000]) / 1.5)


def test_robustmpc_only_looks_at_the_last_five_chunks_and_errors() -> None:
    mpc = RobustMPC()
    old_spike = (100.0, 5000.0, 100.0) + (1000.0,) * 10
    assert mpc.predicted_throughput_kbps(old_spike) == pytest.approx(1000.0)
    # the error of chunk k is against the harmonic mean of the five before it
    history = (1000.0, 1000.0, 1000.0, 1000.0, 1000.0, 500.0)
    error = abs(1000.0 - 500.0) / 500.0
    expected = harmonic_mean(history[-5:]) / (1 + error)
    assert mpc.predicted_throughput_kbps(history) == pytest.approx(expected)


def test_robustmpc_fetches_the_bottom_rung_with_no_history() -> None:
    assert RobustMPC().choose(state(0.0, last=None, throughputs=())) == 0


def test_robustmpc_goes_for_the_top_on_a_fast_steady_link() -> None:
    assert RobustMPC().choose(state(8.0, last=1, throughputs=(20_000.0,) * 5)) == 5


def test_robustmpc_steps_down_on_a_slow_link_with_little_buffer() -> None:
    assert RobustMPC().choose(state(2.0, last=5, throughputs=(400.0,) * 5)) == 0


def test_robustmpc_horizon_shrinks_at_the_end_of_the_video() -> None:
    # one chunk left, a big buffer: nothing after it to protect, so the top rung is worth its change
    assert RobustMPC().choose(state(30.0, last=5, throughputs=(1000.0,) * 5, remaining=1)) == 5


def random_case(rng: random.Random) -> tuple[list[list[float]], float, int | None]:
    bandwidth = rng.uniform(200, 6000)
    steps = rng.randint(1, 5)
    times = [[size * 8 / 1000 / bandwidth * rng.uniform(0.8, 1.2) for size in CBR] for _ in range(steps)]
    last = rng.choice([None, *range(len(LADDER))])
    return times, rng.uniform(0, 30), last


def test_branch_and_bound_finds_the_exhaustive_optimum() -> None:
    rng = random.Random(7)
    qualities = [b / 1000 for b in LADDER]
    for _ in range(300):
        times, buffer_s, last = random_case(rng)
        first, value = best_plan(times, qualities, buffer_s, last, 4.0)
        plans = itertools.product(range(len(LADDER)), repeat=len(times))
        values = {plan: plan_value(plan, times, qualities, buffer_s, last, 4.0) for plan in plans}
        best = max(values.values())
        assert value == pytest.approx(best, abs=1e-9)
        assert max(v for plan, v in values.items() if plan[0] == first) == pytest.approx(best, abs=1e-9)


# all of them


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithms_are_pure(name: str) -> None:
    algorithm = make_algorithm(name)
    assert algorithm.name == name
    rng = random.Random(name)
    for _ in range(50):
        s = state(
            rng.uniform(0, 60),
            rng.choice([None, *range(6)]),
            tuple(rng.uniform(100, 8000) for _ in range(rng.randint(1, 12))),
            rng.randint(1, 48),
        )
        answer = algorithm.choose(s)
        assert 0 <= answer < len(LADDER)
        assert make_algorithm(name).choose(s) == answer == algorithm.choose(s)


def test_an_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'pensieve'"):
        make_algorithm("pensieve")
