"""``reelbus eval anomaly --corpus DIR``: the anomaly detector on a Numenta Anomaly Benchmark corpus.

Runs the streaming detector of ``services.anomaly_detector`` over every labelled series of a NAB-layout
corpus (the full benchmark or a subset), next to NAB's windowed Gaussian baseline and its null detector,
scores all three with NAB's rules (threshold optimised per profile over the corpus, normalised so that
the null detector scores 0 and a perfect one 100) and prints them beside NAB's published scoreboard.
The published figures are for the whole NAB corpus (58 series): on a subset they are a reference, not a
like-for-like comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.anomaly_detector import scoring
from services.anomaly_detector.baselines import NullDetector, WindowedGaussianDetector
from services.anomaly_detector.corpus import Corpus, DetectorFactory, load_corpus, run_corpus
from services.anomaly_detector.detector import Detector

# NAB's published scoreboard: standard profile, whole corpus (58 series, 116 windows).
PUBLISHED_STANDARD: tuple[tuple[str, float], ...] = (
    ("ARTime", 74.9),
    ("Numenta HTM", 70.5),
    ("CAD OSE", 69.9),
    ("earthgecko Skyline", 58.2),
    ("KNN CAD", 58.0),
    ("Relative Entropy", 54.6),
    ("Random Cut Forest", 51.7),
    ("Twitter ADVec", 47.1),
    ("Windowed Gaussian", 39.6),
    ("Etsy Skyline", 35.7),
    ("Random", 11.0),
    ("Null", 0.0),
)
NAB_SERIES = 58
NAB_WINDOWS = 116


@dataclass(frozen=True)
class Candidate:
    key: str
    label: str
    factory: DetectorFactory


CANDIDATES = (
    Candidate("reelbus", "reelbus detector", Detector),
    Candidate("windowed_gaussian", "windowed Gaussian (NAB baseline)", WindowedGaussianDetector),
    Candidate("null", "null (NAB baseline)", NullDetector),
)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def evaluate(corpus: Corpus, profiles: list[str], workers: int) -> dict[str, Any]:
    """Every candidate's results on ``corpus``, as the JSON the command prints."""
    chosen = {name: corpus.profiles[name] for name in profiles}
    detectors: dict[str, Any] = {}
    for candidate in CANDIDATES:
        started = time.monotonic()
        outputs = run_corpus(candidate.factory, corpus.series, workers=workers)
        results = scoring.score_corpus(outputs, chosen)
        seconds = time.monotonic() - started
        _progress(f"{candidate.label}: {seconds:.1f}s")
        detectors[candidate.key] = {
            "label": candidate.label,
            "seconds": round(seconds, 2),
            "profiles": {
                name: {
                    "score": round(r.normalised, 2),
                    "threshold": r.best.threshold,
                    "raw": round(r.best.score, 4),
                    "null_raw": round(r.null_raw, 4),
                    "perfect_raw": r.perfect,
                    "windows_detected": r.best.windows_detected,
                    "windows": r.best.windows,
                    "false_positive_records": r.best.fp,
                }
                for name, r in results.items()
            },
        }
    whole = len(corpus.series) == NAB_SERIES and corpus.window_count == NAB_WINDOWS
    return {
        "corpus": str(corpus.root),
        "series": len(corpus.series),
        "records": corpus.records,
        "windows": corpus.window_count,
        "unlabelled_files_skipped": corpus.unlabelled,
        "detectors": detectors,
        "published": {
            "profile": "standard",
            "scope": f"whole NAB corpus ({NAB_SERIES} series, {NAB_WINDOWS} windows)",
            "comparable": whole,
            "scores": dict(PUBLISHED_STANDARD),
        },
    }


def _print_report(report: dict[str, Any], profiles: list[str]) -> None:
    print(
        f"NAB corpus {report['corpus']}: {report['series']} series, {report['records']:,} records, "
        f"{report['windows']} anomaly windows"
    )
    if report["unlabelled_files_skipped"]:
        print(f"  (data files without labels, not scored: {len(report['unlabelled_files_skipped'])})")
    width = max(len(d["label"]) for d in report["detectors"].values())
    columns = [max(len(p), 7) for p in profiles]
    print()
    print("  ".join([" " * width, *(p.rjust(w) for p, w in zip(profiles, columns, strict=True))]))
    for d in report["detectors"].values():
        cells = [f"{d['profiles'][p]['score']:.2f}".rjust(w) for p, w in zip(profiles, columns, strict=True)]
        print("  ".join([d["label"].ljust(width), *cells]))
    ours = report["detectors"]["reelbus"]["profiles"]
    print()
    print("reelbus detector at the optimised thresholds:")
    for p in profiles:
        r = ours[p]
        print(
            f"  {p}: threshold {r['threshold']:.6f}, {r['windows_detected']}/{r['windows']} windows "
            f"detected, {r['false_positive_records']} false-positive records"
        )
    published = report["published"]
    print()
    if published["comparable"]:
        note = "the same corpus as this run"
    else:
        note = f"NOT this corpus: this run scored {report['series']} series, a subset; reference only"
    print(f"NAB published scoreboard, standard profile, {published['scope']} ({note}):")
    for name, score in published["scores"].items():
        print(f"  {name:<20} {score:5.1f}")


def cmd_anomaly(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        corpus = load_corpus(Path(args.corpus))
    except (OSError, ValueError) as exc:
        print(f"reelbus eval anomaly: {exc}", file=sys.stderr)
        return 1
    if args.profile == "all":
        profiles = list(corpus.profiles)
    elif args.profile in corpus.profiles:
        profiles = [args.profile]
    else:
        known = ", ".join(["all", *corpus.profiles])
        print(f"reelbus eval anomaly: unknown profile {args.profile!r} (known: {known})", file=sys.stderr)
        return 2
    _progress(f"{len(corpus.series)} series, {corpus.records:,} records; running {len(CANDIDATES)} detectors")
    report = evaluate(corpus, profiles, max(1, args.workers))
    report["seconds"] = round(time.monotonic() - started, 2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, profiles)
        print(f"\n({report['seconds']:.1f}s)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluations against benchmarks")
    which = p.add_subparsers(dest="evaluation", required=True)
    a = which.add_parser("anomaly", help="the anomaly detector on a NAB corpus, scored by NAB's rules")
    a.add_argument("--corpus", required=True, help="a NAB-layout folder: data/, combined_windows.json, ...")
    a.add_argument(
        "--profile",
        default="all",
        help="all, or one profile of the corpus' profiles.json (standard, reward_low_FP_rate, ...)",
    )
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="processes (the scores do not depend on it)",
    )
    a.set_defaults(func=cmd_anomaly)

    from services.cli import eval_recommender

    eval_recommender.register(which)
