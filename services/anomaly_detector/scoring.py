"""The Numenta Anomaly Benchmark (NAB) scoring rules, written from the published description.

References: Lavin & Ahmad 2015, "Evaluating Real-time Anomaly Detection Algorithms - the Numenta Anomaly
Benchmark"; the NAB repository's ``nab/sweeper.py``, ``nab/optimizer.py`` and ``nab/runner.py`` (whose
behaviour this module reproduces, edge cases included, without sharing its code).

The rules, per series of ``n`` records:

- **Probationary period**: the first ``min(floor(0.15 n), 0.15 * 5000)`` records are not scored at all
  (neither detections nor the windows' records there count).
- **Anomaly windows** ``[start, end]`` (timestamps that must be records of the series). A record inside a
  window of width ``w`` records, at index ``i`` with the window's last record at ``r``, would score
  ``tp_weight * S(-(r - i + 1) / w) / S(-1)`` if detected, with the scaled sigmoid
  ``S(x) = 2 / (1 + exp(5x)) - 1`` (``S(x) = -1`` for ``x > 3``): the window's first record is worth
  exactly ``tp_weight`` and the worth decays towards 0 at its end. Only the best (so the earliest)
  detection of a window counts; a window without any detection costs ``-fn_weight``.
- **False positives**: a detected record outside every window costs ``fp_weight * S(d / (w' - 1))``,
  where ``d`` is its distance in records from the end of the preceding window, of width ``w'``: just after
  a window an FP costs almost nothing, ``3 (w' - 1)`` records later the full ``-fp_weight``. Before the first
  window (or in a series without windows) the cost is the full ``-fp_weight``.
- A series' **raw score** is the sum of its windows' parts and its FP costs; the corpus raw score is the
  sum over series.
- **Threshold**: detectors emit an anomaly score in [0, 1] per record, a record is a detection when its
  score is ``>= threshold``, and the threshold is chosen per profile to maximise the corpus raw score
  (NAB's optimiser sweeps every distinct anomaly score of the corpus; so does :func:`sweep`).
- **Normalisation**: ``100 * (raw - null) / (perfect - null)``, where ``null`` is the raw score of NAB's null
  detector (a constant 0.5 for every record, itself put through the optimiser) and ``perfect`` is
  ``tp_weight`` times the number of labelled windows. The null detector scores 0, a detector that fires
  exactly at every window's first record and nowhere else scores 100.

Checked against the NAB repository's stored results of its published detectors: at NAB's stored
thresholds the per-file scores agree with NAB's score files to 1e-11 and the normalised scores with its
``final_results.json``; where a stored threshold is not the exact optimum for the stored results,
:func:`sweep` finds an equal or better one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

PROBATIONARY_PERCENT = 0.15
"""The share of each series, at the start, that is not scored (NAB's default)."""
PROBATIONARY_CAP_RECORDS = 5000
"""The probationary period is at most ``PROBATIONARY_PERCENT`` of this many records (NAB's rule)."""
NULL_SCORE = 0.5
"""NAB's null detector emits this constant for every record."""
_START_ABOVE = 1.1
"""The first threshold of a sweep: above every anomaly score, so nothing is detected."""


@dataclass(frozen=True)
class CostMatrix:
    """The weights of an application profile (``tnWeight`` exists in NAB's files but is never used)."""

    tp_weight: float
    fp_weight: float
    fn_weight: float


@dataclass(frozen=True)
class Profile:
    name: str
    costs: CostMatrix


def load_profiles(path: Path) -> dict[str, Profile]:
    """NAB's ``profiles.json``: ``{name: {"CostMatrix": {"tpWeight": .., "fpWeight": .., ..}}}``."""
    raw = json.loads(path.read_text())
    profiles = {}
    for name, body in raw.items():
        matrix = body["CostMatrix"]
        costs = CostMatrix(
            tp_weight=float(matrix["tpWeight"]),
            fp_weight=float(matrix["fpWeight"]),
            fn_weight=float(matrix["fnWeight"]),
        )
        profiles[name] = Profile(name, costs)
    return profiles


def probationary_length(n_records: int, percent: float = PROBATIONARY_PERCENT) -> float:
    """Records with an index below this are in the probationary period (NAB: it may be a float, 750.0)."""
    return min(math.floor(percent * n_records), percent * PROBATIONARY_CAP_RECORDS)


def scaled_sigmoid(relative_position: float) -> float:
    """NAB's scaled sigmoid: 0.9866 at -1 (a window's left edge), 0 at 0 (its right edge), -1 past 3."""
    if relative_position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * relative_position)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)


@dataclass(frozen=True)
class Point:
    """One scorable record (outside the probationary period) of a series.

    ``window`` names the anomaly window the record is in (``None`` outside every window). ``tp_value`` is
    the record's unweighted worth as a detection inside its window (``S(x) / S(-1)``), ``fp_value`` its
    unweighted cost as a detection outside (``S(d / (w' - 1))``, negative); only one of them applies.
    """

    anomaly_score: float
    window: str | None
    tp_value: float
    fp_value: float


def window_indices(
    timestamps: Sequence[datetime], windows: Iterable[tuple[datetime, datetime]], name: str = ""
) -> list[tuple[int, int]]:
    """The windows as (first, last) record indices, checked the way NAB checks its label files.

    Every window bound must be a timestamp of the series, windows must be ordered and must not overlap.
    """
    index: dict[datetime, int] = {}
    for i, t in enumerate(timestamps):
        index.setdefault(t, i)
    result: list[tuple[int, int]] = []
    for start, end in windows:
        if start not in index or end not in index:
            raise ValueError(f"{name}: window [{start}, {end}]: a bound is not a timestamp of the series")
        first, last = index[start], index[end]
        if last < first:
            raise ValueError(f"{name}: window [{start}, {end}] ends before it starts")
        if result and first <= result[-1][1]:
            raise ValueError(f"{name}: window [{start}, {end}] overlaps or precedes the one before it")
        result.append((first, last))
    return result


def points(
    n_records: int,
    anomaly_scores: Sequence[float],
    windows: Sequence[tuple[int, int]],
    name: str,
    probationary_percent: float = PROBATIONARY_PERCENT,
) -> list[Point]:
    """The scorable records of one series, given its windows as record indices (see :func:`window_indices`).

    ``name`` must be unique in the corpus: windows are told apart by ``name|first-index``.
    """
    if len(anomaly_scores) != n_records:
        raise ValueError(f"{name}: {len(anomaly_scores)} anomaly scores for {n_records} records")
    probation = probationary_length(n_records, probationary_percent)
    result: list[Point] = []
    pending = list(windows)
    current: tuple[int, int] | None = None
    current_name: str | None = None
    previous: tuple[int, int] | None = None
    for i in range(n_records):
        if current is None and pending and pending[0][0] == i:
            current = pending.pop(0)
            current_name = f"{name}|{current[0]}"
        tp_value = 0.0
        fp_value = 0.0
        if current is not None:
            first, last = current
            width = float(last - first + 1)
            tp_value = scaled_sigmoid(-(last - i + 1) / width) / MAX_TP
        elif previous is None:
            fp_value = -1.0
        else:
            previous_width = float(previous[1] - previous[0] + 1)
            # NAB divides by (width - 1): a one-record window makes that zero; treat it as "far away".
            if previous_width > 1.0:
                fp_value = scaled_sigmoid(abs(previous[1] - i) / (previous_width - 1.0))
            else:
                fp_value = -1.0
        if i >= probation:
            result.append(Point(float(anomaly_scores[i]), current_name, tp_value, fp_value))
        if current is not None and i == current[1]:
            previous = current
            current = None
            current_name = None
    return result


@dataclass(frozen=True)
class ThresholdScore:
    """The raw score when every record with an anomaly score ``>= threshold`` is a detection.

    The counts are records, as NAB counts them (a window of 40 records detected at its 3rd record
    and after gives tp=38); ``windows_detected`` and ``windows`` count windows (those with records after
    the probationary period).
    """

    threshold: float
    score: float
    tp: int
    tn: int
    fp: int
    fn: int
    windows_detected: int
    windows: int


def sweep(scorable: Iterable[Point], costs: CostMatrix) -> list[ThresholdScore]:
    """The raw score at every distinct anomaly score of ``scorable`` (plus 1.1: nothing detected).

    Points of several series may be mixed (that is how the threshold is optimised over a corpus).
    """
    ordered = sorted(scorable, key=lambda p: p.anomaly_score, reverse=True)
    parts: dict[str, float] = {}
    for p in ordered:
        if p.window is not None:
            parts[p.window] = -costs.fn_weight
    total = -costs.fn_weight * len(parts)
    tn = sum(1 for p in ordered if p.window is None)
    fn = len(ordered) - tn
    tp = fp = 0
    detected: set[str] = set()
    result: list[ThresholdScore] = []
    threshold = _START_ABOVE
    for p in ordered:
        if p.anomaly_score != threshold:
            result.append(ThresholdScore(threshold, total, tp, tn, fp, fn, len(detected), len(parts)))
            threshold = p.anomaly_score
        if p.window is None:
            fp += 1
            tn -= 1
            total += p.fp_value * costs.fp_weight
        else:
            tp += 1
            fn -= 1
            detected.add(p.window)
            worth = p.tp_value * costs.tp_weight
            if worth > parts[p.window]:
                total += worth - parts[p.window]
                parts[p.window] = worth
    result.append(ThresholdScore(threshold, total, tp, tn, fp, fn, len(detected), len(parts)))
    return result


def best_threshold(scores: Sequence[ThresholdScore]) -> ThresholdScore:
    """The sweep row of the highest score; among equal scores the highest threshold (as NAB's sort keeps)."""
    best = scores[0]
    for row in scores[1:]:
        if row.score > best.score:
            best = row
    return best


def score_at(scorable: Iterable[Point], costs: CostMatrix, threshold: float) -> ThresholdScore:
    """The raw score of ``scorable`` with a given threshold (detection: anomaly score ``>= threshold``)."""
    rows = sweep(scorable, costs)
    chosen = rows[0]
    for row in rows:
        if row.threshold < threshold:
            break
        chosen = row
    return chosen


def normalise(raw: float, null_raw: float, perfect: float) -> float:
    """NAB's normalised score: 0 for the null detector, 100 for the perfect one."""
    return 100.0 * (raw - null_raw) / (perfect - null_raw)


@dataclass(frozen=True)
class SeriesScores:
    """A detector's output on one labelled series: ``windows`` as record indices."""

    name: str
    anomaly_scores: Sequence[float]
    windows: Sequence[tuple[int, int]]


@dataclass(frozen=True)
class ProfileResult:
    """A detector's result on a corpus for one profile, at the threshold optimised for it."""

    profile: str
    best: ThresholdScore
    null_raw: float
    perfect: float

    @property
    def normalised(self) -> float:
        return normalise(self.best.score, self.null_raw, self.perfect)


def score_corpus(
    series: Sequence[SeriesScores],
    profiles: Mapping[str, Profile],
    probationary_percent: float = PROBATIONARY_PERCENT,
) -> dict[str, ProfileResult]:
    """Optimise the threshold per profile over the corpus and normalise, as NAB's runner does."""
    scorable: list[Point] = []
    null_points: list[Point] = []
    window_count = 0
    for s in series:
        n = len(s.anomaly_scores)
        scorable.extend(points(n, s.anomaly_scores, s.windows, s.name, probationary_percent))
        null_points.extend(points(n, [NULL_SCORE] * n, s.windows, s.name, probationary_percent))
        window_count += len(s.windows)
    results = {}
    for name, profile in profiles.items():
        best = best_threshold(sweep(scorable, profile.costs))
        null_raw = best_threshold(sweep(null_points, profile.costs)).score
        perfect = window_count * profile.costs.tp_weight
        results[name] = ProfileResult(name, best, null_raw, perfect)
    return results
