"""NAB's scoring rules on tiny series whose score is computable by hand.

The scaled sigmoid is ``S(x) = 2 / (1 + exp(5x)) - 1 = -tanh(2.5 x)``, so a detection at relative position
``x`` in a window is worth ``tanh(-2.5 x) / tanh(2.5)`` true positives. The series below have 100 records,
so a probationary period of 15 records, and one window on records 40..49 (width 10) unless stated.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from services.anomaly_detector import scoring

STANDARD = scoring.CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=1.0)
LOW_FP = scoring.CostMatrix(tp_weight=1.0, fp_weight=0.22, fn_weight=1.0)
LOW_FN = scoring.CostMatrix(tp_weight=1.0, fp_weight=0.11, fn_weight=2.0)
PROFILES = {
    "standard": scoring.Profile("standard", STANDARD),
    "reward_low_FP_rate": scoring.Profile("reward_low_FP_rate", LOW_FP),
    "reward_low_FN_rate": scoring.Profile("reward_low_FN_rate", LOW_FN),
}
N = 100
WINDOW = (40, 49)


def worth(position: float) -> float:
    """A detection's worth at a relative position in a window, by hand: tanh(-2.5 x) / tanh(2.5)."""
    return math.tanh(-2.5 * position) / math.tanh(2.5)


def raw(
    detections: set[int],
    costs: scoring.CostMatrix = STANDARD,
    windows: tuple[tuple[int, int], ...] = (WINDOW,),
    n: int = N,
) -> scoring.ThresholdScore:
    """The raw score of one series when exactly ``detections`` are detected."""
    anomaly = [1.0 if i in detections else 0.0 for i in range(n)]
    return scoring.score_at(scoring.points(n, anomaly, windows, "s"), costs, threshold=1.0)


def test_the_scaled_sigmoid_is_nabs() -> None:
    assert scoring.scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scoring.scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert scoring.scaled_sigmoid(0.0) == 0.0
    assert scoring.scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert scoring.scaled_sigmoid(3.0001) == -1.0
    for x in (-1.0, -0.3, 0.2, 2.9):
        assert scoring.scaled_sigmoid(x) == pytest.approx(-math.tanh(2.5 * x), abs=1e-15)


def test_a_detection_at_the_window_start_is_worth_the_full_tp_weight() -> None:
    result = raw({40})
    assert result.score == pytest.approx(1.0, abs=1e-12)
    assert (result.windows_detected, result.windows, result.fp) == (1, 1, 0)


def test_a_detection_at_the_window_end_is_worth_little() -> None:
    # position -(49 - 49 + 1) / 10 = -0.1
    assert raw({49}).score == pytest.approx(worth(-0.1), abs=1e-12)
    assert raw({49}).score == pytest.approx(0.2482, abs=1e-4)


def test_a_detection_halfway_through_the_window() -> None:
    # position -(49 - 45 + 1) / 10 = -0.5
    assert raw({45}).score == pytest.approx(worth(-0.5), abs=1e-12)


def test_only_the_first_detection_in_a_window_counts() -> None:
    # 42 is at -(49 - 42 + 1) / 10 = -0.8; the later ones add nothing, and take nothing away.
    assert raw({42, 43, 47, 49}).score == pytest.approx(worth(-0.8), abs=1e-12)
    assert raw({42, 43, 47, 49}).tp == 4  # NAB counts records


def test_a_missed_window_costs_the_fn_weight() -> None:
    assert raw(set()).score == -1.0
    assert raw(set(), LOW_FN).score == -2.0
    assert raw(set()).windows_detected == 0


def test_a_false_positive_before_any_window_costs_the_full_fp_weight() -> None:
    assert raw({20}).score == pytest.approx(-1.0 - 0.11, abs=1e-12)
    assert raw({20}, LOW_FP).score == pytest.approx(-1.0 - 0.22, abs=1e-12)
    assert raw({20}, windows=()).score == pytest.approx(-0.11, abs=1e-12)


def test_a_false_positive_after_a_window_is_weighted_by_its_distance() -> None:
    # record 60 is 11 records after the window's last one; NAB divides by (width - 1) = 9.
    expected = 1.0 + 0.11 * -math.tanh(2.5 * 11 / 9)
    assert raw({40, 60}).score == pytest.approx(expected, abs=1e-12)
    # just after the window it costs almost nothing
    assert raw({40, 50}).score == pytest.approx(1.0 + 0.11 * -math.tanh(2.5 / 9), abs=1e-12)
    # more than three (width - 1) past the window: the full FP weight
    assert raw({40, 90}).score == pytest.approx(1.0 - 0.11, abs=1e-12)


def test_the_probationary_period_is_fifteen_percent_capped_at_750_records() -> None:
    assert scoring.probationary_length(100) == 15
    assert scoring.probationary_length(99) == 14
    assert scoring.probationary_length(10_000) == 750.0


def test_detections_in_the_probationary_period_are_ignored() -> None:
    assert raw({3, 14}).score == -1.0  # no FP cost, the window is still missed
    assert raw({15}).score == pytest.approx(-1.11, abs=1e-12)  # record 15 is scored
    # A window inside the probationary period is neither a TP nor an FN (NAB drops its records).
    assert raw(set(), windows=((5, 9),)).score == 0.0
    assert raw({5}, windows=((5, 9),)).score == 0.0


def test_sweeping_finds_the_best_threshold() -> None:
    anomaly = [0.2] * N
    anomaly[40] = 0.9  # the window's first record
    anomaly[90] = 0.95  # a false positive far from the window
    pts = scoring.points(N, anomaly, (WINDOW,), "s")
    rows = scoring.sweep(pts, STANDARD)
    by_threshold = {row.threshold: row.score for row in rows}
    assert by_threshold[1.1] == -1.0  # nothing detected
    assert by_threshold[0.95] == pytest.approx(-1.11)
    assert by_threshold[0.9] == pytest.approx(0.89)
    assert by_threshold[0.2] < 0  # everything detected: 75 false positives
    best = scoring.best_threshold(rows)
    assert best.threshold == 0.9
    assert best.score == pytest.approx(0.89)
    assert scoring.score_at(pts, STANDARD, 0.5).score == pytest.approx(0.89)


def test_equal_scores_keep_the_highest_threshold() -> None:
    rows = [scoring.ThresholdScore(t, 1.0, 0, 0, 0, 0, 0, 0) for t in (1.1, 0.8, 0.5)]
    assert scoring.best_threshold(rows).threshold == 1.1


def perfect_and_null(series: list[tuple[int, tuple[tuple[int, int], ...]]]) -> dict[str, tuple[float, float]]:
    perfect, null = [], []
    for k, (n, windows) in enumerate(series):
        ideal = [0.0] * n
        for first, _ in windows:
            ideal[first] = 1.0
        perfect.append(scoring.SeriesScores(f"s{k}", ideal, windows))
        null.append(scoring.SeriesScores(f"s{k}", [scoring.NULL_SCORE] * n, windows))
    p = scoring.score_corpus(perfect, PROFILES)
    z = scoring.score_corpus(null, PROFILES)
    return {name: (p[name].normalised, z[name].normalised) for name in PROFILES}


def test_normalisation_null_scores_0_and_perfect_100() -> None:
    series = [(100, ((40, 49),)), (200, ((50, 60), (120, 140))), (100, ())]
    for name, (perfect, null) in perfect_and_null(series).items():
        assert perfect == pytest.approx(100.0), name
        assert null == pytest.approx(0.0, abs=1e-12), name


def test_normalisation_formula() -> None:
    # 3 windows, standard profile: null -3, perfect 3; a raw 0 is halfway.
    assert scoring.normalise(0.0, -3.0, 3.0) == 50.0
    assert scoring.normalise(-3.0, -3.0, 3.0) == 0.0
    result = scoring.score_corpus([scoring.SeriesScores("s", [0.0] * N, (WINDOW,))], PROFILES)
    assert result["standard"].null_raw == -1.0
    assert result["standard"].perfect == 1.0
    assert result["reward_low_FN_rate"].null_raw == -2.0


def test_the_threshold_is_shared_by_the_corpus() -> None:
    # Series a wants a threshold of 0.9 (its window start), series b has a false positive at 0.95
    # and its own window start at 0.7: the corpus optimum detects both windows (0.7) and pays one FP.
    a = [0.0] * N
    a[40] = 0.9
    b = [0.0] * N
    b[40] = 0.7
    b[90] = 0.95
    series = [scoring.SeriesScores("a", a, (WINDOW,)), scoring.SeriesScores("b", b, (WINDOW,))]
    result = scoring.score_corpus(series, PROFILES)["standard"]
    assert result.best.threshold == 0.7
    assert result.best.score == pytest.approx(2.0 - 0.11)
    assert result.normalised == pytest.approx(100 * (1.89 + 2) / 4)


def test_window_bounds_must_be_timestamps_of_the_series() -> None:
    t0 = datetime(2024, 1, 1)
    stamps = [t0 + timedelta(minutes=5 * i) for i in range(10)]
    assert scoring.window_indices(stamps, [(stamps[2], stamps[4])]) == [(2, 4)]
    with pytest.raises(ValueError, match="not a timestamp"):
        scoring.window_indices(stamps, [(stamps[2], stamps[4] + timedelta(minutes=1))])
    with pytest.raises(ValueError, match="overlaps"):
        scoring.window_indices(stamps, [(stamps[2], stamps[4]), (stamps[4], stamps[6])])


def test_points_need_one_score_per_record() -> None:
    with pytest.raises(ValueError, match="anomaly scores"):
        scoring.points(10, [0.0] * 9, (), "s")


def test_profiles_are_read_from_nabs_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    path.write_text(
        '{"standard": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}}}'
    )
    assert scoring.load_profiles(path) == {"standard": scoring.Profile("standard", STANDARD)}
