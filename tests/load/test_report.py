"""Unit tests of the report's arithmetic (pure logic)."""

from __future__ import annotations

import argparse

import pytest

from services.cli.load import (
    GroupLag,
    Recorder,
    SchedulerStats,
    build_report,
    classify,
    parse_duration,
    percentile,
    render_report,
)


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50.0, 90.0, 99.0)
    assert percentile(values, 100) == 100.0 and percentile(values, 0) == 1.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_classify() -> None:
    assert classify(201, (201,), (403,)) == "ok"
    assert classify(403, (201,), (403,)) == "expected"
    assert classify(429, (201,), ()) == "rate_limited"
    assert classify(404, (201,), (403,)) == "error"
    assert classify(503, (201,), (403,)) == "error"
    assert classify(None, (201,), ()) == "error"


def test_durations() -> None:
    assert parse_duration("90") == 90.0 and parse_duration("90s") == 90.0
    assert parse_duration("1.5m") == 90.0 and parse_duration("2h") == 7200.0
    assert parse_duration("250ms") == 0.25
    for bad in ("soon", "-3s", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_report_counts_rates_and_percentiles() -> None:
    rec = Recorder()
    # 10 heartbeats of 10..100 ms, 3 expected refusals, one 429, a 503 and a request without answer
    for i in range(1, 11):
        rec.record("POST /hb", 0.0, i / 100, 202, "ok", "202")
    for _ in range(3):
        rec.record(
            "POST /v1/accounts", 0.0, 0.005, 422, "expected", "422 invalid (bad input: short password)"
        )
    rec.record("POST /v1/auth/login", 0.0, 0.3, 429, "rate_limited", "429 rate_limited")
    rec.record("GET /v1/catalog/titles", 0.0, 2.0, 503, "error", "503 upstream_unavailable (catalog)")
    rec.record("GET /v1/catalog/titles", 0.0, 30.0, None, "error", "ServerTimeoutError")
    rec.skip("subscribe: billing unavailable")
    stats = SchedulerStats()
    stats.overflow.update({"play": 2})
    stats.send_delays.extend([0.001, 0.002, 0.010])
    lag = [GroupLag("history", "playback.events", 7, 93, 100, 1, "STABLE")]
    report = build_report(
        asked_rate=4.0, duration=5.0, planned=21, recorder=rec, stats=stats, arrivals_sent=18,
        cancelled_at_end=1, lag=lag,
    )  # fmt: skip
    assert report["actions"] == {
        "planned": 21,
        "sent": 18,
        "achieved_rate": 3.6,
        "skipped": {"subscribe: billing unavailable": 1},
    }
    r = report["requests"]
    assert (r["total"], r["rate"], r["ok"], r["expected_4xx"], r["rate_limited"]) == (16, 3.2, 10, 3, 1)
    assert (r["unexpected_errors"], r["unexpected_5xx"], r["no_answer"]) == (3, 1, 1)  # + 1 cancelled
    assert r["error_rate"] == round(3 / 16, 5)
    assert report["overflow"] == {"total": 2, "by_kind": {"play": 2}}
    assert report["generator_lateness_ms"] == {"p50": 2.0, "p99": 10.0, "max": 10.0}
    assert report["by_status"] == {"202": 10, "422": 3, "429": 1, "503": 1, "none": 1}
    assert report["expected"] == {"422 invalid (bad input: short password)": 3}
    assert report["errors"] == {"503 upstream_unavailable (catalog)": 1, "ServerTimeoutError": 1}
    hb = report["endpoints"]["POST /hb"]
    assert (hb["count"], hb["p50_ms"], hb["p90_ms"], hb["p99_ms"], hb["max_ms"]) == (
        10,
        50.0,
        90.0,
        100.0,
        100.0,
    )
    assert report["endpoints"]["GET /v1/catalog/titles"]["by_outcome"] == {"error": 2}
    assert report["consumer_lag"] == [
        {"group": "history", "topic": "playback.events", "lag": 7, "committed": 93, "end": 100,
         "members": 1, "state": "STABLE"}
    ]  # fmt: skip
    text = render_report(report)
    assert "18 sent of 21 planned, 3.60/s achieved vs 4/s asked" in text
    assert "unexpected errors 3 (18.75%; 5xx 1, no answer 1)" in text
    assert "history" in text and "playback.events" in text
