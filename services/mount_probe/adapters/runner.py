"""Runs one probe round in the sandbox process and reads its result.

The sandbox (``python -m services.mount_probe.sandbox``) is a process of its own, in its own session:
its mount namespace, with every mount in it, ends with it and its workers. The empty directory its
tmpfs goes on is made here, in the node's file system, and removed here once it has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from services.mount_probe.probe import Mode, RoundResult

SANDBOX_MODULE = "services.mount_probe.sandbox"
REPO_ROOT = Path(__file__).resolve().parents[3]


class ProbeFailed(RuntimeError):
    """The sandbox did not answer: it crashed, printed no result, or ran past its time."""


@dataclass(frozen=True)
class RoundConfig:
    mode: Mode
    layers: int
    concurrency: int
    starts_per_worker: int = 1
    idmap: bool = True  # try id-mapped mounts (falls back to plain binds when refused)
    health_interval_ms: float = 5.0

    def payload(self, root: str) -> bytes:
        doc = asdict(self)
        doc["mode"] = self.mode.value
        doc["root"] = root
        return json.dumps(doc).encode()


def sandbox_command(prefix: Sequence[str] = ()) -> list[str]:
    """``prefix`` runs before the interpreter (``setpriv --bounding-set=-sys_admin`` in a test)."""
    return [*prefix, sys.executable, "-m", SANDBOX_MODULE]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _parse(returncode: int | None, out: bytes, err: bytes) -> RoundResult:
    if returncode != 0:
        raise ProbeFailed(f"the sandbox exited with {returncode}: {err.decode(errors='replace')[-2000:]}")
    try:
        return RoundResult.from_dict(json.loads(out))
    except (ValueError, KeyError, TypeError) as exc:
        tail = err.decode(errors="replace")[-2000:]
        raise ProbeFailed(f"the sandbox printed no result ({exc}): {tail}") from None


def _remove_root(root: str) -> None:
    """The directory must be empty in the node's view: all writes went to the sandbox's tmpfs."""
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(root)


def run_round(config: RoundConfig, timeout: float, prefix: Sequence[str] = ()) -> RoundResult:
    """One round, blocking (the bench and tests)."""
    root = tempfile.mkdtemp(prefix="rbmp-")
    proc = subprocess.Popen(
        sandbox_command(prefix),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=_env(),
    )
    try:
        out, err = proc.communicate(config.payload(root), timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session this call started: sandbox and workers
        proc.communicate()
        raise ProbeFailed(f"the round ran past {timeout:.0f}s") from None
    finally:
        if proc.poll() is not None:
            _remove_root(root)
    return _parse(proc.returncode, out, err)


async def run_round_async(config: RoundConfig, timeout: float, prefix: Sequence[str] = ()) -> RoundResult:
    """One round, from the service's event loop."""
    root = tempfile.mkdtemp(prefix="rbmp-")
    proc = await asyncio.create_subprocess_exec(
        *sandbox_command(prefix),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=_env(),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(config.payload(root))
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.shield(proc.wait())
        _remove_root(root)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise ProbeFailed(f"the round ran past {timeout:.0f}s") from None
    _remove_root(root)
    return _parse(proc.returncode, out, err)
