"""``reelbus load --rate N --duration D``: an open-loop load generator through the gateway's public API.

**Open loop.** Arrivals are drawn ahead of time from a Poisson process at ``--rate`` per second (the
gaps are exponential, from a seeded generator) and fired on the clock, whether or not earlier requests
have answered: a slow stack does not slow the arrivals down, it piles requests up. Each request's
latency is measured from the time it was *scheduled*, not from the time it was sent, so a generator
that falls behind (or a target that stalls it) shows up in the latencies instead of being hidden
(coordinated omission). At most ``--max-in-flight`` requests are outstanding; an arrival that finds
them all busy is not sent and is counted as an overflow, by kind, in the report.

**What arrives.** ``--rate`` is the rate of user *actions*, each one request, drawn from a mix
(``MIX``): browsing the catalog (a page, a title), a profile's history, the account's profiles,
starting playback, sign-ups (followed by the new viewer's login and profile), logins, subscribing
through billing (``tok_ok``; some cards with ``tok_renewal_decline``), a declined card
(``tok_decline``, 402), reading the billing account, cancelling at the period's end, and bad input
(each kind with the 4xx the API documents for it). A playback session, once started, sends
heartbeats on its own clock every ``--heartbeat-interval`` seconds (10 s by default: the low end of
the "every 10-30 s" the ``Heartbeat`` schema documents; playback enforces no cadence), sometimes
pauses (the client holds its heartbeats: the API has no pause or resume route) and then stops. Those
follow-ups are scheduled from the start's scheduled time, so they are open-loop too; the total request
rate is therefore higher than ``--rate`` and the report gives both.

**Virtual users.** ``--users`` viewers are made before the clock starts (sign-up, login, a profile,
a subscription with ``tok_ok``), each with its own account, profile and token, and, when the gateway
is on a loopback address, a loopback source address of its own (127.78.x.y): the gateway limits
sign-ups and logins per client address, and each viewer is a different client. Sign-ups during the run
add viewers. Renewals happen on billing's own clock (``BILLING_PERIOD_SECONDS``, 30 days by
default), not through the API, so a run sees them only against a billing started with short periods.

**Outcomes.** Each request names the statuses that mean success and the 4xx that are expected for
it (bad input, a declined card, a viewer whose entitlement playback has not projected yet): those are
counted as expected, not as errors. 429 (the gateway's rate limits) is counted apart. Anything else,
a 5xx, an unexpected 4xx or no answer at all, is an unexpected error. When the gateway says billing
is unavailable (502/503 naming ``upstream: billing``) at the start, the billing share of the mix is
skipped and the report says so.

**Appliances.** Playback steers only to Open Connect appliances that reported themselves healthy and
holding the title on ``opencdn.appliances``; natively nothing reports for them, so the generator does,
as the end-to-end tests do (``--no-stock-appliances`` turns it off).

**Report.** Achieved action rate against the asked one, requests per second, latency p50/p90/p99/max
per endpoint, counts by status and by error, expected 4xx against unexpected errors, the overflow,
and the consumer lag at the end for the consumer groups of the declared topics (committed offsets
against high watermarks, through Kafka's admin API). ``--json FILE`` writes it as JSON. The exit code
is 1 when unexpected errors exceed ``--max-error-rate`` of the requests sent, 2 when the gateway
does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import heapq
import ipaddress
import itertools
import json
import math
import os
import platform
import random
import sys
import time
import urllib.parse
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import aiohttp

EXIT_ERRORS = 1
EXIT_UNREACHABLE = 2
PASSWORD = "correct horse battery"
REQUEST_TIMEOUT = 30.0
STOP = "POST /v1/playback/sessions/{id}/stop"
STOP_AT_END = STOP + " (end of run)"
SETTLE_GRACE = 30.0  # seconds after which a viewer's subscription and profile must be projected
APPLIANCES = ("oca-ix-lax-01", "oca-ix-sjc-01")  # the exchange points of appliances.example.yaml

# The mix of actions, as relative weights (per arrival).
MIX: Mapping[str, float] = {
    "browse": 22.0,  # GET /v1/catalog/titles (a page, sometimes by genre)
    "title": 14.0,  # GET /v1/catalog/titles/{title_id}
    "history": 8.0,  # GET /v1/profiles/{profile_id}/history
    "profiles": 3.0,  # GET /v1/accounts/{account_id}/profiles
    "play": 20.0,  # POST /v1/playback/sessions, then heartbeats and a stop on the session's clock
    "signup": 3.0,  # POST /v1/accounts, then the new viewer's login and profile
    "login": 4.0,  # POST /v1/auth/login
    "subscribe": 4.0,  # POST /v1/billing/subscriptions (tok_ok, sometimes tok_renewal_decline)
    "decline": 2.0,  # POST /v1/billing/subscriptions with tok_decline: 402
    "billing_account": 4.0,  # GET /v1/billing/accounts/{account_id}
    "cancel": 1.0,  # POST /v1/billing/subscriptions/{id}/cancel at the period's end
    "bad": 15.0,  # bad input of several kinds, each with its documented 4xx
}
BILLING_KINDS = frozenset({"subscribe", "decline", "billing_account", "cancel"})

Outcome = Literal["ok", "expected", "rate_limited", "error"]


# --- arrivals -----------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``1.5m``, ``2h`` to seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    for suffix in ("ms", "s", "m", "h"):
        if raw.endswith(suffix):
            number, scale = raw[: -len(suffix)], units[suffix]
            break
    else:
        number, scale = raw, 1.0
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30, 30s, 2m)") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
    return seconds


def poisson_arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival offsets in [0, duration) of a Poisson process of ``rate`` per second (exponential gaps)."""
    if rate <= 0:
        return []
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start
    kind: str


def plan_arrivals(rate: float, duration: float, mix: Mapping[str, float], seed: int) -> list[Arrival]:
    """The whole schedule of actions, fixed before the clock starts (so it cannot depend on answers)."""
    rng = random.Random(seed)
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    times = poisson_arrivals(rate, duration, rng)
    return [Arrival(t, k) for t, k in zip(times, rng.choices(kinds, weights, k=len(times)), strict=True)]


# --- the open-loop scheduler --------------------------------------------------------------------


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


Job = Callable[[float], Awaitable[None]]  # called with its scheduled (clock) time


@dataclass(order=True)
class _Entry:
    at: float
    seq: int
    name: str = field(compare=False)
    job: Job = field(compare=False)


@dataclass
class SchedulerStats:
    fired: Counter[str] = field(default_factory=Counter)
    overflow: Counter[str] = field(default_factory=Counter)
    discarded: int = 0  # due after the end; never sent
    send_delays: list[float] = field(default_factory=list)  # seconds late, fire time - scheduled time


class OpenLoopScheduler:
    """Fires jobs at their scheduled clock times, never waiting for earlier jobs to finish.

    ``schedule`` may be called at any time, also by running jobs (a session's heartbeats). A job due
    when ``max_in_flight`` jobs are running is not started: it is counted in ``stats.overflow``.
    """

    def __init__(self, clock: Clock, max_in_flight: int) -> None:
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.stats = SchedulerStats()
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def pending(self) -> int:
        return len(self._heap)

    def schedule(self, at: float, name: str, job: Job) -> None:
        heapq.heappush(self._heap, _Entry(at, next(self._seq), name, job))
        self._wake.set()

    async def run_until(self, end: float) -> None:
        """Fire every job due up to ``end`` (clock time), on time; returns at ``end``."""
        while True:
            now = self.clock.now()
            if self._heap and self._heap[0].at <= now:
                self._fire(heapq.heappop(self._heap), now)
                continue
            if now >= end:
                return
            wake_at = min(end, self._heap[0].at) if self._heap else end
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - now))

    def discard_pending(self) -> int:
        n = len(self._heap)
        self._heap.clear()
        self.stats.discarded += n
        return n

    async def drain(self, timeout: float) -> int:
        """Wait for the running jobs, at most ``timeout`` s; cancels the rest and returns how many."""
        if self._tasks:
            _done, late = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
            return len(late)
        return 0

    def _fire(self, entry: _Entry, now: float) -> None:
        async def call(job: Job, at: float) -> None:
            await job(at)

        if len(self._tasks) >= self.max_in_flight:
            self.stats.overflow[entry.name] += 1
            return
        self.stats.fired[entry.name] += 1
        self.stats.send_delays.append(max(0.0, now - entry.at))
        task = asyncio.create_task(call(entry.job, entry.at), name=f"load:{entry.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --- recording and the report -------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    endpoint: str
    latency: float  # seconds from the scheduled time to the answer
    status: int | None  # None: no answer
    outcome: Outcome
    label: str  # "201", "402 card_declined", "ClientConnectorError", ...


def classify(status: int | None, ok: Iterable[int], expected: Iterable[int]) -> Outcome:
    if status is None:
        return "error"
    if status in ok:
        return "ok"
    if status in expected:
        return "expected"
    if status == 429:
        return "rate_limited"
    return "error"


class Recorder:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.skipped: Counter[str] = Counter()  # actions not sent, and why

    def record(
        self,
        endpoint: str,
        scheduled: float,
        finished: float,
        status: int | None,
        outcome: Outcome,
        label: str,
    ) -> Sample:
        sample = Sample(endpoint, max(0.0, finished - scheduled), status, outcome, label)
        self.samples.append(sample)
        return sample

    def skip(self, why: str) -> None:
        self.skipped[why] += 1


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class GroupLag:
    group: str
    topic: str
    lag: int | None  # None: the group has committed nothing on the topic
    committed: int
    end: int
    members: int
    state: str


def summarise(samples: Sequence[Sample]) -> dict[str, Any]:
    """Per endpoint: count, latency percentiles (ms), counts by status and by outcome."""
    by_endpoint: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_endpoint[s.endpoint].append(s)
    out: dict[str, Any] = {}
    for endpoint in sorted(by_endpoint):
        group = by_endpoint[endpoint]
        lat = sorted(s.latency * 1000.0 for s in group)
        out[endpoint] = {
            "count": len(group),
            "p50_ms": round(percentile(lat, 50), 1),
            "p90_ms": round(percentile(lat, 90), 1),
            "p99_ms": round(percentile(lat, 99), 1),
            "max_ms": round(lat[-1], 1),
            "by_status": dict(sorted(Counter(str(s.status or "none") for s in group).items())),
            "by_outcome": dict(sorted(Counter(s.outcome for s in group).items())),
        }
    return out


def build_report(
    *,
    asked_rate: float,
    duration: float,
    planned: int,
    recorder: Recorder,
    stats: SchedulerStats,
    arrivals_sent: int,
    cancelled_at_end: int,
    lag: Sequence[GroupLag] | None,
    notes: Sequence[str] = (),
    setup: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    samples = recorder.samples
    outcomes = Counter(s.outcome for s in samples)
    requests = len(samples)
    errors = outcomes.get("error", 0) + cancelled_at_end
    delays = sorted(d * 1000.0 for d in stats.send_delays)
    overflow = sum(stats.overflow.values())
    return {
        "meta": dict(meta or {}),
        "asked_rate": asked_rate,
        "duration_s": duration,
        "actions": {
            "planned": planned,
            "sent": arrivals_sent,
            "achieved_rate": round(arrivals_sent / duration, 3),
            "skipped": dict(sorted(recorder.skipped.items())),
        },
        "requests": {
            "total": requests,
            "rate": round(requests / duration, 3),
            "ok": outcomes.get("ok", 0),
            "expected_4xx": outcomes.get("expected", 0),
            "rate_limited": outcomes.get("rate_limited", 0),
            "unexpected_errors": errors,
            "unexpected_5xx": sum(1 for s in samples if s.outcome == "error" and (s.status or 0) >= 500),
            "no_answer": sum(1 for s in samples if s.status is None),
            "cancelled_at_end": cancelled_at_end,
            "error_rate": round(errors / requests, 5) if requests else 0.0,
        },
        "overflow": {"total": overflow, "by_kind": dict(sorted(stats.overflow.items()))},
        "discarded_after_end": stats.discarded,
        "generator_lateness_ms": {
            "p50": round(percentile(delays, 50), 2) if delays else None,
            "p99": round(percentile(delays, 99), 2) if delays else None,
            "max": round(delays[-1], 2) if delays else None,
        },
        "by_status": dict(sorted(Counter(str(s.status or "none") for s in samples).items())),
        "expected": dict(sorted(Counter(s.label for s in samples if s.outcome == "expected").items())),
        "errors": dict(sorted(Counter(s.label for s in samples if s.outcome == "error").items())),
        "endpoints": summarise(samples),
        "consumer_lag": None
        if lag is None
        else [
            {
                "group": g.group,
                "topic": g.topic,
                "lag": g.lag,
                "committed": g.committed,
                "end": g.end,
                "members": g.members,
                "state": g.state,
            }
            for g in lag
        ],
        "setup": dict(setup or {}),
        "notes": list(notes),
    }


def render_report(report: Mapping[str, Any]) -> str:
    a, r = report["actions"], report["requests"]
    lines = [
        f"reelbus load: {report['duration_s']:g} s at {report['asked_rate']:g} actions/s asked",
    ]
    for key, value in report["meta"].items():
        lines.append(f"  {key}: {value}")
    lines += [
        f"actions: {a['sent']} sent of {a['planned']} planned, {a['achieved_rate']:.2f}/s achieved "
        f"vs {report['asked_rate']:g}/s asked"
        + (f"; skipped {_counts(a['skipped'])}" if a["skipped"] else ""),
        f"requests: {r['total']} ({r['rate']:.2f}/s, heartbeats and stops included): ok {r['ok']}, "
        f"expected 4xx {r['expected_4xx']}, rate-limited {r['rate_limited']}, "
        f"unexpected errors {r['unexpected_errors']} ({r['error_rate']:.2%}; 5xx {r['unexpected_5xx']}, "
        f"no answer {r['no_answer']})",
        f"overflow (not sent: max in flight reached): {report['overflow']['total']}"
        + (f" ({_counts(report['overflow']['by_kind'])})" if report["overflow"]["total"] else ""),
        f"generator lateness (sent - scheduled): p50 {report['generator_lateness_ms']['p50']} ms, "
        f"p99 {report['generator_lateness_ms']['p99']} ms, max {report['generator_lateness_ms']['max']} ms",
        f"by status: {_counts(report['by_status'])}",
    ]
    if report["expected"]:
        lines.append(f"expected 4xx: {_counts(report['expected'])}")
    lines.append(f"unexpected errors: {_counts(report['errors']) if report['errors'] else 'none'}")
    lines.append("")
    header = ("endpoint", "count", "p50 ms", "p90 ms", "p99 ms", "max ms", "statuses")
    rows = [header] + [
        (
            name,
            str(e["count"]),
            f"{e['p50_ms']:.1f}",
            f"{e['p90_ms']:.1f}",
            f"{e['p99_ms']:.1f}",
            f"{e['max_ms']:.1f}",
            _counts(e["by_status"]),
        )
        for name, e in report["endpoints"].items()
    ]
    lines += _table(rows, right=(1, 2, 3, 4, 5))
    lines.append("")
    lag = report["consumer_lag"]
    if lag is None:
        lines.append("consumer lag: not measured")
    else:
        lines.append("consumer lag at the end (committed offsets vs high watermarks):")
        rows = [("group", "topic", "lag", "committed", "end", "members", "state")] + [
            (
                g["group"],
                g["topic"],
                "no offsets" if g["lag"] is None else str(g["lag"]),
                str(g["committed"]),
                str(g["end"]),
                str(g["members"]),
                g["state"],
            )
            for g in lag
            if g["state"] != "ABSENT"
        ]
        lines += _table(rows, right=(2, 3, 4, 5))
        absent = sorted({g["group"] for g in lag if g["state"] == "ABSENT"})
        if absent:
            lines.append(f"declared consumer groups not present on the broker: {', '.join(absent)}")
    if report["setup"]:
        lines.append("")
        lines.append("setup (before the clock): " + ", ".join(f"{k} {v}" for k, v in report["setup"].items()))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counter.items())


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


# --- consumer lag ---------------------------------------------------------------------------------


def consumer_lag(bootstrap_servers: str, timeout: float = 15.0) -> list[GroupLag]:
    """Per declared (topic, consumer group): committed offsets summed over the topic's partitions
    against its high watermarks. A consumer's group is its service name (the bus's default); a
    service that names its groups ``<service>-<instance>`` (catalog, for its cache) is matched by that
    prefix, among the groups with active members (stale ones of earlier instances are left out)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    from services.bus.contracts import Contracts

    contracts = Contracts.load()
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 3})
    existing = {g.group_id for g in admin.list_consumer_groups(request_timeout=timeout).result().valid}
    consumers = {c for t in contracts.topics.values() for c in t.consumers}
    prefixed = {g for g in existing for c in consumers if g.startswith(f"{c}-")}
    described: dict[str, tuple[int, str]] = {}
    to_describe = sorted((existing & consumers) | prefixed)
    if to_describe:
        for gid, fut in admin.describe_consumer_groups(to_describe, request_timeout=timeout).items():
            try:
                d = fut.result()
                described[gid] = (len(d.members), str(d.state).rsplit(".", 1)[-1])
            except Exception:  # reported as unknown
                described[gid] = (0, "UNKNOWN")
    wanted: set[tuple[str, str]] = set()  # (group, topic)
    for declared in contracts.topics.values():
        for c in declared.consumers:
            wanted.add((c, declared.name))
            wanted |= {(g, declared.name) for g in prefixed if g.startswith(f"{c}-") and described[g][0] > 0}
    meta = admin.list_topics(timeout=timeout).topics
    partitions = {t: sorted(meta[t].partitions) for _g, t in wanted if t in meta}
    ends: dict[tuple[str, int], int] = {}
    if partitions:
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        specs = {TopicPartition(t, p): latest for t, ps in partitions.items() for p in ps}
        for tp, fut in admin.list_offsets(specs, request_timeout=timeout).items():
            ends[(tp.topic, tp.partition)] = fut.result().offset
    out: list[GroupLag] = []
    for group, topic in sorted(wanted):
        if topic not in partitions:
            continue
        end_total = sum(ends[(topic, p)] for p in partitions[topic])
        if group not in existing:
            out.append(GroupLag(group, topic, None, 0, end_total, 0, "ABSENT"))
            continue
        members, state = described.get(group, (0, "UNKNOWN"))
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions[topic]])
        result = admin.list_consumer_group_offsets([request], request_timeout=timeout)[group].result()
        committed, lag, any_committed = 0, 0, False
        for tp in result.topic_partitions:
            end = ends[(topic, tp.partition)]
            if tp.offset >= 0:
                any_committed = True
                committed += tp.offset
                lag += max(0, end - tp.offset)
            else:
                lag += end  # nothing committed on this partition: all of it is behind
        out.append(
            GroupLag(group, topic, lag if any_committed else None, committed, end_total, members, state)
        )
    return out


# --- the workload -----------------------------------------------------------------------------


@dataclass
class Viewer:
    """A virtual user: its account, profile, token and its own HTTP client (its own source address)."""

    index: int
    email: str
    client: aiohttp.ClientSession
    account_id: str = ""
    token: str = ""
    token_expires: float = 0.0  # clock time
    profile_id: str = ""
    subscription_id: str = ""
    card: str = "tok_ok"
    changed_at: float = 0.0  # clock time of the last profile or subscription change

    def settled(self, now: float, grace: float) -> bool:
        """Subscribed, and long enough ago that playback has surely projected it (and the profile)."""
        return (
            self.subscription_id not in ("", "pending")
            and self.card == "tok_ok"  # a renewal-declining card may lose its entitlement
            and now - self.changed_at >= grace
        )

    @property
    def ready(self) -> bool:
        return bool(self.account_id and self.token and self.profile_id)


@dataclass
class Playing:
    viewer: Viewer
    session_id: str
    title_id: str
    runtime_ms: int
    ladder: list[int]
    position_ms: int = 0
    stopped: bool = False


@dataclass
class Call:
    """One request and what it may answer."""

    endpoint: str  # the route template, e.g. "POST /v1/playback/sessions/{id}/heartbeats"
    method: str
    path: str
    ok: tuple[int, ...]
    expected: tuple[int, ...] = ()
    body: Any = None
    raw_body: bytes | None = None
    token: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    why: str = ""  # what an expected refusal means, for the report


def _source_address(i: int) -> str:
    return f"127.78.{i // 250 % 250}.{i % 250 + 1}"


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Workload:
    """The viewers and what each action does; every request is recorded with its scheduled time."""

    def __init__(
        self,
        gateway: str,
        scheduler: OpenLoopScheduler,
        recorder: Recorder,
        rng: random.Random,
        *,
        heartbeat_interval: float,
        own_addresses: bool,
        run_id: str,
    ) -> None:
        self.gateway = gateway.rstrip("/")
        self.scheduler = scheduler
        self.clock = scheduler.clock
        self.recorder = recorder
        self.rng = rng
        self.heartbeat_interval = heartbeat_interval
        self.own_addresses = own_addresses
        self.run_id = run_id
        self.viewers: list[Viewer] = []
        self.playing: dict[str, Playing] = {}
        self.titles: list[dict[str, Any]] = []
        self.genres: list[str] = []
        self.billing_available = True
        self.arrivals_sent = 0
        self._counter = itertools.count()
        self._clients: list[aiohttp.ClientSession] = []
        self._shared: aiohttp.ClientSession | None = None

    # -- clients

    def _new_client(self, index: int) -> aiohttp.ClientSession:
        if not self.own_addresses and self._shared is not None:
            return self._shared
        local = (_source_address(index), 0) if self.own_addresses else None
        connector = aiohttp.TCPConnector(limit=0, local_addr=local, force_close=False)
        client = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        )
        self._clients.append(client)
        if not self.own_addresses:
            self._shared = client
        return client

    def new_viewer(self) -> Viewer:
        i = next(self._counter)
        return Viewer(i, f"load-{self.run_id}-{i}@example.com", self._new_client(i))

    async def close(self) -> None:
        for client in self._clients:
            await client.close()

    # -- one request

    async def send(
        self, client: aiohttp.ClientSession, call: Call, scheduled: float
    ) -> tuple[int | None, Any]:
        headers = {"Content-Type": "application/json", **call.headers}
        if call.token:
            headers["Authorization"] = f"Bearer {call.token}"
        data = (
            call.raw_body
            if call.raw_body is not None
            else (None if call.body is None else json.dumps(call.body).encode())
        )
        status: int | None = None
        body: Any = None
        label = ""
        try:
            async with client.request(
                call.method, self.gateway + call.path, data=data, headers=headers
            ) as resp:
                status = resp.status
                text = await resp.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            label = type(exc).__name__
        finished = self.clock.now()
        outcome = classify(status, call.ok, call.expected)
        if status is not None:
            detail = ""
            if isinstance(body, dict) and outcome != "ok":
                detail = str(body.get("reason") or body.get("error") or "")
                if outcome == "error" and body.get("upstream"):
                    detail += f" ({body['upstream']})"
            label = f"{status} {detail}".strip()
            if outcome == "expected" and call.why:
                label += f" ({call.why})"
        self.recorder.record(call.endpoint, scheduled, finished, status, outcome, label)
        return status, body

    # -- setup (before the clock starts; not part of the measured run)

    async def probe_gateway(self) -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as client,
            client.get(self.gateway + "/readyz") as resp,
        ):
            await resp.read()
            if resp.status >= 500:
                raise SetupFailed(f"the gateway at {self.gateway} is not ready ({resp.status})")

    async def setup_viewer(self, deadline: float, subscribe: bool) -> Viewer:
        """Sign up, log in, make a profile and (when billing answers) subscribe; 429s are waited out."""
        v = self.new_viewer()
        status, body = await _setup_call(
            v.client,
            self.gateway,
            "POST",
            "/v1/accounts",
            {"email": v.email, "password": PASSWORD},
            None,
            deadline,
        )
        _require(status, body, 201, "sign-up")
        v.account_id = body["account_id"]
        await self._setup_login(v, deadline)
        status, body = await _setup_call(
            v.client,
            self.gateway,
            "POST",
            f"/v1/accounts/{v.account_id}/profiles",
            {"name": f"Viewer {v.index}"},
            v.token,
            deadline,
        )
        _require(status, body, 201, "profile")
        v.profile_id = body["profile_id"]
        v.changed_at = self.clock.now()
        if subscribe and self.billing_available:
            await self.setup_subscription(v, deadline)
        self.viewers.append(v)
        return v

    async def setup_subscription(self, v: Viewer, deadline: float) -> None:
        status, body = await _setup_call(
            v.client,
            self.gateway,
            "POST",
            "/v1/billing/subscriptions",
            {"account_id": v.account_id, "plan": "STANDARD", "card_token": "tok_ok"},
            v.token,
            deadline,
            {"Idempotency-Key": f"load-{self.run_id}-setup-{v.index}"},
        )
        if status in (502, 503, 504) and isinstance(body, dict) and body.get("upstream") == "billing":
            self.billing_available = False
            return
        _require(status, body, 201, "subscription")
        v.subscription_id = body["subscription_id"]
        v.changed_at = self.clock.now()

    async def _setup_login(self, v: Viewer, deadline: float) -> None:
        status, body = await _setup_call(
            v.client,
            self.gateway,
            "POST",
            "/v1/auth/login",
            {"email": v.email, "password": PASSWORD, "device_id": f"load-{v.index}", "device_type": "TV"},
            None,
            deadline,
        )
        _require(status, body, 200, "login")
        v.token = body["access_token"]
        v.token_expires = self.clock.now() + float(body.get("expires_in", 900))

    async def probe_billing(self, v: Viewer, deadline: float) -> None:
        status, body = await _setup_call(
            v.client, self.gateway, "GET", f"/v1/billing/accounts/{v.account_id}", None, v.token, deadline
        )
        if status in (502, 503, 504) and isinstance(body, dict) and body.get("upstream") == "billing":
            self.billing_available = False

    async def load_titles(self, v: Viewer, deadline: float) -> None:
        offset = 0
        while offset < 300:
            status, body = await _setup_call(
                v.client,
                self.gateway,
                "GET",
                f"/v1/catalog/titles?limit=100&offset={offset}",
                None,
                v.token,
                deadline,
            )
            _require(status, body, 200, "catalog")
            items = body.get("items") or []
            self.titles += [t for t in items if t.get("ladder_kbps")]
            if len(items) < 100:
                break
            offset += 100
        if not self.titles:
            raise SetupFailed("the catalog has no titles with renditions")
        self.genres = sorted({g for t in self.titles for g in t.get("genres", [])})

    async def wait_playable(self, v: Viewer, deadline: float) -> float | None:
        """Seconds until playback starts a session for ``v`` (its projections caught up); None if never."""
        t0 = self.clock.now()
        title = self.titles[0]["title_id"]
        while time.monotonic() < deadline:
            status, body = await _setup_call(
                v.client,
                self.gateway,
                "POST",
                "/v1/playback/sessions",
                {"profile_id": v.profile_id, "title_id": title},
                v.token,
                deadline,
            )
            if status == 201:
                await _setup_call(
                    v.client,
                    self.gateway,
                    "POST",
                    f"/v1/playback/sessions/{body['session_id']}/stop",
                    {"position_ms": 0},
                    v.token,
                    deadline,
                )
                return self.clock.now() - t0
            if status not in (403, 404, 503):
                raise SetupFailed(f"playback answered {status}: {body}")
            await asyncio.sleep(0.5)
        return None

    # -- the actions

    def arrival_job(self, kind: str) -> Job:
        async def job(scheduled: float) -> None:
            self.arrivals_sent += 1
            await getattr(self, f"do_{kind}")(scheduled)

        return job

    def _viewer(self, want: Callable[[Viewer], bool] = lambda v: True) -> Viewer | None:
        pool = [v for v in self.viewers if v.ready and want(v)]
        return self.rng.choice(pool) if pool else None

    async def _fresh(self, v: Viewer, scheduled: float) -> None:
        """Log in again when the token is about to expire (as a client would)."""
        if v.token_expires - self.clock.now() < 60.0:
            await self.do_login(scheduled, v)

    async def do_browse(self, scheduled: float) -> None:
        v = self._viewer()
        if v is None:
            self.recorder.skip("browse: no viewer")
            return
        await self._fresh(v, scheduled)
        query = f"limit=20&offset={self.rng.randrange(0, 280, 20)}"
        if self.genres and self.rng.random() < 0.4:
            query = f"limit=20&genre={self.rng.choice(self.genres)}"
        await self.send(
            v.client,
            Call("GET /v1/catalog/titles", "GET", f"/v1/catalog/titles?{query}", (200,), token=v.token),
            scheduled,
        )

    async def do_title(self, scheduled: float) -> None:
        v = self._viewer()
        if v is None:
            self.recorder.skip("title: no viewer")
            return
        await self._fresh(v, scheduled)
        title = self.rng.choice(self.titles)["title_id"]
        await self.send(
            v.client,
            Call("GET /v1/catalog/titles/{id}", "GET", f"/v1/catalog/titles/{title}", (200,), token=v.token),
            scheduled,
        )

    async def do_history(self, scheduled: float) -> None:
        v = self._viewer()
        if v is None:
            self.recorder.skip("history: no viewer")
            return
        await self._fresh(v, scheduled)
        await self.send(
            v.client,
            Call(
                "GET /v1/profiles/{id}/history",
                "GET",
                f"/v1/profiles/{v.profile_id}/history?limit=20",
                (200,),
                token=v.token,
            ),
            scheduled,
        )

    async def do_profiles(self, scheduled: float) -> None:
        v = self._viewer()
        if v is None:
            self.recorder.skip("profiles: no viewer")
            return
        await self._fresh(v, scheduled)
        await self.send(
            v.client,
            Call(
                "GET /v1/accounts/{id}/profiles",
                "GET",
                f"/v1/accounts/{v.account_id}/profiles",
                (200,),
                token=v.token,
            ),
            scheduled,
        )

    async def do_signup(self, scheduled: float) -> None:
        """A new viewer: sign-up, then (each as soon as the previous answered) login and a profile."""
        v = self.new_viewer()
        status, body = await self.send(
            v.client,
            Call(
                "POST /v1/accounts",
                "POST",
                "/v1/accounts",
                (201,),
                body={"email": v.email, "password": PASSWORD},
            ),
            scheduled,
        )
        if status != 201:
            return
        v.account_id = body["account_id"]
        await self.do_login(self.clock.now(), v)
        if not v.token:
            return
        status, body = await self.send(
            v.client,
            Call(
                "POST /v1/accounts/{id}/profiles",
                "POST",
                f"/v1/accounts/{v.account_id}/profiles",
                (201,),
                body={"name": f"Viewer {v.index}"},
                token=v.token,
                headers={"Idempotency-Key": f"load-{self.run_id}-profile-{v.index}"},
            ),
            self.clock.now(),
        )
        if status == 201:
            v.profile_id = body["profile_id"]
            v.changed_at = self.clock.now()
            self.viewers.append(v)

    async def do_login(self, scheduled: float, viewer: Viewer | None = None) -> None:
        v = viewer or self._viewer()
        if v is None:
            self.recorder.skip("login: no viewer")
            return
        body = {"email": v.email, "password": PASSWORD, "device_id": f"load-{v.index}", "device_type": "TV"}
        status, answer = await self.send(
            v.client, Call("POST /v1/auth/login", "POST", "/v1/auth/login", (200,), body=body), scheduled
        )
        if status == 200:
            v.token = answer["access_token"]
            v.token_expires = self.clock.now() + float(answer.get("expires_in", 900))

    async def do_play(self, scheduled: float) -> None:
        v = self._viewer()
        if v is None:
            self.recorder.skip("play: no viewer")
            return
        await self._fresh(v, scheduled)
        title = self.rng.choice(self.titles)
        runtime = int(title.get("runtime_ms") or 3_600_000)
        start_at = self.rng.randrange(0, max(1, runtime // 2), 1000)
        # Expected refusals, for a viewer without a subscription or whose subscription or profile is
        # recent (playback projects billing.events and accounts.profiles): 403 not entitled, 404 no such
        # profile yet. For a settled viewer they are errors.
        settled = v.settled(self.clock.now(), SETTLE_GRACE)
        status, body = await self.send(
            v.client,
            Call(
                "POST /v1/playback/sessions",
                "POST",
                "/v1/playback/sessions",
                (201,),
                () if settled else (403, 404),
                body={"profile_id": v.profile_id, "title_id": title["title_id"], "position_ms": start_at},
                token=v.token,
                why="no subscription yet" if not v.subscription_id else "subscription or profile just made",
            ),
            scheduled,
        )
        if status != 201:
            return
        ladder = sorted(int(k) for k in body["manifest"]["ladder"]) or [3000]
        p = Playing(v, body["session_id"], title["title_id"], runtime, ladder, position_ms=start_at)
        self.playing[p.session_id] = p
        # The session's own clock, from the start's scheduled time: heartbeats every interval, now and
        # then a pause (no heartbeats for 1-3 intervals), then a stop.
        beats = self.rng.randint(3, 12)
        pause_after = self.rng.randint(1, beats) if self.rng.random() < 0.2 else None
        pause = self.rng.randint(1, 3) if pause_after else 0
        t = scheduled
        for k in range(1, beats + 1):
            t += self.heartbeat_interval
            playing_ms = int(self.heartbeat_interval * 1000)
            if pause_after is not None and k == pause_after + 1:
                t += pause * self.heartbeat_interval
            self.scheduler.schedule(t, "heartbeat", self._heartbeat_job(p, playing_ms))
        self.scheduler.schedule(t + self.heartbeat_interval / 2, "stop", self._stop_job(p))

    def _heartbeat_job(self, p: Playing, played_ms: int) -> Job:
        async def job(scheduled: float) -> None:
            if p.stopped:
                return
            p.position_ms = min(p.position_ms + played_ms, p.runtime_ms)
            bitrate = self.rng.choice(p.ladder)
            rebuffer = self.rng.choice((0, 0, 0, 0, 0, 0, 0, 250, 800))
            body = {
                "position_ms": p.position_ms,
                "bitrate_kbps": bitrate,
                "buffer_ms": self.rng.randrange(4_000, 30_000),
                "throughput_kbps": int(bitrate * self.rng.uniform(1.2, 3.0)),
                "rebuffer_ms": rebuffer,
            }
            await self.send(
                p.viewer.client,
                Call(
                    "POST /v1/playback/sessions/{id}/heartbeats",
                    "POST",
                    f"/v1/playback/sessions/{p.session_id}/heartbeats",
                    (202,),
                    body=body,
                    token=p.viewer.token,
                ),
                scheduled,
            )

        return job

    def _stop_job(self, p: Playing, endpoint: str = STOP) -> Job:
        async def job(scheduled: float) -> None:
            await self.stop(p, scheduled, endpoint)

        return job

    async def stop(self, p: Playing, scheduled: float, endpoint: str = STOP) -> None:
        if p.stopped:
            return
        p.stopped = True
        self.playing.pop(p.session_id, None)
        await self.send(
            p.viewer.client,
            Call(
                endpoint,
                "POST",
                f"/v1/playback/sessions/{p.session_id}/stop",
                (202,),
                body={"position_ms": p.position_ms},
                token=p.viewer.token,
            ),
            scheduled,
        )

    def stop_all(self, at: float) -> int:
        """At the end of the run the sessions still playing stop, spread over the next 2 s and
        reported as an endpoint of their own (a burst the mix does not have)."""
        sessions = list(self.playing.values())
        for i, p in enumerate(sessions):
            self.scheduler.schedule(
                at + 2.0 * i / len(sessions), "stop at end", self._stop_job(p, STOP_AT_END)
            )
        return len(sessions)

    def _billing_skipped(self, kind: str) -> bool:
        if not self.billing_available:
            self.recorder.skip(f"{kind}: billing unavailable")
            return True
        return False

    async def do_subscribe(self, scheduled: float) -> None:
        if self._billing_skipped("subscribe"):
            return
        v = self._viewer(lambda v: not v.subscription_id)
        if v is None:
            self.recorder.skip("subscribe: every viewer subscribed")
            return
        await self._fresh(v, scheduled)
        v.subscription_id = "pending"
        card = "tok_renewal_decline" if self.rng.random() < 0.2 else "tok_ok"
        plan = self.rng.choice(("BASIC", "STANDARD", "PREMIUM"))
        status, body = await self.send(
            v.client,
            Call(
                "POST /v1/billing/subscriptions",
                "POST",
                "/v1/billing/subscriptions",
                (201,),
                body={"account_id": v.account_id, "plan": plan, "card_token": card},
                token=v.token,
                headers={"Idempotency-Key": f"load-{self.run_id}-sub-{uuid.uuid4().hex[:12]}"},
            ),
            scheduled,
        )
        if status == 201:
            v.subscription_id, v.card = body["subscription_id"], card
            v.changed_at = self.clock.now()
        else:
            v.subscription_id = ""

    async def do_decline(self, scheduled: float) -> None:
        if self._billing_skipped("decline"):
            return
        v = self._viewer()
        if v is None:
            self.recorder.skip("decline: no viewer")
            return
        await self._fresh(v, scheduled)
        await self.send(
            v.client,
            Call(
                "POST /v1/billing/subscriptions",
                "POST",
                "/v1/billing/subscriptions",
                (),
                (402,),
                body={"account_id": v.account_id, "plan": "PREMIUM", "card_token": "tok_decline"},
                token=v.token,
                headers={"Idempotency-Key": f"load-{self.run_id}-decline-{uuid.uuid4().hex[:12]}"},
                why="declined card",
            ),
            scheduled,
        )

    async def do_billing_account(self, scheduled: float) -> None:
        if self._billing_skipped("billing_account"):
            return
        v = self._viewer()
        if v is None:
            self.recorder.skip("billing_account: no viewer")
            return
        await self._fresh(v, scheduled)
        await self.send(
            v.client,
            Call(
                "GET /v1/billing/accounts/{id}",
                "GET",
                f"/v1/billing/accounts/{v.account_id}",
                (200,),
                token=v.token,
            ),
            scheduled,
        )

    async def do_cancel(self, scheduled: float) -> None:
        if self._billing_skipped("cancel"):
            return
        v = self._viewer(lambda v: v.subscription_id not in ("", "pending", "cancelled"))
        if v is None:
            self.recorder.skip("cancel: no subscribed viewer")
            return
        await self._fresh(v, scheduled)
        sub, v.subscription_id = v.subscription_id, "cancelled"  # entitled until the period's end
        await self.send(
            v.client,
            Call(
                "POST /v1/billing/subscriptions/{id}/cancel",
                "POST",
                f"/v1/billing/subscriptions/{sub}/cancel",
                (200,),
                body={"at_period_end": True},
                token=v.token,
                headers={"Idempotency-Key": f"load-{self.run_id}-cancel-{uuid.uuid4().hex[:12]}"},
            ),
            scheduled,
        )

    async def do_bad(self, scheduled: float) -> None:
        """Bad input, each kind with the 4xx the API documents for it (counted as expected)."""
        v = self._viewer()
        if v is None:
            self.recorder.skip("bad: no viewer")
            return
        kinds = [
            "short_password",
            "wrong_password",
            "no_token",
            "bad_limit",
            "unknown_title",
            "bad_session_id",
            "unknown_session",
            "not_json",
            "negative_position",
            "foreign_profile",
        ]
        if self.billing_available:
            kinds.append("bad_plan")
        kind = self.rng.choice(kinds)
        fake = str(uuid.uuid4())
        calls = {
            "short_password": Call(
                "POST /v1/accounts",
                "POST",
                "/v1/accounts",
                (),
                (422,),
                body={"email": f"short-{fake}@example.com", "password": "short"},
            ),
            "wrong_password": Call(
                "POST /v1/auth/login",
                "POST",
                "/v1/auth/login",
                (),
                (401,),
                body={
                    "email": f"nobody-{fake}@example.com",
                    "password": "not the password",
                    "device_id": "load",
                    "device_type": "TV",
                },
            ),
            "no_token": Call("GET /v1/catalog/titles", "GET", "/v1/catalog/titles?limit=5", (), (401,)),
            "bad_limit": Call(
                "GET /v1/catalog/titles",
                "GET",
                "/v1/catalog/titles?limit=1000",
                (),
                (400,),
                token=v.token,
            ),
            "unknown_title": Call(
                "GET /v1/catalog/titles/{id}",
                "GET",
                "/v1/catalog/titles/tt9999999",
                (),
                (404,),
                token=v.token,
            ),
            "bad_session_id": Call(
                "POST /v1/playback/sessions/{id}/heartbeats",
                "POST",
                "/v1/playback/sessions/not-a-uuid/heartbeats",
                (),
                (400,),
                body={
                    "position_ms": 0,
                    "bitrate_kbps": 1,
                    "buffer_ms": 0,
                    "throughput_kbps": 1,
                    "rebuffer_ms": 0,
                },
                token=v.token,
            ),
            "unknown_session": Call(
                "POST /v1/playback/sessions/{id}/stop",
                "POST",
                f"/v1/playback/sessions/{fake}/stop",
                (),
                (404,),
                body={"position_ms": 0},
                token=v.token,
            ),
            "not_json": Call(
                "POST /v1/playback/sessions",
                "POST",
                "/v1/playback/sessions",
                (),
                (400,),
                raw_body=b"{not json",
                token=v.token,
            ),
            "negative_position": Call(
                "POST /v1/playback/sessions/{id}/heartbeats",
                "POST",
                f"/v1/playback/sessions/{fake}/heartbeats",
                (),
                (422,),
                body={
                    "position_ms": -5,
                    "bitrate_kbps": 3000,
                    "buffer_ms": 0,
                    "throughput_kbps": 1,
                    "rebuffer_ms": 0,
                },
                token=v.token,
            ),
            "foreign_profile": Call(
                "GET /v1/profiles/{id}/history",
                "GET",
                f"/v1/profiles/{fake}/history",
                (),
                (404,),
                token=v.token,
            ),
            "bad_plan": Call(
                "POST /v1/billing/subscriptions",
                "POST",
                "/v1/billing/subscriptions",
                (),
                (422,),
                body={"account_id": v.account_id, "plan": "GOLD", "card_token": "tok_ok"},
                token=v.token,
                headers={"Idempotency-Key": f"load-{self.run_id}-bad-{fake}"},
            ),
        }
        call = calls[kind]
        call.why = "bad input: " + kind.replace("_", " ")
        await self.send(v.client, call, scheduled)


class SetupFailed(RuntimeError):
    pass


def _require(status: int | None, body: Any, want: int, what: str) -> None:
    if status != want:
        raise SetupFailed(f"{what} answered {status}: {body}")


async def _setup_call(
    client: aiohttp.ClientSession,
    gateway: str,
    method: str,
    path: str,
    body: Any,
    token: str | None,
    deadline: float,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Any]:
    """A setup request; a 429 is waited out (Retry-After) until ``deadline``."""
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    while True:
        async with client.request(method, gateway + path, json=body, headers=h) as resp:
            status, text, retry = resp.status, await resp.text(), resp.headers.get("Retry-After", "1")
        if status == 429 and time.monotonic() + float(retry) < deadline:
            await asyncio.sleep(max(0.2, float(retry)))
            continue
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text


async def stock_appliances(bootstrap_servers: str, registry_url: str, title_ids: Sequence[str]) -> None:
    """What the Open Connect appliances would report: the exchange points healthy, holding the titles."""
    from services.bus.contracts import Contracts
    from services.bus.events import ApplianceContents, ApplianceHealth
    from services.bus.producer import Producer, ProducerConfig
    from services.bus.registry import RegistryClient
    from services.bus.serde import Serde

    contracts = Contracts.load()
    producer = Producer(
        ProducerConfig(bootstrap_servers, client_id=f"reelbus-load-{os.getpid()}"),
        contracts,
        Serde(contracts, RegistryClient(registry_url)),
    )
    await producer.start(["opencdn.appliances"])
    try:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        for appliance in APPLIANCES:
            site = appliance.split("-")[2]
            health = ApplianceHealth(
                appliance_id=appliance,
                healthy=True,
                load=0.2,
                reported_at=now,
                base_url=f"https://{appliance}.example.net",
                site=site,
            )
            contents = ApplianceContents(
                appliance_id=appliance, title_ids=list(title_ids), full_snapshot=False
            )
            await producer.send("opencdn.appliances", appliance, health)
            await producer.send("opencdn.appliances", appliance, contents)
    finally:
        await producer.close()


# --- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    gateway: str
    rate: float
    duration: float
    users: int = 8
    max_in_flight: int = 256
    heartbeat_interval: float = 10.0
    seed: int | None = None
    stock_appliances: bool = True
    bootstrap_servers: str = "localhost:9092"
    registry_url: str = "http://localhost:8081/apis/ccompat/v7"
    lag: bool = True
    drain_timeout: float = 15.0
    setup_timeout: float = 180.0
    progress_interval: float = 5.0
    mix: Mapping[str, float] = field(default_factory=lambda: dict(MIX))


class Progress:
    """One updating line on a TTY; a line every ``interval`` seconds otherwise."""

    def __init__(self, out: TextIO, interval: float) -> None:
        self.out = out
        self.tty = out.isatty()
        self.interval = interval if not self.tty else 0.5
        self._last_len = 0

    def show(self, line: str) -> None:
        if self.tty:
            pad = max(0, self._last_len - len(line))
            self.out.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self._last_len:
            self.out.write("\n")
            self.out.flush()


def _progress_line(
    elapsed: float, opts: Options, workload: Workload, sched: OpenLoopScheduler, rec: Recorder
) -> str:
    outcomes = Counter(s.outcome for s in rec.samples)
    recent = sorted(s.latency for s in rec.samples[-500:])
    p99 = f"{percentile(recent, 99) * 1000:.0f}ms" if recent else "-"
    rate = workload.arrivals_sent / elapsed if elapsed > 0 else 0.0
    return (
        f"[load] {elapsed:5.1f}/{opts.duration:g}s  actions {workload.arrivals_sent}"
        f" ({rate:.1f}/s of {opts.rate:g})"
        f"  requests {len(rec.samples)}  ok {outcomes['ok']}  4xx-expected {outcomes['expected']}"
        f"  429 {outcomes['rate_limited']}  errors {outcomes['error']}  in-flight {sched.in_flight}"
        f"  overflow {sum(sched.stats.overflow.values())}  playing {len(workload.playing)}"
        f"  p99(last 500) {p99}"
    )


async def run_load(opts: Options, say: Callable[[str], None], progress_out: TextIO) -> dict[str, Any]:
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**31)
    run_id = uuid.uuid4().hex[:8]
    clock = MonotonicClock()
    sched = OpenLoopScheduler(clock, opts.max_in_flight)
    recorder = Recorder()
    rng = random.Random(seed + 1)
    workload = Workload(
        opts.gateway,
        sched,
        recorder,
        rng,
        heartbeat_interval=opts.heartbeat_interval,
        own_addresses=_is_loopback(opts.gateway),
        run_id=run_id,
    )
    notes: list[str] = []
    setup: dict[str, Any] = {}
    try:
        t_setup = time.monotonic()
        deadline = t_setup + opts.setup_timeout
        await workload.probe_gateway()
        say(f"setting up {opts.users} viewers through {opts.gateway} (run {run_id}, seed {seed})")
        first = await workload.setup_viewer(deadline, subscribe=False)
        await workload.probe_billing(first, deadline)
        if workload.billing_available:
            await workload.setup_subscription(first, deadline)
        else:
            notes.append(
                "billing unavailable (the gateway answered 5xx for upstream billing): the billing share "
                "of the "
                "mix was skipped, and viewers are not entitled, so playback starts answer 403 (expected)"
            )
        await workload.load_titles(first, deadline)
        gate = asyncio.Semaphore(4)

        async def one() -> None:
            async with gate:
                await workload.setup_viewer(deadline, subscribe=True)

        await asyncio.gather(*(one() for _ in range(opts.users - 1)))
        if opts.stock_appliances:
            await stock_appliances(
                opts.bootstrap_servers, opts.registry_url, [t["title_id"] for t in workload.titles]
            )
        waited: float | None = None
        if workload.billing_available:  # without billing nobody is entitled: nothing to wait for
            waited = await workload.wait_playable(first, min(deadline, time.monotonic() + 60.0))
        setup = {
            "viewers": len(workload.viewers),
            "titles": len(workload.titles),
            "seconds": round(time.monotonic() - t_setup, 1),
        }
        if waited is None and workload.billing_available:
            notes.append("playback did not start a session for a set-up viewer within 60 s before the run")
        elif waited is not None:
            setup["first_playback_after_s"] = round(waited, 1)

        arrivals = plan_arrivals(opts.rate, opts.duration, opts.mix, seed)
        say(f"running: {len(arrivals)} actions planned over {opts.duration:g} s")
        start = clock.now()
        for a in arrivals:
            sched.schedule(start + a.at, a.kind, workload.arrival_job(a.kind))
        end = start + opts.duration
        display = Progress(progress_out, opts.progress_interval)
        runner = asyncio.create_task(sched.run_until(end))
        try:
            while not runner.done():
                await asyncio.wait({runner}, timeout=display.interval)
                display.show(
                    _progress_line(min(clock.now() - start, opts.duration), opts, workload, sched, recorder)
                )
        finally:
            display.done()
            await runner
        sched.discard_pending()
        stops = workload.stop_all(clock.now())
        await sched.run_until(clock.now() + 2.0)
        cancelled = await sched.drain(opts.drain_timeout)
        if stops:
            notes.append(
                f"{stops} session(s) still playing at the end were stopped (their stops are counted)"
            )
        if cancelled:
            notes.append(
                f"{cancelled} request(s) had no answer {opts.drain_timeout:g} s after the end (errors)"
            )
        lag = None
        if opts.lag:
            try:
                lag = await asyncio.to_thread(consumer_lag, opts.bootstrap_servers)
            except Exception as exc:  # the report says why
                notes.append(f"consumer lag not measured: {exc}")
        meta = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.platform(terse=True)})",
            "gateway": opts.gateway,
            "seed": seed,
            "heartbeat_interval_s": opts.heartbeat_interval,
            "max_in_flight": opts.max_in_flight,
            "billing": "available" if workload.billing_available else "unavailable (skipped)",
        }
        return build_report(
            asked_rate=opts.rate,
            duration=opts.duration,
            planned=len(arrivals),
            recorder=recorder,
            stats=sched.stats,
            arrivals_sent=workload.arrivals_sent,
            cancelled_at_end=cancelled,
            lag=lag,
            notes=notes,
            setup=setup,
            meta=meta,
        )
    finally:
        await workload.close()


# --- the command --------------------------------------------------------------------------------


def _positive(kind: type[float] | type[int]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return value

    return parse


def default_gateway() -> str:
    from services.cli import stack

    return stack.service("gateway").url


def register(sub: Any) -> None:
    from services.cli.infra import Layout

    layout = Layout.from_env()
    p = sub.add_parser("load", help="open-loop load through the gateway, with a report")
    p.add_argument("--rate", type=_positive(float), required=True, help="user actions per second (Poisson)")
    p.add_argument("--duration", type=parse_duration, required=True, help="e.g. 60, 60s, 5m")
    p.add_argument(
        "--gateway", default=None, help="the gateway's base URL (default: services/cli/stack.py's)"
    )
    p.add_argument("--users", type=_positive(int), default=8, help="viewers made before the run (default 8)")
    p.add_argument("--max-in-flight", type=_positive(int), default=256, help="outstanding requests at most")
    p.add_argument(
        "--heartbeat-interval",
        type=_positive(float),
        default=10.0,
        help="seconds between a session's heartbeats (default 10)",
    )
    p.add_argument("--seed", type=int, default=None, help="fix the schedule and the choices")
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=0.01,
        help="exit 1 when unexpected errors exceed this share of requests (default 0.01)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    p.add_argument(
        "--bootstrap", default=layout.bootstrap_servers, help="Kafka, for the lag and the appliances"
    )
    p.add_argument("--registry", default=layout.registry_url, help="the schema registry (appliance reports)")
    p.add_argument(
        "--no-stock-appliances",
        action="store_true",
        help="do not publish the appliances' health and contents",
    )
    p.add_argument("--no-lag", action="store_true", help="skip the consumer lag at the end")
    p.add_argument(
        "--progress-interval",
        type=_positive(float),
        default=5.0,
        help="seconds between progress lines when not on a terminal",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    opts = Options(
        gateway=(args.gateway or default_gateway()).rstrip("/"),
        rate=args.rate,
        duration=args.duration,
        users=args.users,
        max_in_flight=args.max_in_flight,
        heartbeat_interval=args.heartbeat_interval,
        seed=args.seed,
        stock_appliances=not args.no_stock_appliances,
        bootstrap_servers=args.bootstrap,
        registry_url=args.registry,
        lag=not args.no_lag,
        progress_interval=args.progress_interval,
    )
    try:
        report = asyncio.run(run_load(opts, say, sys.stderr))
    except (aiohttp.ClientError, OSError) as exc:
        print(f"reelbus load: the gateway at {opts.gateway} does not answer: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SetupFailed as exc:
        print(f"reelbus load: setting up the viewers failed: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(render_report(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    rate = report["requests"]["error_rate"]
    if rate > args.max_error_rate:
        print(
            f"reelbus load: unexpected errors {rate:.2%} > --max-error-rate {args.max_error_rate:.2%}",
            file=sys.stderr,
        )
        return EXIT_ERRORS
    return 0
