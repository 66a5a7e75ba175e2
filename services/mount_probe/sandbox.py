"""``python -m services.mount_probe.sandbox``: one probe round in a private mount namespace.

Reads a JSON config on stdin, prints a JSON result on stdout (``probe.RoundResult``), logs to stderr.

1. Passive, in the caller's namespace (the node's): lines of ``/proc/self/mountinfo`` and the time to
   read it.
2. ``unshare(CLONE_NEWNS)``; refused (no CAP_SYS_ADMIN): the result says so and stops there.
3. ``/`` made recursively private at once (nothing propagates back to the node), a tmpfs mounted on
   the empty directory ``root`` the caller made; the image's layers are small directories on it.
4. A user namespace (ids 0-65535 mapped to 100000-165535) for the id maps; one trial id-mapped bind
   mount and overlay. Refused: plain bind mounts instead, the same operations otherwise, and the
   result says so (``idmapped: false`` and why).
5. ``concurrency`` forked workers (they share this namespace, and the kernel's mount lock is global)
   start ``starts_per_worker`` containers each, released together; each keeps its containers' root
   file systems mounted until all of its starts are done, then unmounts them (the teardown). Meanwhile
   this process runs the health probe (``posix_spawn`` of ``/bin/true`` and its ``waitpid``, a stand-in
   for an exec probe) and reads the namespace's mount table, until every worker has exited. The peak
   table size is the largest this process saw or a worker saw right after its last start.

When this process exits, the namespace, its tmpfs and every mount in it go with it.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from services.mount_probe.adapters.syscalls import (
    CLONE_NEWNS,
    IDMAP_REFUSALS,
    MS_PRIVATE,
    MS_REC,
    Syscalls,
    make_userns_fd,
)
from services.mount_probe.probe import Mode, ops_per_start, start_container

MOUNTINFO = "/proc/self/mountinfo"
HEALTH_COMMAND = "/bin/true"


def log(msg: str) -> None:
    print(f"mount-probe sandbox[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def read_mount_table() -> tuple[int, float]:
    """Lines of this namespace's mount table and the ms it took to read it whole."""
    t0 = time.perf_counter_ns()
    with open(MOUNTINFO, "rb") as f:
        data = f.read()
    return data.count(b"\n"), (time.perf_counter_ns() - t0) / 1e6


def read_mount_table_median(reads: int = 5) -> tuple[int, float]:
    """The table's size and the median of ``reads`` read times (one read is a few µs: jitter)."""
    samples = [read_mount_table() for _ in range(reads)]
    times = sorted(ms for _, ms in samples)
    return samples[-1][0], times[len(times) // 2]


def health_probe() -> float:
    """ms to spawn ``/bin/true`` and reap it."""
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(HEALTH_COMMAND, [HEALTH_COMMAND], {})
    os.waitpid(pid, 0)
    return (time.perf_counter_ns() - t0) / 1e6


class KernelMountOps:
    """``probe.MountOps`` with the real syscalls; id-mapped binds when ``userns_fd`` is set."""

    def __init__(self, calls: Syscalls, userns_fd: int | None) -> None:
        self.calls = calls
        self.userns_fd = userns_fd

    def make_dirs(self, paths: Sequence[str]) -> None:
        for path in paths:
            os.makedirs(path, exist_ok=True)

    def bind(self, source: str, target: str) -> None:
        fd = self.calls.open_tree(source)
        try:
            if self.userns_fd is not None:
                self.calls.mount_setattr_idmap(fd, self.userns_fd)
            self.calls.move_mount(fd, target)
        finally:
            os.close(fd)

    def overlay(self, lowers: Sequence[str], upper: str, work: str, target: str) -> None:
        data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
        self.calls.mount("overlay", target, "overlay", 0, data)

    def umount(self, target: str) -> None:
        self.calls.umount2(target, 0)

    def read_user_info(self, rootfs: str) -> None:
        with open(f"{rootfs}/etc/passwd", "rb") as f:
            f.read()


def make_image(root: str, layers: int) -> tuple[str, list[str]]:
    """``layers`` small layer directories under ``root/img``; the first holds /etc/passwd."""
    image = f"{root}/img"
    names = [f"l{i}" for i in range(layers)]
    for i, name in enumerate(names):
        os.makedirs(f"{image}/{name}/etc", exist_ok=True)
        with open(f"{image}/{name}/etc/layer-{i}", "w") as f:
            f.write(f"layer {i}\n")
    with open(f"{image}/{names[0]}/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    return image, names


def try_idmap(calls: Syscalls, root: str, image: str, names: list[str]) -> tuple[int | None, str | None]:
    """The user-namespace fd if an id-mapped start works here, else None and why not."""
    try:
        userns_fd = make_userns_fd(calls)
    except OSError as exc:
        return None, f"no user namespace for the id map ({exc})"
    ops = KernelMountOps(calls, userns_fd)
    trial = f"{root}/trial"
    try:
        record = start_container(ops, time.perf_counter_ns, Mode.PER_LAYER, image, names[:2], trial)
        ops.umount(record.rootfs)
    except OSError as exc:
        os.close(userns_fd)
        if exc.errno in IDMAP_REFUSALS:
            return None, f"id-mapped mounts refused here ({exc}); plain bind mounts instead, same count"
        raise
    return userns_fd, None


def worker(
    ops: KernelMountOps,
    mode: Mode,
    image: str,
    names: list[str],
    root: str,
    index: int,
    starts: int,
    go_fd: int,
) -> dict[str, Any]:
    os.read(go_fd, 1)  # released together with the other workers (EOF when the parent closes it)
    out: dict[str, Any] = {
        "start_ms": [],
        "start_cpu_ms": [],
        "counted_ops": [],
        "op_ms": {},
        "teardown_ms": [],
        "errors": [],
    }
    rootfses: list[str] = []
    try:
        for n in range(starts):
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            record = start_container(ops, time.perf_counter_ns, mode, image, names, f"{root}/w{index}/c{n}")
            out["start_ms"].append((time.perf_counter_ns() - t0) / 1e6)
            out["start_cpu_ms"].append((time.thread_time_ns() - c0) / 1e6)
            out["counted_ops"].append(record.counted_ops)
            for kind, values in record.op_ms.items():
                out["op_ms"].setdefault(kind, []).extend(values)
            rootfses.append(record.rootfs)
    except OSError as exc:
        out["errors"].append(f"worker {index}: {exc}")
    out["table_at_last_start"] = read_mount_table()[0]  # all of this worker's containers are up
    for rootfs in rootfses:
        t0 = time.perf_counter_ns()
        try:
            ops.umount(rootfs)
        except OSError as exc:
            out["errors"].append(f"worker {index} teardown: {exc}")
        out["teardown_ms"].append((time.perf_counter_ns() - t0) / 1e6)
    return out


def run_workers(
    ops: KernelMountOps, calls: Syscalls, config: dict[str, Any], image: str, names: list[str], root: str
) -> dict[str, Any]:
    mode = Mode(config["mode"])
    concurrency = int(config["concurrency"])
    starts = int(config["starts_per_worker"])
    interval = float(config.get("health_interval_ms", 5.0)) / 1000
    results = f"{root}/results"
    os.makedirs(results)
    go_r, go_w = os.pipe()
    pids: list[int] = []
    for index in range(concurrency):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(go_w)
                calls.die_with_parent(signal.SIGKILL)
                out = worker(ops, mode, image, names, root, index, starts, go_r)
                with open(f"{results}/w{index}.json", "w") as f:
                    json.dump(out, f)
            except BaseException as exc:  # a worker must never return into the parent's code
                print(f"worker {index} failed: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        pids.append(pid)
    os.close(go_r)
    health_idle = [health_probe() for _ in range(5)]
    table_before, _ = read_mount_table()
    peak, health, reads = table_before, [], []
    t0 = time.perf_counter_ns()
    os.close(go_w)  # go
    running = set(pids)
    exit_codes: dict[int, int] = {}
    while running:
        health.append(health_probe())
        size, read_ms = read_mount_table()
        reads.append(read_ms)
        peak = max(peak, size)
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                exit_codes[pid] = os.waitstatus_to_exitcode(status)
        if running:
            time.sleep(interval)
    wall_ms = (time.perf_counter_ns() - t0) / 1e6
    table_after, _ = read_mount_table()
    merged: dict[str, Any] = {
        "start_ms": [],
        "start_cpu_ms": [],
        "counted_ops": [],
        "op_ms": {},
        "teardown_ms": [],
        "errors": [],
    }
    for index, pid in enumerate(pids):
        path = f"{results}/w{index}.json"
        if exit_codes.get(pid) != 0 or not os.path.exists(path):
            merged["errors"].append(f"worker {index} exited with {exit_codes.get(pid)}")
            continue
        with open(path) as f:
            out = json.load(f)
        for key in ("start_ms", "start_cpu_ms", "counted_ops", "teardown_ms", "errors"):
            merged[key].extend(out[key])
        for kind, values in out["op_ms"].items():
            merged["op_ms"].setdefault(kind, []).extend(values)
        peak = max(peak, int(out["table_at_last_start"]))
    merged.update(
        health_idle_ms=health_idle,
        health_ms=health,
        table_before=table_before,
        table_peak=peak,
        table_after=table_after,
        table_read_ms=reads,
        wall_ms=wall_ms,
    )
    return merged


def run(config: dict[str, Any]) -> dict[str, Any]:
    mode = Mode(config["mode"])
    layers = int(config["layers"])
    root = str(config["root"])
    host_size, host_read_ms = read_mount_table_median()
    result: dict[str, Any] = {
        "kernel": platform.release(),
        "host_table_size": host_size,
        "host_table_read_ms": host_read_ms,
        "mode": mode.value,
        "layers": layers,
        "concurrency": int(config["concurrency"]),
        "ops_per_start": ops_per_start(mode, layers),
    }
    calls = Syscalls()
    try:
        calls.unshare(CLONE_NEWNS)
    except OSError as exc:
        reason = f"no private mount namespace: {exc} (CAP_SYS_ADMIN is needed); passive measurements only"
        log(reason)
        health = [health_probe() for _ in range(5)]
        result.update(privileged=False, reason=reason, health_idle_ms=health, health_ms=health)
        return result
    calls.mount("none", "/", None, MS_REC | MS_PRIVATE, None)  # before any mount: nothing propagates out
    calls.mount("tmpfs", root, "tmpfs", 0, "size=256m,mode=0755")
    image, names = make_image(root, layers)
    userns_fd: int | None = None
    note: str | None = None
    if config.get("idmap", True):
        userns_fd, note = try_idmap(calls, root, image, names)
    else:
        note = "id-mapped mounts turned off by the caller; plain bind mounts, same count"
    if note:
        log(note)
    ops = KernelMountOps(calls, userns_fd)
    result.update(privileged=True, idmapped=userns_fd is not None, idmap_note=note)
    result.update(run_workers(ops, calls, config, image, names, root))
    return result


def main() -> None:
    config = json.loads(sys.stdin.read())
    json.dump(run(config), sys.stdout)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
