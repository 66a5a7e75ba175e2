"""``reelbus bench billing``: subscribe charges through the Galera cluster next to a single MariaDB.

One run on this machine, loopback only, the same workload against two databases:

- **galera**: the billing cluster through HAProxy's write endpoint (galera-1; every commit is
  certified with galera-2 and garbd, synchronous replication; binlog on for the async replica);
- **single**: a plain, non-replicated MariaDB the bench starts for the run (``mariadbd`` as the
  ``mysql`` user, data in ``.reelbus/data/bench-mariadb``, a free loopback port, binlog off, the
  Galera nodes' InnoDB settings otherwise) and stops by its pid at the end.

The workload is the billing service's own subscribe, called in this process: ``handlers.subscribe``
with ``Deps`` built as the service builds them (a write pool, the simulated provider on a pool of
its own, ``Database.in_transaction`` with its retries), card ``tok_ok``, a new account and a unique
Idempotency-Key per charge. One subscribe is three InnoDB transactions: the idempotency claim, the
provider's capture record, then the subscription, charge, four ledger legs, two outbox rows and
the stored answer. Calling the handler rather than the HTTP service measures the database's cost
without aiohttp, tokens and the outbox relay's Kafka traffic in the way: those are the same on
both targets and would only dilute the ratio.

``--concurrency`` workers, closed loop (the next charge as soon as the last one is answered), for
``--duration`` seconds or ``--max-charges`` after a ``--warmup`` not counted. Each target gets a
database of its own (``bench_billing_<run id>``), dropped at the end. Reported per target:
charges/s (answered 201), p50/p99 of the whole subscribe call, errors by kind, transaction retries
(Galera certification conflicts, deadlocks), and the ratio galera/single.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from services.cli import galera, infra
from services.cli.bench_playback import percentile

NAME = "bench-mariadb"
CARD = "tok_ok"
PLAN: Final = "BASIC"
DB_LOGGER = "reelbus.billing.db"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
SHARED_CPUS_NOTE = (
    "the load client, both databases, HAProxy, garbd and whatever else runs on this machine share "
    "these CPUs and one disk"
)

Say = Callable[[str], None]


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why."""


# --- pure helpers ------------------------------------------------------------------------------


def mariadb_config(*, datadir: Path, socket_path: Path, pid_file: Path, port: int) -> str:
    """The single server's option file: the Galera nodes' server and InnoDB settings, without
    wsrep and without the binary log."""
    return f"""# reelbus bench billing: a plain, non-replicated MariaDB for the run (written by the bench).
[mysqld]
datadir = {datadir}
socket = {socket_path}
pid_file = {pid_file}
port = {port}
bind_address = 127.0.0.1
skip_name_resolve = ON
max_connections = 200
performance_schema = OFF
innodb_buffer_pool_size = 64M
default_storage_engine = InnoDB
innodb_autoinc_lock_mode = 2
innodb_flush_log_at_trx_commit = 2
skip_log_bin
server_id = 1
"""


def database_name(run_id: str) -> str:
    if not run_id.isalnum():
        raise ValueError(f"run id {run_id!r} must be letters and digits")
    return f"bench_billing_{run_id}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class Budget:
    """The most charges one target may be sent, shared by its workers."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass
class TargetResult:
    """One closed-loop run against one database."""

    label: str
    endpoint: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, 201 answers only
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: int = 0  # transactions run again by Database.in_transaction

    @property
    def charges(self) -> int:
        return len(self.latencies)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def per_s(self) -> float:
        return self.charges / self.seconds if self.seconds > 0 else 0.0

    def quantiles_ms(self) -> tuple[float | None, float | None]:
        ordered = sorted(self.latencies)
        return _ms(percentile(ordered, 0.5)), _ms(percentile(ordered, 0.99))

    def as_dict(self) -> dict[str, Any]:
        p50, p99 = self.quantiles_ms()
        return {
            "target": self.label,
            "endpoint": self.endpoint,
            "charges": self.charges,
            "seconds": round(self.seconds, 3),
            "charges_per_s": round(self.per_s, 1),
            "p50_ms": _round(p50),
            "p99_ms": _round(p99),
            "errors": self.error_count,
            "errors_by_kind": dict(self.errors),
            "transaction_retries": self.retries,
        }


@dataclass
class BillingBench:
    machine: dict[str, Any]
    settings: dict[str, Any]
    galera: TargetResult
    single: TargetResult
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        g50, g99 = self.galera.quantiles_ms()
        s50, s99 = self.single.quantiles_ms()
        return {
            "charges_per_s": _div(self.galera.per_s, self.single.per_s),
            "p50": _div(g50, s50),
            "p99": _div(g99, s99),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "results": [self.galera.as_dict(), self.single.as_dict()],
            "ratio_galera_over_single": {k: _round(v, 4) for k, v in self.ratios().items()},
            "notes": self.notes,
        }


def render_table(result: BillingBench) -> str:
    s, m = result.settings, result.machine
    lines = [
        f"reelbus bench billing: {s['concurrency']} concurrent subscribers, closed loop, "
        f"{s['duration_s']:g} s per target after a {s['warmup_s']:g} s warm-up (not counted), "
        f"at most {s['max_charges']} charges per target, card {CARD}, plan {PLAN}, loopback",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, {m['os']}, "
        f"Python {m['python']}, {s['mariadb']}, {m['date']}",
        f"note: {SHARED_CPUS_NOTE}.",
        "",
    ]
    ratios = result.ratios()
    header = ("target", "charges/s", "p50 ms", "p99 ms", "errors", "retries")
    rows: list[tuple[str, ...]] = [header]
    for target in (result.galera, result.single):
        p50, p99 = target.quantiles_ms()
        rows.append(
            (
                f"{target.label} ({target.endpoint})",
                f"{target.per_s:,.1f}",
                _fmt(p50, ".2f"),
                _fmt(p99, ".2f"),
                str(target.error_count),
                str(target.retries),
            )
        )
    rows.append(
        (
            "ratio galera/single",
            _fmt(ratios["charges_per_s"], ".3f"),
            _fmt(ratios["p50"], ".2f"),
            _fmt(ratios["p99"], ".2f"),
            "",
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    lines += [
        "",
        f"galera: {result.galera.charges} charges in {result.galera.seconds:.2f} s, errors "
        f"{_counts(result.galera.errors)}; single: {result.single.charges} charges in "
        f"{result.single.seconds:.2f} s, errors {_counts(result.single.errors)}",
        "measured: the whole handlers.subscribe call (3 InnoDB transactions: idempotency claim, "
        "provider capture, subscription + charge + 4 ledger legs + 2 outbox rows + stored answer).",
    ]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "none"


# --- the single MariaDB ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SingleServer:
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def start_single(layout: infra.Layout, port: int, say: Say) -> SingleServer:
    """Initialise (once) and start the bench's own mariadbd; answers once it takes queries."""
    if not Path(galera.MARIADBD).exists():
        raise BenchError(f"{galera.MARIADBD} is missing: bring the cluster up first (it installs MariaDB)")
    galera._init_datadir(layout, NAME)  # mariadb-install-db as the mysql user, into an empty folder
    data = galera.datadir(layout, NAME)
    run = galera._owned_dir(galera.run_dir(layout))
    pid_file = run / f"{NAME}.pid"
    sock = galera.socket_path(layout, NAME)
    config = galera.config_dir(layout) / f"{NAME}.cnf"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(mariadb_config(datadir=data, socket_path=sock, pid_file=pid_file, port=port))
    config.chmod(0o644)
    log = layout.log_file(NAME)
    log.parent.mkdir(parents=True, exist_ok=True)
    user = galera._server_user()
    say(f"starting a single MariaDB on 127.0.0.1:{port} (data {layout.data / NAME}, log {log})")
    with log.open("ab") as out:
        process = subprocess.Popen(
            [galera.MARIADBD, f"--defaults-file={config}"],
            cwd=data,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=user,
            group=user,
            start_new_session=True,
        )
    server = SingleServer(port, process, log)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise BenchError(f"the single MariaDB exited with {process.returncode} at start; see {log}")
        with contextlib.suppress(galera.SqlError):
            if galera.node_sql(layout, NAME, "SELECT 1", timeout=3.0) == [("1",)]:
                break
        if time.monotonic() > deadline:
            stop_single(server, say)
            raise BenchError(f"the single MariaDB did not answer within {START_TIMEOUT:.0f} s; see {log}")
        time.sleep(0.3)
    galera.node_sql(
        layout,
        NAME,
        f"CREATE USER IF NOT EXISTS '{galera.APP_USER}'@'127.0.0.1' IDENTIFIED BY '{galera.APP_PASSWORD}';"
        f"GRANT ALL PRIVILEGES ON *.* TO '{galera.APP_USER}'@'127.0.0.1'",
    )
    return server


def stop_single(server: SingleServer, say: Say) -> None:
    """SIGTERM to the pid the bench started (a clean shutdown), SIGKILL if it lingers."""
    process = server.process
    if process.poll() is not None:
        return
    say(f"stopping the single MariaDB (pid {process.pid})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


# --- the load ------------------------------------------------------------------------------------


class _RetryCounter(logging.Handler):
    """Counts Database.in_transaction's retry warnings (and keeps them off stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.count += 1


@contextlib.contextmanager
def _counting_retries() -> Iterator[_RetryCounter]:
    logger = logging.getLogger(DB_LOGGER)
    counter = _RetryCounter()
    before = logger.propagate
    logger.addHandler(counter)
    logger.propagate = False
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.propagate = before


@dataclass(frozen=True)
class Options:
    concurrency: int
    duration: float
    warmup: float
    max_charges: int


async def run_target(label: str, port: int, database: str, opts: Options, say: Say) -> TargetResult:
    """The subscribe workload against 127.0.0.1:``port``, on a fresh database ``database``."""
    import aiomysql

    from services.billing import handlers
    from services.billing.adapters.db import Database, create_pool
    from services.billing.adapters.provider import PaymentProvider

    await asyncio.to_thread(galera.endpoint_sql, port, f"CREATE DATABASE {database}")
    user, password = galera.APP_USER, galera.APP_PASSWORD
    pools: list[Any] = []
    result = TargetResult(label, f"127.0.0.1:{port}")
    try:
        write = await create_pool("127.0.0.1", port, user, password, database, opts.concurrency)
        pools.append(write)
        own = await create_pool("127.0.0.1", port, user, password, database, opts.concurrency)
        pools.append(own)
        db = Database(write, write, attempts=8)
        await db.create_schema()
        provider = PaymentProvider(Database(own, own, 8), timeout_seconds=3.0, slow_seconds=1.0)
        deps = handlers.Deps(db, provider, dt.timedelta(days=30))

        async def one() -> tuple[str | None, float]:
            account = uuid.uuid4()
            cmd = handlers.Subscribe(account_id=account, plan=PLAN, card_token=CARD)
            t0 = time.perf_counter()
            try:
                reply = await handlers.subscribe(
                    cmd, token_account=str(account), key=str(uuid.uuid4()), deps=deps
                )
            except Exception as exc:  # counted by kind, the run goes on
                return type(exc).__name__, time.perf_counter() - t0
            elapsed = time.perf_counter() - t0
            return (None if reply.status == 201 else str(reply.status)), elapsed

        async def phase(seconds: float, budget: Budget, record: TargetResult | None) -> float:
            stop_at = time.perf_counter() + seconds

            async def worker() -> None:
                while time.perf_counter() < stop_at and budget.take():
                    error, elapsed = await one()
                    if record is None:
                        continue
                    if error is None:
                        record.latencies.append(elapsed)
                    else:
                        record.errors[error] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(opts.concurrency)))
            return time.perf_counter() - started

        # INSERT IGNORE of a claimed key warns (pymysql.err.Warning) by design: not news here.
        with _counting_retries() as retries, warnings.catch_warnings():
            warnings.simplefilter("ignore", aiomysql.Warning)
            if opts.warmup > 0:
                say(f"{label}: warm-up {opts.warmup:g} s")
                await phase(opts.warmup, Budget(opts.max_charges), None)
            retries.count = 0
            say(f"{label}: {opts.concurrency} workers for {opts.duration:g} s")
            result.seconds = await phase(opts.duration, Budget(opts.max_charges), result)
            result.retries = retries.count
        p50, p99 = result.quantiles_ms()
        say(
            f"{label}: {result.charges} charges, {result.per_s:.1f}/s, p50 {_fmt(p50, '.2f')} ms, "
            f"p99 {_fmt(p99, '.2f')} ms, {result.error_count} errors, {result.retries} retries"
        )
    finally:
        for pool in pools:
            pool.close()
            await pool.wait_closed()
        try:
            await asyncio.to_thread(
                galera.endpoint_sql, port, f"DROP DATABASE IF EXISTS {database}", None, 60.0
            )
        except galera.SqlError as exc:
            say(f"{label}: could not drop {database}: {exc}")
    return result


def _cluster_notes(layout: infra.Layout) -> list[str]:
    members = galera.cluster_members(layout)
    notes = [f"Galera cluster members during the run: {', '.join(members) or 'unknown'}"]
    if not {"galera-1", "galera-2", "garbd"} <= set(members):
        notes.append("WARNING: the cluster is not whole (galera-1, galera-2 and garbd expected)")
    return notes


def _mariadb_version() -> str:
    try:
        out = subprocess.run([galera.MARIADBD, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "MariaDB unknown"
    words = out.stdout.split()
    version = next((w for w in words if w[:1].isdigit()), "unknown")
    return f"MariaDB {version}"


async def bench_billing(layout: infra.Layout, opts: Options, single_port: int, say: Say) -> BillingBench:
    from services.cli.bench import machine_info

    up = await infra.up(layout, list(galera.NAMES), progress=say)
    try:
        run_id = uuid.uuid4().hex[:8]
        database = database_name(run_id)
        ports = galera.Ports.from_env()
        notes = _cluster_notes(layout)
        say(f"galera via HAProxy 127.0.0.1:{ports.write}; {notes[0]}")
        galera_result = await run_target("galera", ports.write, database, opts, say)
        server = start_single(layout, single_port or _free_port(), say)
        try:
            single_result = await run_target("single", server.port, database, opts, say)
        finally:
            stop_single(server, say)
        notes.append(
            "both servers: innodb_flush_log_at_trx_commit=2, 64M buffer pool; the Galera nodes also "
            "write a binlog (log_slave_updates) for the async replica, the single server has none"
        )
        settings = {
            "concurrency": opts.concurrency,
            "duration_s": opts.duration,
            "warmup_s": opts.warmup,
            "max_charges": opts.max_charges,
            "mariadb": _mariadb_version(),
            "workload": "services.billing.handlers.subscribe called in-process (pools per target)",
            "run_id": run_id,
        }
        return BillingBench(machine_info(layout), settings, galera_result, single_result, notes)
    finally:
        if up.started:
            say(f"stopping what the bench started: {', '.join(up.started)}")
            infra.down(layout, up.started, progress=say)


# --- the command --------------------------------------------------------------------------------


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _bounded(limit: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text!r} must be at most {limit}")
        return value

    return parse


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value) or value > 3600:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and at most 3600 seconds")
    return value


def _warmup_arg(text: str) -> float:
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _seconds_arg(text)


def _port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 picks a free one)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.description is None:
        parser.description = __doc__
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--concurrency",
        type=_bounded(150),
        default=16,
        help="concurrent subscribers per target (default 16, at most 150)",
    )
    parser.add_argument(
        "--duration", type=_seconds_arg, default=15.0, help="seconds of load per target (default 15)"
    )
    parser.add_argument(
        "--warmup",
        type=_warmup_arg,
        default=2.0,
        help="seconds of warm-up per target, not counted (default 2)",
    )
    parser.add_argument(
        "--max-charges",
        type=_bounded(1_000_000),
        default=200_000,
        help="most charges per target, workers together (default 200000)",
    )
    parser.add_argument(
        "--single-port", type=_port_arg, default=0, help="port of the single MariaDB (default: a free one)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    layout = infra.Layout.from_env()
    opts = Options(args.concurrency, args.duration, args.warmup, args.max_charges)
    try:
        result = asyncio.run(bench_billing(layout, opts, args.single_port, _progress))
    except (BenchError, infra.InfraError, ValueError, OSError) as exc:
        print(f"reelbus bench billing: the bench failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(render_table(result))
    return 0
