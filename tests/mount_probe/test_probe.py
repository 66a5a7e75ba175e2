"""Pure logic of the mount probe: the operation count, the mount sequence, statistics, the stall rule,
and the sample a round becomes. The mount operations here are a fake that records calls (named so);
the real ones run in test_sandbox.py."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from services.bus.events import MountProbeMode
from services.mount_probe.handlers import build_sample
from services.mount_probe.probe import (
    Baseline,
    Mode,
    Observation,
    RoundResult,
    StallTracker,
    Verdict,
    judge,
    ops_per_start,
    percentile,
    start_container,
)
from services.mount_probe.settings import Settings


class FakeMountOps:
    """Records every call in order; mounts nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def make_dirs(self, paths: Sequence[str]) -> None:
        self.calls.append(("mkdir", *paths))

    def bind(self, source: str, target: str) -> None:
        self.calls.append(("bind", source, target))

    def overlay(self, lowers: Sequence[str], upper: str, work: str, target: str) -> None:
        self.calls.append(("overlay", ":".join(lowers), upper, work, target))

    def umount(self, target: str) -> None:
        self.calls.append(("umount", target))

    def read_user_info(self, rootfs: str) -> None:
        self.calls.append(("read", rootfs))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls if c[0] != "mkdir"]


def fake_clock() -> itertools.count[int]:
    return itertools.count(0, 1000)  # every reading 1 µs after the last


def test_the_blogs_count() -> None:
    assert ops_per_start(Mode.PER_LAYER, 50) == 202  # the blog: 100 starts x 202 = 20 200
    assert ops_per_start(Mode.PER_LAYER, 10) == 42
    assert ops_per_start(Mode.PER_LAYER, 1) == 6
    assert {ops_per_start(Mode.COMMON_PARENT, n) for n in (1, 10, 50)} == {6}
    with pytest.raises(ValueError):
        ops_per_start(Mode.PER_LAYER, 0)


@pytest.mark.parametrize("layers", [1, 3, 10, 50])
def test_per_layer_start_makes_the_counted_operations_in_order(layers: int) -> None:
    ops = FakeMountOps()
    names = [f"l{i}" for i in range(layers)]
    clock = fake_clock()
    record = start_container(ops, lambda: next(clock), Mode.PER_LAYER, "/r/img", names, "/r/c0")
    assert record.counted_ops == ops_per_start(Mode.PER_LAYER, layers) == 2 * (1 + 2 * layers)
    walk = ["bind"] * layers + ["overlay"] + ["umount"] * layers
    assert ops.kinds() == [*walk, "read", "umount", *walk]  # the inspection's overlay comes off
    assert record.uncounted_ops == 1
    binds = [c for c in ops.calls if c[0] == "bind"]
    assert binds[0] == ("bind", "/r/img/l0", "/r/c0/inspect/l0")
    assert binds[-1] == ("bind", f"/r/img/l{layers - 1}", f"/r/c0/rootfs/l{layers - 1}")
    overlay = [c for c in ops.calls if c[0] == "overlay"][-1]
    assert overlay[1] == ":".join(f"/r/c0/rootfs/l{i}" for i in range(layers))
    assert record.rootfs == overlay[4] == "/r/c0/rootfs/merged"
    assert ("umount", record.rootfs) not in ops.calls  # stays mounted: the container runs on it
    assert len(record.op_ms["bind"]) == 2 * layers and all(ms == 0.001 for ms in record.op_ms["bind"])


def test_common_parent_start_is_six_operations_whatever_the_layers() -> None:
    ops = FakeMountOps()
    names = [f"l{i}" for i in range(50)]
    clock = fake_clock()
    record = start_container(ops, lambda: next(clock), Mode.COMMON_PARENT, "/r/img", names, "/r/c1")
    assert record.counted_ops == 6
    assert ops.kinds() == ["bind", "overlay", "umount", "read", "umount", "bind", "overlay", "umount"]
    assert ("bind", "/r/img", "/r/c1/rootfs/parent") in ops.calls  # the layers' common parent, once
    overlay = [c for c in ops.calls if c[0] == "overlay"][-1]
    assert overlay[1].split(":") == [f"/r/c1/rootfs/parent/l{i}" for i in range(50)]


def test_percentile() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.99) == pytest.approx(1.99)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_baseline_is_the_median_of_the_rounds_and_skips_what_was_not_measured() -> None:
    base = Baseline.of(
        [Observation(10.0, 5.0, 0.1), Observation(30.0, None, 0.2), Observation(20.0, 7.0, 0.9)]
    )
    assert (base.start_p50_ms, base.health_p99_ms, base.table_read_ms, base.rounds) == (20.0, 6.0, 0.2, 3)


def test_stall_rule_is_relative_to_the_baseline() -> None:
    base = Baseline.of([Observation(10.0, 4.0, 0.5)])
    assert judge(Observation(29.0, 4.0, 0.5), base, 3.0).stalled is False
    v = judge(Observation(30.0, 4.0, 0.5), base, 3.0)
    assert (v.stalled, v.worst, v.ratio) == (True, "container_start_p50", 3.0)
    v = judge(Observation(10.0, 20.0, 0.5), base, 3.0)
    assert (v.stalled, v.worst, v.ratio) == (True, "health_probe_p99", 5.0)
    # A slow node is not stalled for being slow: only its own baseline counts.
    slow = Baseline.of([Observation(1000.0, 400.0, 50.0)])
    assert judge(Observation(1500.0, 500.0, 60.0), slow, 3.0).stalled is False
    # Passive (nothing mounted): the mount table's read time alone.
    passive = Baseline.of([Observation(None, None, 0.5)])
    v = judge(Observation(None, None, 2.0), passive, 3.0)
    assert (v.stalled, v.worst, set(v.ratios)) == (True, "mount_table_read", {"mount_table_read"})
    assert judge(Observation(None, None, None), passive, 3.0) == Verdict(False, None, None, {})
    with pytest.raises(ValueError):
        judge(Observation(1.0, 1.0, 1.0), base, 1.0)


def test_tracker_needs_consecutive_rounds_and_a_failed_round_stalls_at_once() -> None:
    tracker = StallTracker(Baseline.of([Observation(10.0, None, None)]), 3.0, rounds=2)
    high, low = Observation(40.0, None, None), Observation(11.0, None, None)
    assert [tracker.observe(o).stalled for o in (high, low, high, high, high, low)] == [
        False, False, False, True, True, False,
    ]  # fmt: skip
    assert tracker.failed_round().stalled is True
    assert tracker.failed_round().worst == "round_timeout"


def result(**changes: object) -> RoundResult:
    doc: dict[str, object] = {
        "privileged": True,
        "kernel": "6.1.0-test",
        "host_table_size": 20,
        "host_table_read_ms": 0.05,
        "mode": "per-layer",
        "layers": 10,
        "concurrency": 4,
        "idmapped": True,
        "ops_per_start": 42,
        "counted_ops": [42] * 4,
        "start_ms": [4.0, 5.0, 6.0, 7.0],
        "op_ms": {"bind": [0.1, 0.1], "overlay": [0.4], "umount": [0.2]},
        "health_ms": [1.0, 2.0],
    }
    doc.update(changes)
    return RoundResult.from_dict(doc)


def test_a_round_becomes_a_sample() -> None:
    settings = Settings(node_name="node-a", layers=10, concurrency=4)
    base = Baseline.of([Observation(2.0, 1.0, 0.05)])
    verdict = judge(result().observation(), base, settings.stall_factor)
    sample = build_sample(settings, "probe-1", result(), verdict, base, 123.0)
    assert (sample.node, sample.probe_mode, sample.privileged, sample.idmapped) == (
        "node-a", MountProbeMode.PER_LAYER, True, True,
    )  # fmt: skip
    assert (sample.layers, sample.mount_ops_per_start, sample.concurrent_mounts) == (10, 42, 4)
    assert sample.mount_op_latency_ms == pytest.approx(0.2)
    assert sample.container_start_p50_ms == 5.5 and sample.stall_ratio == 2.75
    assert sample.stalled is False and sample.stall_figure == "container_start_p50"
    assert sample.probe_note is None and sample.kernel_version == "6.1.0-test"


def test_a_refused_id_map_and_a_passive_round_say_so() -> None:
    settings = Settings(node_name="node-b")
    base = Baseline.of([Observation(None, None, 0.05)])
    note = "id-mapped mounts refused here (EINVAL); plain bind mounts instead, same count"
    fallback = build_sample(
        settings, "p", result(idmapped=False, idmap_note=note), Verdict(False, None, None, {}), base, 1.0
    )
    assert fallback.idmapped is False and fallback.probe_note == note and fallback.mount_ops_per_start == 42
    reason = "no private mount namespace: unshare: Operation not permitted (CAP_SYS_ADMIN is needed)"
    passive = result(privileged=False, reason=reason, idmapped=None, start_ms=[], op_ms={}, health_ms=[])
    verdict = judge(passive.observation(), base, 3.0)
    sample = build_sample(settings, "p", passive, verdict, base, 1.0)
    assert sample.probe_mode is MountProbeMode.PASSIVE and sample.privileged is False
    assert sample.probe_note == reason and sample.idmapped is None
    assert sample.container_start_p50_ms is None and sample.mount_ops_per_start == 0
    assert sample.concurrent_mounts == 0 and sample.mount_table_size == 20
    assert verdict.worst == "mount_table_read"


def test_only_counted_operations_are_in_the_counted_latencies() -> None:
    ops = FakeMountOps()
    clock = fake_clock()
    record = start_container(ops, lambda: next(clock), Mode.PER_LAYER, "/i", ["a", "b"], "/c")
    assert [len(record.op_ms[k]) for k in ("bind", "overlay", "umount", "uncounted")] == [4, 2, 4, 1]
    r = result(op_ms=record.op_ms)
    assert len(r.counted_op_ms) == record.counted_ops == 10
