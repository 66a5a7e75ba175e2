"""A NAB corpus on disk, and running a streaming detector over it.

The layout is NAB's own (the full benchmark or a subset of it):

- ``data/<category>/<series>.csv``: a ``timestamp,value`` header, then one record a line;
- ``combined_windows.json``: ``{"<category>/<series>.csv": [[start, end], ...]}``; the series scored are
  exactly the ones named there (NAB warns about and skips data files without labels);
- ``profiles.json``: the application profiles (see :func:`scoring.load_profiles`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from services.anomaly_detector import scoring


class StreamingDetector(Protocol):
    def update(self, timestamp: datetime, value: float) -> float: ...


DetectorFactory = Callable[[], StreamingDetector]


@dataclass(frozen=True)
class Series:
    name: str  # "<category>/<series>.csv", as in the label files
    timestamps: list[datetime]
    values: list[float]
    windows: list[tuple[int, int]]  # record indices, first and last inclusive


@dataclass(frozen=True)
class Corpus:
    root: Path
    series: list[Series]
    profiles: dict[str, scoring.Profile]
    unlabelled: list[str]  # data files with no entry in combined_windows.json (not scored)

    @property
    def records(self) -> int:
        return sum(len(s.values) for s in self.series)

    @property
    def window_count(self) -> int:
        return sum(len(s.windows) for s in self.series)


def parse_timestamp(text: str) -> datetime:
    """NAB's timestamps: ``YYYY-MM-DD HH:MM:SS`` in the data, with ``.ffffff`` in the label files."""
    return datetime.fromisoformat(text.strip())


def read_series_csv(path: Path) -> tuple[list[datetime], list[float]]:
    timestamps: list[datetime] = []
    values: list[float] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
            raise ValueError(f"{path}: expected a 'timestamp,value' header, got {header}")
        for row in reader:
            if not row:
                continue
            timestamps.append(parse_timestamp(row[0]))
            values.append(float(row[1]))
    return timestamps, values


def load_corpus(root: Path) -> Corpus:
    """Read a NAB-layout corpus; raises ``ValueError`` when the labels and the data disagree."""
    data_dir = root / "data"
    windows_path = root / "combined_windows.json"
    profiles_path = root / "profiles.json"
    for needed in (data_dir, windows_path, profiles_path):
        if not needed.exists():
            raise ValueError(f"{root} is not a NAB corpus: {needed.name} is missing")
    labelled: dict[str, list[list[str]]] = json.loads(windows_path.read_text())
    present = {p.relative_to(data_dir).as_posix() for p in data_dir.glob("*/*.csv")}
    missing = sorted(set(labelled) - present)
    if missing:
        raise ValueError(f"labelled series without a data file: {', '.join(missing)}")
    series = []
    for name in sorted(labelled):
        timestamps, values = read_series_csv(data_dir / name)
        bounds = [(parse_timestamp(a), parse_timestamp(b)) for a, b in labelled[name]]
        series.append(Series(name, timestamps, values, scoring.window_indices(timestamps, bounds, name)))
    return Corpus(root, series, scoring.load_profiles(profiles_path), sorted(present - set(labelled)))


def run_series(factory: DetectorFactory, series: Series) -> list[float]:
    """One fresh detector, fed the series record by record; its anomaly scores (checked in [0, 1])."""
    detector = factory()
    scores = [detector.update(t, v) for t, v in zip(series.timestamps, series.values, strict=True)]
    for i, score in enumerate(scores):
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"{series.name}: anomaly score {score} of record {i} is not in [0, 1]")
    return scores


def _run_one(job: tuple[DetectorFactory, Series]) -> list[float]:
    return run_series(*job)


def run_corpus(
    factory: DetectorFactory, series: Sequence[Series], workers: int = 1
) -> list[scoring.SeriesScores]:
    """Run a detector over every series (in ``workers`` processes when > 1; the results do not depend
    on it), ready for :func:`scoring.score_corpus`. ``factory`` must be picklable when ``workers > 1``."""
    jobs = [(factory, s) for s in series]
    outputs: Iterable[list[float]]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            outputs = list(pool.map(_run_one, jobs, chunksize=1))
    else:
        outputs = [_run_one(job) for job in jobs]
    return [
        scoring.SeriesScores(s.name, scores, s.windows) for s, scores in zip(series, outputs, strict=True)
    ]
