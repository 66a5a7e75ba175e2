"""Billing's business logic: plain async functions of (command, dependencies).

Transactions, isolation and locks, per operation (all on the write endpoint, InnoDB):

- claim an idempotency key: READ COMMITTED; ``INSERT IGNORE`` of the (account, key) row, then read
  it: a different request hash is refused (422), a finished one is answered again, moving nothing.
- subscribe: the provider is called outside any transaction with a key derived from the
  idempotency key (the charge id), so a retry never captures twice; then one READ COMMITTED
  transaction locks the idempotency row (``SELECT … FOR UPDATE``; finished already: answer that),
  writes the subscription, the charge, the ledger legs, the outbox events and the stored answer. A
  provider timeout is an unknown outcome: nothing is recorded, the client gets 504 and retries
  with the same key, which asks the provider again with the same charge id.
- renew: per due subscription, ``SELECT … FOR UPDATE`` on it to re-check it is still due; the
  provider is called outside the transaction with a charge id derived from (subscription, period
  end); a second transaction locks the subscription again and advances the period only if nobody
  else did (the charge id is a primary key: a renewal is never written twice).
- cancel: READ COMMITTED, ``SELECT … FOR UPDATE`` on the subscription; a second cancel changes
  nothing and publishes nothing.
- refund: READ COMMITTED, ``SELECT … FOR UPDATE`` on the charge row, which serialises the refunds
  of one charge, so the check "refunded + amount <= charged" cannot race (a CHECK constraint backs
  it); the provider's refund (idempotent by refund id) runs under that lock.

A Galera certification conflict surfaces as error 1213 at commit; ``Database.in_transaction``
runs the whole transaction again, which the locked idempotency row and the deterministic ids make
harmless even when a lost COMMIT had in fact committed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field

from services.billing.adapters.db import PLANS, Conn, Database, execute, fetch_all, fetch_one
from services.billing.adapters.outbox import add_event
from services.billing.adapters.provider import Outcome, PaymentProvider, ProviderTimeout
from services.bus.events import (
    CancelReason,
    DeclineReason,
    PaymentFailed,
    PaymentSucceeded,
    Plan,
    RefundIssued,
    RefundReason,
    SubscriptionCancelled,
    SubscriptionRenewed,
    SubscriptionStarted,
)
from services.bus.http import ApiError
from services.bus.tracing import ATTR_ACCOUNT_ID

log = logging.getLogger("reelbus.billing")

EVENTS_TOPIC = "billing.events"
IDEMPOTENCY_HEADER = "Idempotency-Key"
NAMESPACE = uuid.UUID("6d1c3f0e-7b7a-4d0e-9a59-3b6f0c1e5b21")
CURRENCY = "USD"

# Ledger accounts; every ledger transaction's legs sum to zero.
RECEIVABLE = "customer_receivable"
REVENUE = "revenue"
CASH = "cash"
REFUNDS = "refunds"


# -- commands --------------------------------------------------------------------------------------


class Subscribe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    account_id: uuid.UUID
    plan: Literal["BASIC", "STANDARD", "PREMIUM"]
    card_token: str = Field(min_length=1, max_length=64, pattern=r"^tok_[A-Za-z0-9_]+$")


class Cancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at_period_end: bool = True


class Refund(BaseModel):
    model_config = ConfigDict(extra="forbid")
    charge_id: uuid.UUID
    amount_cents: int = Field(gt=0, le=10_000_000)
    reason: Literal["CUSTOMER_REQUEST", "DUPLICATE_CHARGE", "SERVICE_OUTAGE", "FRAUD", "GOODWILL"] = (
        "CUSTOMER_REQUEST"
    )


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    gtid: str = ""
    replayed: bool = False


@dataclass
class Deps:
    db: Database
    provider: PaymentProvider
    period: dt.timedelta
    wake_relay: Callable[[], None] = field(default=lambda: None)


# -- helpers ---------------------------------------------------------------------------------------


def utcnow() -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def naive(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def aware(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC)


def owned(account_id: str | uuid.UUID, token_account: str) -> uuid.UUID:
    """The account id, if the token's account is that account (403 otherwise)."""
    try:
        parsed = uuid.UUID(str(account_id))
    except ValueError:
        raise ApiError(400, "account_id must be a UUID", field="account_id") from None
    if str(parsed) != token_account:
        raise ApiError(403, "the token's account does not own this account", field="account_id")
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, str(parsed))
    return parsed


def require_key(key: str | None) -> str:
    if key is None or not key.strip():
        raise ApiError(400, f"the {IDEMPOTENCY_HEADER} header is required", field=IDEMPOTENCY_HEADER)
    if len(key) > 255:
        raise ApiError(400, f"{IDEMPOTENCY_HEADER} is longer than 255 characters", field=IDEMPOTENCY_HEADER)
    return key.strip()


def request_hash(operation: str, body: BaseModel) -> str:
    canonical = json.dumps([operation, body.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def derived_id(*parts: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, "/".join(parts))


async def claim(db: Database, account: uuid.UUID, key: str, digest: str) -> Reply | None:
    """Record the key (or find it): the first answer if it finished, None to go on."""

    async def work(conn: Conn) -> Reply | None:
        await execute(
            conn,
            "INSERT IGNORE INTO idempotency (account_id, idem_key, request_hash, state) "
            "VALUES (%s, %s, %s, 'pending')",
            (str(account), key, digest),
        )
        row = await fetch_one(
            conn,
            "SELECT request_hash, state, status_code, response FROM idempotency "
            "WHERE account_id=%s AND idem_key=%s",
            (str(account), key),
        )
        assert row is not None
        if row["request_hash"] != digest:
            raise ApiError(
                422,
                f"this {IDEMPOTENCY_HEADER} was already used with a different request",
                field=IDEMPOTENCY_HEADER,
                code="idempotency_key_reused",
            )
        return stored(row)

    return (await db.in_transaction(work)).value


def stored(row: dict[str, Any]) -> Reply | None:
    if row["state"] != "done":
        return None
    return Reply(int(row["status_code"]), json.loads(row["response"]), replayed=True)


async def locked_claim(conn: Conn, account: uuid.UUID, key: str, digest: str) -> Reply | None:
    """The key's row, locked until this transaction ends (claimed again if a failover lost the
    first claim); the first answer if a concurrent or earlier attempt finished it."""
    await execute(
        conn,
        "INSERT IGNORE INTO idempotency (account_id, idem_key, request_hash, state) "
        "VALUES (%s, %s, %s, 'pending')",
        (str(account), key, digest),
    )
    row = await fetch_one(
        conn,
        "SELECT request_hash, state, status_code, response FROM idempotency "
        "WHERE account_id=%s AND idem_key=%s FOR UPDATE",
        (str(account), key),
    )
    assert row is not None
    if row["request_hash"] != digest:
        raise ApiError(422, f"this {IDEMPOTENCY_HEADER} was already used with a different request",
                       field=IDEMPOTENCY_HEADER, code="idempotency_key_reused")  # fmt: skip
    return stored(row)


async def finish(conn: Conn, account: uuid.UUID, key: str, reply: Reply) -> Reply:
    await execute(
        conn,
        "UPDATE idempotency SET state='done', status_code=%s, response=%s "
        "WHERE account_id=%s AND idem_key=%s",
        (reply.status, json.dumps(reply.body), str(account), key),
    )
    return reply


async def post_ledger(conn: Conn, txn_id: uuid.UUID, account: str, legs: list[tuple[str, int]]) -> None:
    if sum(amount for _, amount in legs) != 0:
        raise AssertionError(f"ledger transaction {txn_id} does not balance: {legs}")
    for ledger_account, amount in legs:
        await execute(
            conn,
            "INSERT INTO ledger_entries (txn_id, account_id, ledger_account, amount_cents) "
            "VALUES (%s, %s, %s, %s)",
            (str(txn_id), account, ledger_account, amount),
        )


def capture_legs(amount: int) -> list[tuple[str, int]]:
    """Invoice issued (receivable against revenue) and paid (cash against receivable)."""
    return [(RECEIVABLE, amount), (REVENUE, -amount), (CASH, amount), (RECEIVABLE, -amount)]


async def insert_charge(
    conn: Conn,
    charge_id: uuid.UUID,
    sub_id: uuid.UUID,
    account: str,
    amount: int,
    outcome: Outcome,
    start: dt.datetime,
    end: dt.datetime,
) -> None:
    await execute(
        conn,
        "INSERT INTO charges (charge_id, subscription_id, account_id, amount_cents, currency, status,"
        " decline_reason, period_start, period_end) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            str(charge_id),
            str(sub_id),
            account,
            amount,
            CURRENCY,
            "succeeded" if outcome.captured else "failed",
            outcome.decline_reason,
            naive(start),
            naive(end),
        ),
    )


async def charge_events(
    conn: Conn,
    account: uuid.UUID,
    sub_id: uuid.UUID,
    charge_id: uuid.UUID,
    amount: int,
    outcome: Outcome,
    start: dt.datetime,
    end: dt.datetime,
) -> None:
    if outcome.captured:
        await post_ledger(conn, charge_id, str(account), capture_legs(amount))
        event: PaymentSucceeded | PaymentFailed = PaymentSucceeded(
            account_id=account,
            subscription_id=sub_id,
            charge_id=charge_id,
            idempotency_key=str(charge_id),
            amount_cents=amount,
            currency=CURRENCY,
            period_start=start,
            period_end=end,
            attempt=1,
        )
    else:
        reason = outcome.decline_reason or "UNKNOWN"
        event = PaymentFailed(
            account_id=account,
            subscription_id=sub_id,
            charge_id=charge_id,
            idempotency_key=str(charge_id),
            amount_cents=amount,
            currency=CURRENCY,
            period_start=start,
            period_end=end,
            decline_reason=DeclineReason(reason if reason in DeclineReason.__members__ else "UNKNOWN"),
            attempt=1,
            card_fingerprint=outcome.card_fingerprint,
        )
    await add_event(conn, EVENTS_TOPIC, str(account), event)


PAYMENT_TIMEOUT = (
    "the payment provider did not answer in time; the outcome is unknown and nothing was recorded: "
    "retry with the same Idempotency-Key"
)


# -- subscribe ---------------------------------------------------------------------------------------


async def subscribe(cmd: Subscribe, *, token_account: str, key: str | None, deps: Deps) -> Reply:
    account = owned(cmd.account_id, token_account)
    idem = require_key(key)
    digest = request_hash("subscribe", cmd)
    first = await claim(deps.db, account, idem, digest)
    if first is not None:
        return first
    sub_id = derived_id(str(account), idem, "subscription")
    charge_id = derived_id(str(account), idem, "charge")
    amount = PLANS[cmd.plan]
    try:
        outcome = await deps.provider.charge(str(charge_id), cmd.card_token, amount)
    except ProviderTimeout:
        # Unknown outcome (it may have captured): record no answer; a retry with the same key asks the
        # provider again with the same charge id and learns what happened.
        raise ApiError(504, PAYMENT_TIMEOUT, field="card_token", code="payment_timeout") from None
    start = utcnow()
    end = start + deps.period

    async def work(conn: Conn) -> Reply:
        done = await locked_claim(conn, account, idem, digest)
        if done is not None:
            return done
        status = "active" if outcome.captured else "incomplete"
        await execute(
            conn,
            "INSERT INTO subscriptions (subscription_id, account_id, plan, status, card_token, period_start,"
            " period_end) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (str(sub_id), str(account), cmd.plan, status, cmd.card_token, naive(start), naive(end)),
        )
        await insert_charge(conn, charge_id, sub_id, str(account), amount, outcome, start, end)
        if outcome.captured:
            await add_event(
                conn,
                EVENTS_TOPIC,
                str(account),
                SubscriptionStarted(
                    account_id=account,
                    subscription_id=sub_id,
                    plan=Plan(cmd.plan),
                    amount_cents=amount,
                    currency=CURRENCY,
                    period_start=start,
                    period_end=end,
                ),
            )
        await charge_events(conn, account, sub_id, charge_id, amount, outcome, start, end)
        body: dict[str, Any] = {
            "subscription_id": str(sub_id),
            "status": status,
            "plan": cmd.plan,
            "charge_id": str(charge_id),
            "amount_cents": amount,
            "currency": CURRENCY,
            "period_start": start.isoformat(),
            "period_end": end.isoformat(),
        }
        if outcome.captured:
            reply = Reply(201, body)
        else:
            body |= {"error": "card_declined", "field": "card_token",
                     "message": f"the card was declined ({outcome.decline_reason})"}  # fmt: skip
            reply = Reply(402, body)
        return await finish(conn, account, idem, reply)

    committed = await deps.db.in_transaction(work)
    deps.wake_relay()
    return Reply(committed.value.status, committed.value.body, committed.gtid, committed.value.replayed)


# -- cancel ------------------------------------------------------------------------------------------


async def cancel(sub_id: str, cmd: Cancel, *, token_account: str, deps: Deps) -> Reply:
    try:
        sid = uuid.UUID(sub_id)
    except ValueError:
        raise ApiError(400, "subscription id must be a UUID", field="subscription_id") from None

    async def work(conn: Conn) -> Reply:
        row = await fetch_one(
            conn, "SELECT * FROM subscriptions WHERE subscription_id=%s FOR UPDATE", (str(sid),)
        )
        if row is None:
            raise ApiError(404, "no such subscription", field="subscription_id")
        account = owned(row["account_id"], token_account)
        now = utcnow()
        period_end = aware(row["period_end"])
        body = {"subscription_id": str(sid), "status": row["status"]}
        if row["status"] in ("cancelled",) or (cmd.at_period_end and row["cancel_at_period_end"]):
            return Reply(200, body | {"cancel_at_period_end": bool(row["cancel_at_period_end"]),
                                      "changed": False})  # fmt: skip
        at_end = cmd.at_period_end and row["status"] == "active"
        if at_end:
            effective = period_end
            await execute(
                conn,
                "UPDATE subscriptions SET cancel_at_period_end=TRUE WHERE subscription_id=%s",
                (str(sid),),
            )
            status = "active"
        else:
            effective = now
            await execute(
                conn,
                "UPDATE subscriptions SET status='cancelled', ended_at=%s WHERE subscription_id=%s",
                (naive(now), str(sid)),
            )
            status = "cancelled"
        await add_event(
            conn,
            EVENTS_TOPIC,
            str(account),
            SubscriptionCancelled(
                account_id=account,
                subscription_id=sid,
                plan=Plan(row["plan"]),
                at_period_end=at_end,
                effective_at=effective,
                reason=CancelReason.USER_REQUESTED,
            ),
        )
        return Reply(200, {"subscription_id": str(sid), "status": status, "cancel_at_period_end": at_end,
                           "effective_at": effective.isoformat(), "changed": True})  # fmt: skip

    committed = await deps.db.in_transaction(work)
    deps.wake_relay()
    return Reply(committed.value.status, committed.value.body, committed.gtid)


# -- refund ------------------------------------------------------------------------------------------


async def refund(cmd: Refund, *, token_account: str, key: str | None, deps: Deps) -> Reply:
    account = owned(token_account, token_account)
    idem = require_key(key)
    digest = request_hash("refund", cmd)
    first = await claim(deps.db, account, idem, digest)
    if first is not None:
        return first
    refund_id = derived_id(str(account), idem, "refund")

    async def work(conn: Conn) -> Reply:
        done = await locked_claim(conn, account, idem, digest)
        if done is not None:
            return done
        charge = await fetch_one(
            conn, "SELECT * FROM charges WHERE charge_id=%s FOR UPDATE", (str(cmd.charge_id),)
        )
        if charge is None:
            raise ApiError(404, "no such charge", field="charge_id")
        owned(charge["account_id"], token_account)
        if charge["status"] != "succeeded":
            raise ApiError(422, "only a captured charge can be refunded", field="charge_id")
        left = int(charge["amount_cents"]) - int(charge["refunded_cents"])
        if cmd.amount_cents > left:
            raise ApiError(
                422,
                f"amount_cents {cmd.amount_cents} exceeds what is left to refund on the charge ({left})",
                field="amount_cents",
            )
        await deps.provider.refund(str(refund_id), cmd.amount_cents)
        await execute(
            conn,
            "UPDATE charges SET refunded_cents = refunded_cents + %s WHERE charge_id=%s",
            (cmd.amount_cents, str(cmd.charge_id)),
        )
        await execute(
            conn,
            "INSERT INTO refunds (refund_id, charge_id, account_id, amount_cents) VALUES (%s, %s, %s, %s)",
            (str(refund_id), str(cmd.charge_id), str(account), cmd.amount_cents),
        )
        await post_ledger(
            conn, refund_id, str(account), [(REFUNDS, cmd.amount_cents), (CASH, -cmd.amount_cents)]
        )
        await add_event(
            conn,
            EVENTS_TOPIC,
            str(account),
            RefundIssued(
                account_id=account,
                subscription_id=uuid.UUID(charge["subscription_id"]),
                refund_id=refund_id,
                charge_id=cmd.charge_id,
                idempotency_key=str(refund_id),
                amount_cents=cmd.amount_cents,
                currency=str(charge["currency"]),
                reason=RefundReason(cmd.reason),
            ),
        )
        body = {
            "refund_id": str(refund_id),
            "charge_id": str(cmd.charge_id),
            "amount_cents": cmd.amount_cents,
            "refunded_total_cents": int(charge["refunded_cents"]) + cmd.amount_cents,
        }
        return await finish(conn, account, idem, Reply(201, body))

    committed = await deps.db.in_transaction(work)
    deps.wake_relay()
    return Reply(committed.value.status, committed.value.body, committed.gtid, committed.value.replayed)


# -- renewals ----------------------------------------------------------------------------------------


async def renew_due(deps: Deps, limit: int = 100) -> int:
    """Renew (or end) every active subscription whose period is over; returns how many it renewed."""

    async def due(conn: Conn) -> list[dict[str, Any]]:
        return await fetch_all(
            conn,
            "SELECT subscription_id FROM subscriptions WHERE status='active' AND period_end <= %s "
            "ORDER BY period_end LIMIT %s",
            (naive(utcnow()), limit),
        )

    renewed = 0
    for row in (await deps.db.in_transaction(due)).value:
        renewed += await renew_one(uuid.UUID(row["subscription_id"]), deps)
    return renewed


async def renew_one(sid: uuid.UUID, deps: Deps) -> int:
    async def check(conn: Conn) -> dict[str, Any] | None:
        row = await fetch_one(
            conn, "SELECT * FROM subscriptions WHERE subscription_id=%s FOR UPDATE", (str(sid),)
        )
        if row is None or row["status"] != "active" or aware(row["period_end"]) > utcnow():
            return None
        if row["cancel_at_period_end"]:  # its cancellation was published when it was asked for
            await execute(
                conn,
                "UPDATE subscriptions SET status='cancelled', ended_at=period_end WHERE subscription_id=%s",
                (str(sid),),
            )
            return None
        return row

    sub = (await deps.db.in_transaction(check)).value
    if sub is None:
        return 0
    deps.wake_relay()
    account = uuid.UUID(sub["account_id"])
    start = aware(sub["period_end"])
    end = start + deps.period
    charge_id = derived_id(str(sid), start.isoformat(), "renewal")
    amount = PLANS[sub["plan"]]
    try:
        outcome = await deps.provider.charge(str(charge_id), sub["card_token"], amount, renewal=True)
    except ProviderTimeout:
        log.warning("renewal charge %s timed out; the next run asks again with the same id", charge_id)
        return 0

    async def write(conn: Conn) -> int:
        row = await fetch_one(
            conn, "SELECT * FROM subscriptions WHERE subscription_id=%s FOR UPDATE", (str(sid),)
        )
        if row is None or row["status"] != "active" or aware(row["period_end"]) != start:
            return 0  # renewed (or ended) meanwhile
        await insert_charge(conn, charge_id, sid, str(account), amount, outcome, start, end)
        if outcome.captured:
            await execute(
                conn,
                "UPDATE subscriptions SET period_start=%s, period_end=%s WHERE subscription_id=%s",
                (naive(start), naive(end), str(sid)),
            )
            await add_event(
                conn,
                EVENTS_TOPIC,
                str(account),
                SubscriptionRenewed(
                    account_id=account,
                    subscription_id=sid,
                    plan=Plan(row["plan"]),
                    charge_id=charge_id,
                    amount_cents=amount,
                    currency=CURRENCY,
                    period_start=start,
                    period_end=end,
                ),
            )
        else:
            await execute(
                conn, "UPDATE subscriptions SET status='past_due' WHERE subscription_id=%s", (str(sid),)
            )
        await charge_events(conn, account, sid, charge_id, amount, outcome, start, end)
        return 1 if outcome.captured else 0

    done = (await deps.db.in_transaction(write)).value
    deps.wake_relay()
    return done


# -- reads -------------------------------------------------------------------------------------------


async def account_view(
    account_id: str, *, token_account: str, read_your_writes: str | None, db: Database, wait_seconds: float
) -> dict[str, Any]:
    """The account's billing state from the replica, saying how stale it may be; with a GTID to read
    one's own write, from the writer when the replica has not applied it within ``wait_seconds``."""
    account = owned(account_id, token_account)
    if read_your_writes is not None and not _valid_gtid(read_your_writes):
        raise ApiError(400, "X-Read-Your-Writes must be a GTID such as 1-1-42", field="X-Read-Your-Writes")
    consistency: dict[str, Any] = {"source": "replica", "read_your_writes": read_your_writes}

    async def from_replica(conn: Conn) -> dict[str, Any] | None:
        status = await fetch_one(conn, "SHOW SLAVE STATUS")
        if status is None:  # HAProxy sent the read to a Galera node: as fresh as the cluster
            consistency.update(source="cluster-node", seconds_behind_master=0)
        else:
            consistency.update(
                seconds_behind_master=status.get("Seconds_Behind_Master"),
                replica_gtid_received=status.get("Gtid_IO_Pos"),
                replica_io_running=status.get("Slave_IO_Running"),
                replica_sql_running=status.get("Slave_SQL_Running"),
            )
            applied = await fetch_one(conn, "SELECT @@gtid_slave_pos AS pos")
            consistency["replica_gtid_position"] = applied["pos"] if applied else None
            if read_your_writes:
                waited = await fetch_one(
                    conn, "SELECT MASTER_GTID_WAIT(%s, %s) AS w", (read_your_writes, wait_seconds)
                )
                if waited is None or waited["w"] != 0:
                    return None
        return await _read_account(conn, account)

    view = (await db.in_transaction(from_replica, pool=db.read)).value
    if view is None:
        consistency.update(source="primary", seconds_behind_master=0)

        async def from_primary(conn: Conn) -> dict[str, Any]:
            return await _read_account(conn, account)

        view = (await db.in_transaction(from_primary)).value
    return view | {"consistency": consistency}


def _valid_gtid(value: str) -> bool:
    parts = [p.strip() for p in value.split(",")]
    return all(len(p.split("-")) == 3 and all(x.isdigit() for x in p.split("-")) for p in parts)


async def _read_account(conn: Conn, account: uuid.UUID) -> dict[str, Any]:
    subs = await fetch_all(
        conn,
        "SELECT subscription_id, plan, status, period_start, period_end, cancel_at_period_end, ended_at "
        "FROM subscriptions WHERE account_id=%s ORDER BY created_at DESC, subscription_id",
        (str(account),),
    )
    charges = await fetch_all(
        conn,
        "SELECT charge_id, subscription_id, amount_cents, refunded_cents, currency, status, decline_reason,"
        " period_start, period_end FROM charges WHERE account_id=%s ORDER BY created_at, charge_id",
        (str(account),),
    )
    legs = await fetch_all(
        conn,
        "SELECT ledger_account, SUM(amount_cents) AS total FROM ledger_entries WHERE account_id=%s "
        "GROUP BY ledger_account",
        (str(account),),
    )
    current = next((s for s in subs if s["status"] in ("active", "past_due")), subs[0] if subs else None)
    ledger = {str(r["ledger_account"]): int(r["total"]) for r in legs}
    return {
        "account_id": str(account),
        "status": current["status"] if current else "none",
        "plan": current["plan"] if current else None,
        "subscriptions": [_plain(s) for s in subs],
        "invoices": [_plain(c) for c in charges],
        "ledger": {
            "accounts": ledger,
            "paid_cents": ledger.get(CASH, 0) + ledger.get(REFUNDS, 0),
            "refunded_cents": ledger.get(REFUNDS, 0),
            "net_paid_cents": ledger.get(CASH, 0),
            "balance_cents": sum(ledger.values()),
        },
    }


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    def value(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            return aware(v).isoformat()
        if isinstance(v, Decimal):
            return int(v)
        return v

    return {k: value(v) for k, v in row.items()}
