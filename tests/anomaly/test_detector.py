"""The streaming detector on planted anomalies, on clean noise, and across a state round trip."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta

import pytest

from services.anomaly_detector import Detector, DetectorConfig
from services.anomaly_detector.baselines import NullDetector, WindowedGaussianDetector

T0 = datetime(2024, 1, 1)
DAY = 288  # records of 5 minutes
WARM = 300  # records after which the tests look at the scores


def stamps(n: int, minutes: int = 5) -> list[datetime]:
    return [T0 + timedelta(minutes=minutes * i) for i in range(n)]


def noise(seed: int, n: int, level: float = 10.0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, 1.0) for _ in range(n)]


def daily(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [50.0 + 10.0 * math.sin(2 * math.pi * i / DAY) + rng.gauss(0.0, 0.5) for i in range(n)]


def run(values: list[float], detector: Detector | None = None) -> list[float]:
    d = detector or Detector()
    return [d.update(t, v) for t, v in zip(stamps(len(values)), values, strict=True)]


def test_scores_are_in_0_1_and_zero_while_warming_up() -> None:
    values = noise(0, 1000)
    values[500] = 1e6
    scores = run(values)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[: DetectorConfig().warm_up] == [0.0] * DetectorConfig().warm_up


@pytest.mark.parametrize("seed", range(3))
def test_a_planted_spike_scores_1(seed: int) -> None:
    values = noise(seed, 3000)
    values[2000] += 8.0
    scores = run(values)
    assert scores[2000] == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_a_level_shift_fires_at_once(seed: int) -> None:
    values = [v + (5.0 if i >= 2000 else 0.0) for i, v in enumerate(noise(seed, 3000))]
    scores = run(values)
    assert max(scores[2000:2010]) >= 0.5


def test_a_flat_line_that_moves_fires() -> None:
    scores = run([45.0] * 1000 + [46.0] * 100)
    assert max(scores[WARM:1000]) < 0.1
    assert scores[1000] == 1.0
    assert max(scores[1001:]) < 0.5  # one alarm for one incident


@pytest.mark.parametrize("seed", range(3))
def test_a_flattened_day_stands_out(seed: int) -> None:
    values = daily(seed, 3000)
    rng = random.Random(100 + seed)
    for i in range(2000, 2000 + DAY):
        values[i] = 50.0 + rng.gauss(0.0, 0.5)  # the daily cycle is missing, the values stay in range
    scores = run(values)
    assert max(scores[2000 : 2000 + DAY]) > 1.3 * max(scores[WARM:2000])


def test_clean_noise_stays_quiet() -> None:
    alarms = 0
    looked_at = 0
    for seed in range(10):
        scores = run(noise(seed, 3000))[WARM:]
        alarms += sum(1 for s in scores if s >= 0.5)
        looked_at += len(scores)
    assert alarms <= looked_at / 3000  # at most about one per 3000 records


def test_a_clean_daily_cycle_stays_quiet() -> None:
    for seed in range(3):
        assert max(run(daily(seed, 3000))[WARM:]) < 0.5


def test_the_day_is_learned_from_the_sampling_interval() -> None:
    for minutes, period in ((5, 288), (60, 24), (24 * 60, 0), (1, 1440)):
        d = Detector()
        for t in stamps(30, minutes):
            d.update(t, 1.0)
        assert d.period == period, minutes


def test_state_round_trip_continues_exactly() -> None:
    values = daily(7, 2500)
    values[1800] += 30.0
    values[2100:] = [v + 8.0 for v in values[2100:]]
    times = stamps(len(values))
    straight = Detector()
    expected = [straight.update(t, v) for t, v in zip(times, values, strict=True)]

    first = Detector()
    got = [first.update(t, v) for t, v in zip(times[:1200], values[:1200], strict=True)]
    state = json.loads(json.dumps(first.to_dict()))  # through JSON, as a service would store it
    second = Detector.from_dict(state)
    got += [second.update(t, v) for t, v in zip(times[1200:], values[1200:], strict=True)]

    assert got == expected
    assert second.to_dict() == straight.to_dict()


def test_state_is_small() -> None:
    d = Detector()
    run(daily(0, 5000), d)
    state = d.to_dict()
    numbers = len(state["history"]) + len(state["rarity"]) + len(state["intervals"])
    assert numbers <= 3 * DAY + 400 + 20
    assert len(json.dumps(state)) < 40_000


def test_state_round_trip_of_a_fresh_detector_and_a_custom_config() -> None:
    config = DetectorConfig(seasons=2, refractory=50)
    d = Detector.from_dict(json.loads(json.dumps(Detector(config).to_dict())))
    assert d.config == config
    assert run(noise(1, 400), d) == run(noise(1, 400), Detector(config))


def test_unknown_state_versions_are_refused() -> None:
    state = Detector().to_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Detector.from_dict(state)


def test_non_finite_values_are_skipped() -> None:
    d = Detector()
    run(noise(0, 200), d)
    before = d.to_dict()
    assert d.update(T0 + timedelta(days=5), math.nan) == 0.0
    assert d.update(T0 + timedelta(days=5), math.inf) == 0.0
    assert d.to_dict() == before


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="seasons"):
        DetectorConfig(seasons=0)
    with pytest.raises(ValueError, match="red_likelihood"):
        DetectorConfig(red_likelihood=1.5)


def test_baselines() -> None:
    assert {NullDetector().update(T0, v) for v in (0.0, 1e9)} == {0.5}
    values = noise(0, 500)
    values[400] = 100.0
    wg = WindowedGaussianDetector()
    scores = [wg.update(t, v) for t, v in zip(stamps(500), values, strict=True)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[400] == pytest.approx(1.0)
    assert max(scores[50:400]) < 0.9999999
