"""``reelbus bench mounts``: container starts against the kernel's mount lock, per-layer versus common-parent.

Each cell of the grid (layers x concurrency x mode) is one round of the mount probe's sandbox
(``services.mount_probe.sandbox``): a private mount namespace with a tmpfs, an image of L small
layers on it, and C forked workers released together, each starting containers back to back (the
mount sequence of a container runtime, for real: ``open_tree``, ``mount_setattr`` with a user
namespace's id map, ``move_mount``, the overlay, the unmounts) while the sandbox's main process runs
a trivial health probe (spawn and reap ``/bin/true``) and reads the namespace's mount table. The
workers share one namespace and the kernel's mount lock is global: concurrency is the contention.

- **per-layer** (containerd before PR #12092): an id-mapped bind mount per layer, the overlay, the
  per-layer unmounts, twice per start: 2*(1+2L) mount operations (202 for 50 layers);
- **common-parent** (PR #12092): one id-mapped bind mount of the layers' parent, the overlay, its
  unmount, twice per start: 6 operations whatever L.

Reported per cell: container-start p50/p99, health-probe p99 during the starts, mean mount-operation
latency and the namespace's peak mount table; per (layers, concurrency) the ratio per-layer /
common-parent (the baseline measured in the same run). The cells of one (layers, concurrency) run
back to back, per-layer first, so machine load drifts little between the two. Written next to each
other: a PNG plot and a JSON with every figure, under ``.reelbus/bench/`` unless ``--out`` says.

Needs CAP_SYS_ADMIN (root): without it the sandbox says so and the bench stops with that reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.cli import infra
from services.mount_probe.adapters.runner import ProbeFailed, RoundConfig, run_round
from services.mount_probe.probe import Mode, RoundResult, Summary, percentile

FULL_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
FULL_LAYERS = (10, 50)
QUICK_CONCURRENCY = (1, 4, 16)
QUICK_LAYERS = (10, 50)
MODES = (Mode.PER_LAYER, Mode.COMMON_PARENT)


@dataclass(frozen=True)
class Cell:
    layers: int
    concurrency: int
    mode: str
    starts: int
    ops_per_start: int
    idmapped: bool | None
    start_p50_ms: float | None
    start_p99_ms: float | None
    start_cpu_p50_ms: float | None
    start_cpu_p99_ms: float | None
    health_idle_p50_ms: float | None
    health_p50_ms: float | None
    health_p99_ms: float | None
    health_samples: int
    op_mean_ms: float | None
    op_p99_ms: float | None
    table_before: int
    table_peak: int
    table_read_p99_ms: float | None
    wall_ms: float

    @classmethod
    def of(cls, rounds: Sequence[RoundResult]) -> Cell:
        """One cell from its repeats, their samples pooled."""

        def pooled(get: Callable[[RoundResult], Sequence[float]]) -> list[float]:
            return [x for r in rounds for x in get(r)]

        first = rounds[0]
        starts = pooled(lambda r: r.start_ms)
        cpu = pooled(lambda r: r.start_cpu_ms)
        health = pooled(lambda r: r.health_ms)
        ops = Summary.of(pooled(lambda r: r.counted_op_ms))
        return cls(
            layers=first.layers,
            concurrency=first.concurrency,
            mode=first.mode,
            starts=len(starts),
            ops_per_start=first.ops_per_start,
            idmapped=first.idmapped,
            start_p50_ms=percentile(starts, 0.5),
            start_p99_ms=percentile(starts, 0.99),
            start_cpu_p50_ms=percentile(cpu, 0.5),
            start_cpu_p99_ms=percentile(cpu, 0.99),
            health_idle_p50_ms=percentile(pooled(lambda r: r.health_idle_ms), 0.5),
            health_p50_ms=percentile(health, 0.5),
            health_p99_ms=percentile(health, 0.99),
            health_samples=len(health),
            op_mean_ms=ops.mean,
            op_p99_ms=ops.p99,
            table_before=first.table_before,
            table_peak=max(r.table_peak for r in rounds),
            table_read_p99_ms=percentile(pooled(lambda r: r.table_read_ms), 0.99),
            wall_ms=sum(r.wall_ms for r in rounds),
        )


@dataclass(frozen=True)
class Options:
    layers: Sequence[int]
    concurrency: Sequence[int]
    starts: int  # at least this many starts per cell (each worker starts ceil(starts / C), at least 2)
    repeat: int  # rounds per cell, alternating per-layer and common-parent; their samples pooled
    idmap: bool
    out: Path
    timeout: float


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def run_grid(opts: Options, say: Callable[[str], None]) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    host = machine()
    cells: list[Cell] = []
    notes: set[str] = set()
    for layers in opts.layers:
        for concurrency in opts.concurrency:
            per_worker = max(2, math.ceil(opts.starts / concurrency))
            rounds: dict[Mode, list[RoundResult]] = {mode: [] for mode in MODES}
            for _ in range(opts.repeat):
                for mode in MODES:  # alternating, so that load on the machine drifts little between them
                    config = RoundConfig(mode, layers, concurrency, per_worker, idmap=opts.idmap)
                    result = run_round(config, opts.timeout)
                    if not result.privileged:
                        raise ProbeFailed(result.reason or "the sandbox could not mount")
                    if result.errors:
                        raise ProbeFailed("; ".join(result.errors[:5]))
                    if result.idmap_note:
                        notes.add(result.idmap_note)
                    rounds[mode].append(result)
            for mode in MODES:
                cell = Cell.of(rounds[mode])
                cells.append(cell)
                say(
                    f"L={layers:<3} C={concurrency:<3} {mode.value:<13} start p50 "
                    f"{cell.start_p50_ms or 0:8.2f} ms p99 {cell.start_p99_ms or 0:8.2f} ms, "
                    f"cpu p50 {cell.start_cpu_p50_ms or 0:7.2f} ms, "
                    f"health p99 {cell.health_p99_ms or 0:7.2f} ms"
                )
    return {
        "date": started,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": host,
        "loadavg_at_end": list(os.getloadavg()),
        "idmapped": sorted({str(c.idmapped) for c in cells}),
        "notes": sorted(notes),
        "cells": [asdict(c) for c in cells],
        "ratios": ratios(cells),
    }


def ratios(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per (layers, concurrency): per-layer / common-parent."""
    by = {(c.layers, c.concurrency, c.mode): c for c in cells}
    out = []
    for (layers, concurrency, mode), pl in by.items():
        cp = by.get((layers, concurrency, Mode.COMMON_PARENT.value))
        if mode != Mode.PER_LAYER.value or cp is None:
            continue
        out.append(
            {
                "layers": layers,
                "concurrency": concurrency,
                "start_p50": _ratio(pl.start_p50_ms, cp.start_p50_ms),
                "start_p99": _ratio(pl.start_p99_ms, cp.start_p99_ms),
                "start_cpu_p50": _ratio(pl.start_cpu_p50_ms, cp.start_cpu_p50_ms),
                "health_p99": _ratio(pl.health_p99_ms, cp.health_p99_ms),
                "ops_per_start": _ratio(pl.ops_per_start, cp.ops_per_start),
            }
        )
    return out


def _f(value: float | None, width: int = 8, digits: int = 2) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 3) + "n/a"


def render_table(doc: dict[str, Any]) -> str:
    cells = {(c["layers"], c["concurrency"], c["mode"]): c for c in doc["cells"]}
    m = doc["machine"]
    lines = [
        f"reelbus bench mounts, {doc['date']}: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"load average {m['loadavg_at_start'][0]:.2f} at start, "
        f"{doc.get('loadavg_at_end', [float('nan')])[0]:.2f} at the end",
        f"id-mapped bind mounts: {', '.join(doc['idmapped'])}"
        + (f" ({'; '.join(doc['notes'])})" if doc["notes"] else ""),
        "times in ms; PL = per-layer (2*(1+2L) mount ops/start), CP = common-parent (6 ops/start); "
        "ratio = PL / CP; cpu50 = median CPU time (user+sys) of a start's thread; "
        "hlth99 = p99 of the health probe during the starts; peak = mount-table lines in the namespace",
        "",
        f"{'L':>3} {'C':>3} | {'PL p50':>8} {'PL p99':>8} {'CP p50':>8} {'CP p99':>8} | "
        f"{'ratio p50':>9} {'ratio p99':>9} | {'PL cpu50':>8} {'CP cpu50':>8} {'ratio':>6} | "
        f"{'PL hlth99':>9} {'CP hlth99':>9} | {'PL peak':>7} {'CP peak':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in doc["ratios"]:
        pl = cells[(r["layers"], r["concurrency"], Mode.PER_LAYER.value)]
        cp = cells[(r["layers"], r["concurrency"], Mode.COMMON_PARENT.value)]
        lines.append(
            f"{r['layers']:>3} {r['concurrency']:>3} | {_f(pl['start_p50_ms'])} {_f(pl['start_p99_ms'])} "
            f"{_f(cp['start_p50_ms'])} {_f(cp['start_p99_ms'])} | {_f(r['start_p50'], 9)} "
            f"{_f(r['start_p99'], 9)} | {_f(pl['start_cpu_p50_ms'])} {_f(cp['start_cpu_p50_ms'])} "
            f"{_f(r['start_cpu_p50'], 6)} | {_f(pl['health_p99_ms'], 9)} {_f(cp['health_p99_ms'], 9)} | "
            f"{pl['table_peak']:>7} {cp['table_peak']:>7}"
        )
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 5))
    styles = {Mode.PER_LAYER.value: "-", Mode.COMMON_PARENT.value: "--"}
    layer_counts = sorted({c["layers"] for c in doc["cells"]})
    concurrency = sorted({c["concurrency"] for c in doc["cells"]})
    colours = dict(zip(layer_counts, ("tab:blue", "tab:red", "tab:green", "tab:purple"), strict=False))
    for mode, line in styles.items():
        for layers in layer_counts:
            row = sorted(
                (c for c in doc["cells"] if c["mode"] == mode and c["layers"] == layers),
                key=lambda c: c["concurrency"],
            )
            xs = [c["concurrency"] for c in row]
            label = f"{mode}, {layers} layers"
            style = dict(linestyle=line, color=colours.get(layers), marker="o")
            axes[0].plot(xs, [c["start_p50_ms"] for c in row], label=label, **style)
            axes[1].plot(xs, [c["start_p99_ms"] for c in row], label=label, **style)
            axes[2].plot(xs, [c["start_cpu_p50_ms"] for c in row], label=label, **style)
            axes[3].plot(xs, [c["health_p99_ms"] for c in row], label=label, **style)
    titles = (
        "container start p50 (ms)",
        "container start p99 (ms)",
        "CPU time per start p50 (ms)",
        "health probe p99 during starts (ms)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent container starts")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(
        f"reelbus bench mounts {doc['date'][:10]}: {m['cpus']} CPUs, kernel {m['kernel']}, "
        f"id-mapped: {', '.join(doc['idmapped'])}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _list(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: comma-separated positive integers") from None
    if not items or any(v < 1 or v > 64 for v in items):
        raise argparse.ArgumentTypeError(f"{value!r}: each between 1 and 64")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small grid: concurrency 1,4,16; layers 10,50")
    parser.add_argument("--concurrency", type=_list, help="concurrent starts (default 1,2,4,8,16,32,64)")
    parser.add_argument("--layers", type=_list, help="image layers (default 10,50)")
    parser.add_argument(
        "--starts", type=int, default=128, help="starts per cell, at least (default 128; --quick 32)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="rounds per cell, the modes alternating, samples pooled (default 3; --quick 1)",
    )
    parser.add_argument("--no-idmap", action="store_true", help="plain bind mounts instead of id-mapped ones")
    parser.add_argument("--out", type=Path, help="folder of the PNG and JSON (default .reelbus/bench/)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cell at most (default 600)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    starts = args.starts if args.starts != 128 or not quick else 32
    opts = Options(
        layers=args.layers or (QUICK_LAYERS if quick else FULL_LAYERS),
        concurrency=args.concurrency or (QUICK_CONCURRENCY if quick else FULL_CONCURRENCY),
        starts=max(1, starts),
        repeat=max(1, args.repeat or (1 if quick else 3)),
        idmap=not args.no_idmap,
        out=args.out or infra.Layout.from_env().home / "bench",
        timeout=args.timeout,
    )

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        doc = run_grid(opts, say)
    except ProbeFailed as exc:
        print(f"reelbus bench mounts: {exc}", file=sys.stderr)
        return 1
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = doc["date"].replace(":", "").replace("+0000", "Z")
    png, js = opts.out / f"mounts-{stamp}.png", opts.out / f"mounts-{stamp}.json"
    js.write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2), flush=True)
    else:
        print(render_table(doc), flush=True)
    plot(doc, png)
    print(f"\nwrote {png} and {js}", file=sys.stderr)
    return 0
