"""The history service's Prometheus metrics, served at ``/metrics`` with the bus's."""

from __future__ import annotations

from prometheus_client import Histogram

# From a playback event's event_time (set by playback when it accepted the request) to the moment the
# Cassandra write that event caused completed; observed only when the event changed something (a
# redelivery or a stale event writes nothing and is not observed). Same clock only when both services
# run on one machine; event_time has millisecond resolution.
ACCEPT_TO_WRITE = Histogram(
    "history_accept_to_write_seconds",
    "Playback event_time (request accepted) to the end of the Cassandra write it caused",
    ["event_type"],
    buckets=(
        0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
        0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
        15.0, 20.0, 30.0, 60.0, 120.0,
    ),
)  # fmt: skip
