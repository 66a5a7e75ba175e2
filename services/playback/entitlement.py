"""Entitlement: may an account play, projected from ``billing.events``. Pure.

Rules (one state per account, the latest subscription wins):

- ``SubscriptionStarted``: entitled until the end of the first period (or of the trial, if later).
- ``SubscriptionRenewed``: entitled until the end of the new period.
- ``SubscriptionCancelled`` with ``at_period_end``: entitled until ``effective_at`` (the end of the
  paid period), then refused as *cancelled*. Without ``at_period_end``: access ends at once (at the
  event's time, or ``effective_at`` if that is earlier).
- ``PaymentFailed`` on a renewal -- a charge for a period that starts after the start of the period
  the account is entitled for -- ends access at once (no grace period while billing retries; a
  later ``SubscriptionRenewed`` restores it). A failed charge for the current period (the first
  charge, say) changes nothing here: billing says ``SubscriptionCancelled`` if it gives up.
- ``SubscriptionCancelled`` and ``PaymentFailed`` about another subscription than the account's
  current one change nothing (an old subscription's late news cannot end a new one).
- Order: an event older (``event_time``) than the last one applied is ignored, so a late or replayed
  event never rolls the state back; at equal times the later arrival wins (Kafka keeps an account's
  events in order). Duplicates are dropped by event id before these rules run.
- ``PaymentSucceeded`` and ``RefundIssued`` change nothing: a paid period arrives as
  ``SubscriptionRenewed``.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from services.bus.events import PaymentFailed, SubscriptionCancelled, SubscriptionRenewed, SubscriptionStarted

BillingEvent = SubscriptionStarted | SubscriptionRenewed | SubscriptionCancelled | PaymentFailed


class Status(enum.StrEnum):
    ACTIVE = "active"
    CANCELLED = "cancelled"
    PAYMENT_FAILED = "payment_failed"


@dataclass(frozen=True)
class Entitlement:
    subscription_id: uuid.UUID
    status: Status
    period_start: datetime
    entitled_until: datetime
    last_event_time: datetime


@dataclass(frozen=True)
class Decision:
    entitled: bool
    reason: str | None = None  # machine-readable: no_subscription, expired, cancelled, payment_failed
    message: str = ""


def apply(state: Entitlement | None, event: BillingEvent) -> Entitlement | None:
    """The state after ``event``, or None when the event changes nothing."""
    if state is not None and event.event_time < state.last_event_time:
        return None
    at = event.event_time
    match event:
        case SubscriptionStarted():
            until = max(event.period_end, event.trial_end or event.period_end)
            return Entitlement(event.subscription_id, Status.ACTIVE, event.period_start, until, at)
        case SubscriptionRenewed():
            return Entitlement(event.subscription_id, Status.ACTIVE, event.period_start, event.period_end, at)
        case SubscriptionCancelled():
            if state is not None and state.subscription_id != event.subscription_id:
                return None
            until = event.effective_at if event.at_period_end else min(at, event.effective_at)
            start = state.period_start if state is not None else min(at, until)
            return Entitlement(event.subscription_id, Status.CANCELLED, start, until, at)
        case PaymentFailed():
            if state is None or state.subscription_id != event.subscription_id:
                return None
            if event.period_start <= state.period_start:
                return None  # not a renewal: the current period's own charge
            until = min(state.entitled_until, at)
            return Entitlement(event.subscription_id, Status.PAYMENT_FAILED, state.period_start, until, at)
    return None


def decide(state: Entitlement | None, now: datetime) -> Decision:
    """May the account play at ``now``? When not, why."""
    if state is None:
        return Decision(False, "no_subscription", "the account has no subscription")
    if now < state.entitled_until:
        return Decision(True)
    ended = state.entitled_until.isoformat()
    if state.status is Status.CANCELLED:
        return Decision(False, "cancelled", f"the subscription was cancelled (access ended {ended})")
    if state.status is Status.PAYMENT_FAILED:
        return Decision(False, "payment_failed", f"the renewal payment failed (access ended {ended})")
    return Decision(False, "expired", f"the subscription expired at {ended} and was not renewed")
