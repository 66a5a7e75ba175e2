"""The ABR service's Prometheus metrics, served at ``/metrics`` with the bus's."""

from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter("abr_decisions", "Bitrate decisions made, per algorithm", ["algorithm"])
SAMPLES = Counter("abr_samples", "Telemetry samples taken in, per source (player, heartbeat)", ["source"])
DROPPED = Counter(
    "abr_dropped_samples",
    "Samples and heartbeats counted and dropped without a decision, per reason",
    ["reason"],
)
