"""``reelbus abr simulate`` over the synthetic traces."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.abr.simulator import SYNTHETIC_TRACES
from services.cli import abr


def main(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="reelbus")
    abr.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


def test_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main("abr", "simulate", "--traces", str(SYNTHETIC_TRACES)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "algorithm",
        "traces",
        "QoE/session",
        "QoE/chunk",
        "bitrate",
        "kbps",
        "rebuffer",
        "%",
        "switches/min",
        "startup",
        "s",
    ]
    assert [line.split()[0] for line in lines[1:4]] == ["bba", "bola", "robustmpc"]
    assert all(line.split()[1] == "3" for line in lines[1:4])
    assert any("3 trace files" in line and "9 sessions" in line for line in lines)


def test_json_with_chosen_algorithms_and_chunks(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--algorithms", "robustmpc,bba-index", "--chunks", "12", "--json"]
    code = main("abr", "simulate", "--traces", str(SYNTHETIC_TRACES), *args)
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace_files"] == 3 and out["chunks"] == 12
    assert [a["algorithm"] for a in out["algorithms"]] == ["robustmpc", "bba-index"]
    mpc = out["algorithms"][0]
    assert len(mpc["per_trace"]) == 3
    assert mpc["qoe_per_chunk"] == pytest.approx(mpc["qoe_per_session"] / 12)


def test_an_unknown_algorithm_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main("abr", "simulate", "--traces", str(SYNTHETIC_TRACES), "--algorithms", "bba,pensieve")
    assert exit_.value.code == 2
    assert "unknown algorithm 'pensieve'" in capsys.readouterr().err


def test_a_folder_without_traces_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main("abr", "simulate", "--traces", str(tmp_path)) == 1
    assert "no trace files" in capsys.readouterr().err
