"""The pure parts of ``reelbus bench billing``: the single server's options, results, ratios, table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.cli.bench_billing import (
    BillingBench,
    Budget,
    TargetResult,
    add_arguments,
    database_name,
    mariadb_config,
    render_table,
)

MACHINE = {
    "nproc": 2,
    "cpu_model": "Test CPU",
    "memory_gib": 4.0,
    "os": "Linux 6",
    "python": "3.11.7",
    "date": "2026-01-01T00:00:00+00:00",
}
SETTINGS = {
    "concurrency": 16,
    "duration_s": 15.0,
    "warmup_s": 2.0,
    "max_charges": 1000,
    "mariadb": "MariaDB 10.11",
}


def target(label: str, latencies_ms: list[float], seconds: float, **errors: int) -> TargetResult:
    result = TargetResult(label, "127.0.0.1:1", seconds, [ms / 1000 for ms in latencies_ms])
    result.errors.update(errors)
    return result


def test_config_has_no_binlog_no_wsrep_and_the_galera_innodb_settings() -> None:
    text = mariadb_config(
        datadir=Path("/d"), socket_path=Path("/r/s.sock"), pid_file=Path("/r/p.pid"), port=3399
    )
    lines = {line.strip() for line in text.splitlines()}
    assert {"port = 3399", "datadir = /d", "socket = /r/s.sock", "bind_address = 127.0.0.1"} <= lines
    assert {"skip_log_bin", "innodb_flush_log_at_trx_commit = 2", "innodb_buffer_pool_size = 64M"} <= lines
    assert not any(line.startswith(("wsrep", "log_bin")) for line in lines)


def test_config_matches_the_galera_template_innodb_lines() -> None:
    template = Path(__file__).parents[2] / "deploy/native/galera/galera-node.cnf"
    innodb = {line.strip() for line in template.read_text().splitlines() if line.startswith("innodb_")}
    text = mariadb_config(datadir=Path("/d"), socket_path=Path("/s"), pid_file=Path("/p"), port=1)
    assert innodb and innodb <= {line.strip() for line in text.splitlines()}


def test_database_name() -> None:
    assert database_name("ab12") == "bench_billing_ab12"
    with pytest.raises(ValueError):
        database_name("x; DROP DATABASE y")


def test_budget_bounds_the_count() -> None:
    budget = Budget(2)
    assert [budget.take() for _ in range(4)] == [True, True, False, False]


def test_target_result_rates_and_quantiles() -> None:
    r = target("galera", [10.0, 20.0, 30.0, 40.0], seconds=2.0, OperationalError=1, **{"504": 2})
    assert r.charges == 4
    assert r.per_s == 2.0
    assert r.error_count == 3
    p50, p99 = r.quantiles_ms()
    assert p50 == pytest.approx(25.0)
    assert p99 == pytest.approx(39.7)
    assert r.as_dict()["errors_by_kind"] == {"OperationalError": 1, "504": 2}


def test_empty_target_has_no_quantiles_and_no_rate() -> None:
    r = target("single", [], seconds=0.0)
    assert r.per_s == 0.0
    assert r.quantiles_ms() == (None, None)


def test_ratios_are_galera_over_single() -> None:
    bench = BillingBench(
        MACHINE, SETTINGS, target("galera", [20.0, 40.0], 1.0), target("single", [10.0, 10.0], 0.5)
    )
    ratios = bench.ratios()
    assert ratios["charges_per_s"] == pytest.approx(0.5)
    assert ratios["p50"] == pytest.approx(3.0)
    empty = BillingBench(MACHINE, SETTINGS, target("galera", [1.0], 1.0), target("single", [], 1.0))
    assert empty.ratios() == {"charges_per_s": None, "p50": None, "p99": None}


def test_table_and_json() -> None:
    bench = BillingBench(
        MACHINE,
        SETTINGS,
        target("galera", [20.0, 40.0], 1.0, OperationalError=1),
        target("single", [10.0, 10.0], 0.5),
        notes=["a note"],
    )
    table = render_table(bench)
    assert "ratio galera/single" in table
    assert "Test CPU" in table and "2026-01-01" in table
    assert "OperationalError: 1" in table and "note: a note" in table
    data = json.loads(json.dumps(bench.as_dict()))
    assert [r["target"] for r in data["results"]] == ["galera", "single"]
    assert data["ratio_galera_over_single"]["charges_per_s"] == 0.5


def test_arguments_defaults_and_bounds() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.concurrency, args.duration, args.warmup, args.json) == (16, 15.0, 2.0, False)
    assert parser.parse_args(["--warmup", "0"]).warmup == 0.0
    for bad in (
        ["--concurrency", "0"],
        ["--concurrency", "1000"],
        ["--duration", "-1"],
        ["--single-port", "70000"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
