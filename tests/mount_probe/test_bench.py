"""``reelbus bench mounts`` end to end on a tiny grid: it runs the real sandbox, prints the table with
the per-layer / common-parent ratio, and writes the PNG and the JSON next to each other. No timing is
asserted (benchmarks report, tests check behaviour)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.cli.main import main

PRIVILEGED = os.geteuid() == 0


def test_bench_mounts_writes_a_table_a_plot_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = ["--layers", "3", "--concurrency", "1,2", "--starts", "2", "--repeat", "1"]
    code = main(["bench", "mounts", *grid, "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    if not PRIVILEGED:
        assert code == 1 and "CAP_SYS_ADMIN" in err
        return
    assert code == 0, err
    pngs, jsons = sorted(tmp_path.glob("mounts-*.png")), sorted(tmp_path.glob("mounts-*.json"))
    assert len(pngs) == len(jsons) == 1 and pngs[0].stem == jsons[0].stem
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(jsons[0].read_text())
    assert {(c["mode"], c["concurrency"]) for c in doc["cells"]} == {
        (m, c) for m in ("per-layer", "common-parent") for c in (1, 2)
    }
    assert {c["ops_per_start"] for c in doc["cells"] if c["mode"] == "per-layer"} == {2 * (1 + 2 * 3)}
    assert {c["ops_per_start"] for c in doc["cells"] if c["mode"] == "common-parent"} == {6}
    assert all(c["starts"] >= 2 and c["start_p50_ms"] > 0 for c in doc["cells"])
    assert [r["ops_per_start"] for r in doc["ratios"]] == [14 / 6, 14 / 6]
    assert doc["machine"]["kernel"] == os.uname().release
    assert "ratio = PL / CP" in out and "id-mapped bind mounts:" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("3 ")]
    assert len(rows) == 2
