"""``reelbus bench playback``: heartbeat throughput of the running stack next to a bare aiohttp handler.

One run on this machine, loopback only:

- **stack**: N simulated players (``--players``), each with its own account, profile and playback
  session, made once before any timing through the gateway as the end-to-end journey does (sign-up,
  login, profile; a ``SubscriptionStarted`` and the exchange point's health and contents published
  on Kafka; a session started once the projections have them). Each player then sends heartbeats
  through the gateway, closed loop (one request in flight per player, the next as soon as the
  answer is in), for ``--duration`` seconds or until ``--max-requests``, after a ``--warmup`` not
  counted. Reported: heartbeats/s answered 202, the other answers by status, p50/p99 of the HTTP
  round trip at the client (202s only), and p50/p99 of accept → Cassandra write.
- **accept → write**: history observes ``history_accept_to_write_seconds{event_type="Heartbeat"}``
  right after the Cassandra batch a heartbeat caused completed, as now minus the event's
  ``event_time`` (the wall clock playback read when its heartbeat handler began, truncated to the
  millisecond, so at most 1 ms too long). The bench reads history's ``/metrics`` before and after the
  run, once history has written every accepted heartbeat (its count grew by the number of 202s;
  ``--drain-timeout``), and takes the percentiles from the difference of the buckets, interpolated
  within a bucket as Prometheus' ``histogram_quantile`` does.
- **bare**: a subprocess serving one aiohttp POST handler that parses the same JSON body and answers
  202, driven by the same client, concurrency and duration: the ceiling of aiohttp on this machine.

The client is one aiohttp ``ClientSession`` in this process with a pool of ``--players`` connections.
Every process shares the same CPUs, so the client's own cost is in both figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.cli import infra, stack

METRIC = "history_accept_to_write_seconds"
EVENT_TYPE = "Heartbeat"
LAG_METRIC = "reelbus_consumer_lag"
HISTORY_GROUP = "history"
PLAYBACK_TOPIC = "playback.events"
APPLIANCE = "oca-ix-lax-01"  # the exchange point of services/playback/appliances.example.yaml
PASSWORD = "correct horse battery"
SETUP_CONCURRENCY = 4  # sign-up and login hash passwords (argon2id): a few at a time on a small machine
REQUEST_TIMEOUT = 10.0
METRICS_TIMEOUT = 60.0
SESSION_WAIT = 90.0  # for the projections to have the subscription, profile, title and appliance
SHARED_CPUS_NOTE = (
    "the load client, gateway, accounts, catalog, playback, history, Kafka, Cassandra, PostgreSQL, "
    "Redis, the schema registry and Zipkin all share these CPUs; the bare server shares them with "
    "the client and the idle stack"
)

Say = Callable[[str], None]


class BenchError(RuntimeError):
    """The bench cannot go on; the message says why."""


class StackDown(BenchError):
    """A service of the stack does not answer ready."""


# --- pure helpers: percentiles and Prometheus histograms -------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1) of sorted samples, linear between the closest ranks; None if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not between 0 and 1")
    n = len(sorted_values)
    if n == 0:
        return None
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass(frozen=True)
class Histogram:
    """One Prometheus histogram series: cumulative bucket counts by upper bound (``+Inf`` last)."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum: float

    @classmethod
    def empty(cls) -> Histogram:
        return cls((), 0.0, 0.0)


def parse_histogram(text: str, name: str, labels: Mapping[str, str]) -> Histogram:
    """The series of histogram ``name`` whose labels include ``labels``, from /metrics text;
    ``Histogram.empty()`` when the series is not there (a labelled series appears on first use)."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            found = True
            if sample.name == f"{name}_bucket":
                buckets[float(sample.labels["le"])] = float(sample.value)
            elif sample.name == f"{name}_count":
                count = float(sample.value)
            elif sample.name == f"{name}_sum":
                total = float(sample.value)
    if not found:
        return Histogram.empty()
    return Histogram(tuple(sorted(buckets.items())), count, total)


def histogram_diff(before: Histogram, after: Histogram) -> Histogram:
    """What was observed between two reads of the same series. An empty ``before`` counts as zeros;
    a bucket that went down means the process restarted in between, which makes the diff meaningless."""
    if not before.buckets:
        return after
    if not after.buckets:
        raise ValueError("the histogram disappeared between the two reads (did the service restart?)")
    if [le for le, _ in before.buckets] != [le for le, _ in after.buckets]:
        raise ValueError("the two reads have different bucket bounds")
    diff: list[tuple[float, float]] = []
    for (le, b), (_, a) in zip(before.buckets, after.buckets, strict=True):
        if a < b:
            raise ValueError(f"bucket le={le} went from {b} down to {a} (did the service restart?)")
        diff.append((le, a - b))
    if after.count < before.count:
        raise ValueError("the count went down (did the service restart?)")
    return Histogram(tuple(diff), after.count - before.count, after.sum - before.sum)


def histogram_quantile(q: float, hist: Histogram) -> float | None:
    """Prometheus' ``histogram_quantile``: find the bucket holding rank q * count and interpolate
    linearly inside it (from 0 for the first bucket). A rank in the ``+Inf`` bucket answers the
    highest finite bound. None when nothing was observed."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is not between 0 and 1")
    if not hist.buckets or hist.buckets[-1][0] != math.inf:
        raise ValueError("a histogram needs its +Inf bucket")
    total = hist.buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, cumulative in hist.buckets:
        if cumulative >= rank and cumulative > lower_count:
            if le == math.inf:
                return lower_bound
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
        lower_bound, lower_count = le, cumulative
    return lower_bound


def highest_bound(hist: Histogram) -> float | None:
    """The upper bound of the highest bucket holding an observation (``inf`` when that is the
    ``+Inf`` bucket); None when nothing was observed."""
    if not hist.buckets or hist.buckets[-1][1] <= 0:
        return None
    total = hist.buckets[-1][1]
    return next(le for le, cumulative in hist.buckets if cumulative >= total)


def gauge_total(text: str, name: str, labels: Mapping[str, str]) -> float | None:
    """The sum of the series of gauge ``name`` whose labels include ``labels``; None if there is none."""
    total: float | None = None
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + float(sample.value)
    return total


def status_key(status: int | None, error: BaseException | None = None) -> str:
    """How an answer is counted: its HTTP status, or the exception's class name when there was none."""
    if error is not None:
        return type(error).__name__
    return str(status)


# --- results ---------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One closed-loop run: the accepted (202) round trips and every other outcome."""

    label: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, 202 answers only
    others: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def accepted(self) -> int:
        return len(self.latencies)

    @property
    def per_s(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    def quantiles_ms(self) -> tuple[float | None, float | None]:
        ordered = sorted(self.latencies)
        return _ms(percentile(ordered, 0.5)), _ms(percentile(ordered, 0.99))


@dataclass
class WriteLatency:
    """Accept → Cassandra write, from the difference of history's histogram around the run."""

    hist: Histogram
    expected: int  # heartbeats answered 202 during the run
    complete: bool
    drain_seconds: float  # end of the run → the /metrics read that saw them all (reads take seconds)

    @property
    def max_bound_ms(self) -> float | None:
        """The bound of the highest bucket anything fell in: every write took at most this long
        (``inf`` when some fell beyond the highest finite bound)."""
        return _ms(highest_bound(self.hist))

    def quantiles_ms(self) -> tuple[float | None, float | None]:
        if not self.hist.buckets:
            return None, None
        return _ms(histogram_quantile(0.5, self.hist)), _ms(histogram_quantile(0.99, self.hist))


@dataclass
class PlaybackBench:
    machine: dict[str, Any]
    settings: dict[str, Any]
    stack: LoadResult
    bare: LoadResult
    write: WriteLatency
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        sp50, sp99 = self.stack.quantiles_ms()
        bp50, bp99 = self.bare.quantiles_ms()
        return {
            "requests_per_s": _div(self.stack.per_s, self.bare.per_s),
            "p50": _div(sp50, bp50),
            "p99": _div(sp99, bp99),
        }

    def as_dict(self) -> dict[str, Any]:
        sp50, sp99 = self.stack.quantiles_ms()
        bp50, bp99 = self.bare.quantiles_ms()
        wp50, wp99 = self.write.quantiles_ms()
        w = self.write
        return {
            "machine": self.machine,
            "settings": self.settings,
            "results": [
                {
                    "what": "stack: heartbeat HTTP round trip via the gateway",
                    "accepted": self.stack.accepted,
                    "seconds": round(self.stack.seconds, 3),
                    "requests_per_s": round(self.stack.per_s, 1),
                    "p50_ms": _round(sp50),
                    "p99_ms": _round(sp99),
                    "other_answers": dict(self.stack.others),
                },
                {
                    "what": "stack: accept -> Cassandra write (history histogram)",
                    "observed": int(w.hist.count),
                    "expected": w.expected,
                    "complete": w.complete,
                    "drain_seconds": round(w.drain_seconds, 2),
                    "max_at_most_ms": _round(w.max_bound_ms),
                    "mean_ms": _round(_ms(w.hist.sum / w.hist.count) if w.hist.count else None),
                    "p50_ms": _round(wp50),
                    "p99_ms": _round(wp99),
                },
                {
                    "what": "bare aiohttp handler",
                    "accepted": self.bare.accepted,
                    "seconds": round(self.bare.seconds, 3),
                    "requests_per_s": round(self.bare.per_s, 1),
                    "p50_ms": _round(bp50),
                    "p99_ms": _round(bp99),
                    "other_answers": dict(self.bare.others),
                },
            ],
            "ratio_stack_over_bare": {k: _round(v, 4) for k, v in self.ratios().items()},
            "notes": self.notes,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(result: PlaybackBench) -> str:
    s, m = result.settings, result.machine
    sp50, sp99 = result.stack.quantiles_ms()
    bp50, bp99 = result.bare.quantiles_ms()
    wp50, wp99 = result.write.quantiles_ms()
    ratios = result.ratios()
    lines = [
        f"reelbus bench playback: {s['players']} players, closed loop (one request in flight each), "
        f"{s['duration_s']:g} s per run after a {s['warmup_s']:g} s warm-up (not counted), "
        f"at most {s['max_requests']} requests per run, loopback",
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, {m['os']}, "
        f"Python {m['python']}, aiohttp {s['aiohttp']}, {m['date']}",
        f"note: {SHARED_CPUS_NOTE}.",
        "",
    ]
    header = ("what", "requests/s", "p50 ms", "p99 ms", "stack/bare")
    rows: list[tuple[str, ...]] = [
        header,
        (
            "stack: heartbeat round trip (gateway, 202)",
            f"{result.stack.per_s:,.1f}",
            _fmt(sp50, ".2f"),
            _fmt(sp99, ".2f"),
            _fmt(ratios["requests_per_s"], ".3f"),
        ),
        (
            "stack: accept -> Cassandra write (history)",
            "-",
            _fmt(wp50, ".2f"),
            _fmt(wp99, ".2f"),
            "",
        ),
        (
            "bare aiohttp handler (202)",
            f"{result.bare.per_s:,.1f}",
            _fmt(bp50, ".2f"),
            _fmt(bp99, ".2f"),
            "1",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    w = result.write
    lines += [
        "",
        f"round-trip latency stack/bare: p50 x{_fmt(ratios['p50'], '.1f')}, "
        f"p99 x{_fmt(ratios['p99'], '.1f')}",
        f"answers other than 202: stack {_counts(result.stack.others)}; bare {_counts(result.bare.others)}",
        f"stack: {result.stack.accepted} heartbeats accepted in {result.stack.seconds:.2f} s; "
        f"bare: {result.bare.accepted} requests in {result.bare.seconds:.2f} s",
        f"accept -> write: {int(w.hist.count)} of {w.expected} accepted heartbeats observed by history "
        f"({'all written' if w.complete else 'INCOMPLETE'}; seen by a /metrics read "
        f"{w.drain_seconds:.1f} s after the last answer, each read taking seconds); "
        f"mean {_fmt(_ms(w.hist.sum / w.hist.count) if w.hist.count else None, '.2f')} ms, "
        f"max at most {_fmt(w.max_bound_ms, '.0f')} ms (highest bucket used).",
        f"  measured as: the Heartbeat's event_time (playback's wall clock when its handler began, ms "
        f"resolution) to the end of history's Cassandra batch, observed by history in {METRIC}; read "
        "from history's /metrics before and after the run, buckets subtracted, percentiles "
        "interpolated within a bucket (histogram_quantile).",
    ]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "none"


# --- the load generator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where one simulated player sends its heartbeats."""

    url: str
    headers: Mapping[str, str]
    runtime_ms: int


def heartbeat_body(k: int, runtime_ms: int) -> bytes:
    """The k-th heartbeat's JSON body: the position moves on a second per heartbeat, within the runtime."""
    position = (k * 1000) % max(runtime_ms, 1)
    return (
        b'{"position_ms":%d,"bitrate_kbps":3000,"buffer_ms":12000,"throughput_kbps":8000,"rebuffer_ms":0}'
        % position
    )


class Budget:
    """The most requests one run may send, shared by its players."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def drive(
    client: aiohttp.ClientSession, targets: Sequence[Target], seconds: float, max_requests: int, label: str
) -> LoadResult:
    """Every target's player sends heartbeats back to back until ``seconds`` pass or the budget is spent.
    ``seconds`` is from the first request to the last answer (the requests started before the end
    finish and count)."""
    result = LoadResult(label)
    budget = Budget(max_requests)
    start = time.perf_counter()
    end = start + seconds
    latencies = result.latencies
    others = result.others

    async def player(target: Target, offset: int) -> None:
        k = offset
        while time.perf_counter() < end and budget.take():
            k += 1
            body = heartbeat_body(k, target.runtime_ms)
            t0 = time.perf_counter()
            try:
                async with client.post(target.url, data=body, headers=target.headers) as resp:
                    await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as exc:
                others[status_key(None, exc)] += 1
                continue
            if status == 202:
                latencies.append(time.perf_counter() - t0)
                continue
            others[status_key(status)] += 1
            if status == 429:  # the gateway's per-account limit: wait as a client would, within the run
                await asyncio.sleep(max(0.0, min(_seconds(retry_after), end - time.perf_counter())))

    await asyncio.gather(*(player(t, i * 1_000_000) for i, t in enumerate(targets)))
    result.seconds = time.perf_counter() - start
    return result


def _seconds(value: str | None) -> float:
    try:
        return float(value) if value else 1.0
    except ValueError:
        return 1.0


def new_client(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        headers={"Content-Type": "application/json"},
    )


# --- the bare aiohttp server ------------------------------------------------------------------

BARE_SERVER = r"""
import asyncio, socket, sys
from aiohttp import web

async def heartbeat(request):
    body = await request.json()
    return web.json_response(
        {"session_id": request.match_info["session_id"], "position_ms": body["position_ms"]}, status=202
    )

async def main():
    app = web.Application()
    app.router.add_post("/v1/playback/sessions/{session_id}/heartbeats", heartbeat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    await web.SockSite(runner, sock).start()
    print(sock.getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def bare_server() -> AsyncIterator[str]:
    """A subprocess serving the trivial handler; yields its base URL, terminates it at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE_SERVER, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20.0)
        except TimeoutError:
            raise BenchError("the bare aiohttp server did not start within 20 s") from None
        if not line.strip().isdigit():
            raise BenchError(f"the bare aiohttp server did not start (exit code {proc.returncode})")
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# --- the stack: checks, players, history's metrics --------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    gateway: str
    history: str

    @classmethod
    def default(cls) -> Endpoints:
        ports = {s.name: s.port for s in stack.SERVICES}
        return cls(f"http://127.0.0.1:{ports['gateway']}", f"http://127.0.0.1:{ports['history']}")


NEEDED = ("accounts", "catalog", "playback", "history", "gateway")


def check_stack(layout: infra.Layout, endpoints: Endpoints) -> None:
    """Every service the journey uses answers ready, and so does Kafka; ``StackDown`` names the rest."""
    ports = {s.name: s.port for s in stack.SERVICES}
    down = [n for n in NEEDED if not infra.http_ok(f"http://127.0.0.1:{ports[n]}/readyz")]
    if down:
        raise StackDown(
            f"the stack is not up: {', '.join(down)} not ready. Start it first: reelbus up {' '.join(NEEDED)}"
        )


@dataclass(frozen=True)
class Player:
    account_id: str
    token: str
    profile_id: str
    session_id: str = ""


async def _call(
    client: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    deadline: float | None = None,
) -> tuple[int, Any]:
    """One JSON request; a 429 is waited out (Retry-After) and retried until ``deadline``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while True:
        async with client.request(method, url, json=body, headers=headers) as resp:
            text = await resp.text()
            status = resp.status
            retry_after = _seconds(resp.headers.get("Retry-After"))
        if status == 429 and deadline is not None and time.monotonic() + retry_after < deadline:
            await asyncio.sleep(retry_after)
            continue
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text


def source_address(i: int) -> str:
    """A loopback address of its own per player (127.77.x.y): the gateway limits sign-up and login per
    client address, and each simulated player is a different client."""
    return f"127.77.{i // 250}.{i % 250 + 1}"


async def sign_up(gateway: str, i: int, run_id: str, deadline: float) -> Player:
    connector = aiohttp.TCPConnector(local_addr=(source_address(i), 0))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30.0)
    ) as client:
        email = f"bench-{run_id}-{i}@example.com"
        status, body = await _call(
            client,
            "POST",
            f"{gateway}/v1/accounts",
            {"email": email, "password": PASSWORD},
            deadline=deadline,
        )
        if status != 201:
            raise BenchError(f"sign-up answered {status}: {body}")
        account_id = body["account_id"]
        status, body = await _call(
            client,
            "POST",
            f"{gateway}/v1/auth/login",
            {"email": email, "password": PASSWORD, "device_id": f"bench-{i}", "device_type": "TV"},
            deadline=deadline,
        )
        if status != 200:
            raise BenchError(f"login answered {status}: {body}")
        token = body["access_token"]
        status, body = await _call(
            client,
            "POST",
            f"{gateway}/v1/accounts/{account_id}/profiles",
            {"name": f"Bench {i}"},
            token,
            deadline,
        )
        if status != 201:
            raise BenchError(f"profile creation answered {status}: {body}")
        return Player(account_id, token, body["profile_id"])


async def pick_title(client: aiohttp.ClientSession, gateway: str, token: str) -> tuple[str, int]:
    status, page = await _call(client, "GET", f"{gateway}/v1/catalog/titles?limit=5&genre=drama", token=token)
    if status != 200 or not page.get("items"):
        raise BenchError(f"the catalog answered {status}: {page}")
    item = page["items"][0]
    return str(item["title_id"]), int(item["runtime_ms"])


async def publish_entitlements(layout: infra.Layout, account_ids: Sequence[str], title_id: str) -> None:
    """What billing and the Open Connect appliances would publish: a subscription per account, and the
    exchange point healthy and holding the title (as the end-to-end journey does)."""
    from services.bus.contracts import Contracts
    from services.bus.events import ApplianceContents, ApplianceHealth, Plan, SubscriptionStarted
    from services.bus.producer import Producer, ProducerConfig
    from services.bus.registry import RegistryClient
    from services.bus.serde import Serde

    contracts = Contracts.load()
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    producer = Producer(
        ProducerConfig(layout.bootstrap_servers, client_id=f"bench-playback-{os.getpid()}"), contracts, serde
    )
    await producer.start(["billing.events", "opencdn.appliances"])
    try:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        for account_id in account_ids:
            event = SubscriptionStarted(
                account_id=uuid.UUID(account_id),
                subscription_id=uuid.uuid4(),
                plan=Plan.STANDARD,
                period_start=now - dt.timedelta(days=1),
                period_end=now + dt.timedelta(days=30),
                amount_cents=1599,
                currency="USD",
            )
            await producer.send("billing.events", account_id, event)
        health = ApplianceHealth(
            appliance_id=APPLIANCE,
            healthy=True,
            load=0.2,
            reported_at=now,
            base_url=f"https://{APPLIANCE}.example.net",
            site="lax",
        )
        contents = ApplianceContents(appliance_id=APPLIANCE, title_ids=[title_id], full_snapshot=False)
        await producer.send("opencdn.appliances", APPLIANCE, health)
        await producer.send("opencdn.appliances", APPLIANCE, contents)
    finally:
        await producer.close()


async def start_session(
    client: aiohttp.ClientSession, gateway: str, player: Player, title_id: str, deadline: float
) -> Player:
    """Start the player's session once playback's projections have what it needs."""
    last: tuple[int, Any] = (0, None)
    while time.monotonic() < deadline:
        last = await _call(
            client,
            "POST",
            f"{gateway}/v1/playback/sessions",
            {"profile_id": player.profile_id, "title_id": title_id},
            player.token,
            deadline,
        )
        status, body = last
        if status == 201:
            return dataclasses.replace(player, session_id=body["session_id"])
        if status not in (403, 404, 503):
            break
        await asyncio.sleep(0.5)
    raise BenchError(f"no playback session for profile {player.profile_id}: last answer {last[0]}: {last[1]}")


async def setup_players(layout: infra.Layout, gateway: str, n: int, say: Say) -> tuple[list[Player], int]:
    """N players with a running session each; the title's runtime."""
    run_id = uuid.uuid4().hex[:10]
    deadline = time.monotonic() + 300.0
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(i: int) -> Player:
        async with gate:
            return await sign_up(gateway, i, run_id, deadline)

    say(f"signing up {n} accounts with a profile each through the gateway")
    players = list(await asyncio.gather(*(one(i) for i in range(n))))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as client:
        title_id, runtime_ms = await pick_title(client, gateway, players[0].token)
        say(f"publishing {n} SubscriptionStarted and the appliance's health and contents on Kafka")
        await publish_entitlements(layout, [p.account_id for p in players], title_id)
        say(f"starting {n} playback sessions of title {title_id}")
        session_deadline = time.monotonic() + SESSION_WAIT
        players = list(
            await asyncio.gather(
                *(start_session(client, gateway, p, title_id, session_deadline) for p in players)
            )
        )
    return players, runtime_ms


async def stop_sessions(gateway: str, players: Sequence[Player], runtime_ms: int) -> None:
    """Best effort: stop every session the bench started (not timed)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as client:

        async def stop(p: Player) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await _call(
                    client,
                    "POST",
                    f"{gateway}/v1/playback/sessions/{p.session_id}/stop",
                    {"position_ms": min(runtime_ms, 1000)},
                    p.token,
                )

        await asyncio.gather(*(stop(p) for p in players))


class HistoryMetrics:
    """Reads history's /metrics: the accept → write histogram and its consumer lag on playback.events."""

    def __init__(self, client: aiohttp.ClientSession, url: str) -> None:
        self.client = client
        self.url = f"{url}/metrics"

    async def read(self) -> tuple[Histogram, float | None]:
        hist, lag, _ = await self._read()
        return hist, lag

    async def _read(self) -> tuple[Histogram, float | None, str]:
        async with self.client.get(self.url) as resp:
            if resp.status != 200:
                raise BenchError(f"history's /metrics answered {resp.status}")
            text = await resp.text()
        hist = parse_histogram(text, METRIC, {"event_type": EVENT_TYPE})
        lag = gauge_total(text, LAG_METRIC, {"group": HISTORY_GROUP, "topic": PLAYBACK_TOPIC})
        return hist, lag, text

    async def histogram(self) -> Histogram:
        """The heartbeats' series now; ``BenchError`` when the running history has no such metric."""
        hist, _, text = await self._read()
        if not hist.buckets and f"# TYPE {METRIC} histogram" not in text:
            raise BenchError(
                f"history's /metrics has no {METRIC}: the running history predates the metric; "
                "restart it (reelbus down history && reelbus up history)"
            )
        return hist


async def wait_written(
    metrics: HistoryMetrics, baseline: Histogram, expected: int, timeout: float, say: Say
) -> tuple[Histogram, bool]:
    """Poll history until its histogram counted ``expected`` more heartbeats; give up at ``timeout``,
    or earlier when its consumer lag on playback.events stays 0 and the count stops moving for 5 s
    (a heartbeat that changed nothing is not written, so it is never observed)."""
    start = time.monotonic()
    last_count, still_since, last_say = -1.0, time.monotonic(), 0.0
    while True:
        hist, lag = await metrics.read()
        seen = hist.count - baseline.count
        if seen >= expected:
            return hist, True
        now = time.monotonic()
        if hist.count != last_count:
            last_count, still_since = hist.count, now
        if lag == 0 and now - still_since >= 5.0:
            return hist, False
        if now - start >= timeout:
            return hist, False
        if now - last_say >= 5.0:
            say(f"history has written {int(seen)} of {expected} heartbeats (consumer lag {lag})")
            last_say = now
        await asyncio.sleep(0.25)


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    players: int
    duration: float
    warmup: float
    max_requests: int
    drain_timeout: float


async def bench_playback(
    layout: infra.Layout, endpoints: Endpoints, opts: Options, machine: dict[str, Any], say: Say
) -> PlaybackBench:
    check_stack(layout, endpoints)
    players, runtime_ms = await setup_players(layout, endpoints.gateway, opts.players, say)
    notes: list[str] = []
    try:
        # history's /metrics works out its consumer lag on every read: seconds, not milliseconds
        metrics_timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT)
        async with (
            new_client(opts.players) as client,
            aiohttp.ClientSession(timeout=metrics_timeout) as metrics_client,
        ):
            metrics = HistoryMetrics(metrics_client, endpoints.history)

            # The bare server first, while the stack is idle.
            async with bare_server() as base:
                bare_targets = [
                    Target(f"{base}/v1/playback/sessions/{p.session_id}/heartbeats", {}, runtime_ms)
                    for p in players
                ]
                say(f"bare aiohttp: warm-up {opts.warmup:g} s, then {opts.duration:g} s")
                await drive(client, bare_targets, opts.warmup, opts.max_requests, "warm-up")
                bare = await drive(client, bare_targets, opts.duration, opts.max_requests, "bare")
            say(f"bare aiohttp: {bare.per_s:,.0f} requests/s")

            targets = [
                Target(
                    f"{endpoints.gateway}/v1/playback/sessions/{p.session_id}/heartbeats",
                    {"Authorization": f"Bearer {p.token}"},
                    runtime_ms,
                )
                for p in players
            ]
            before_warmup = await metrics.histogram()
            say(f"stack: warm-up {opts.warmup:g} s")
            warm = await drive(client, targets, opts.warmup, opts.max_requests, "warm-up")
            _, warm_done = await wait_written(metrics, before_warmup, warm.accepted, opts.drain_timeout, say)
            if not warm_done:
                notes.append("history had not written every warm-up heartbeat before the run")
            before = await metrics.histogram()
            say(f"stack: {opts.duration:g} s of heartbeats through the gateway")
            run = await drive(client, targets, opts.duration, opts.max_requests, "stack")
            ended = time.monotonic()
            say(f"stack: {run.per_s:,.0f} heartbeats/s accepted; waiting for history to write them")
            after, complete = await wait_written(metrics, before, run.accepted, opts.drain_timeout, say)
            drained = time.monotonic()
            diff = histogram_diff(before, after)
            write = WriteLatency(
                hist=diff,
                expected=run.accepted,
                complete=complete,
                drain_seconds=drained - ended,
            )
    finally:
        say("stopping the bench's playback sessions")
        await stop_sessions(endpoints.gateway, players, runtime_ms)
    if run.others.get("429"):
        notes.append(
            "the gateway's per-account rate limit (GATEWAY_RATE_LIMIT_ACCOUNT_REQUESTS per "
            "GATEWAY_RATE_LIMIT_ACCOUNT_WINDOW_SECONDS, 300 per 60 s by default) answered 429: the limit, "
            "not the stack's capacity, bounded the run; use more --players"
        )
    if not complete:
        notes.append(
            f"history observed {int(diff.count)} of {run.accepted} accepted heartbeats within "
            f"{opts.drain_timeout:g} s; the accept -> write figures cover those only"
        )
    notes.append(
        "closed loop: a slower answer delays that player's next request, so the round-trip percentiles "
        "are of the requests sent, not of a fixed arrival rate"
    )
    settings = {
        "players": opts.players,
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "max_requests": opts.max_requests,
        "drain_timeout_s": opts.drain_timeout,
        "gateway": endpoints.gateway,
        "history": endpoints.history,
        "aiohttp": aiohttp.__version__,
        "shared_cpus": SHARED_CPUS_NOTE,
    }
    return PlaybackBench(machine, settings, run, bare, write, notes)


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


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.description is None:
        parser.description = __doc__
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--players", type=_positive_int, default=32, help="concurrent simulated players (default 32)"
    )
    parser.add_argument(
        "--duration", type=_seconds_arg, default=20.0, help="seconds of load per run (default 20)"
    )
    parser.add_argument(
        "--warmup", type=_seconds_arg, default=2.0, help="seconds of warm-up before each run, not counted"
    )
    parser.add_argument(
        "--max-requests",
        type=_positive_int,
        default=1_000_000,
        help="most requests per run, all players together (default 1000000)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_seconds_arg,
        default=120.0,
        help="most seconds to wait for history to write the accepted heartbeats (default 120)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from services.cli.bench import machine_info

    layout = infra.Layout.from_env()
    endpoints = Endpoints.default()
    opts = Options(args.players, args.duration, args.warmup, args.max_requests, args.drain_timeout)
    try:
        result = asyncio.run(bench_playback(layout, endpoints, opts, machine_info(layout), _progress))
    except StackDown as exc:
        print(f"reelbus bench playback: {exc}", file=sys.stderr)
        return 2
    except (BenchError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"reelbus bench playback: the bench failed: {exc!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(render_table(result))
    return 0
