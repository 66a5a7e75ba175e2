"""The anomaly rules, pure: ``rule.apply(state, event) -> Outcome(state, findings, status)``.

No Kafka, no clock, no randomness. A rule's state is plain JSON-able data (what a changelog-backed
table keeps per key), the time is the events' own ``event_time``, and the same events in the same order
give the same findings with the same ids.

- :class:`AccountRule`, per account: **account sharing** (more concurrent streams than the plan allows)
  and **impossible travel** (a session starts where the account could not have got to since another of
  its sessions was seen, faster than ``max_speed_kmh``).
- :class:`DeclineBurstRule`, per account and per card: **payment fraud**, a burst of declined payments,
  scored as a Poisson tail against the subject's own robust daily rate.
- :class:`SeriesRule`, per service metric or node metric: **service anomalies** (error rate, latency)
  and **mount-stall latency**, scored by the streaming :class:`~services.anomaly_detector.detector.Detector`
  (no fixed threshold per series).
- :class:`StallFlagRule`, per node: the probe's own ``stalled`` verdict, sustained.

**Idempotence.** Each rule remembers the ids of the last :data:`APPLIED_MEMORY` events it applied to a
key, with the findings they produced: a redelivered event changes no state and returns the same
findings again, with the same deterministic ids (:meth:`Finding.event_id`), so that a crash between a
table write and an output send loses nothing and a duplicate output is dropped downstream by its id.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from services.anomaly_detector import geo
from services.anomaly_detector.detector import Detector, DetectorConfig
from services.bus.events import (
    AnomalyDetected,
    AnomalyKind,
    Heartbeat,
    PaymentFailed,
    SessionStarted,
    SessionStopped,
    Severity,
    SubscriptionRenewed,
    SubscriptionStarted,
)

APPLIED_MEMORY = 64
"""Event ids remembered per key for redelivery; at-least-once redelivers at most the records since the
last commit, far fewer than this per key."""

FINDING_NAMESPACE = uuid.UUID("5b0d6f39-4c84-4b8e-9c55-2f3a1d7a9e10")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000

Status = Literal["applied", "duplicate", "late", "skipped"]


def to_ms(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly, before it becomes an ``AnomalyDetected`` event."""

    kind: str
    """An ``AnomalyKind`` symbol."""
    subject: str
    score: float
    threshold: float
    severity: str
    evidence: Mapping[str, str]
    window_start_ms: int
    window_end_ms: int
    detected_ms: int
    """Event time of detection: the event time of the record that completed the evidence."""
    detector: str
    trigger: str
    """The id of the input event that completed the evidence (with kind, subject and detector, the
    anomaly's id)."""

    def event_id(self) -> uuid.UUID:
        """Deterministic: the same trigger gives the same id, however often it is delivered."""
        return uuid.uuid5(FINDING_NAMESPACE, f"{self.kind}|{self.subject}|{self.detector}|{self.trigger}")

    def to_event(self) -> AnomalyDetected:
        return AnomalyDetected(
            event_id=self.event_id(),
            event_time=from_ms(self.detected_ms),
            kind=AnomalyKind(self.kind),
            severity=Severity(self.severity),
            subject=self.subject,
            score=self.score,
            threshold=self.threshold,
            evidence=dict(self.evidence),
            window_start=from_ms(self.window_start_ms),
            window_end=from_ms(self.window_end_ms),
            detector=self.detector,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "score": self.score,
            "threshold": self.threshold,
            "severity": self.severity,
            "evidence": dict(self.evidence),
            "window_start_ms": self.window_start_ms,
            "window_end_ms": self.window_end_ms,
            "detected_ms": self.detected_ms,
            "detector": self.detector,
            "trigger": self.trigger,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finding:
        return cls(
            kind=str(d["kind"]),
            subject=str(d["subject"]),
            score=float(d["score"]),
            threshold=float(d["threshold"]),
            severity=str(d["severity"]),
            evidence={str(k): str(v) for k, v in d["evidence"].items()},
            window_start_ms=int(d["window_start_ms"]),
            window_end_ms=int(d["window_end_ms"]),
            detected_ms=int(d["detected_ms"]),
            detector=str(d["detector"]),
            trigger=str(d["trigger"]),
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    state: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    status: Status = "applied"
    reason: str = ""


def _replayed(state: Mapping[str, Any] | None, event_id: str) -> Outcome | None:
    """The outcome of an event this key already applied, or None."""
    if not state:
        return None
    for seen, findings in state.get("applied", ()):
        if seen == event_id:
            return Outcome(dict(state), [Finding.from_dict(f) for f in findings], "duplicate", "redelivered")
    return None


def _remember(state: dict[str, Any], event_id: str, findings: list[Finding]) -> None:
    applied = [*state.get("applied", ()), [event_id, [f.to_dict() for f in findings]]]
    state["applied"] = applied[-APPLIED_MEMORY:]


def _severity(score: float) -> str:
    return "CRITICAL" if score >= 0.9 else "WARNING"


# -- account sharing and impossible travel ---------------------------------------------------------


PLAN_STREAMS: dict[str, int] = {"BASIC": 1, "STANDARD": 2, "PREMIUM": 4}
"""Concurrent streams each plan allows (the tiers' usual 1 / 2 / 4)."""


@dataclass(frozen=True, slots=True)
class AccountConfig:
    default_stream_limit: int = 4
    """Streams allowed when no SubscriptionStarted/Renewed has been seen for the account (the billing
    topic keeps 30 days): the most generous plan, so that an old subscriber is never flagged for it."""
    session_slack_ms: int = 2 * _HOUR_MS
    """An open session with no stop is taken as over this long after its title would have ended."""
    max_session_ms: int = 6 * _HOUR_MS
    """How long an open session lasts when the title's length is not known."""
    max_speed_kmh: float = 1000.0
    """Faster than an airliner between the countries' nearest points: impossible travel."""
    travel_memory_ms: int = 24 * _HOUR_MS
    """How long a stopped session's location is remembered for the travel check."""
    min_interval_ms: int = 60_000
    """The least time between two sightings the speed is computed over (no division by zero)."""
    grace_ms: int = 60_000
    """A start is judged for sharing once the account's event time has passed it by this much and every
    other open session of the account has shown it was still playing after it (a heartbeat) or has
    stopped: each session's events are in order (one partition), but different sessions' are not, so
    a stop that happened before a start may arrive after it."""
    max_wait_ms: int = 10 * 60_000
    """... or once the account's event time has passed the start by this much (a session that went
    silent counts as playing until its expected end)."""
    sharing_refractory_ms: int = 30 * 60_000
    """After a sharing anomaly, further over-limit starts of the account within this long are the same
    incident."""


class AccountRule:
    """Per account: open sessions, recently ended ones, starts still to be judged, and the plan.

    State: ``{"plan", "open": {session: {start, until, country}}, "recent": [{session, country, start,
    seen}], "pending": [[start_ms, session, event_id]], "last_sharing": ms | None, "watermark": ms,
    "applied": [...]}``. Sharing is judged in event time: the streams concurrent at a start are the
    sessions started at or before it and not stopped by then, whatever order their events came in.
    """

    SHARING = "account-sharing/2"
    TRAVEL = "impossible-travel/1"

    def __init__(self, config: AccountConfig | None = None) -> None:
        self.config = config or AccountConfig()

    def limit(self, state: Mapping[str, Any]) -> int:
        plan = state.get("plan")
        if isinstance(plan, str) and plan in PLAN_STREAMS:
            return PLAN_STREAMS[plan]
        return self.config.default_stream_limit

    def apply(
        self,
        state: Mapping[str, Any] | None,
        event: SessionStarted | SessionStopped | Heartbeat | SubscriptionStarted | SubscriptionRenewed,
        account_id: str,
    ) -> Outcome:
        event_id = str(event.event_id)
        replay = _replayed(state, event_id)
        if replay is not None:
            return replay
        state = state or {}
        s: dict[str, Any] = {
            "plan": state.get("plan"),
            "open": {k: dict(v) for k, v in state.get("open", {}).items()},
            "recent": [dict(r) for r in state.get("recent", [])],
            "pending": [list(p) for p in state.get("pending", [])],
            "judged": [list(p) for p in state.get("judged", [])],
            "last_sharing": state.get("last_sharing"),
            "watermark": int(state.get("watermark", 0)),
            "applied": list(state.get("applied", [])),
        }
        t = to_ms(event.event_time)
        s["watermark"] = max(s["watermark"], t)
        findings: list[Finding] = []
        status: Status = "applied"
        reason = ""
        if isinstance(event, SubscriptionStarted | SubscriptionRenewed):
            plan = event.plan.value if event.plan.value in PLAN_STREAMS else None
            if plan != s["plan"]:  # the limit changed: judge again what was judged under the old one
                s["pending"] += s["judged"]
                s["judged"] = []
            s["plan"] = plan
        elif isinstance(event, SessionStopped):
            session = str(event.session_id)
            opened = s["open"].pop(session, None)
            if opened is not None:
                s["recent"].append(
                    {"session": session, "country": opened["country"], "start": opened["start"], "seen": t}
                )
            elif not any(r["session"] == session for r in s["recent"]):
                s["recent"].append({"session": session, "country": None, "start": None, "seen": t})
        elif isinstance(event, Heartbeat):
            opened = s["open"].get(str(event.session_id))
            if opened is not None:  # alive: it lasts at least a slack beyond this beat
                opened["last"] = max(int(opened.get("last", opened["start"])), t)
                opened["until"] = max(opened["until"], t + self.config.session_slack_ms)
        else:
            session = str(event.session_id)
            if session in s["open"] or any(r["session"] == session for r in s["recent"]):
                status, reason = "skipped", "session already known (started twice, or stopped first)"
            else:
                findings.extend(self._travel(s, event, account_id, t))
                remaining = max(event.title_duration_ms - event.position_ms, 0)
                span = (
                    remaining + self.config.session_slack_ms
                    if event.title_duration_ms > 0
                    else self.config.max_session_ms
                )
                s["open"][session] = {
                    "start": t,
                    "last": t,
                    "until": t + span,
                    "country": (event.country or "").upper() or None,
                }
                s["pending"].append([t, session, event_id])
                # A start that arrives late may overlap starts already judged: judge them again.
                again = [j for j in s["judged"] if t <= j[0] < t + span]
                s["judged"] = [j for j in s["judged"] if not (t <= j[0] < t + span)]
                s["pending"] += again
        self._expire(s)
        findings.extend(self._settle(s, account_id))
        _remember(s, event_id, findings)
        return Outcome(s, findings, status, reason)

    def _expire(self, s: dict[str, Any]) -> None:
        now = s["watermark"]
        for session, opened in list(s["open"].items()):
            if opened["until"] < now:
                del s["open"][session]
                s["recent"].append(
                    {
                        "session": session,
                        "country": opened["country"],
                        "start": opened["start"],
                        "seen": opened["until"],
                    }
                )
        horizon = now - self.config.travel_memory_ms
        s["recent"] = [r for r in s["recent"] if r["seen"] >= horizon][-64:]
        s["judged"] = [j for j in s["judged"] if j[0] >= horizon][-32:]

    def _concurrent(self, s: dict[str, Any], at: int) -> list[tuple[str, int, str | None]]:
        """(session, start, country) of the sessions playing at event time ``at``."""
        found = [
            (k, int(v["start"]), v["country"]) for k, v in s["open"].items() if v["start"] <= at < v["until"]
        ]
        found += [
            (r["session"], int(r["start"]), r["country"])
            for r in s["recent"]
            if r["start"] is not None and r["start"] <= at < r["seen"]
        ]
        return sorted(found, key=lambda x: (x[1], x[0]))

    def _ready(self, s: dict[str, Any], at: int, session: str) -> bool:
        """Whether the start at ``at`` can be judged (see ``AccountConfig.grace_ms``)."""
        c = self.config
        if s["watermark"] >= at + c.max_wait_ms:
            return True
        if s["watermark"] < at + c.grace_ms:
            return False
        return all(
            int(o.get("last", o["start"])) >= at
            for k, o in s["open"].items()
            if k != session and o["start"] <= at
        )

    def _settle(self, s: dict[str, Any], account_id: str) -> list[Finding]:
        """Judge the pending starts that are ready, in event-time order."""
        c = self.config
        findings: list[Finding] = []
        limit = self.limit(s)
        waiting: list[list[Any]] = []
        for start, session, event_id in sorted(s["pending"]):
            if not self._ready(s, start, session):
                waiting.append([start, session, event_id])
                continue
            s["judged"].append([start, session, event_id])
            playing = self._concurrent(s, start)
            streams = len(playing)
            last = s["last_sharing"]
            if streams <= limit:
                continue
            if last is not None and 0 <= start - int(last) < c.sharing_refractory_ms:
                continue
            if any(f.trigger == event_id for f in findings) or self._fired(s, event_id):
                continue
            s["last_sharing"] = start
            score = 1.0 - limit / streams
            findings.append(
                Finding(
                    kind="ACCOUNT_SHARING",
                    subject=f"account:{account_id}",
                    score=score,
                    threshold=0.0,
                    severity="CRITICAL" if streams >= 2 * limit else "WARNING",
                    evidence={
                        "concurrent_streams": str(streams),
                        "stream_limit": str(limit),
                        "plan": s["plan"] or "unknown (default limit)",
                        "sessions": ",".join(p[0] for p in playing),
                        "countries": ",".join(sorted({p[2] or "?" for p in playing})),
                        "trigger_session": session,
                    },
                    window_start_ms=playing[0][1],
                    window_end_ms=start + c.grace_ms + 1,
                    detected_ms=start + c.grace_ms,
                    detector=self.SHARING,
                    trigger=event_id,
                )
            )
        s["pending"] = waiting
        return findings

    @staticmethod
    def _fired(s: dict[str, Any], event_id: str) -> bool:
        """Whether a sharing anomaly was already raised for this start (a start judged again)."""
        return any(
            f.get("trigger") == event_id and f.get("kind") == "ACCOUNT_SHARING"
            for _, found in s["applied"]
            for f in found
        )

    def _travel(self, s: dict[str, Any], event: SessionStarted, account_id: str, t: int) -> list[Finding]:
        here = geo.country(event.country)
        if here is None:
            return []
        worst: tuple[float, float, float, str, str, int] | None = None
        # Each other session was where it was from its start to its last sign of life (its stop, its
        # last heartbeat, or for an open one its expected end): the gap to ``t`` is 0 inside that span.
        sightings = [(k, o["country"], int(o["start"]), int(o["until"])) for k, o in s["open"].items()]
        sightings += [
            (
                r["session"],
                r["country"],
                int(r["start"] if r["start"] is not None else r["seen"]),
                int(r["seen"]),
            )
            for r in s["recent"]
        ]
        for session, code, first, last in sightings:
            there = geo.country(code)
            if there is None or there.code == here.code:
                continue
            distance = geo.least_distance_km(here, there)
            if distance <= 0.0:
                continue
            seen = min(max(t, first), last)  # the moment of that span nearest to t
            hours = max(abs(t - seen), self.config.min_interval_ms) / _HOUR_MS
            speed = distance / hours
            if worst is None or speed > worst[0]:
                worst = (speed, distance, hours, session, there.code, seen)
        if worst is None or worst[0] <= self.config.max_speed_kmh:
            return []
        speed, distance, hours, session, code, seen = worst
        score = 1.0 - self.config.max_speed_kmh / speed
        return [
            Finding(
                kind="IMPOSSIBLE_TRAVEL",
                subject=f"account:{account_id}",
                score=score,
                threshold=0.0,
                severity=_severity(score),
                evidence={
                    "speed_kmh": f"{speed:.0f}",
                    "max_speed_kmh": f"{self.config.max_speed_kmh:.0f}",
                    "least_distance_km": f"{distance:.0f}",
                    "hours_between": f"{hours:.3f}",
                    "from_country": code,
                    "to_country": here.code,
                    "from_session": session,
                    "to_session": str(event.session_id),
                    "to_client_ip": event.client_ip,
                },
                window_start_ms=min(seen, t),
                window_end_ms=t + 1,
                detected_ms=t,
                detector=self.TRAVEL,
                trigger=str(event.event_id),
            )
        ]


# -- payment fraud -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeclineConfig:
    window_ms: int = _HOUR_MS
    """The burst window: declines counted over the last hour of event time."""
    baseline_days: int = 7
    """The subject's own rate: the median of its daily decline counts over the previous days."""
    prior_per_day: float = 1.0
    """The least daily rate assumed (a card declining once a day, as dunning retries do, is ordinary)."""
    max_p_value: float = 1e-4
    """A burst: at least this unlikely under the subject's rate (Poisson)."""
    score_decades: float = 10.0
    """Score ``-log10(p) / score_decades`` capped at 1."""


def poisson_tail(n: int, mean: float) -> float:
    """P(N >= n) for N ~ Poisson(mean), summed upwards from n (accurate for tiny tails)."""
    if n <= 0:
        return 1.0
    log_term = -mean + n * math.log(mean) - math.lgamma(n + 1) if mean > 0 else -math.inf
    if log_term == -math.inf:
        return 0.0
    total, k, term = 0.0, n, math.exp(log_term)
    while term > 1e-300 and k < n + 1000:
        total += term
        k += 1
        term *= mean / k
        if term < total * 1e-16:
            break
    return min(1.0, total)


class DeclineBurstRule:
    """Per subject (``account:<id>`` or ``card:<fingerprint>``): bursts of declined payments.

    State: ``{"window": [[event_id, ms], ...], "days": {day: count}, "last_fired": ms | None,
    "watermark": ms, "applied": [...]}``.
    """

    DETECTOR = "decline-burst/1"

    def __init__(self, config: DeclineConfig | None = None) -> None:
        self.config = config or DeclineConfig()

    def apply(self, state: Mapping[str, Any] | None, event: PaymentFailed, subject: str) -> Outcome:
        c = self.config
        event_id = str(event.event_id)
        replay = _replayed(state, event_id)
        if replay is not None:
            return replay
        state = state or {}
        t = to_ms(event.event_time)
        watermark = max(int(state.get("watermark", 0)), t)
        window = [w for w in state.get("window", []) if w[1] > watermark - c.window_ms]
        days = {int(d): int(n) for d, n in state.get("days", {}).items()}
        last_fired = state.get("last_fired")
        s: dict[str, Any] = {"applied": list(state.get("applied", []))}
        findings: list[Finding] = []
        status: Status = "applied"
        reason = ""
        if t <= watermark - c.window_ms:
            status, reason = "late", "older than the burst window"
        else:
            window.append([event_id, t])
            day = t // _DAY_MS
            days[day] = days.get(day, 0) + 1
        today = watermark // _DAY_MS
        days = {d: n for d, n in days.items() if d > today - c.baseline_days - 1}
        previous = [days.get(d, 0) for d in range(today - c.baseline_days, today)]
        rate = max(c.prior_per_day, statistics.median(previous) if previous else 0.0)
        expected = rate * c.window_ms / _DAY_MS
        count = len(window)
        p = poisson_tail(count, expected)
        quiet = last_fired is None or t - int(last_fired) >= c.window_ms
        if status == "applied" and p <= c.max_p_value and quiet:
            score = min(1.0, -math.log10(max(p, 1e-300)) / c.score_decades)
            last_fired = t
            findings.append(
                Finding(
                    kind="PAYMENT_FRAUD",
                    subject=subject,
                    score=score,
                    threshold=min(1.0, -math.log10(c.max_p_value) / c.score_decades),
                    severity=_severity(score),
                    evidence={
                        "declines_in_window": str(count),
                        "window_s": str(c.window_ms // 1000),
                        "baseline_per_day": f"{rate:g}",
                        "expected_in_window": f"{expected:.4g}",
                        "p_value": f"{p:.3g}",
                        "decline_reason": event.decline_reason.value,
                        "account_id": str(event.account_id),
                        "card_fingerprint": event.card_fingerprint or "",
                    },
                    window_start_ms=min(w[1] for w in window),
                    window_end_ms=t + 1,
                    detected_ms=t,
                    detector=self.DETECTOR,
                    trigger=event_id,
                )
            )
        s.update({"window": window, "days": {str(d): n for d, n in days.items()}})
        s.update({"last_fired": last_fired, "watermark": watermark})
        _remember(s, event_id, findings)
        return Outcome(s, findings, status, reason)


# -- time series: service error rate and latency, node mount latency --------------------------------


@dataclass(frozen=True, slots=True)
class SeriesConfig:
    threshold: float = 0.5
    """Detector score that raises an anomaly (0.5: likelihood 1e-10, or out of the range seen)."""
    floor: float = 0.0
    """A value at or below this is never anomalous, whatever its score (e.g. a 0.2 % error rate)."""
    detector: DetectorConfig = field(default_factory=DetectorConfig)


class SeriesRule:
    """One univariate series per key, scored by :class:`Detector`; only rises are anomalies.

    State: ``{"detector": Detector.to_dict(), "last_ms": ms, "applied": [...]}``. Records older than the
    series' last one are late (the detector needs time order) and dropped.
    """

    def __init__(self, kind: str, metric: str, config: SeriesConfig | None = None) -> None:
        self.kind = kind
        self.metric = metric
        self.config = config or SeriesConfig()
        self.name = f"streaming-likelihood/1:{metric}"
        # The detector behind each state this rule returned last, by the state's identity: a caller
        # that hands the same state back (the table adapter's decoded copy) skips rebuilding it.
        self._live: dict[int, tuple[Mapping[str, Any], Detector]] = {}

    def apply(
        self,
        state: Mapping[str, Any] | None,
        event_id: str,
        event_time: datetime,
        value: float,
        subject: str,
        evidence: Mapping[str, str] | None = None,
    ) -> Outcome:
        replay = _replayed(state, event_id)
        if replay is not None:
            return replay
        state = state or {}
        t = to_ms(event_time)
        last = state.get("last_ms")
        if last is not None and t < int(last):
            return Outcome(dict(state), [], "late", "older than the series' last record")
        if not math.isfinite(value):
            return Outcome(dict(state), [], "skipped", "not a finite number")
        live = self._live.pop(id(state), None)
        if live is not None and live[0] is state:
            detector = live[1]
        elif "detector" in state:
            detector = Detector.from_dict(state["detector"])
        else:
            detector = Detector(self.config.detector)
        k = detector.config.local_window
        recent = sorted(list(detector.history)[-k:])
        typical = recent[len(recent) // 2] if recent else value
        score = detector.update(event_time, value)
        findings: list[Finding] = []
        if score >= self.config.threshold and value > typical and value > self.config.floor:
            findings.append(
                Finding(
                    kind=self.kind,
                    subject=subject,
                    score=score,
                    threshold=self.config.threshold,
                    severity=_severity(score),
                    evidence={
                        "metric": self.metric,
                        "value": f"{value:.6g}",
                        "recent_median": f"{typical:.6g}",
                        "seen_low": f"{detector.low:.6g}" if detector.low is not None else "",
                        "records": str(detector.count),
                        **(evidence or {}),
                    },
                    window_start_ms=int(last) if last is not None else t,
                    window_end_ms=t + 1,
                    detected_ms=t,
                    detector=self.name,
                    trigger=event_id,
                )
            )
        s: dict[str, Any] = {
            "detector": detector.to_dict(),
            "last_ms": t,
            "applied": list(state.get("applied", [])),
        }
        _remember(s, event_id, findings)
        if len(self._live) >= 10_000:
            self._live.pop(next(iter(self._live)))
        self._live[id(s)] = (s, detector)
        return Outcome(s, findings)


@dataclass(frozen=True, slots=True)
class StallConfig:
    sustained: int = 2
    """Consecutive stalled probes that make a stall (one slow probe is not one)."""


class StallFlagRule:
    """Per node: the probe's ``stalled`` verdict held for ``sustained`` probes, once per stall.

    State: ``{"run": n, "run_start": ms, "fired": bool, "last_ms": ms, "applied": [...]}``.
    """

    DETECTOR = "mount-stall-flag/1"

    def __init__(self, config: StallConfig | None = None) -> None:
        self.config = config or StallConfig()

    def apply(
        self,
        state: Mapping[str, Any] | None,
        event_id: str,
        event_time: datetime,
        stalled: bool,
        subject: str,
        evidence: Mapping[str, str] | None = None,
    ) -> Outcome:
        replay = _replayed(state, event_id)
        if replay is not None:
            return replay
        state = state or {}
        t = to_ms(event_time)
        last = state.get("last_ms")
        if last is not None and t < int(last):
            return Outcome(dict(state), [], "late", "older than the node's last probe")
        run = int(state.get("run", 0))
        run_start = int(state.get("run_start", t))
        fired = bool(state.get("fired", False))
        findings: list[Finding] = []
        if stalled:
            run, run_start = run + 1, run_start if run else t
            if run >= self.config.sustained and not fired:
                fired = True
                findings.append(
                    Finding(
                        kind="MOUNT_STALL",
                        subject=subject,
                        score=1.0,
                        threshold=1.0,
                        severity="CRITICAL",
                        evidence={"stalled_probes": str(run), **(evidence or {})},
                        window_start_ms=run_start,
                        window_end_ms=t + 1,
                        detected_ms=t,
                        detector=self.DETECTOR,
                        trigger=event_id,
                    )
                )
        else:
            run, run_start, fired = 0, t, False
        s: dict[str, Any] = {
            "run": run,
            "run_start": run_start,
            "fired": fired,
            "last_ms": t,
            "applied": list(state.get("applied", [])),
        }
        _remember(s, event_id, findings)
        return Outcome(s, findings)
