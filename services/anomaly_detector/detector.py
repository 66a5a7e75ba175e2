"""A streaming anomaly detector for one univariate time series: ``Detector.update(timestamp, value)``.

One pass, about 1,300 numbers of state for a series sampled every 5 minutes, no knowledge of the
series' length or range in advance, nothing tuned per series. Each record goes through four steps.

1. **Three predictions, three surprises.** The value is compared with

   - *local*: the median of the previous ``local_window`` values (spikes, sudden jumps);
   - *seasonal*: the median of the values one, two, ... ``seasons`` days earlier at the same time of day,
     a day counted in records from the sampling interval seen at the start (a changed daily shape, a
     missing or flattened cycle; off when the interval is too long or too short for a daily cycle);
   - *rarity*: the value's rank among the last ``rarity_window`` values (a move to a level not seen
     lately, even without a sharp edge).

   The surprise of the local and seasonal channels is the absolute prediction error divided by its own
   typical size (an exponentially weighted mean of past absolute errors, half-life ``scale_half_life``
   records): about 1 for an ordinary record, whatever the units of the series. The rarity surprise is
   ``-ln(2p)``, ``p`` the share of recent values at least as far out on the same side.

2. **Anomaly likelihood** (Numenta's idea, Ahmad et al. 2017): per channel, the mean surprise of the last
   ``average_window`` records is compared with the long-term distribution of that mean (exponentially
   weighted mean and variance, half-life ``history_half_life`` records): its Gaussian tail probability is
   the likelihood that the recent records are as ordinary as the earlier ones. A series that is always
   noisy raises no alarm for being noisy; a quiet one that turns noisy does. The smallest likelihood of
   the three channels is the record's.

3. **One alarm per incident.** When the likelihood drops below ``red_likelihood`` the detector fires, then
   holds its likelihood at ``100 * red_likelihood`` or above for ``refractory`` records, and never fires on
   two records in a row (the filter of Numenta's likelihood): an incident is reported when it starts, not
   for as long as it lasts.

4. **Out of range.** A value beyond everything seen so far, by more than ``range_tolerance`` of that range
   and more than ``range_errors`` typical local errors, is an anomaly outright (score 1), as in
   Numenta's NAB detector.

The score is ``-log10(likelihood) / score_decades`` capped at 1 (0.5 for a likelihood of 1e-10 with the
defaults); the first ``warm_up`` records score 0. No randomness: the same records give the same scores.

State: :meth:`Detector.to_dict` gives plain JSON-able data and :meth:`Detector.from_dict` a detector that
continues exactly where the first one stopped. Its size is ``O(seasons * records a day + rarity_window)``
numbers.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any

STATE_VERSION = 1
_SECONDS_PER_DAY = 86400.0
_MAX_SURPRISE = 20.0
_TINY = 1e-300
_MIN_RANKED = 50  # values the rarity channel needs before it ranks anything


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's parameters, in records unless stated; the defaults are for any series."""

    local_window: int = 5
    seasons: int = 3
    rarity_window: int = 400
    scale_half_life: float = 500.0
    average_window: int = 10
    history_half_life: float = 2000.0
    min_std: float = 0.05
    red_likelihood: float = 1e-6
    refractory: int = 200
    range_tolerance: float = 0.05
    range_errors: float = 1.0
    """Out of range: beyond the range seen by ``range_tolerance`` of it and by ``range_errors`` typical local
    prediction errors (so that a Gaussian noise's slowly growing extremes are not anomalies)."""
    warm_up: int = 150
    score_decades: float = 20.0
    period_samples: int = 20
    """Sampling intervals looked at, at the start, to find how many records make a day."""
    min_period: int = 4
    max_period: int = 2000
    """A day of fewer or more records than these: no seasonal channel."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name not in {"refractory", "warm_up", "range_errors"}):
                raise ValueError(f"DetectorConfig.{f.name} must be positive, got {value}")
        if self.red_likelihood >= 1.0:
            raise ValueError("DetectorConfig.red_likelihood must be below 1")


def _gaussian_tail(x: float, mean: float, std: float) -> float:
    """P(X >= x) for X ~ N(mean, std)."""
    return 0.5 * math.erfc((x - mean) / (std * math.sqrt(2.0)))


class _Channel:
    """A prediction error's typical size, and the likelihood of its recent average (steps 1 and 2)."""

    def __init__(self, config: DetectorConfig, scaled: bool) -> None:
        self.scaled = scaled  # False: the surprise is given directly (the rarity channel)
        self.scale_rate = math.log(2.0) / config.scale_half_life
        self.history_rate = math.log(2.0) / config.history_half_life
        self.min_std = config.min_std
        self.warm_up = config.warm_up
        self.scale: float | None = None
        self.scale_count = 0
        self.recent: deque[float] = deque(maxlen=config.average_window)
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def surprise(self, error: float) -> float | None:
        """The surprise of an absolute prediction error, and the scale learns from it."""
        if self.scale is None:
            self.scale = error
            self.scale_count = 1
            return None
        if self.scale > 0.0:
            surprise = min(error / self.scale, _MAX_SURPRISE)
        else:
            surprise = 0.0 if error == 0.0 else _MAX_SURPRISE
        self.scale_count += 1
        self.scale += max(self.scale_rate, 1.0 / self.scale_count) * (error - self.scale)
        return surprise

    def likelihood(self, surprise: float) -> float:
        """The likelihood of the recent mean surprise under its long-term distribution, then learn it."""
        self.recent.append(surprise)
        average = math.fsum(self.recent) / len(self.recent)
        self.count += 1
        likelihood = 1.0
        if self.count > self.warm_up:
            std = max(math.sqrt(self.var), self.min_std)
            if average > self.mean:
                likelihood = _gaussian_tail(average, self.mean, std)
        if self.count == 1:
            self.mean = average
        else:
            rate = max(self.history_rate, 1.0 / self.count)
            delta = average - self.mean
            self.mean += rate * delta
            self.var = (1.0 - rate) * (self.var + rate * delta * delta)
        return likelihood

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "scale_count": self.scale_count,
            "recent": list(self.recent),
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.scale = None if state["scale"] is None else float(state["scale"])
        self.scale_count = int(state["scale_count"])
        self.recent.clear()
        self.recent.extend(float(v) for v in state["recent"])
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])


class Detector:
    """Streaming anomaly scores in [0, 1] for one series; see the module's documentation."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        c = self.config
        self.count = 0
        self.low: float | None = None
        self.high: float | None = None
        self.last_timestamp: datetime | None = None
        self.intervals: list[float] = []
        self.period: int | None = None  # records in a day; 0: no seasonal channel; None: not known yet
        self.history: deque[float] = deque()  # the last values the local and seasonal channels need
        self.rarity: deque[float] = deque()  # the last rarity_window values, in arrival order...
        self.rarity_sorted: list[float] = []  # ...and sorted
        self.local = _Channel(c, scaled=True)
        self.seasonal = _Channel(c, scaled=True)
        self.rare = _Channel(c, scaled=False)
        self.previous_red = False
        self.since_alarm: int | None = None

    # -- the predictions ------------------------------------------------------------------------------

    def _learn_period(self, timestamp: datetime) -> None:
        c = self.config
        if self.period is None and self.last_timestamp is not None:
            self.intervals.append((timestamp - self.last_timestamp).total_seconds())
            if len(self.intervals) >= c.period_samples:
                interval = sorted(self.intervals)[len(self.intervals) // 2]
                period = round(_SECONDS_PER_DAY / interval) if interval > 0 else 0
                self.period = period if c.min_period <= period <= c.max_period else 0
                self.intervals = []
        self.last_timestamp = timestamp

    def _local_error(self, value: float) -> float | None:
        k = self.config.local_window
        if len(self.history) < k:
            return None
        window = sorted(self.history[-j] for j in range(1, k + 1))
        return abs(value - window[k // 2])

    def _seasonal_error(self, value: float) -> float | None:
        period, seasons = self.period, self.config.seasons
        if not period or len(self.history) < period * seasons:
            return None
        same_phase = sorted(self.history[-period * j] for j in range(1, seasons + 1))
        return abs(value - same_phase[seasons // 2])

    def _rarity_surprise(self, value: float) -> float | None:
        ordered = self.rarity_sorted
        m = len(ordered)
        if m < min(_MIN_RANKED, self.config.rarity_window):
            return None
        below = bisect.bisect_left(ordered, value)
        above = m - bisect.bisect_right(ordered, value)
        p = (min(below, above) + 0.5) / (m + 1)
        return -math.log(2.0 * p) if p < 0.5 else 0.0

    def _remember(self, value: float) -> None:
        c = self.config
        self.history.append(value)
        keep = max(c.local_window, (self.period or 0) * c.seasons)
        while len(self.history) > keep:
            self.history.popleft()
        self.rarity.append(value)
        bisect.insort(self.rarity_sorted, value)
        if len(self.rarity) > c.rarity_window:
            old = self.rarity.popleft()
            del self.rarity_sorted[bisect.bisect_left(self.rarity_sorted, old)]

    # -- the score ------------------------------------------------------------------------------------

    def update(self, timestamp: datetime, value: float) -> float:
        """Take the next record of the series; its anomaly score in [0, 1] (higher: more anomalous).

        Records must come in time order. A non-finite value scores 0 and leaves the state unchanged.
        """
        if not math.isfinite(value):
            return 0.0
        c = self.config
        self.count += 1
        self._learn_period(timestamp)

        likelihood = 1.0
        for channel, error in (
            (self.local, self._local_error(value)),
            (self.seasonal, self._seasonal_error(value)),
            (self.rare, self._rarity_surprise(value)),
        ):
            if error is None:
                continue
            surprise = channel.surprise(error) if channel.scaled else error
            if surprise is not None:
                likelihood = min(likelihood, channel.likelihood(surprise))

        red = likelihood <= c.red_likelihood
        if red and self.previous_red:
            likelihood = max(likelihood, c.red_likelihood * 100.0)
        self.previous_red = red
        if self.since_alarm is not None:
            self.since_alarm = min(self.since_alarm + 1, c.refractory + 1)
            if self.since_alarm <= c.refractory:
                likelihood = max(likelihood, c.red_likelihood * 100.0)
        if red and (self.since_alarm is None or self.since_alarm > c.refractory):
            self.since_alarm = 0
        score = min(1.0, -math.log10(max(likelihood, _TINY)) / c.score_decades)

        if self.low is not None and self.high is not None and self.high > self.low:
            margin = max(
                (self.high - self.low) * c.range_tolerance, c.range_errors * (self.local.scale or 0.0)
            )
            if (value > self.high + margin or value < self.low - margin) and self.count > c.warm_up:
                score = 1.0
        self.low = value if self.low is None else min(self.low, value)
        self.high = value if self.high is None else max(self.high, value)

        self._remember(value)
        if self.count <= c.warm_up:
            return 0.0
        return max(score, 0.0)

    # -- state ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-able data (numbers, strings, lists, dicts)."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "count": self.count,
            "low": self.low,
            "high": self.high,
            "last_timestamp": None if self.last_timestamp is None else self.last_timestamp.isoformat(),
            "intervals": list(self.intervals),
            "period": self.period,
            "history": list(self.history),
            "rarity": list(self.rarity),
            "channels": {
                "local": self.local.to_dict(),
                "seasonal": self.seasonal.to_dict(),
                "rarity": self.rare.to_dict(),
            },
            "previous_red": self.previous_red,
            "since_alarm": self.since_alarm,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Detector:
        """A detector continuing from :meth:`to_dict`'s output."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported detector state version {state.get('version')!r}")
        detector = cls(DetectorConfig(**state["config"]))
        detector.count = int(state["count"])
        detector.low = None if state["low"] is None else float(state["low"])
        detector.high = None if state["high"] is None else float(state["high"])
        last = state["last_timestamp"]
        detector.last_timestamp = None if last is None else datetime.fromisoformat(last)
        detector.intervals = [float(v) for v in state["intervals"]]
        detector.period = None if state["period"] is None else int(state["period"])
        detector.history.extend(float(v) for v in state["history"])
        detector.rarity.extend(float(v) for v in state["rarity"])
        detector.rarity_sorted = sorted(detector.rarity)
        channels = state["channels"]
        detector.local.load(channels["local"])
        detector.seasonal.load(channels["seasonal"])
        detector.rare.load(channels["rarity"])
        detector.previous_red = bool(state["previous_red"])
        since = state["since_alarm"]
        detector.since_alarm = None if since is None else int(since)
        return detector
