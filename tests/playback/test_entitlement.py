"""Unit tests of the entitlement rules (pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from services.bus.events import (
    CancelReason,
    DeclineReason,
    PaymentFailed,
    Plan,
    SubscriptionCancelled,
    SubscriptionRenewed,
    SubscriptionStarted,
)
from services.playback.entitlement import BillingEvent, Entitlement, Status, apply, decide

T0 = datetime(2026, 11, 1, tzinfo=UTC)
DAY = timedelta(days=1)
ACCOUNT = uuid.uuid4()
SUB = uuid.uuid4()


def started(at: datetime = T0, sub: uuid.UUID = SUB, days: int = 30, **kw: object) -> SubscriptionStarted:
    return SubscriptionStarted(
        event_time=at,
        account_id=ACCOUNT,
        subscription_id=sub,
        plan=Plan.STANDARD,
        amount_cents=1599,
        currency="USD",
        period_start=at,
        period_end=at + days * DAY,
        **kw,  # type: ignore[arg-type]
    )


def renewed(at: datetime, start: datetime, end: datetime, sub: uuid.UUID = SUB) -> SubscriptionRenewed:
    return SubscriptionRenewed(
        event_time=at,
        account_id=ACCOUNT,
        subscription_id=sub,
        plan=Plan.STANDARD,
        charge_id=uuid.uuid4(),
        amount_cents=1599,
        currency="USD",
        period_start=start,
        period_end=end,
    )


def cancelled(
    at: datetime, at_period_end: bool, effective: datetime, sub: uuid.UUID = SUB
) -> SubscriptionCancelled:
    return SubscriptionCancelled(
        event_time=at,
        account_id=ACCOUNT,
        subscription_id=sub,
        plan=Plan.STANDARD,
        at_period_end=at_period_end,
        effective_at=effective,
        reason=CancelReason.USER_REQUESTED,
    )


def failed(at: datetime, start: datetime, end: datetime, sub: uuid.UUID = SUB) -> PaymentFailed:
    return PaymentFailed(
        event_time=at,
        account_id=ACCOUNT,
        subscription_id=sub,
        charge_id=uuid.uuid4(),
        idempotency_key="k",
        amount_cents=1599,
        currency="USD",
        period_start=start,
        period_end=end,
        decline_reason=DeclineReason.INSUFFICIENT_FUNDS,
        attempt=1,
    )


def fold(*events: BillingEvent) -> Entitlement | None:
    state: Entitlement | None = None
    for event in events:
        state = apply(state, event) or state
    return state


def test_no_subscription_is_refused() -> None:
    decision = decide(None, T0)
    assert not decision.entitled and decision.reason == "no_subscription"
    assert "no subscription" in decision.message


def test_a_started_subscription_entitles_until_the_period_end() -> None:
    state = fold(started())
    assert state is not None and state.status is Status.ACTIVE
    assert decide(state, T0 + 29 * DAY).entitled
    expired = decide(state, T0 + 30 * DAY)
    assert not expired.entitled and expired.reason == "expired", "the end is exclusive"


def test_a_trial_longer_than_the_period_counts() -> None:
    state = fold(started(trial_end=T0 + 45 * DAY))
    assert decide(state, T0 + 40 * DAY).entitled


def test_a_renewal_extends_to_the_new_period_end() -> None:
    state = fold(started(), renewed(T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY))
    assert decide(state, T0 + 59 * DAY).entitled
    assert decide(state, T0 + 60 * DAY).reason == "expired"


def test_cancelled_at_period_end_keeps_access_until_then() -> None:
    state = fold(started(), cancelled(T0 + 10 * DAY, True, T0 + 30 * DAY))
    assert state is not None and state.status is Status.CANCELLED
    assert decide(state, T0 + 29 * DAY).entitled
    after = decide(state, T0 + 30 * DAY)
    assert not after.entitled and after.reason == "cancelled"


def test_cancelled_now_ends_access_at_the_event() -> None:
    state = fold(started(), cancelled(T0 + 10 * DAY, False, T0 + 10 * DAY))
    assert decide(state, T0 + 10 * DAY - timedelta(seconds=1)).entitled
    now = decide(state, T0 + 10 * DAY)
    assert not now.entitled and now.reason == "cancelled" and "cancelled" in now.message
    # an immediate cancellation whose effective_at lies in the future still ends access now
    state = fold(started(), cancelled(T0 + 10 * DAY, False, T0 + 30 * DAY))
    assert decide(state, T0 + 11 * DAY).reason == "cancelled"


def test_a_failed_renewal_payment_ends_access() -> None:
    state = fold(started(), failed(T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY))
    assert state is not None and state.status is Status.PAYMENT_FAILED
    assert decide(state, T0 + 30 * DAY).reason == "payment_failed"
    early = fold(started(), failed(T0 + 28 * DAY, T0 + 30 * DAY, T0 + 60 * DAY))
    assert decide(early, T0 + 28 * DAY).reason == "payment_failed", "a failed renewal ends access at once"
    again = fold(started(), failed(T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY))
    later = fold(
        started(),
        failed(T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY),
        renewed(T0 + 31 * DAY, T0 + 30 * DAY, T0 + 60 * DAY),
    )
    assert again != later and decide(later, T0 + 31 * DAY).entitled, "a successful retry restores it"


def test_a_failed_payment_for_the_current_period_is_not_a_renewal() -> None:
    state = fold(started(), failed(T0 + DAY, T0, T0 + 30 * DAY))
    assert state is not None and state.status is Status.ACTIVE
    assert decide(state, T0 + 2 * DAY).entitled


def test_a_late_event_never_rolls_the_state_back() -> None:
    state = fold(started(), renewed(T0 + 30 * DAY, T0 + 30 * DAY, T0 + 60 * DAY))
    late_cancel = cancelled(T0 + 20 * DAY, False, T0 + 20 * DAY)
    assert apply(state, late_cancel) is None
    late_start = started(at=T0 - DAY)
    assert apply(state, late_start) is None
    cancelled_state = fold(started(), cancelled(T0 + 10 * DAY, False, T0 + 10 * DAY))
    assert apply(cancelled_state, renewed(T0 + 5 * DAY, T0, T0 + 60 * DAY)) is None


def test_news_about_an_old_subscription_does_not_end_the_new_one() -> None:
    new = uuid.uuid4()
    state = fold(
        started(),
        cancelled(T0 + DAY, False, T0 + DAY),
        started(at=T0 + 2 * DAY, sub=new),
    )
    assert decide(state, T0 + 3 * DAY).entitled, "resubscribed"
    assert apply(state, cancelled(T0 + 4 * DAY, False, T0 + 4 * DAY, sub=SUB)) is None
    assert apply(state, failed(T0 + 4 * DAY, T0 + 40 * DAY, T0 + 70 * DAY, sub=SUB)) is None


def test_a_cancellation_without_a_known_start_is_still_recorded() -> None:
    state = fold(cancelled(T0, True, T0 + 5 * DAY))
    assert decide(state, T0 + DAY).entitled
    assert decide(state, T0 + 5 * DAY).reason == "cancelled"
    assert apply(None, failed(T0, T0 + DAY, T0 + 31 * DAY)) is None, "a payment of an unknown subscription"
