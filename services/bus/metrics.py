"""Prometheus metrics of the bus, served by every service at ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PRODUCED = Counter("reelbus_produced_total", "Records queued for a topic", ["topic"])
CONSUMED = Counter(
    "reelbus_consumed_total",
    "Records consumed, by outcome (ok, retried, dead_lettered)",
    ["topic", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "reelbus_handler_seconds",
    "Handler latency per event type",
    ["event_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CONSUMER_LAG = Gauge(
    "reelbus_consumer_lag", "High watermark minus committed offset", ["group", "topic", "partition"]
)
ASSIGNED = Gauge("reelbus_assigned_partitions", "Partitions assigned to this consumer", ["group"])
