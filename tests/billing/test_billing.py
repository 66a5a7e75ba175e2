"""The billing service as a process against the real Galera cluster (through HAProxy), the async
replica, Kafka and the registry."""

from __future__ import annotations

import asyncio
import signal
import uuid

import aiohttp
import pytest

from services.billing.adapters.provider import card_fingerprint
from services.bus.auth import TokenIssuer
from services.bus.events import (
    PaymentFailed,
    PaymentSucceeded,
    RefundIssued,
    SubscriptionCancelled,
    SubscriptionRenewed,
    SubscriptionStarted,
)
from services.cli.infra import Layout
from tests.billing.service import (
    billing_events,
    call,
    customer,
    names,
    now_ms,
    query,
    start_billing,
    subscribe,
    value,
)
from tests.conftest import SpawnService, wait_for

pytestmark = pytest.mark.infra


async def events_once_sent(
    layout: Layout, database: str, account_id: str, since: int, count: int
) -> list[str]:
    async def arrived() -> list[str] | None:
        unsent = await value(database, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        found = names(await billing_events(layout, account_id, since))
        return found if unsent == 0 and len(found) >= count else None

    return await wait_for(arrived, f"{count} billing event(s) of {account_id}", 30, 0.3)


async def test_subscribe_renew_cancel_and_refund_each_publish_their_event(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    since = now_ms()
    service = await start_billing(
        spawn_service, database, BILLING_PERIOD_SECONDS="2", BILLING_RENEWAL_INTERVAL_SECONDS="0.3"
    )
    who = customer(token_issuer)
    made = await subscribe(http, service.url, who, plan="STANDARD")
    assert made.status == 201, made
    assert made.body["status"] == "active" and made.body["amount_cents"] == 1299
    sub_id = made.body["subscription_id"]
    first_charge = made.body["charge_id"]

    async def renewed() -> bool:
        view = await call(http, "GET", f"{service.url}/v1/billing/accounts/{who.account_id}", token=who.token)
        return view.status == 200 and len(view.body["invoices"]) >= 2

    await wait_for(renewed, "a renewal charge", 20, 0.3)

    cancelled = await call(
        http, "POST", f"{service.url}/v1/billing/subscriptions/{sub_id}/cancel", {"at_period_end": True},
        token=who.token,
    )  # fmt: skip
    assert cancelled.status == 200, cancelled
    assert cancelled.body["cancel_at_period_end"] is True and cancelled.body["status"] == "active"
    again = await call(
        http, "POST", f"{service.url}/v1/billing/subscriptions/{sub_id}/cancel", {"at_period_end": True},
        token=who.token,
    )  # fmt: skip
    assert again.status == 200 and again.body["changed"] is False

    refunded = await call(
        http, "POST", f"{service.url}/v1/billing/refunds", {"charge_id": first_charge, "amount_cents": 500},
        token=who.token, key=str(uuid.uuid4()),
    )  # fmt: skip
    assert refunded.status == 201, refunded
    assert refunded.body["refunded_total_cents"] == 500

    async def ended() -> bool:
        status = await value(database, "SELECT status FROM subscriptions WHERE subscription_id=%s", (sub_id,))
        return bool(status == "cancelled")

    await wait_for(ended, "the subscription to end at its period end", 20, 0.3)
    found = await events_once_sent(billing_db, database, who.account_id, since, 6)
    assert found[:2] == ["SubscriptionStarted", "PaymentSucceeded"], found
    assert found.count("SubscriptionCancelled") == 1, found
    assert found.count("RefundIssued") == 1, found
    renewals = found.count("SubscriptionRenewed")
    assert renewals >= 1 and found.count("PaymentSucceeded") == 1 + renewals, found
    # A cancelled subscription is not renewed again.
    charges = await value(database, "SELECT count(*) FROM charges WHERE subscription_id=%s", (sub_id,))
    assert charges == 1 + renewals
    events = await billing_events(billing_db, who.account_id, since)
    assert all(str(getattr(e, "account_id", "")) == who.account_id for e in events)
    assert isinstance(events[0], SubscriptionStarted) and str(events[0].subscription_id) == sub_id
    renewal = next(e for e in events if isinstance(e, SubscriptionRenewed))
    assert renewal.amount_cents == 1299
    assert any(isinstance(e, SubscriptionCancelled) and e.at_period_end for e in events)
    assert any(isinstance(e, RefundIssued) and e.amount_cents == 500 for e in events)
    assert all(isinstance(e, PaymentSucceeded) for e in events if "Payment" in type(e).__name__)


async def test_a_repeated_request_answers_the_first_answer_and_moves_no_money(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    service = await start_billing(spawn_service, database)
    who = customer(token_issuer)
    key = str(uuid.uuid4())
    first = await subscribe(http, service.url, who, key=key)
    assert first.status == 201, first
    assert first.headers.get("X-Write-GTID")
    # Sequential and concurrent repeats (the slow card keeps the first one in flight).
    repeat = await subscribe(http, service.url, who, key=key)
    assert (repeat.status, repeat.body) == (201, first.body)
    assert repeat.headers.get("Idempotent-Replayed") == "true"
    slow_key = str(uuid.uuid4())
    racing = await asyncio.gather(
        *(subscribe(http, service.url, who, plan="PREMIUM", card="tok_slow", key=slow_key) for _ in range(5))
    )
    assert {r.status for r in racing} == {201}, racing
    assert len({r.body["subscription_id"] for r in racing}) == 1
    assert await value(database, "SELECT count(*) FROM charges WHERE account_id=%s", (who.account_id,)) == 2
    assert await value(database, "SELECT count(*) FROM provider_operations WHERE kind='charge'") == 2
    cash = await value(
        database,
        "SELECT SUM(amount_cents) FROM ledger_entries WHERE account_id=%s AND ledger_account='cash'",
        (who.account_id,),
    )
    assert cash == 799 + 1999

    # The same key with another body is refused, naming the header; so is a missing key.
    other = await subscribe(http, service.url, who, plan="PREMIUM", key=key)
    assert other.status == 422 and other.body["field"] == "Idempotency-Key", other
    missing = await call(
        http, "POST", f"{service.url}/v1/billing/subscriptions",
        {"account_id": who.account_id, "plan": "BASIC", "card_token": "tok_ok"}, token=who.token,
    )  # fmt: skip
    assert missing.status == 400 and missing.body["field"] == "Idempotency-Key", missing
    refund_key = str(uuid.uuid4())
    body = {"charge_id": first.body["charge_id"], "amount_cents": 100}
    refunds = [
        await call(http, "POST", f"{service.url}/v1/billing/refunds", body, token=who.token, key=refund_key)
        for _ in range(3)
    ]
    assert [r.status for r in refunds] == [201, 201, 201]
    assert len({r.body["refund_id"] for r in refunds}) == 1
    refunded = await value(
        database, "SELECT refunded_cents FROM charges WHERE charge_id=%s", (body["charge_id"],)
    )
    assert refunded == 100
    no_key = await call(http, "POST", f"{service.url}/v1/billing/refunds", body, token=who.token)
    assert no_key.status == 400 and no_key.body["field"] == "Idempotency-Key"


async def test_declined_timed_out_and_slow_cards(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    since = now_ms()
    service = await start_billing(spawn_service, database)
    who = customer(token_issuer)
    declined = await subscribe(http, service.url, who, card="tok_decline")
    assert declined.status == 402, declined
    assert declined.body["error"] == "card_declined" and declined.body["field"] == "card_token"
    assert declined.body["status"] == "incomplete"
    timed_out = await subscribe(http, service.url, who, card="tok_timeout")
    assert timed_out.status == 504, timed_out
    assert timed_out.body["error"] == "payment_timeout" and timed_out.body["field"] == "card_token"
    ledger = await value(
        database, "SELECT count(*) FROM ledger_entries WHERE account_id=%s", (who.account_id,)
    )
    assert ledger == 0  # no money moved
    assert await value(database, "SELECT count(*) FROM provider_operations WHERE outcome='captured'") == 0
    slow = await subscribe(http, service.url, who, card="tok_slow")
    assert slow.status == 201 and slow.body["status"] == "active", slow
    found = await events_once_sent(billing_db, database, who.account_id, since, 3)
    assert found == ["PaymentFailed", "SubscriptionStarted", "PaymentSucceeded"], found
    events = await billing_events(billing_db, who.account_id, since)
    failed = [e for e in events if isinstance(e, PaymentFailed)]
    assert [str(e.decline_reason) for e in failed] == ["CARD_DECLINED"]
    # The provider's fingerprint of the card, for the anomaly detector's declines per card.
    assert [e.card_fingerprint for e in failed] == [card_fingerprint("tok_decline")]
    assert card_fingerprint("tok_decline") != card_fingerprint("tok_ok")
    view = await call(http, "GET", f"{service.url}/v1/billing/accounts/{who.account_id}", token=who.token,
                      headers={"X-Read-Your-Writes": slow.headers["X-Write-GTID"]})  # fmt: skip
    assert view.body["status"] == "active"
    assert [i["status"] for i in view.body["invoices"]] == ["failed", "succeeded"]


async def test_a_refund_beyond_the_charge_is_refused(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    service = await start_billing(spawn_service, database)
    who, stranger = customer(token_issuer), customer(token_issuer)
    made = await subscribe(http, service.url, who, plan="BASIC")
    charge = made.body["charge_id"]
    url = f"{service.url}/v1/billing/refunds"
    too_much = await call(http, "POST", url, {"charge_id": charge, "amount_cents": 800}, token=who.token,
                          key=str(uuid.uuid4()))  # fmt: skip
    assert too_much.status == 422 and too_much.body["field"] == "amount_cents", too_much
    # Concurrent partial refunds never add up to more than the charge.
    parts = await asyncio.gather(
        *(
            call(
                http,
                "POST",
                url,
                {"charge_id": charge, "amount_cents": 300},
                token=who.token,
                key=str(uuid.uuid4()),
            )
            for _ in range(4)
        )
    )
    assert sorted(p.status for p in parts) == [201, 201, 422, 422], parts
    assert await value(database, "SELECT refunded_cents FROM charges WHERE charge_id=%s", (charge,)) == 600
    assert await value(database, "SELECT count(*) FROM provider_operations WHERE kind='refund'") == 2
    theirs = await call(http, "POST", url, {"charge_id": charge, "amount_cents": 1}, token=stranger.token,
                        key=str(uuid.uuid4()))  # fmt: skip
    assert theirs.status == 403, theirs
    unknown = await call(http, "POST", url, {"charge_id": str(uuid.uuid4()), "amount_cents": 1},
                         token=who.token, key=str(uuid.uuid4()))  # fmt: skip
    assert unknown.status == 404 and unknown.body["field"] == "charge_id"


async def test_the_ledger_balances_after_a_mixed_workload(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    service = await start_billing(
        spawn_service, database, BILLING_PERIOD_SECONDS="1", BILLING_RENEWAL_INTERVAL_SECONDS="0.3"
    )
    customers = [customer(token_issuer) for _ in range(6)]
    cards = ["tok_ok", "tok_decline", "tok_slow", "tok_ok", "tok_timeout", "tok_ok"]
    plans = ["BASIC", "STANDARD", "PREMIUM"]

    async def journey(i: int) -> None:
        who = customers[i]
        made = await subscribe(http, service.url, who, plan=plans[i % 3], card=cards[i])
        if made.status != 201:
            return
        url = f"{service.url}/v1/billing/refunds"
        await asyncio.gather(
            *(
                call(
                    http,
                    "POST",
                    url,
                    {"charge_id": made.body["charge_id"], "amount_cents": 250},
                    token=who.token,
                    key=str(uuid.uuid4()),
                )
                for _ in range(5)
            )
        )
        if i % 2:
            sub_url = f"{service.url}/v1/billing/subscriptions/{made.body['subscription_id']}/cancel"
            await call(http, "POST", sub_url, {"at_period_end": False}, token=who.token)

    await asyncio.gather(*(journey(i) for i in range(len(customers))))

    async def some_renewals() -> bool:
        return bool(await value(database, "SELECT count(*) FROM charges") >= len(customers) + 2)

    await wait_for(some_renewals, "renewals on top of the workload", 20, 0.3)
    total = await value(database, "SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entries")
    assert total == 0
    unbalanced = await query(
        database,
        "SELECT txn_id, SUM(amount_cents) FROM ledger_entries GROUP BY txn_id HAVING SUM(amount_cents) <> 0",
    )
    assert unbalanced == []
    captured = await value(
        database, "SELECT COALESCE(SUM(amount_cents), 0) FROM charges WHERE status='succeeded'"
    )
    refunded = await value(database, "SELECT COALESCE(SUM(amount_cents), 0) FROM refunds")
    cash = await value(database, "SELECT SUM(amount_cents) FROM ledger_entries WHERE ledger_account='cash'")
    revenue = await value(
        database, "SELECT SUM(amount_cents) FROM ledger_entries WHERE ledger_account='revenue'"
    )
    assert (cash, -revenue) == (captured - refunded, captured)
    over = await query(database, "SELECT charge_id FROM charges WHERE refunded_cents > amount_cents")
    assert over == []
    provider = await value(
        database, "SELECT COALESCE(SUM(amount_cents), 0) FROM provider_operations WHERE outcome='captured'"
    )
    assert provider == captured


async def test_a_client_reads_its_own_write_and_is_told_how_stale_a_read_may_be(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    service = await start_billing(spawn_service, database, BILLING_READ_YOUR_WRITES_WAIT_SECONDS="0.5")
    who = customer(token_issuer)
    url = f"{service.url}/v1/billing/accounts/{who.account_id}"
    for plan in ("BASIC", "PREMIUM"):
        made = await subscribe(http, service.url, who, plan=plan)
        gtid = made.headers["X-Write-GTID"]
        view = await call(http, "GET", url, token=who.token, headers={"X-Read-Your-Writes": gtid})
        assert view.status == 200, view
        assert made.body["subscription_id"] in [s["subscription_id"] for s in view.body["subscriptions"]]
        assert view.body["consistency"]["source"] in ("replica", "primary")
        assert view.body["consistency"]["read_your_writes"] == gtid
    plain = await call(http, "GET", url, token=who.token)
    assert plain.body["consistency"]["source"] == "replica", plain.body
    assert "seconds_behind_master" in plain.body["consistency"]
    assert plain.body["consistency"]["replica_gtid_position"]
    # A write the replica has not applied (a GTID from the future): answered from the writer.
    ahead = await call(http, "GET", url, token=who.token, headers={"X-Read-Your-Writes": "1-1-999999999"})
    assert ahead.status == 200 and ahead.body["consistency"]["source"] == "primary", ahead.body
    assert len(ahead.body["subscriptions"]) == 2
    assert ahead.body["ledger"]["net_paid_cents"] == 799 + 1999
    bad = await call(http, "GET", url, token=who.token, headers={"X-Read-Your-Writes": "yesterday"})
    assert bad.status == 400 and bad.body["field"] == "X-Read-Your-Writes"


async def test_an_event_committed_before_a_crash_is_published_after_the_restart(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    since = now_ms()
    held = await start_billing(spawn_service, database, BILLING_OUTBOX_RELAY_START_DELAY_SECONDS="600")
    who = customer(token_issuer)
    made = await subscribe(http, held.url, who)
    assert made.status == 201
    assert await value(database, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 2
    held.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(held.proc.wait, 10)
    assert names(await billing_events(billing_db, who.account_id, since)) == []
    await start_billing(spawn_service, database)
    found = await events_once_sent(billing_db, database, who.account_id, since, 2)
    assert found == ["SubscriptionStarted", "PaymentSucceeded"]


async def test_bad_input_is_refused_naming_the_field_and_publishes_nothing(
    billing_db: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession,
    token_issuer: TokenIssuer,
) -> None:  # fmt: skip
    service = await start_billing(spawn_service, database)
    who, stranger = customer(token_issuer), customer(token_issuer)
    subs = f"{service.url}/v1/billing/subscriptions"
    good = {"account_id": who.account_id, "plan": "BASIC", "card_token": "tok_ok"}
    cases = [
        ({**good, "plan": "GOLD"}, 422, "plan"),
        ({**good, "card_token": "4242"}, 422, "card_token"),
        ({k: v for k, v in good.items() if k != "card_token"}, 422, "card_token"),
        ({**good, "account_id": "nope"}, 422, "account_id"),
        ({**good, "account_id": stranger.account_id}, 403, "account_id"),
        ({**good, "extra": 1}, 422, "extra"),
    ]
    for body, status, field in cases:
        reply = await call(http, "POST", subs, body, token=who.token, key=str(uuid.uuid4()))
        assert (reply.status, reply.body.get("field")) == (status, field), (body, reply)
    not_json = await call(http, "POST", subs, raw=b"{", token=who.token, key=str(uuid.uuid4()))
    assert not_json.status == 400
    anonymous = await call(http, "POST", subs, good, key=str(uuid.uuid4()))
    assert anonymous.status == 401
    refunds = f"{service.url}/v1/billing/refunds"
    for body, field in (
        ({"charge_id": str(uuid.uuid4()), "amount_cents": -5}, "amount_cents"),
        ({"charge_id": "x", "amount_cents": 5}, "charge_id"),
    ):
        reply = await call(http, "POST", refunds, body, token=who.token, key=str(uuid.uuid4()))
        assert reply.status == 422 and reply.body["field"] == field, reply
    cancel = await call(http, "POST", f"{subs}/{uuid.uuid4()}/cancel", {}, token=who.token)
    assert cancel.status == 404 and cancel.body["field"] == "subscription_id"
    cancel_bad = await call(http, "POST", f"{subs}/{uuid.uuid4()}/cancel", {"at_period_end": "soon"},
                            token=who.token)  # fmt: skip
    assert cancel_bad.status == 422 and cancel_bad.body["field"] == "at_period_end"
    made = await subscribe(http, service.url, who)
    theirs = await call(
        http, "POST", f"{subs}/{made.body['subscription_id']}/cancel", {}, token=stranger.token
    )
    assert theirs.status == 403
    peek = await call(
        http, "GET", f"{service.url}/v1/billing/accounts/{who.account_id}", token=stranger.token
    )
    assert peek.status == 403 and peek.body["field"] == "account_id"
    assert await value(database, "SELECT count(*) FROM outbox") == 2  # only the one good subscription
