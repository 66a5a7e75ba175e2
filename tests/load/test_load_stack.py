"""``reelbus load`` against the real stack, started as ``make up`` starts it (the services with
billing's Galera cluster, as tests/e2e does), run as the command a user types: a short run at a low
rate, then the report it wrote is checked."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli import infra, stack
from services.cli.infra import Layout
from services.cli.load import MIX, plan_arrivals
from tests.conftest import REPO, SpawnService, free_port

pytestmark = pytest.mark.infra
NEEDED = ("accounts", "catalog", "playback", "history", "billing", "gateway")
SEED = 7
RATE, DURATION = 4.0, 6.0


@pytest.fixture(scope="module")
def services_up(bus_infra: Layout) -> Iterator[Layout]:
    """The services the load goes through, started by the same code as ``make up``, for this module
    only (as tests/e2e does; billing with its Galera cluster)."""
    names = [*stack.DATABASES, *(s.name for s in stack.SERVICES if s.name in NEEDED and s.exists())]
    result = asyncio.run(infra.up(bus_infra, names, progress=lambda m: print(f"[stack] {m}", flush=True)))
    try:
        yield bus_infra
    finally:
        if result.started:
            infra.down(bus_infra, result.started)


def run_load(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "load", "--rate", str(RATE), "--duration", f"{DURATION}s",
         "--users", "3", "--heartbeat-interval", "1", "--seed", str(SEED), "--json", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


async def test_a_short_run_reports_requests_expected_refusals_no_5xx_and_the_lag(
    services_up: Layout, tmp_path: Path
) -> None:
    plan = plan_arrivals(RATE, DURATION, MIX, SEED)
    assert any(a.kind == "bad" for a in plan) and any(a.kind == "play" for a in plan), "the seed's plan"

    code, report, output = await asyncio.to_thread(run_load, tmp_path, "--max-error-rate", "0")

    assert code == 0, output
    assert report["meta"]["billing"] == "available"
    assert report["actions"]["planned"] == len(plan)
    assert report["actions"]["sent"] == len(plan), "every arrival sent (no overflow at this rate)"
    assert report["overflow"]["total"] == 0
    requests = report["requests"]
    assert requests["total"] >= len(plan)
    assert requests["expected_4xx"] >= sum(1 for a in plan if a.kind == "bad")
    assert all("bad input" in label or "declined" in label or "subscription" in label
               for label in report["expected"]), report["expected"]  # fmt: skip
    assert requests["unexpected_5xx"] == 0 and requests["unexpected_errors"] == 0, report["errors"]
    endpoints = report["endpoints"]
    assert endpoints["POST /v1/playback/sessions"]["by_status"].get("201", 0) >= 1, endpoints
    assert endpoints["POST /v1/playback/sessions/{id}/heartbeats"]["by_status"].get("202", 0) >= 1, endpoints
    stops = [e for name, e in endpoints.items() if name.startswith("POST /v1/playback/sessions/{id}/stop")]
    assert sum(e["by_status"].get("202", 0) for e in stops) >= 1, endpoints
    for e in endpoints.values():
        assert 0 <= e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] <= e["max_ms"]
    lag = {(g["group"], g["topic"]): g for g in report["consumer_lag"]}
    history = lag[("history", "playback.events")]
    assert history["state"] != "ABSENT" and history["lag"] is not None and history["end"] > 0
    assert lag[("playback", "billing.events")]["lag"] is not None
    assert "consumer lag at the end" in output and "achieved vs" in output


async def test_billing_share_is_skipped_when_the_gateway_says_billing_is_unavailable(
    services_up: Layout, tmp_path: Path, spawn_service: SpawnService
) -> None:
    """A gateway of this test's own whose billing upstream does not answer (502 naming billing)."""
    urls = {s.name: s.url for s in stack.SERVICES}
    gateway = spawn_service(
        "services.gateway",
        "GATEWAY_",
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{services_up.redis_port}/0",
        GATEWAY_ACCOUNTS_URL=urls["accounts"],
        GATEWAY_CATALOG_URL=urls["catalog"],
        GATEWAY_PLAYBACK_URL=urls["playback"],
        GATEWAY_HISTORY_URL=urls["history"],
        GATEWAY_BILLING_URL=f"http://127.0.0.1:{free_port()}",
        GATEWAY_HTTP_HOST="127.0.0.1",
    )
    await gateway.wait_ready()

    code, report, output = await asyncio.to_thread(
        run_load, tmp_path, "--gateway", gateway.url, "--no-lag", "--max-error-rate", "0"
    )

    assert code == 0, output
    assert report["meta"]["billing"].startswith("unavailable")
    skipped = report["actions"]["skipped"]
    billing_kinds = {"subscribe", "decline", "billing_account", "cancel"}
    planned_billing = sum(1 for a in plan_arrivals(RATE, DURATION, MIX, SEED) if a.kind in billing_kinds)
    assert sum(n for why, n in skipped.items() if why.endswith("billing unavailable")) == planned_billing
    assert not any(
        e.startswith("POST /v1/billing") or e.startswith("GET /v1/billing") for e in report["endpoints"]
    )
    assert report["requests"]["unexpected_errors"] == 0, report["errors"]
    assert any("billing unavailable" in n for n in report["notes"])
    assert report["consumer_lag"] is None
