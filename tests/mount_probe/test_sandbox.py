"""The real probe: container-start mount sequences in a private mount namespace on this machine.

Runs as root here (the sandbox unshares a mount namespace, mounts a tmpfs, id-maps bind mounts,
mounts overlays). Where the test process is not privileged, the privileged tests check instead that
the round says clearly why nothing was mounted. Nothing may reach the node's own mount table.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading

import pytest

from services.mount_probe.adapters.runner import RoundConfig, run_round, run_round_async
from services.mount_probe.probe import Mode, RoundResult, ops_per_start

PRIVILEGED = os.geteuid() == 0
NO_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


def leftovers() -> set[str]:
    return set(glob.glob("/tmp/rbmp-*"))


def run_watching_the_host(config: RoundConfig) -> tuple[RoundResult, set[int]]:
    """The round, while another thread reads the node's mount table: the sizes it saw."""
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(len(host_mounts()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return run_round(config, timeout=90), seen
    finally:
        stop.set()
        watcher.join()


def check_unprivileged(result: RoundResult) -> None:
    assert result.privileged is False and not result.active
    assert result.reason is not None and "CAP_SYS_ADMIN" in result.reason and "passive" in result.reason
    assert result.host_table_size > 0 and result.host_table_read_ms > 0
    assert result.start_ms == () and result.idmapped is None


@pytest.mark.parametrize(("mode", "layers"), [(Mode.PER_LAYER, 10), (Mode.COMMON_PARENT, 10)])
def test_concurrent_starts_in_a_private_namespace(mode: Mode, layers: int) -> None:
    before, dirs = host_mounts(), leftovers()
    config = RoundConfig(mode, layers, concurrency=4, starts_per_worker=3)
    result, host_sizes = run_watching_the_host(config)
    if not PRIVILEGED:
        check_unprivileged(result)
        return
    assert result.privileged and result.active, result.errors or result.reason
    assert result.kernel == os.uname().release
    # Id-mapped here, or refused with the reason said and plain binds standing in.
    assert result.idmapped is True or (result.idmapped is False and "refused" in (result.idmap_note or ""))
    # The blog's count, per start: 2(1+2L) per-layer, 6 common-parent.
    expected = 2 * (1 + 2 * layers) if mode is Mode.PER_LAYER else 6
    assert result.ops_per_start == ops_per_start(mode, layers) == expected
    assert result.counted_ops == (expected,) * 12
    assert len(result.start_ms) == 12 and all(ms > 0 for ms in result.start_ms)
    per_start = layers if mode is Mode.PER_LAYER else 1
    assert len(result.op_ms["bind"]) == 12 * 2 * per_start and all(ms > 0 for ms in result.op_ms["bind"])
    assert len(result.op_ms["overlay"]) == 12 * 2 and all(ms > 0 for ms in result.op_ms["overlay"])
    assert len(result.teardown_ms) == 12 and result.health_ms and all(ms > 0 for ms in result.health_ms)
    # The namespace's table grew while the containers ran (a root file system each, kept until the
    # worker's last start) and is back where it was once they were torn down.
    assert result.table_before > 0 and result.table_peak > result.table_before
    assert result.table_after == result.table_before
    # The node never saw any of it, and the sandbox's directory is gone.
    assert host_sizes == {len(before)} and host_mounts() == before
    assert leftovers() == dirs


def test_fifty_layers_per_layer_versus_common_parent() -> None:
    """The point of PR #12092: per start, 202 operations against 6."""
    per_layer = run_round(RoundConfig(Mode.PER_LAYER, 50, concurrency=2, starts_per_worker=2), timeout=90)
    common = run_round(RoundConfig(Mode.COMMON_PARENT, 50, concurrency=2, starts_per_worker=2), timeout=90)
    if not PRIVILEGED:
        check_unprivileged(per_layer)
        return
    assert set(per_layer.counted_ops) == {202} and set(common.counted_ops) == {6}
    assert len(per_layer.counted_op_ms) == 4 * 202 and len(common.counted_op_ms) == 4 * 6


def test_id_maps_turned_off_keep_the_count_and_say_so() -> None:
    result = run_round(RoundConfig(Mode.PER_LAYER, 5, concurrency=2, idmap=False), timeout=60)
    if not PRIVILEGED:
        check_unprivileged(result)
        return
    assert result.active and result.idmapped is False
    assert result.idmap_note is not None and "plain bind mounts" in result.idmap_note
    assert set(result.counted_ops) == {2 * (1 + 2 * 5)}


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_without_cap_sys_admin_it_says_why_and_measures_passively() -> None:
    """The same sandbox with CAP_SYS_ADMIN dropped from its bounding set (as an unprivileged pod)."""
    dirs = leftovers()
    result = run_round(RoundConfig(Mode.PER_LAYER, 10, concurrency=2), timeout=60, prefix=NO_SYS_ADMIN)
    check_unprivileged(result)
    assert "Operation not permitted" in (result.reason or "")
    assert leftovers() == dirs


async def test_the_async_runner_gives_the_same_answer() -> None:
    result = await run_round_async(RoundConfig(Mode.COMMON_PARENT, 3, concurrency=1), timeout=60)
    if not PRIVILEGED:
        check_unprivileged(result)
        return
    assert result.active and result.counted_ops == (6,)
