"""The mount probe's Prometheus gauges, served at ``/metrics`` with the bus's: the last round's figures."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

LABELS = ("node", "mode")

CONTAINER_START = Gauge(
    "mount_probe_container_start_ms",
    "Time to mount one container's root file system in the last round, ms",
    [*LABELS, "quantile"],
)
OP_LATENCY = Gauge(
    "mount_probe_mount_op_latency_ms",
    "Mean latency of one counted mount operation in the last round, ms",
    LABELS,
)
OPS_PER_START = Gauge(
    "mount_probe_mount_ops_per_start",
    "Mount operations per container start (the Netflix blog's count)",
    LABELS,
)
HEALTH_PROBE = Gauge(
    "mount_probe_health_probe_p99_ms",
    "p99 of the health probe (spawn /bin/true) during the last round, ms",
    LABELS,
)
TABLE_SIZE = Gauge("mount_probe_mount_table_size", "Lines of the node's /proc/self/mountinfo", ["node"])
TABLE_READ = Gauge("mount_probe_mount_table_read_ms", "Time to read the node's mount table, ms", ["node"])
TABLE_PEAK = Gauge(
    "mount_probe_sandbox_mount_table_peak",
    "Peak mount table lines in the probe's namespace during the last round",
    LABELS,
)
STALLED = Gauge("mount_probe_stalled", "1 when the last round was judged stalled", LABELS)
STALL_RATIO = Gauge("mount_probe_stall_ratio", "Largest figure/baseline ratio of the last round", LABELS)
BASELINE_START = Gauge(
    "mount_probe_baseline_container_start_p50_ms", "Container-start p50 at baseline, ms", LABELS
)
PRIVILEGED = Gauge(
    "mount_probe_privileged", "1 when the probe can mount (CAP_SYS_ADMIN); 0: passive only", ["node"]
)
IDMAPPED = Gauge(
    "mount_probe_idmapped", "1: id-mapped bind mounts; 0: refused here, plain bind mounts instead", LABELS
)
ROUNDS = Counter("mount_probe_rounds", "Probe rounds by outcome", [*LABELS, "outcome"])
