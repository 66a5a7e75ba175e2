"""The dashboard's Prometheus metrics, served at ``/metrics`` with the bus's."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECORDS = Counter("dashboard_records_total", "Records of the viewed topics folded into the view", ["topic"])
BAD_RECORDS = Counter(
    "dashboard_bad_records_total", "Records of the viewed topics that could not be decoded", ["topic"]
)
SAMPLE_SECONDS = Histogram(
    "dashboard_sample_seconds",
    "Time one sample of watermarks and group offsets took",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
