"""``reelbus eval anomaly`` on a tiny corpus in NAB's layout, built in a temporary folder."""

from __future__ import annotations

import argparse
import json
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from services.anomaly_detector.corpus import load_corpus
from services.cli import evaluate

PROFILES = {
    "standard": {"CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.11, "tnWeight": 1.0}},
    "reward_low_FP_rate": {
        "CostMatrix": {"tpWeight": 1.0, "fnWeight": 1.0, "fpWeight": 0.22, "tnWeight": 1.0}
    },
    "reward_low_FN_rate": {
        "CostMatrix": {"tpWeight": 1.0, "fnWeight": 2.0, "fpWeight": 0.11, "tnWeight": 1.0}
    },
}
T0 = datetime(2014, 4, 1)


def stamp(i: int, fraction: bool = False) -> str:
    text = (T0 + timedelta(minutes=5 * i)).strftime("%Y-%m-%d %H:%M:%S")
    return text + ".000000" if fraction else text


def write_series(path: Path, values: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["timestamp,value"] + [f"{stamp(i)},{v}" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(3)
    spiky = [10.0 + rng.gauss(0.0, 1.0) for _ in range(1200)]
    spiky[900] = 40.0
    write_series(tmp_path / "data" / "catA" / "spike.csv", spiky)
    write_series(tmp_path / "data" / "catA" / "quiet.csv", [5.0 + rng.gauss(0.0, 1.0) for _ in range(1200)])
    write_series(tmp_path / "data" / "catB" / "unlabelled.csv", [1.0] * 10)
    windows = {"catA/spike.csv": [[stamp(850, True), stamp(949, True)]], "catA/quiet.csv": []}
    (tmp_path / "combined_windows.json").write_text(json.dumps(windows))
    (tmp_path / "profiles.json").write_text(json.dumps(PROFILES))
    return tmp_path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="reelbus")
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate.register(sub)
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_the_corpus_is_read_in_nabs_layout(corpus: Path) -> None:
    loaded = load_corpus(corpus)
    assert [s.name for s in loaded.series] == ["catA/quiet.csv", "catA/spike.csv"]
    assert loaded.series[1].windows == [(850, 949)]
    assert loaded.unlabelled == ["catB/unlabelled.csv"]
    assert (loaded.records, loaded.window_count) == (2400, 1)


def test_json_report(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("eval", "anomaly", "--corpus", str(corpus), "--json", "--workers", "1") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["series"], report["windows"]) == (2, 1)
    assert report["published"]["comparable"] is False
    assert report["published"]["scores"]["ARTime"] == 74.9
    for profile in PROFILES:
        assert report["detectors"]["null"]["profiles"][profile]["score"] == 0.0
        ours = report["detectors"]["reelbus"]["profiles"][profile]
        assert ours["windows_detected"] == 1
        assert ours["score"] > 80.0


def test_text_report_for_one_profile(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("eval", "anomaly", "--corpus", str(corpus), "--profile", "standard", "--workers", "1") == 0
    out = capsys.readouterr().out
    assert "reelbus detector" in out and "windowed Gaussian" in out
    assert "reward_low_FP_rate" not in out
    assert "NOT this corpus" in out and "earthgecko Skyline" in out


def test_bad_arguments(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("eval", "anomaly", "--corpus", str(corpus), "--profile", "nope", "--workers", "1") == 2
    assert run_cli("eval", "anomaly", "--corpus", str(tmp_path / "missing")) == 1
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and "not a NAB corpus" in err


def test_labels_must_match_the_data(corpus: Path) -> None:
    windows = json.loads((corpus / "combined_windows.json").read_text())
    windows["catA/spike.csv"] = [[stamp(850, True), "2030-01-01 00:00:00.000000"]]
    (corpus / "combined_windows.json").write_text(json.dumps(windows))
    with pytest.raises(ValueError, match="not a timestamp"):
        load_corpus(corpus)
    windows["catC/absent.csv"] = []
    (corpus / "combined_windows.json").write_text(json.dumps(windows))
    with pytest.raises(ValueError, match="without a data file"):
        load_corpus(corpus)
