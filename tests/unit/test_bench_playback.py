"""The pure parts of ``reelbus bench playback``: percentiles, Prometheus histograms and their differences."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import Histogram as PromHistogram

from services.cli.bench_playback import (
    Budget,
    Histogram,
    LoadResult,
    PlaybackBench,
    WriteLatency,
    add_arguments,
    gauge_total,
    heartbeat_body,
    highest_bound,
    histogram_diff,
    histogram_quantile,
    parse_histogram,
    percentile,
    render_table,
    status_key,
)

INF = math.inf
BUCKETS = (0.01, 0.02, 0.05, 0.1)


def exposition(observations: list[float], other: list[float] | None = None) -> str:
    """/metrics text of a labelled histogram like history's, with a Heartbeat and another series."""
    registry = CollectorRegistry()
    hist = PromHistogram(
        "history_accept_to_write_seconds", "h", ["event_type"], buckets=BUCKETS, registry=registry
    )
    for value in observations:
        hist.labels("Heartbeat").observe(value)
    for value in other or []:
        hist.labels("SessionStopped").observe(value)
    lag = Gauge("reelbus_consumer_lag", "lag", ["group", "topic", "partition"], registry=registry)
    lag.labels("history", "playback.events", "0").set(3)
    lag.labels("history", "playback.events", "1").set(4)
    lag.labels("history", "accounts.profiles", "0").set(100)
    return generate_latest(registry).decode()


# --- percentiles of samples --------------------------------------------------------------------


def test_percentile_interpolates_between_the_closest_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0.0) == 1.0
    assert percentile(values, 1.0) == 4.0
    assert percentile(values, 0.5) == pytest.approx(2.5)
    assert percentile(values, 0.99) == pytest.approx(3.97)


def test_percentile_of_one_sample_and_of_none() -> None:
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_percentile_of_a_hundred_samples() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)


@pytest.mark.parametrize("q", [-0.1, 1.1])
def test_percentile_refuses_a_quantile_outside_0_1(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)


# --- parsing /metrics ----------------------------------------------------------------------------


def test_parse_histogram_takes_the_labelled_series_with_cumulative_buckets() -> None:
    text = exposition([0.005, 0.015, 0.015, 0.07, 3.0], other=[0.001] * 10)
    hist = parse_histogram(text, "history_accept_to_write_seconds", {"event_type": "Heartbeat"})
    assert hist.buckets == ((0.01, 1.0), (0.02, 3.0), (0.05, 3.0), (0.1, 4.0), (INF, 5.0))
    assert hist.count == 5.0
    assert hist.sum == pytest.approx(3.105)


def test_parse_histogram_of_a_series_not_observed_yet_is_empty() -> None:
    text = exposition([], other=[0.001])
    assert parse_histogram(text, "history_accept_to_write_seconds", {"event_type": "Heartbeat"}) == (
        Histogram.empty()
    )
    assert parse_histogram(text, "no_such_metric", {}) == Histogram.empty()


def test_gauge_total_sums_the_matching_series() -> None:
    text = exposition([])
    assert gauge_total(text, "reelbus_consumer_lag", {"group": "history", "topic": "playback.events"}) == 7.0
    assert gauge_total(text, "reelbus_consumer_lag", {"group": "history"}) == 107.0
    assert gauge_total(text, "reelbus_consumer_lag", {"group": "playback"}) is None


# --- differences of histograms ----------------------------------------------------------------


def test_diff_of_two_reads_is_what_was_observed_in_between() -> None:
    name, labels = "history_accept_to_write_seconds", {"event_type": "Heartbeat"}
    before = parse_histogram(exposition([0.005, 0.07]), name, labels)
    after = parse_histogram(exposition([0.005, 0.07, 0.015, 0.03, 0.5]), name, labels)
    diff = histogram_diff(before, after)
    assert diff.buckets == ((0.01, 0.0), (0.02, 1.0), (0.05, 2.0), (0.1, 2.0), (INF, 3.0))
    assert diff.count == 3.0
    assert diff.sum == pytest.approx(0.545)


def test_diff_from_an_empty_read_is_the_second_read() -> None:
    after = Histogram(((0.1, 2.0), (INF, 3.0)), 3.0, 1.0)
    assert histogram_diff(Histogram.empty(), after) == after


def test_diff_refuses_counts_that_went_down() -> None:
    before = Histogram(((0.1, 5.0), (INF, 5.0)), 5.0, 0.2)
    after = Histogram(((0.1, 1.0), (INF, 1.0)), 1.0, 0.01)
    with pytest.raises(ValueError, match="restart"):
        histogram_diff(before, after)


def test_diff_refuses_different_bounds_and_a_vanished_series() -> None:
    before = Histogram(((0.1, 1.0), (INF, 1.0)), 1.0, 0.05)
    with pytest.raises(ValueError, match="bucket bounds"):
        histogram_diff(before, Histogram(((0.2, 1.0), (INF, 1.0)), 1.0, 0.05))
    with pytest.raises(ValueError, match="disappeared"):
        histogram_diff(before, Histogram.empty())


# --- quantiles of histograms --------------------------------------------------------------------


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # 10 in (0, 0.01], 30 in (0.01, 0.02], 60 in (0.02, 0.05]
    hist = Histogram(((0.01, 10.0), (0.02, 40.0), (0.05, 100.0), (INF, 100.0)), 100.0, 3.0)
    assert histogram_quantile(0.05, hist) == pytest.approx(0.005)
    assert histogram_quantile(0.25, hist) == pytest.approx(0.015)
    assert histogram_quantile(0.5, hist) == pytest.approx(0.025)
    assert histogram_quantile(0.99, hist) == pytest.approx(0.0495)
    assert histogram_quantile(1.0, hist) == pytest.approx(0.05)


def test_quantile_skips_empty_buckets() -> None:
    hist = Histogram(((0.01, 0.0), (0.02, 0.0), (0.05, 4.0), (INF, 4.0)), 4.0, 0.1)
    assert histogram_quantile(0.0, hist) == pytest.approx(0.02)
    assert histogram_quantile(0.5, hist) == pytest.approx(0.035)


def test_quantile_in_the_inf_bucket_answers_the_highest_finite_bound() -> None:
    hist = Histogram(((0.01, 1.0), (0.1, 2.0), (INF, 10.0)), 10.0, 50.0)
    assert histogram_quantile(0.99, hist) == 0.1


def test_highest_bound_is_the_bucket_of_the_largest_observation() -> None:
    assert highest_bound(Histogram(((0.01, 3.0), (0.02, 5.0), (0.05, 5.0), (INF, 5.0)), 5.0, 0.1)) == 0.02
    assert highest_bound(Histogram(((0.01, 3.0), (INF, 4.0)), 4.0, 9.0)) == INF
    assert highest_bound(Histogram(((0.01, 0.0), (INF, 0.0)), 0.0, 0.0)) is None
    assert highest_bound(Histogram.empty()) is None


def test_quantile_of_nothing_observed_is_none_and_needs_an_inf_bucket() -> None:
    assert histogram_quantile(0.5, Histogram(((0.1, 0.0), (INF, 0.0)), 0.0, 0.0)) is None
    with pytest.raises(ValueError):
        histogram_quantile(0.5, Histogram(((0.1, 1.0),), 1.0, 0.05))


def test_quantiles_of_a_real_exposition_diff() -> None:
    name, labels = "history_accept_to_write_seconds", {"event_type": "Heartbeat"}
    before = parse_histogram(exposition([0.09] * 50), name, labels)
    after = parse_histogram(exposition([0.09] * 50 + [0.015] * 99 + [0.04]), name, labels)
    diff = histogram_diff(before, after)
    assert diff.count == 100.0
    assert histogram_quantile(0.5, diff) == pytest.approx(0.01 + 0.01 * 50 / 99)
    assert histogram_quantile(0.99, diff) == pytest.approx(0.01 + 0.01 * 99 / 99)


# --- the small parts of the load generator and the output ----------------------------------------


def test_heartbeat_body_is_json_within_the_runtime() -> None:
    body = json.loads(heartbeat_body(7, 60_000))
    assert body == {
        "position_ms": 7000,
        "bitrate_kbps": 3000,
        "buffer_ms": 12000,
        "throughput_kbps": 8000,
        "rebuffer_ms": 0,
    }
    assert json.loads(heartbeat_body(61, 60_000))["position_ms"] == 1000


def test_budget_bounds_the_requests() -> None:
    budget = Budget(2)
    assert [budget.take() for _ in range(4)] == [True, True, False, False]


def test_status_key_names_the_status_or_the_exception() -> None:
    assert status_key(429) == "429"
    assert status_key(None, TimeoutError()) == "TimeoutError"


def test_load_result_rate_and_quantiles() -> None:
    result = LoadResult("x", seconds=2.0, latencies=[0.004, 0.001, 0.002, 0.003])
    assert result.accepted == 4
    assert result.per_s == 2.0
    p50, p99 = result.quantiles_ms()
    assert p50 == pytest.approx(2.5)
    assert p99 == pytest.approx(3.97)


def test_table_and_json_carry_the_ratio_and_the_shared_cpus() -> None:
    machine = {
        "nproc": 2,
        "cpu_model": "cpu",
        "memory_gib": 24.0,
        "os": "Linux",
        "python": "3.11",
        "date": "d",
    }
    settings = {"players": 32, "duration_s": 20.0, "warmup_s": 2.0, "max_requests": 10, "aiohttp": "3"}
    stack = LoadResult("stack", 10.0, [0.01] * 1000)
    stack.others["429"] = 3
    bare = LoadResult("bare", 10.0, [0.002] * 20000)
    hist = Histogram(((0.01, 500.0), (0.02, 1000.0), (INF, 1000.0)), 1000.0, 12.0)
    result = PlaybackBench(machine, settings, stack, bare, WriteLatency(hist, 1000, True, 1.5), ["n"])
    assert result.ratios()["requests_per_s"] == pytest.approx(0.05)
    assert result.ratios()["p50"] == pytest.approx(5.0)
    table = render_table(result)
    assert "share these CPUs" in table
    assert "0.050" in table and "429: 3" in table
    as_json = result.as_dict()
    assert as_json["results"][1]["p50_ms"] == pytest.approx(10.0)
    assert as_json["results"][1]["mean_ms"] == pytest.approx(12.0)
    assert as_json["results"][1]["max_at_most_ms"] == pytest.approx(20.0)
    json.dumps(as_json)


def test_arguments_and_their_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.players, args.duration, args.warmup, args.json) == (32, 20.0, 2.0, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--players", "0"])
