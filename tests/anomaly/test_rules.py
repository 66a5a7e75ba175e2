"""The pure anomaly rules: each kind fires on a planted case, stays quiet on a clean stream, and a
redelivered event changes nothing. No Kafka here (the service tests publish the same scenarios)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from services.anomaly_detector import geo
from services.anomaly_detector.rules import (
    AccountRule,
    DeclineBurstRule,
    Finding,
    SeriesConfig,
    SeriesRule,
    StallFlagRule,
    poisson_tail,
)
from services.bus.events import (
    Heartbeat,
    LoadSample,
    MountStallSample,
    PaymentFailed,
    SessionStarted,
    SessionStopped,
    SubscriptionRenewed,
    SubscriptionStarted,
)
from tests.anomaly import planted
from tests.anomaly.planted import T0

AccountEvent = SessionStarted | SessionStopped | Heartbeat | SubscriptionStarted | SubscriptionRenewed


def run_accounts(events: list[planted.Published], rule: AccountRule | None = None) -> list[Finding]:
    """Route playback and billing events to per-account state, as the service does."""
    rule = rule or AccountRule()
    states: dict[str, Mapping[str, Any]] = {}
    session_account: dict[str, str] = {}
    findings: list[Finding] = []
    for _, _, event in events:
        if isinstance(event, SessionStarted):
            session_account[str(event.session_id)] = str(event.account_id)
            account = str(event.account_id)
        elif isinstance(event, SessionStopped | Heartbeat):
            account = session_account[str(event.session_id)]
        elif isinstance(event, SubscriptionStarted | SubscriptionRenewed):
            account = str(event.account_id)
        else:
            continue
        outcome = rule.apply(states.get(account), event, account)
        states[account] = outcome.state
        findings += outcome.findings
    return findings


def run_declines(events: list[planted.Published]) -> list[Finding]:
    rule = DeclineBurstRule()
    states: dict[str, Mapping[str, Any]] = {}
    findings: list[Finding] = []
    for _, _, event in events:
        assert isinstance(event, PaymentFailed)
        subjects = [f"account:{event.account_id}"]
        if event.card_fingerprint:
            subjects.append(f"card:{event.card_fingerprint}")
        for subject in subjects:
            outcome = rule.apply(states.get(subject), event, subject)
            states[subject] = outcome.state
            findings += outcome.findings
    return findings


def run_load(events: list[planted.Published]) -> list[Finding]:
    latency = SeriesRule("LATENCY", "latency_p99_ms")
    errors = SeriesRule("ERROR_RATE", "error_rate", SeriesConfig(floor=0.01))
    states: dict[str, Mapping[str, Any]] = {}
    findings: list[Finding] = []
    for _, _, event in events:
        assert isinstance(event, LoadSample)
        for rule, value in ((latency, event.latency_p99_ms), (errors, event.error_rate)):
            assert value is not None
            key = f"{event.service}/{rule.metric}"
            outcome = rule.apply(
                states.get(key), str(event.event_id), event.event_time, value, f"service:{event.service}"
            )
            states[key] = outcome.state
            findings += outcome.findings
    return findings


def run_mounts(events: list[planted.Published]) -> list[Finding]:
    flag = StallFlagRule()
    latency = SeriesRule("MOUNT_STALL", "mount_op_latency_ms")
    states: dict[str, Mapping[str, Any]] = {}
    findings: list[Finding] = []
    for _, _, event in events:
        assert isinstance(event, MountStallSample)
        subject = f"node:{event.node}"
        out = flag.apply(states.get("flag"), str(event.event_id), event.event_time, event.stalled, subject)
        states["flag"] = out.state
        findings += out.findings
        out = latency.apply(
            states.get("lat"), str(event.event_id), event.event_time, event.mount_op_latency_ms, subject
        )
        states["lat"] = out.state
        findings += out.findings
    return findings


# -- account sharing ---------------------------------------------------------------------------------


def test_sharing_fires_on_a_stream_over_the_plan() -> None:
    events = planted.sharing(planted=True)
    findings = run_accounts(events)
    assert [f.kind for f in findings] == ["ACCOUNT_SHARING"]
    f = findings[0]
    assert f.evidence["concurrent_streams"] == "3"
    assert f.evidence["stream_limit"] == "2"
    assert f.evidence["plan"] == "STANDARD"
    third = [e for _, _, e in events if isinstance(e, SessionStarted)][-1]
    assert f.subject == f"account:{third.account_id}"
    assert f.trigger == str(third.event_id)
    assert f.detected_ms == int(third.event_time.timestamp() * 1000) + 60_000  # after the grace period
    assert f.to_event().kind.value == "ACCOUNT_SHARING"


def test_sharing_quiet_when_a_stream_stops_first() -> None:
    assert run_accounts(planted.sharing(planted=False)) == []


def tick(started: SessionStarted, minutes: float) -> planted.Published:
    """A heartbeat that moves the account's event time past the grace period."""
    return ("playback.events", "k", planted.heartbeat(started, T0 + timedelta(minutes=minutes)))


def test_sharing_uses_the_default_limit_without_a_plan() -> None:
    account = uuid.uuid4()
    sessions = [planted.session_started(account, T0 + timedelta(minutes=i)) for i in range(5)]
    events: list[planted.Published] = [("playback.events", "k", s) for s in sessions]
    # No heartbeats from the others: judged once the account's time is 10 minutes past the start.
    assert run_accounts([*events[:4], tick(sessions[0], 15)]) == []  # the default allows 4
    assert run_accounts([*events, tick(sessions[0], 13)]) == []  # not judged yet
    findings = run_accounts([*events, tick(sessions[0], 15)])
    assert [f.evidence["plan"] for f in findings] == ["unknown (default limit)"]


def test_sharing_waits_for_the_grace_period() -> None:
    events = planted.sharing(planted=True)
    assert run_accounts(events[:-1]) == []  # the third start is not judged yet
    assert len(run_accounts(events)) == 1


def test_sharing_judged_in_event_time_when_a_stop_comes_late() -> None:
    """The stop of b (minute 3) arrives after c's start (minute 4): c never played alongside b."""
    events = planted.sharing(planted=False)
    kinds = [type(e).__name__ for _, _, e in events]
    assert kinds.index("SessionStopped") > max(i for i, k in enumerate(kinds) if k == "SessionStarted")
    assert run_accounts(events) == []


def test_sharing_fires_once_per_incident_and_again_after_it() -> None:
    account = uuid.uuid4()
    basic = planted.subscription_started(account, "BASIC", T0)
    a = planted.session_started(account, T0 + timedelta(minutes=1))
    b = planted.session_started(account, T0 + timedelta(minutes=2))
    c = planted.session_started(account, T0 + timedelta(minutes=3))
    stops = [planted.session_stopped(s, T0 + timedelta(minutes=4)) for s in (b, c)]
    d = planted.session_started(account, T0 + timedelta(minutes=45))
    events: list[planted.Published] = [("x", "k", e) for e in (basic, a, b, c, *stops, d)]
    findings = run_accounts([*events, tick(a, 50)])
    assert [f.trigger for f in findings] == [str(b.event_id), str(d.event_id)]
    assert findings[0].evidence["concurrent_streams"] == "2"  # a and b, at b's start
    assert findings[1].evidence["concurrent_streams"] == "2"


def test_sessions_expire_after_the_title_would_have_ended() -> None:
    account = uuid.uuid4()
    sub = planted.subscription_started(account, "BASIC", T0)
    a = planted.session_started(account, T0, duration=timedelta(minutes=30))
    # No stop for a; b starts 3 hours later: a (30 min + 2 h slack) is over.
    b = planted.session_started(account, T0 + timedelta(hours=3))
    assert run_accounts([("x", "k", e) for e in (sub, a, b)] + [tick(b, 200)]) == []


def test_heartbeats_keep_a_session_alive() -> None:
    account = uuid.uuid4()
    sub = planted.subscription_started(account, "BASIC", T0)
    a = planted.session_started(account, T0, duration=timedelta(minutes=30))
    beat = planted.heartbeat(a, T0 + timedelta(hours=2))
    b = planted.session_started(account, T0 + timedelta(hours=3))
    findings = run_accounts([("x", "k", e) for e in (sub, a, beat, b)] + [tick(b, 200)])
    assert [f.trigger for f in findings] == [str(b.event_id)]


# -- impossible travel ------------------------------------------------------------------------------


def test_travel_fires_between_concurrent_sessions_far_apart() -> None:
    findings = run_accounts(planted.travel(planted=True))
    assert [f.kind for f in findings] == ["IMPOSSIBLE_TRAVEL"]
    ev = findings[0].evidence
    assert (ev["from_country"], ev["to_country"]) == ("US", "FR")
    assert float(ev["speed_kmh"]) > 1000.0
    assert 0.0 < findings[0].score < 1.0


def test_travel_quiet_when_there_was_time_to_fly() -> None:
    assert run_accounts(planted.travel(planted=False)) == []


def test_travel_quiet_across_a_border() -> None:
    account = uuid.uuid4()
    a = planted.session_started(account, T0, "FR")
    b = planted.session_started(account, T0 + timedelta(minutes=5), "BE")
    c = planted.session_started(account, T0 + timedelta(minutes=6), "US")
    findings = run_accounts([("x", "k", e) for e in (a, b)])
    assert findings == []
    assert [f.evidence["to_country"] for f in run_accounts([("x", "k", e) for e in (a, b, c)])] == ["US"]


def test_travel_quiet_for_unknown_countries() -> None:
    account = uuid.uuid4()
    a = planted.session_started(account, T0, None)
    b = planted.session_started(account, T0 + timedelta(minutes=5), "ZZ")
    c = planted.session_started(account, T0 + timedelta(minutes=6), "JP")
    assert run_accounts([("x", "k", e) for e in (a, b, c)]) == []


def test_least_distance() -> None:
    fr, be, au = geo.country("fr"), geo.country("BE"), geo.country("AU")
    assert fr and be and au
    assert geo.least_distance_km(fr, be) == 0.0
    assert 10_000 < geo.least_distance_km(fr, au) < 17_000
    assert geo.country("zz") is None and geo.country(None) is None


# -- payment fraud ----------------------------------------------------------------------------------


def test_decline_burst_fires_per_card_and_not_per_account() -> None:
    findings = run_declines(planted.declines(planted=True))
    # 6 declines on one card in 12 minutes; 2 per account is within an account's ordinary rate.
    assert [f.subject.split(":")[0] for f in findings] == ["card"]
    f = findings[0]
    assert f.kind == "PAYMENT_FRAUD"
    assert int(f.evidence["declines_in_window"]) >= 3
    assert float(f.evidence["p_value"]) <= 1e-4


def test_decline_burst_fires_per_account() -> None:
    account = uuid.uuid4()
    events: list[planted.Published] = [
        ("billing.events", str(account), planted.payment_failed(account, T0 + timedelta(minutes=i)))
        for i in range(5)
    ]
    findings = run_declines(events)
    assert [(f.subject, f.evidence["declines_in_window"]) for f in findings] == [(f"account:{account}", "3")]


def test_decline_daily_retries_stay_quiet() -> None:
    assert run_declines(planted.declines(planted=False)) == []


def test_decline_baseline_is_the_subjects_own_median() -> None:
    """A subject that declines 30 times a day, every day, is not bursting at 4 an hour."""
    account = uuid.uuid4()
    events: list[planted.Published] = []
    for day in range(8):
        for i in range(30):
            t = T0 + timedelta(days=day, minutes=48 * i)
            events.append(("b", "k", planted.payment_failed(account, t)))
    burst: list[planted.Published] = [
        ("b", "k", planted.payment_failed(account, T0 + timedelta(days=8, minutes=m))) for m in range(4)
    ]
    assert run_declines(events + burst) == []


def test_poisson_tail() -> None:
    assert poisson_tail(0, 3.0) == 1.0
    assert poisson_tail(1, 2.0) == pytest.approx(1 - 2.718281828459045**-2.0)
    assert poisson_tail(3, 1 / 24) == pytest.approx((1 / 24) ** 3 / 6, rel=0.05)
    assert poisson_tail(2, 0.0) == 0.0


# -- service anomalies -------------------------------------------------------------------------------


def test_service_latency_and_error_rate_fire_on_a_jump() -> None:
    findings = run_load(planted.service_load("playback", planted=True))
    kinds = [f.kind for f in findings]
    assert "LATENCY" in kinds and "ERROR_RATE" in kinds
    assert all(f.subject == "service:playback" for f in findings)
    assert all(f.score >= 0.5 for f in findings)
    # One alarm per incident per series, not one per anomalous record.
    assert len(findings) == 2


@pytest.mark.parametrize("seed", [1, 2, 3, 7])
def test_service_load_clean_stays_quiet(seed: int) -> None:
    assert run_load(planted.service_load("playback", planted=False, seed=seed, records=400)) == []


def test_series_drops_late_records() -> None:
    rule = SeriesRule("LATENCY", "latency_p99_ms")
    first = rule.apply(None, "a", T0, 5.0, "service:x")
    late = rule.apply(first.state, "b", T0 - timedelta(seconds=1), 5.0, "service:x")
    assert late.status == "late" and late.state == first.state


# -- mount stalls ------------------------------------------------------------------------------------


def test_mount_stall_fires_on_sustained_stall() -> None:
    findings = run_mounts(planted.mount_stall("node-1", planted=True))
    assert [f.detector for f in findings] == [StallFlagRule.DETECTOR]
    assert findings[0].subject == "node:node-1" and findings[0].kind == "MOUNT_STALL"


def test_mount_single_stalled_probe_stays_quiet() -> None:
    assert run_mounts(planted.mount_stall("node-1", planted=False)) == []


def test_mount_latency_detector_fires_without_the_flag() -> None:
    events = planted.mount_stall("node-2", planted=False, records=200)
    last = events[-1][2]
    assert isinstance(last, MountStallSample)
    slow = planted.mount_sample("node-2", last.event_time + timedelta(seconds=15), 3000.0, stalled=False)
    findings = run_mounts([*events, ("nodes.mount-stall", "node-2", slow)])
    assert [(f.kind, f.trigger) for f in findings] == [("MOUNT_STALL", str(slow.event_id))]


# -- redelivery ---------------------------------------------------------------------------------------


def test_redelivered_events_change_nothing() -> None:
    rule = AccountRule()
    events = [e for _, _, e in planted.travel(planted=True) if isinstance(e, SessionStarted)]
    account = str(events[0].account_id)
    state: Mapping[str, Any] | None = None
    first: list[Finding] = []
    for e in events:
        out = rule.apply(state, e, account)
        state = out.state
        first += out.findings
    again = rule.apply(state, events[-1], account)
    assert again.status == "duplicate"
    assert again.state == state
    assert again.findings == first
    assert again.findings[0].event_id() == first[0].event_id()

    declines = DeclineBurstRule()
    s: Mapping[str, Any] | None = None
    failures = [planted.payment_failed(uuid.UUID(account), T0 + timedelta(minutes=i)) for i in range(3)]
    outs = []
    for p in failures:
        o = declines.apply(s, p, "account:x")
        s = o.state
        outs.append(o)
    replay = declines.apply(s, failures[1], "account:x")
    assert replay.state == s and replay.findings == outs[1].findings == []
    replay = declines.apply(s, failures[2], "account:x")
    assert replay.findings == outs[2].findings and len(replay.findings) == 1


def test_finding_ids_are_deterministic() -> None:
    a = run_accounts(planted.travel(planted=True))
    assert a[0].event_id() == Finding.from_dict(a[0].to_dict()).event_id()
    assert a[0].to_event().event_id == a[0].event_id()


def interleavings(events: list[planted.Published], seed: int) -> list[planted.Published]:
    """The events merged in a random order that keeps each Kafka key's own order (as partitions do)."""
    rng = random.Random(seed)
    queues: dict[tuple[str, str], list[planted.Published]] = {}
    for e in events:
        queues.setdefault((e[0], e[1]), []).append(e)
    out: list[planted.Published] = []
    while queues:
        key = rng.choice(sorted(queues))
        out.append(queues[key].pop(0))
        if not queues[key]:
            del queues[key]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_account_rules_do_not_depend_on_the_order_across_sessions(seed: int) -> None:
    for scenario, kind in ((planted.sharing, "ACCOUNT_SHARING"), (planted.travel, "IMPOSSIBLE_TRAVEL")):
        assert [f.kind for f in run_accounts(interleavings(scenario(True), seed))] == [kind]
        assert run_accounts(interleavings(scenario(False), seed)) == []
