"""The mount probe's work: measure the baseline, then one round per interval, each a published sample.

A round runs in the sandbox process (``adapters.runner``); what it measured becomes a
``MountStallSample`` keyed by the node's name, judged against the baseline by ``probe.StallTracker``,
and mirrored in the Prometheus gauges.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.bus.events import MountProbeMode, MountStallSample
from services.bus.producer import Delivered
from services.mount_probe import metrics
from services.mount_probe.adapters.runner import ProbeFailed, RoundConfig
from services.mount_probe.probe import (
    Baseline,
    Mode,
    Observation,
    RoundResult,
    StallTracker,
    Verdict,
    ops_per_start,
    percentile,
)
from services.mount_probe.sandbox import read_mount_table_median
from services.mount_probe.settings import Settings

log = logging.getLogger("reelbus.mount_probe")

RunRound = Callable[[RoundConfig, float], Awaitable[RoundResult]]
Send = Callable[[str, str, MountStallSample], Awaitable[Delivered]]

MODES = {Mode.PER_LAYER: MountProbeMode.PER_LAYER, Mode.COMMON_PARENT: MountProbeMode.COMMON_PARENT}


@dataclass
class Deps:
    settings: Settings
    run_round: RunRound
    send: Send
    probe_id: str = field(default_factory=lambda: f"mount-probe-{os.getpid()}")
    tracker: StallTracker | None = None  # set once the baseline is measured
    said: set[str] = field(default_factory=set)  # notes already logged (logged once, not every round)

    @property
    def config(self) -> RoundConfig:
        s = self.settings
        return RoundConfig(s.mode, s.layers, s.concurrency, s.starts_per_worker, s.idmap)

    @property
    def ready(self) -> bool:
        return self.tracker is not None


def _say_once(deps: Deps, note: str | None) -> None:
    if note and note not in deps.said:
        deps.said.add(note)
        log.warning("%s", note)


async def measure_baseline(deps: Deps) -> Baseline:
    """``baseline_rounds`` rounds with the configured settings; the medians of their figures."""
    observations: list[Observation] = []
    for _ in range(deps.settings.baseline_rounds):
        result = await deps.run_round(deps.config, deps.settings.round_timeout)
        _say_once(deps, result.reason or result.idmap_note)
        if not observations:
            log.info(
                "probing %s: %s, %d layers, %d concurrent starts, %s (kernel %s)",
                deps.settings.node,
                deps.settings.mode.value,
                deps.settings.layers,
                deps.settings.concurrency,
                "passive only"
                if not result.privileged
                else "id-mapped bind mounts"
                if result.idmapped
                else "plain bind mounts (id maps refused or off)",
                result.kernel,
            )
        observations.append(result.observation())
    baseline = Baseline.of(observations)
    deps.tracker = StallTracker(baseline, deps.settings.stall_factor, deps.settings.stall_rounds)
    log.info(
        "baseline over %d round(s): container start p50 %s ms, health probe p99 %s ms, "
        "mount table read %s ms",
        baseline.rounds,
        _fmt(baseline.start_p50_ms),
        _fmt(baseline.health_p99_ms),
        _fmt(baseline.table_read_ms),
    )
    return baseline


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def build_sample(
    settings: Settings,
    probe_id: str,
    result: RoundResult,
    verdict: Verdict,
    baseline: Baseline,
    wall_ms: float,
) -> MountStallSample:
    """The published sample of one round (passive when nothing could be mounted)."""
    active = result.active
    op_ms = result.counted_op_ms
    note = result.reason or result.idmap_note
    if result.errors:
        note = "; ".join((*result.errors[:3], *([note] if note else [])))
    return MountStallSample(
        node=settings.node,
        probe_id=probe_id,
        mount_op_latency_ms=sum(op_ms) / len(op_ms) if active and op_ms else 0.0,
        mount_table_size=result.host_table_size,
        mount_table_read_ms=result.host_table_read_ms,
        probe_latency_ms=wall_ms,
        stalled=verdict.stalled,
        concurrent_mounts=result.concurrency if active else 0,
        kernel_version=result.kernel or None,
        probe_mode=MODES[settings.mode] if result.privileged else MountProbeMode.PASSIVE,
        privileged=result.privileged,
        idmapped=result.idmapped if result.privileged else None,
        probe_note=note,
        layers=result.layers if active else 0,
        mount_ops_per_start=result.ops_per_start if active else 0,
        container_start_p50_ms=percentile(result.start_ms, 0.5) if active else None,
        container_start_p99_ms=percentile(result.start_ms, 0.99) if active else None,
        health_probe_p99_ms=percentile(result.health_ms, 0.99) if active else None,
        baseline_container_start_p50_ms=baseline.start_p50_ms,
        baseline_health_probe_p99_ms=baseline.health_p99_ms,
        baseline_mount_table_read_ms=baseline.table_read_ms,
        stall_ratio=verdict.ratio,
        stall_figure=verdict.worst,
    )


def failed_sample(
    settings: Settings, probe_id: str, failure: str, verdict: Verdict, baseline: Baseline, wall_ms: float
) -> MountStallSample:
    """A round that did not finish: the node's mount table (read here) and why."""
    size, read_ms = read_mount_table_median()
    return MountStallSample(
        node=settings.node,
        probe_id=probe_id,
        mount_op_latency_ms=0.0,
        mount_table_size=size,
        mount_table_read_ms=read_ms,
        probe_latency_ms=wall_ms,
        stalled=verdict.stalled,
        concurrent_mounts=settings.concurrency,
        kernel_version=os.uname().release,
        probe_mode=MODES[settings.mode],
        probe_note=failure,
        layers=settings.layers,
        mount_ops_per_start=ops_per_start(settings.mode, settings.layers),
        baseline_container_start_p50_ms=baseline.start_p50_ms,
        baseline_health_probe_p99_ms=baseline.health_p99_ms,
        baseline_mount_table_read_ms=baseline.table_read_ms,
        stall_figure=verdict.worst,
    )


async def probe_once(deps: Deps) -> MountStallSample:
    """One round, judged and published; a round that fails to finish is published as a stall."""
    if deps.tracker is None:
        raise RuntimeError("measure the baseline first")
    tracker, settings = deps.tracker, deps.settings
    t0 = time.perf_counter()
    try:
        result = await deps.run_round(deps.config, settings.round_timeout)
    except ProbeFailed as exc:
        wall_ms = (time.perf_counter() - t0) * 1000
        verdict = tracker.failed_round()
        sample = failed_sample(settings, deps.probe_id, str(exc), verdict, tracker.baseline, wall_ms)
        log.error("probe round failed: %s", exc)
        metrics.ROUNDS.labels(settings.node, settings.mode.value, "failed").inc()
    else:
        wall_ms = (time.perf_counter() - t0) * 1000
        _say_once(deps, result.reason or result.idmap_note)
        for error in result.errors:
            log.error("probe round: %s", error)
        verdict = tracker.observe(result.observation())
        sample = build_sample(settings, deps.probe_id, result, verdict, tracker.baseline, wall_ms)
        record_metrics(settings, result, sample)
        metrics.ROUNDS.labels(settings.node, settings.mode.value, "ok" if result.active else "passive").inc()
    labels = (settings.node, settings.mode.value)
    metrics.STALLED.labels(*labels).set(1 if sample.stalled else 0)
    metrics.STALL_RATIO.labels(*labels).set(sample.stall_ratio or 0.0)
    if sample.stalled:
        log.warning(
            "mount path stalled on %s: %s at %.1fx its baseline (factor %.1f)",
            settings.node,
            sample.stall_figure,
            sample.stall_ratio or float("nan"),
            settings.stall_factor,
        )
    await deps.send(settings.topic, settings.node, sample)
    return sample


def record_metrics(settings: Settings, result: RoundResult, sample: MountStallSample) -> None:
    node, labels = settings.node, (settings.node, settings.mode.value)
    metrics.TABLE_SIZE.labels(node).set(sample.mount_table_size)
    metrics.TABLE_READ.labels(node).set(sample.mount_table_read_ms)
    metrics.PRIVILEGED.labels(node).set(1 if result.privileged else 0)
    if not result.active:
        return
    metrics.CONTAINER_START.labels(*labels, "0.5").set(sample.container_start_p50_ms or 0.0)
    metrics.CONTAINER_START.labels(*labels, "0.99").set(sample.container_start_p99_ms or 0.0)
    metrics.OP_LATENCY.labels(*labels).set(sample.mount_op_latency_ms)
    metrics.OPS_PER_START.labels(*labels).set(sample.mount_ops_per_start)
    metrics.HEALTH_PROBE.labels(*labels).set(sample.health_probe_p99_ms or 0.0)
    metrics.TABLE_PEAK.labels(*labels).set(result.table_peak)
    metrics.IDMAPPED.labels(*labels).set(1 if result.idmapped else 0)
    metrics.BASELINE_START.labels(*labels).set(sample.baseline_container_start_p50_ms or 0.0)
