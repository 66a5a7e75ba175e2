"""The anomaly detector's business logic: one plain async function per input, of (event, dependencies).

The functions know nothing of faust: state is read and written through :class:`StateStore` (a
changelog-backed table in the service, a dict in unit tests), records are re-keyed through
``deps.forward`` and anomalies leave through ``deps.publish``.

The flow (topics in ``topics/topics.yaml``):

- ``playback.events`` (key: session) -> :func:`on_playback`: remembers which account a session belongs to
  (``SessionStopped`` and ``Heartbeat`` do not say) and forwards starts, stops and heartbeats keyed by
  account to ``anomaly-detector.accounts``; a stop or heartbeat of a session it never saw start is
  counted and skipped (its start came before this processor's history).
- ``billing.events`` (key: account) -> :func:`on_billing`: ``SubscriptionStarted``/``Renewed`` go to
  ``anomaly-detector.accounts`` (the plan, in order with the account's sessions); each ``PaymentFailed``
  goes to ``anomaly-detector.declines`` twice, keyed ``account:<id>`` and ``card:<fingerprint>``.
- ``anomaly-detector.accounts`` -> :func:`on_account_event`: account sharing, impossible travel.
- ``anomaly-detector.declines`` -> :func:`on_decline`: payment-fraud bursts.
- ``scaling.load`` (key: service) -> :func:`on_load_sample`: error rate and p99 latency per service.
- ``nodes.mount-stall`` (key: node) -> :func:`on_mount_sample`: sustained stalls and latency anomalies.

Every anomaly goes to ``anomalies.detected`` keyed by its subject, with an id derived from its kind,
subject and triggering event (:meth:`Finding.event_id`), so a redelivered input gives the same output.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from services.anomaly_detector.rules import (
    AccountRule,
    DeclineBurstRule,
    Finding,
    Outcome,
    SeriesConfig,
    SeriesRule,
    StallFlagRule,
)
from services.bus.events import (
    AvroEvent,
    Heartbeat,
    LoadSample,
    MountStallSample,
    PaymentFailed,
    SessionStarted,
    SessionStopped,
    SubscriptionRenewed,
    SubscriptionStarted,
)

log = logging.getLogger("reelbus.anomaly_detector")

INPUTS = Counter(
    "reelbus_anomaly_inputs_total",
    "Records the anomaly rules took, by rule and outcome (applied, duplicate, late, skipped, unknown)",
    ["rule", "outcome"],
)
ANOMALIES = Counter("reelbus_anomalies_total", "Anomalies published, by kind", ["kind"])

ACCOUNTS_ROUTE = "accounts"
DECLINES_ROUTE = "declines"

AccountEvent = SessionStarted | SessionStopped | Heartbeat | SubscriptionStarted | SubscriptionRenewed


class StateStore(Protocol):
    """A rule's JSON-able state per key (a changelog-backed table in the service)."""

    def get(self, key: str) -> Mapping[str, Any] | None: ...

    def put(self, key: str, state: Mapping[str, Any], cause: AvroEvent) -> None: ...


class SessionStore(Protocol):
    """Session id -> account id."""

    def get(self, session: str) -> str | None: ...

    def put(self, session: str, account: str, cause: SessionStarted) -> None: ...


@dataclass(frozen=True)
class Rules:
    accounts: AccountRule = field(default_factory=AccountRule)
    declines: DeclineBurstRule = field(default_factory=DeclineBurstRule)
    latency: SeriesRule = field(default_factory=lambda: SeriesRule("LATENCY", "latency_p99_ms"))
    error_rate: SeriesRule = field(
        default_factory=lambda: SeriesRule("ERROR_RATE", "error_rate", SeriesConfig(floor=0.01))
    )
    mount_latency: SeriesRule = field(
        default_factory=lambda: SeriesRule("MOUNT_STALL", "mount_op_latency_ms")
    )
    health_latency: SeriesRule = field(
        default_factory=lambda: SeriesRule("MOUNT_STALL", "health_probe_p99_ms")
    )
    stall_flag: StallFlagRule = field(default_factory=StallFlagRule)


Forward = Callable[[str, str, Any], Awaitable[None]]
Publish = Callable[[Finding], Awaitable[None]]


@dataclass
class Deps:
    rules: Rules
    sessions: SessionStore
    """session id -> account id (co-partitioned with playback.events)."""
    accounts: StateStore
    declines: StateStore
    services: StateStore
    """``service:<name>/<metric>`` -> detector state (co-partitioned with scaling.load)."""
    nodes: StateStore
    """``node:<host>/<metric>`` -> stall-run or detector state (co-partitioned with nodes.mount-stall)."""
    forward: Forward
    publish: Publish


def _count(rule: str, outcome: Outcome) -> None:
    INPUTS.labels(rule, outcome.status).inc()
    if outcome.status in ("late", "skipped"):
        log.info("%s: %s record skipped: %s", rule, outcome.status, outcome.reason)


async def _publish(deps: Deps, outcome: Outcome) -> None:
    for finding in outcome.findings:
        if outcome.status != "duplicate":
            ANOMALIES.labels(finding.kind).inc()
            log.info(
                "anomaly %s on %s: score %.3f %s",
                finding.kind,
                finding.subject,
                finding.score,
                dict(finding.evidence),
            )
        await deps.publish(finding)


async def on_playback(event: object, deps: Deps) -> None:
    """``playback.events``: re-key session starts and stops by account."""
    if isinstance(event, SessionStarted):
        session = str(event.session_id)
        deps.sessions.put(session, str(event.account_id), event)
        await deps.forward(ACCOUNTS_ROUTE, str(event.account_id), event)
    elif isinstance(event, SessionStopped | Heartbeat):
        account = deps.sessions.get(str(event.session_id))
        if account is None:
            INPUTS.labels("accounts", "unknown").inc()
            log.info(
                "%s %s for unknown session %s: skipped",
                type(event).__name__,
                event.event_id,
                event.session_id,
            )
            return
        await deps.forward(ACCOUNTS_ROUTE, account, event)
    # pauses and resumes say nothing the account rules use


async def on_billing(event: object, deps: Deps) -> None:
    """``billing.events``: plans to the account stream, declines to the per-subject decline stream."""
    if isinstance(event, SubscriptionStarted | SubscriptionRenewed):
        await deps.forward(ACCOUNTS_ROUTE, str(event.account_id), event)
    elif isinstance(event, PaymentFailed):
        await deps.forward(DECLINES_ROUTE, f"account:{event.account_id}", event)
        if event.card_fingerprint:
            await deps.forward(DECLINES_ROUTE, f"card:{event.card_fingerprint}", event)
        else:
            INPUTS.labels("declines.card", "unknown").inc()


async def on_account_event(event: object, account: str, deps: Deps) -> None:
    """``anomaly-detector.accounts`` (key: account id): sharing and impossible travel."""
    if not isinstance(event, AccountEvent):
        return
    if not account:
        INPUTS.labels("accounts", "unknown").inc()
        log.info("%s %s without an account key: skipped", type(event).__name__, event.event_id)
        return
    outcome = deps.rules.accounts.apply(deps.accounts.get(account), event, account)
    deps.accounts.put(account, outcome.state, event)
    _count("accounts", outcome)
    await _publish(deps, outcome)


async def on_decline(event: object, subject: str, deps: Deps) -> None:
    """``anomaly-detector.declines`` (key: ``account:<id>`` or ``card:<fingerprint>``)."""
    if not isinstance(event, PaymentFailed):
        return
    if not subject.startswith(("account:", "card:")):
        INPUTS.labels("declines", "unknown").inc()
        log.info("PaymentFailed %s under unknown subject %r: skipped", event.event_id, subject)
        return
    outcome = deps.rules.declines.apply(deps.declines.get(subject), event, subject)
    deps.declines.put(subject, outcome.state, event)
    _count("declines", outcome)
    await _publish(deps, outcome)


async def _series(
    deps: Deps,
    store: StateStore,
    rule: SeriesRule,
    subject: str,
    event_id: str,
    event: LoadSample | MountStallSample,
    value: float | None,
    evidence: Mapping[str, str],
) -> None:
    if value is None:
        return  # the sender does not measure this figure
    key = f"{subject}/{rule.metric}"
    outcome = rule.apply(store.get(key), event_id, event.event_time, value, subject, evidence)
    store.put(key, outcome.state, event)
    _count(rule.metric, outcome)
    await _publish(deps, outcome)


async def on_load_sample(event: object, deps: Deps) -> None:
    """``scaling.load`` (key: service): the service's error rate and p99 latency, per service."""
    if not isinstance(event, LoadSample):
        return
    if not event.service:
        INPUTS.labels("load", "unknown").inc()
        log.info("LoadSample %s without a service: skipped", event.event_id)
        return
    subject = f"service:{event.service}"
    evidence = {"instance": event.instance, "request_rate": f"{event.request_rate:.4g}"}
    eid = str(event.event_id)
    await _series(deps, deps.services, deps.rules.error_rate, subject, eid, event, event.error_rate, evidence)
    await _series(
        deps, deps.services, deps.rules.latency, subject, eid, event, event.latency_p99_ms, evidence
    )


async def on_mount_sample(event: object, deps: Deps) -> None:
    """``nodes.mount-stall`` (key: node): the probe's stall verdict, and its latencies' anomalies."""
    if not isinstance(event, MountStallSample):
        return
    if not event.node:
        INPUTS.labels("mounts", "unknown").inc()
        log.info("MountStallSample %s without a node: skipped", event.event_id)
        return
    subject = f"node:{event.node}"
    evidence = {
        "probe_id": event.probe_id,
        "mount_op_latency_ms": f"{event.mount_op_latency_ms:.4g}",
        "mount_table_size": str(event.mount_table_size),
        "concurrent_mounts": str(event.concurrent_mounts),
    }
    if event.stall_ratio is not None:
        evidence["stall_ratio"] = f"{event.stall_ratio:.4g}"
    if event.stall_figure:
        evidence["stall_figure"] = event.stall_figure
    eid = str(event.event_id)
    key = f"{subject}/stalled"
    outcome = deps.rules.stall_flag.apply(
        deps.nodes.get(key), eid, event.event_time, event.stalled, subject, evidence
    )
    deps.nodes.put(key, outcome.state, event)
    _count("stalled", outcome)
    await _publish(deps, outcome)
    await _series(
        deps, deps.nodes, deps.rules.mount_latency, subject, eid, event, event.mount_op_latency_ms, evidence
    )
    await _series(
        deps, deps.nodes, deps.rules.health_latency, subject, eid, event, event.health_probe_p99_ms, evidence
    )
