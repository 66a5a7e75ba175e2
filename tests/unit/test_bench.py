"""The parsers of Kafka's performance tools' output, on lines the 4.1.1 tools printed here."""

from __future__ import annotations

import pytest

from services.cli.bench import READER, BenchResult, Measurement, parse_consumer_perf, parse_producer_perf

PRODUCER_RUN = [
    # An interim report (every 5 s): no percentiles, so not the summary.
    "49962 records sent, 9988.4 records/sec (1.42 MB/sec), 5.9 ms avg latency, 253.0 ms max latency.",
    "60000 records sent, 9966.8 records/sec (1.42 MB/sec), 5.53 ms avg latency, 253.00 ms max latency, "
    "4 ms 50th, 12 ms 95th, 36 ms 99th, 57 ms 99.9th.",
    "",
]

CONSUMER_HEADER = (
    "start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, "
    "rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec"
)
CONSUMER_LINE = (
    "2026-11-26 03:33:06:527, 2026-11-26 03:33:08:121, 36.4304, 22.8547, 200000, 125470.5144, "
    "557, 1037, 35.1305, 192864.0309"
)
CONSUMER_TIMEOUT = (
    "WARNING: Exiting before consuming the expected number of messages: timeout (2000 ms) exceeded. "
    "You can use the --timeout option to increase the timeout."
)


def test_producer_summary_is_the_line_with_percentiles() -> None:
    parsed = parse_producer_perf(PRODUCER_RUN)
    assert parsed is not None
    assert parsed.records == 60000
    assert parsed.records_per_s == pytest.approx(9966.8)
    assert parsed.mb_per_s == pytest.approx(1.42)
    assert parsed.avg_latency_ms == pytest.approx(5.53)
    assert parsed.max_latency_ms == pytest.approx(253.0)
    assert (parsed.p50_ms, parsed.p95_ms, parsed.p99_ms, parsed.p999_ms) == (4, 12, 36, 57)
    assert parsed.raw == PRODUCER_RUN[1]


def test_producer_output_without_a_summary() -> None:
    assert parse_producer_perf(PRODUCER_RUN[:1]) is None
    assert parse_producer_perf(["Exception in thread main", ""]) is None


def test_consumer_result_line() -> None:
    parsed = parse_consumer_perf([CONSUMER_HEADER, CONSUMER_LINE])
    assert parsed is not None
    assert parsed.start == "2026-11-26 03:33:06:527"
    assert parsed.end == "2026-11-26 03:33:08:121"
    assert parsed.mb == pytest.approx(36.4304)
    assert parsed.records == 200000
    assert parsed.records_per_s == pytest.approx(125470.5144)
    assert (parsed.rebalance_ms, parsed.fetch_ms) == (557, 1037)
    assert parsed.fetch_mb_per_s == pytest.approx(35.1305)
    assert parsed.fetch_records_per_s == pytest.approx(192864.0309)
    assert parsed.raw == CONSUMER_LINE


def test_consumer_timeout_still_has_a_result_line() -> None:
    line = (
        "2026-11-26 03:35:35:604, 2026-11-26 03:35:38:140, 8.5258, 3.3619, 60000, 23659.3060, "
        "309, 2227, 3.8284, 26942.0745"
    )
    parsed = parse_consumer_perf([CONSUMER_HEADER, CONSUMER_TIMEOUT, line])
    assert parsed is not None and parsed.records == 60000


def test_consumer_header_alone_is_no_result() -> None:
    assert parse_consumer_perf([CONSUMER_HEADER]) is None


def test_ratio_is_bus_over_kafka() -> None:
    result = BenchResult(machine={}, settings={})
    result.measurements += [
        Measurement("produce", "kafka ProducerPerformance", 1000, 0.01, 149),
        Measurement("produce", "reelbus Producer.produce", 1000, 0.1, 149),
    ]
    assert result.ratio("produce") == pytest.approx(0.1)
    assert result.ratio("consume") is None
    result.measurements += [
        Measurement("consume", "kafka ConsumerPerformance", 1000, 0.01, 149),
        Measurement("consume", "reelbus BusConsumer", 1000, 0.04, 149),
        Measurement("consume", READER, 1000, 0.02, 149),  # the client's floor: not in the ratio
    ]
    assert result.ratio("consume") == pytest.approx(0.25)
    assert result.measurements[0].mb_per_s == pytest.approx(100_000 * 149 / 1024 / 1024)
