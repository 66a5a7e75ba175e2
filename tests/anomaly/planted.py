"""Input events for the anomaly rules, and planted and clean scenarios built from them.

Each scenario is a list of ``(topic, key, event)`` in the order to publish; the unit tests feed the same
events to the pure rules, the integration tests publish them on private copies of the topics.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

from services.bus.events import (
    DeclineReason,
    DeviceType,
    Heartbeat,
    LoadSample,
    MountStallSample,
    PaymentFailed,
    Plan,
    SessionStarted,
    SessionStopped,
    StopReason,
    SubscriptionStarted,
)

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
Published = tuple[str, str, object]


def ms(t: datetime) -> datetime:
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def subscription_started(account: uuid.UUID, plan: str, t: datetime) -> SubscriptionStarted:
    return SubscriptionStarted(
        event_time=ms(t),
        account_id=account,
        subscription_id=uuid.uuid4(),
        plan=Plan(plan),
        amount_cents=1299,
        currency="USD",
        period_start=ms(t),
        period_end=ms(t + timedelta(days=30)),
    )


def session_started(
    account: uuid.UUID,
    t: datetime,
    country: str | None = "US",
    session: uuid.UUID | None = None,
    duration: timedelta = timedelta(hours=2),
) -> SessionStarted:
    return SessionStarted(
        event_time=ms(t),
        session_id=session or uuid.uuid4(),
        account_id=account,
        profile_id=uuid.uuid4(),
        title_id="tt0001",
        device_type=DeviceType.TV,
        client_ip="203.0.113.7",
        appliance_id="oca-1",
        cdn_url="https://oca-1.example/tt0001.mpd",
        initial_bitrate_kbps=3000,
        position_ms=0,
        title_duration_ms=int(duration.total_seconds() * 1000),
        country=country,
    )


def session_stopped(started: SessionStarted, t: datetime) -> SessionStopped:
    return SessionStopped(
        event_time=ms(t),
        session_id=started.session_id,
        profile_id=started.profile_id,
        title_id=started.title_id,
        position_ms=60_000,
        reason=StopReason.USER_STOPPED,
        watched_ms=60_000,
    )


def heartbeat(started: SessionStarted, t: datetime, sequence: int = 1) -> Heartbeat:
    return Heartbeat(
        event_time=ms(t),
        session_id=started.session_id,
        profile_id=started.profile_id,
        title_id=started.title_id,
        sequence=sequence,
        position_ms=60_000,
        bitrate_kbps=3000,
        buffer_ms=20_000,
        throughput_kbps=8000,
        rebuffer_ms=0,
    )


def payment_failed(account: uuid.UUID, t: datetime, card: str | None = None) -> PaymentFailed:
    return PaymentFailed(
        event_time=ms(t),
        account_id=account,
        subscription_id=uuid.uuid4(),
        charge_id=uuid.uuid4(),
        idempotency_key=str(uuid.uuid4()),
        amount_cents=1299,
        currency="USD",
        period_start=ms(t),
        period_end=ms(t + timedelta(days=30)),
        decline_reason=DeclineReason.CARD_DECLINED,
        attempt=1,
        card_fingerprint=card,
    )


def load_sample(
    service: str, t: datetime, latency_ms: float, error_rate: float, instance: str = "i-1"
) -> LoadSample:
    return LoadSample(
        event_time=ms(t),
        service=service,
        instance=instance,
        cpu_utilization=0.4,
        in_flight=3,
        request_rate=100.0,
        consumer_lag=0,
        window_ms=10_000,
        error_rate=error_rate,
        latency_p99_ms=latency_ms,
    )


def mount_sample(node: str, t: datetime, latency_ms: float, stalled: bool) -> MountStallSample:
    return MountStallSample(
        event_time=ms(t),
        node=node,
        probe_id=f"probe-{node}",
        mount_op_latency_ms=latency_ms,
        mount_table_size=120,
        mount_table_read_ms=0.8,
        probe_latency_ms=latency_ms * 1.5,
        stalled=stalled,
        concurrent_mounts=2,
    )


# -- scenarios: (topic, key, event) ----------------------------------------------------------------


def sharing(planted: bool, t0: datetime = T0) -> list[Published]:
    """A STANDARD account (2 streams); planted: a third concurrent stream, else the second one stops
    first (its stop published after the third start, as when it comes from another partition)."""
    account = uuid.uuid4()
    out: list[Published] = [("billing.events", str(account), subscription_started(account, "STANDARD", t0))]
    a = session_started(account, t0 + timedelta(minutes=1), "US")
    b = session_started(account, t0 + timedelta(minutes=2), "US")
    out += [("playback.events", str(a.session_id), a), ("playback.events", str(b.session_id), b)]
    c = session_started(account, t0 + timedelta(minutes=4), "US")
    out.append(("playback.events", str(c.session_id), c))
    if not planted:
        out.append(("playback.events", str(b.session_id), session_stopped(b, t0 + timedelta(minutes=3))))
    # Heartbeats past the grace period after c: the account's event time moves on, and every session
    # still open shows it was playing after c started, so c is judged.
    later = t0 + timedelta(minutes=6)
    out.append(("playback.events", str(a.session_id), heartbeat(a, later)))
    if planted:
        out.append(("playback.events", str(b.session_id), heartbeat(b, later)))
    return out


def travel(planted: bool, t0: datetime = T0) -> list[Published]:
    """Planted: a session in the US, then one in France 30 minutes later while the first still plays.
    Clean: the US session stops, and the French one starts 12 hours later."""
    account = uuid.uuid4()
    a = session_started(account, t0, "US")
    out: list[Published] = [("playback.events", str(a.session_id), a)]
    if planted:
        b = session_started(account, t0 + timedelta(minutes=30), "FR")
    else:
        out.append(("playback.events", str(a.session_id), session_stopped(a, t0 + timedelta(hours=1))))
        b = session_started(account, t0 + timedelta(hours=13), "FR")
    out.append(("playback.events", str(b.session_id), b))
    return out


def declines(planted: bool, t0: datetime = T0) -> list[Published]:
    """Planted: one card declined 6 times in 12 minutes on 3 accounts (2 each). Clean: one account's
    renewal retried once a day for a week on its own card."""
    out: list[Published] = []
    card = f"fp_{uuid.uuid4().hex[:16]}"
    if planted:
        accounts = [uuid.uuid4() for _ in range(3)]
        for i in range(6):
            account = accounts[i % 3]
            out.append(
                ("billing.events", str(account), payment_failed(account, t0 + timedelta(minutes=2 * i), card))
            )
    else:
        account = uuid.uuid4()
        for day in range(7):
            out.append(
                ("billing.events", str(account), payment_failed(account, t0 + timedelta(days=day), card))
            )
    return out


def service_load(
    service: str, planted: bool, t0: datetime = T0, records: int = 220, seed: int = 7
) -> list[Published]:
    """Samples every 10 s: p99 latency ~ 50 ms and error rate ~ 0.2 %; planted: the last samples see
    latency jump to 400 ms and errors to 25 %."""
    rng = random.Random(seed)
    out: list[Published] = []
    for i in range(records):
        latency = 50.0 + rng.gauss(0.0, 4.0)
        errors = max(0.0, 0.002 + rng.gauss(0.0, 0.001))
        if planted and i >= records - 3:
            latency, errors = 400.0 + i, 0.25
        t = t0 + timedelta(seconds=10 * i)
        out.append(("scaling.load", service, load_sample(service, t, latency, errors, f"{service}-{i % 2}")))
    return out


def mount_stall(node: str, planted: bool, t0: datetime = T0, records: int = 40) -> list[Published]:
    """Probes every 15 s at ~4 ms with one isolated stalled probe; planted: 3 stalled probes at the end."""
    rng = random.Random(11)
    out: list[Published] = []
    for i in range(records):
        stalled = i == 10 or (planted and i >= records - 3)
        latency = 900.0 if stalled else 4.0 + rng.random()
        out.append(
            ("nodes.mount-stall", node, mount_sample(node, t0 + timedelta(seconds=15 * i), latency, stalled))
        )
    return out
