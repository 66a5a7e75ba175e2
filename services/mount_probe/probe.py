"""What a container runtime mounts to start a container, the count of it, and the stall rule.

Pure logic: the mount sequence runs against a ``MountOps`` (the kernel in the sandbox, a fake in unit
tests) and a clock; nothing here touches the system.

**per-layer** (containerd before PR #12092, as in Netflix's "Mount Mayhem at Netflix", Nov 2025): a
start walks the image twice (once to read the image's user information, once for the real root
filesystem). Each walk makes one id-mapped bind mount per layer (``open_tree(OPEN_TREE_CLONE)``,
``mount_setattr(MOUNT_ATTR_IDMAP)``, ``move_mount``), the overlay over them, then unmounts the
per-layer mounts (the overlay keeps its own references): 1 + 2L operations a walk, 2·(1 + 2L) a
start in the blog's count (202 for 50 layers). The first walk's overlay is unmounted after reading;
that unmount is done and timed but, as in the blog's count, not counted.

**common-parent** (containerd PR #12092): each walk makes one id-mapped bind mount of the layers'
common parent, the overlay whose lower directories are the layers seen through it, and unmounts the
parent's mount: 3 operations a walk, 6 a start, whatever L.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

WALKS = ("inspect", "rootfs")  # the two passes over the image per start
UNCOUNTED = "uncounted"  # op_ms key of operations made but not in the blog's count


class Mode(enum.StrEnum):
    PER_LAYER = "per-layer"
    COMMON_PARENT = "common-parent"


class OpKind(enum.StrEnum):
    BIND = "bind"  # an (id-mapped) bind mount: open_tree + mount_setattr + move_mount
    OVERLAY = "overlay"
    UMOUNT = "umount"


def ops_per_start(mode: Mode, layers: int) -> int:
    """Mount operations one container start makes, counted as the Netflix blog counts them."""
    if layers < 1:
        raise ValueError("an image has at least one layer")
    per_walk_mounts = layers if mode is Mode.PER_LAYER else 1
    return len(WALKS) * (1 + 2 * per_walk_mounts)


class MountOps(Protocol):
    """The mount operations of one start; the sandbox's are syscalls, unit tests' are fakes."""

    def make_dirs(self, paths: Sequence[str]) -> None: ...

    def bind(self, source: str, target: str) -> None: ...

    def overlay(self, lowers: Sequence[str], upper: str, work: str, target: str) -> None: ...

    def umount(self, target: str) -> None: ...

    def read_user_info(self, rootfs: str) -> None: ...


Clock = Callable[[], int]  # nanoseconds, monotonic


@dataclass
class StartRecord:
    """One container start: its counted operations, their latencies, and the root file system left mounted."""

    rootfs: str
    counted_ops: int = 0
    uncounted_ops: int = 0
    # ms per counted operation by kind, and the uncounted ones (the inspection overlay's unmount)
    op_ms: dict[str, list[float]] = field(
        default_factory=lambda: {**{k.value: [] for k in OpKind}, UNCOUNTED: []}
    )


def start_container(
    ops: MountOps,
    clock: Clock,
    mode: Mode,
    image_dir: str,
    layer_names: Sequence[str],
    container_dir: str,
) -> StartRecord:
    """Mount a container's root file system from ``image_dir/<layer>`` the way ``mode`` does it."""
    record = StartRecord(rootfs=f"{container_dir}/{WALKS[-1]}/merged")

    def done(kind: OpKind, counted: bool, t0: int) -> None:
        record.op_ms[kind.value if counted else UNCOUNTED].append((clock() - t0) / 1e6)
        if counted:
            record.counted_ops += 1
        else:
            record.uncounted_ops += 1

    for walk in WALKS:
        base = f"{container_dir}/{walk}"
        upper, work, merged = f"{base}/upper", f"{base}/work", f"{base}/merged"
        if mode is Mode.PER_LAYER:
            targets = [f"{base}/{name}" for name in layer_names]
            ops.make_dirs([*targets, upper, work, merged])
            for name, target in zip(layer_names, targets, strict=True):
                t0 = clock()
                ops.bind(f"{image_dir}/{name}", target)
                done(OpKind.BIND, True, t0)
            t0 = clock()
            ops.overlay(targets, upper, work, merged)
            done(OpKind.OVERLAY, True, t0)
            for target in targets:
                t0 = clock()
                ops.umount(target)
                done(OpKind.UMOUNT, True, t0)
        else:
            parent = f"{base}/parent"
            ops.make_dirs([parent, upper, work, merged])
            t0 = clock()
            ops.bind(image_dir, parent)
            done(OpKind.BIND, True, t0)
            t0 = clock()
            ops.overlay([f"{parent}/{name}" for name in layer_names], upper, work, merged)
            done(OpKind.OVERLAY, True, t0)
            t0 = clock()
            ops.umount(parent)
            done(OpKind.UMOUNT, True, t0)
        if walk != WALKS[-1]:
            ops.read_user_info(merged)  # what the first walk is for: the image's /etc/passwd
            t0 = clock()
            ops.umount(merged)
            done(OpKind.UMOUNT, False, t0)
    return record


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1), linear between the closest ranks; None without samples."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not between 0 and 1")
    ordered = sorted(values)
    if not ordered:
        return None
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    p50: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(0, None, None, None, None)
        mean = statistics.fmean(values)
        return cls(len(values), mean, percentile(values, 0.5), percentile(values, 0.99), max(values))

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "p50": self.p50, "p99": self.p99, "max": self.max}


# -- one round, as the sandbox reports it ----------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    """What one sandbox run measured (see ``services.mount_probe.sandbox`` for how)."""

    privileged: bool
    kernel: str
    host_table_size: int  # the node's own mount table (the caller's namespace), always measured
    host_table_read_ms: float
    mode: str
    layers: int
    concurrency: int
    reason: str | None = None  # why nothing was mounted (no CAP_SYS_ADMIN), or None
    idmapped: bool | None = None  # None: nothing was mounted; False: plain bind mounts instead
    idmap_note: str | None = None
    ops_per_start: int = 0
    counted_ops: tuple[int, ...] = ()  # per start, as made
    start_ms: tuple[float, ...] = ()
    # CPU time (user + system) of the worker's thread per start: what the start cost the machine,
    # without the time it waited for a CPU (on a shared machine, wall time is mostly that)
    start_cpu_ms: tuple[float, ...] = ()
    op_ms: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    teardown_ms: tuple[float, ...] = ()
    health_idle_ms: tuple[float, ...] = ()
    health_ms: tuple[float, ...] = ()  # the health probe while the starts ran
    table_before: int = 0  # lines of /proc/self/mountinfo inside the sandbox's namespace
    table_peak: int = 0
    table_after: int = 0
    table_read_ms: tuple[float, ...] = ()  # reading it inside the namespace, while the starts ran
    wall_ms: float = 0.0
    errors: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundResult:
        def floats(key: str) -> tuple[float, ...]:
            return tuple(float(v) for v in d.get(key, ()))

        return cls(
            privileged=bool(d["privileged"]),
            kernel=str(d.get("kernel", "")),
            host_table_size=int(d["host_table_size"]),
            host_table_read_ms=float(d["host_table_read_ms"]),
            mode=str(d.get("mode", "")),
            layers=int(d.get("layers", 0)),
            concurrency=int(d.get("concurrency", 0)),
            reason=d.get("reason"),
            idmapped=d.get("idmapped"),
            idmap_note=d.get("idmap_note"),
            ops_per_start=int(d.get("ops_per_start", 0)),
            counted_ops=tuple(int(v) for v in d.get("counted_ops", ())),
            start_ms=floats("start_ms"),
            start_cpu_ms=floats("start_cpu_ms"),
            op_ms={str(k): tuple(float(x) for x in v) for k, v in dict(d.get("op_ms", {})).items()},
            teardown_ms=floats("teardown_ms"),
            health_idle_ms=floats("health_idle_ms"),
            health_ms=floats("health_ms"),
            table_before=int(d.get("table_before", 0)),
            table_peak=int(d.get("table_peak", 0)),
            table_after=int(d.get("table_after", 0)),
            table_read_ms=floats("table_read_ms"),
            wall_ms=float(d.get("wall_ms", 0.0)),
            errors=tuple(str(e) for e in d.get("errors", ())),
        )

    @property
    def active(self) -> bool:
        """Mounts were made and measured (privileged, and no start failed)."""
        return self.privileged and bool(self.start_ms) and not self.errors

    @property
    def counted_op_ms(self) -> tuple[float, ...]:
        return tuple(x for kind in OpKind for x in self.op_ms.get(kind.value, ()))

    def observation(self) -> Observation:
        """The stall rule's figures; passive (nothing mounted): the mount table's read time only."""
        if not self.active:
            return Observation(None, None, self.host_table_read_ms)
        return Observation(
            start_p50_ms=percentile(self.start_ms, 0.5),
            health_p99_ms=percentile(self.health_ms, 0.99),
            table_read_ms=self.host_table_read_ms,
        )


# -- the stall rule ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """The figures the stall rule compares with the baseline (None: not measured this time)."""

    start_p50_ms: float | None
    health_p99_ms: float | None
    table_read_ms: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "container_start_p50": self.start_p50_ms,
            "health_probe_p99": self.health_p99_ms,
            "mount_table_read": self.table_read_ms,
        }


@dataclass(frozen=True)
class Baseline(Observation):
    rounds: int = 0

    @classmethod
    def of(cls, observations: Sequence[Observation]) -> Baseline:
        """The median of each figure over the rounds measured at start (robust to one odd round)."""

        def median(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None and v > 0]
            return statistics.median(present) if present else None

        return cls(
            start_p50_ms=median([o.start_p50_ms for o in observations]),
            health_p99_ms=median([o.health_p99_ms for o in observations]),
            table_read_ms=median([o.table_read_ms for o in observations]),
            rounds=len(observations),
        )


@dataclass(frozen=True)
class Verdict:
    stalled: bool
    ratio: float | None  # the largest figure/baseline ratio, None if nothing was comparable
    worst: str | None  # which figure it was
    ratios: Mapping[str, float]


def judge(now: Observation, baseline: Baseline, factor: float) -> Verdict:
    """Stalled when any figure measured now is at least ``factor`` times its baseline.

    The figures: container-start p50, health-probe p99 (both during the same concurrent starts as at
    baseline), and the time to read the node's mount table. No absolute threshold: a node is judged
    against itself at start, so slow hardware is not "stalled" for being slow.
    """
    if factor <= 1.0:
        raise ValueError("the stall factor must be above 1")
    ratios: dict[str, float] = {}
    for name, value in now.as_dict().items():
        base = baseline.as_dict()[name]
        if value is not None and base is not None and base > 0:
            ratios[name] = value / base
    if not ratios:
        return Verdict(False, None, None, ratios)
    worst = max(ratios, key=lambda k: ratios[k])
    return Verdict(ratios[worst] >= factor, ratios[worst], worst, ratios)


class StallTracker:
    """``judge`` each round; stalled only after ``rounds`` consecutive rounds over the factor, so one
    noisy round (a 2-core machine's scheduler, a p99 over few samples) does not flip the node."""

    def __init__(self, baseline: Baseline, factor: float, rounds: int = 2) -> None:
        if rounds < 1:
            raise ValueError("at least one round")
        self.baseline = baseline
        self.factor = factor
        self.rounds = rounds
        self.over = 0  # consecutive rounds over the factor so far

    def observe(self, now: Observation) -> Verdict:
        verdict = judge(now, self.baseline, self.factor)
        self.over = self.over + 1 if verdict.stalled else 0
        return Verdict(self.over >= self.rounds, verdict.ratio, verdict.worst, verdict.ratios)

    def failed_round(self) -> Verdict:
        """A round that did not finish (killed after its timeout): stalled at once, no need to wait."""
        self.over = max(self.over + 1, self.rounds)
        return Verdict(self.over >= self.rounds, None, "round_timeout", {})
