"""Reference detectors for comparison: NAB's null detector and its windowed Gaussian.

Both follow NAB's definitions (``nab/detectors/null``, ``nab/detectors/gaussian``), in plain Python.
"""

from __future__ import annotations

import math
from datetime import datetime

from services.anomaly_detector.scoring import NULL_SCORE


class NullDetector:
    """NAB's null detector: the same score for every record (it normalises to 0)."""

    def update(self, timestamp: datetime, value: float) -> float:
        return NULL_SCORE


def _gaussian_tail(x: float, mean: float, std: float) -> float:
    """P(X > x) for X ~ N(mean, std), reflected below the mean (the probability of something as extreme)."""
    if x < mean:
        x = 2.0 * mean - x
    return 0.5 * math.erfc((x - mean) / std / math.sqrt(2.0))


class WindowedGaussianDetector:
    """NAB's windowed Gaussian: ``1 - tail probability`` of the value under a normal fitted to a window.

    The window grows to ``window`` values, then slides ``step`` values at a time (NAB: 6400 and 100);
    the mean and standard deviation are refitted whenever the window changes.
    """

    def __init__(self, window: int = 6400, step: int = 100) -> None:
        self.window_size = window
        self.step = step
        self.window: list[float] = []
        self.buffer: list[float] = []
        self.mean = 0.0
        self.std = 1.0
        # Running sums while the window grows (refitting from scratch at every record would be quadratic).
        self._sum = 0.0
        self._sum_sq = 0.0

    def update(self, timestamp: datetime, value: float) -> float:
        score = 0.0
        if self.window:
            score = 1.0 - _gaussian_tail(value, self.mean, self.std)
        if len(self.window) < self.window_size:
            self.window.append(value)
            self._sum += value
            self._sum_sq += value * value
            n = len(self.window)
            self._fit(self._sum / n, max(self._sum_sq / n - (self._sum / n) ** 2, 0.0))
        else:
            self.buffer.append(value)
            if len(self.buffer) == self.step:
                self.window = self.window[self.step :] + self.buffer
                self.buffer = []
                n = len(self.window)
                mean = math.fsum(self.window) / n
                self._fit(mean, math.fsum((v - mean) ** 2 for v in self.window) / n)
        return min(max(score, 0.0), 1.0)

    def _fit(self, mean: float, variance: float) -> None:
        self.mean = mean
        self.std = math.sqrt(variance)
        if self.std == 0.0:
            self.std = 0.000001
