"""A simulated payment provider, with the test card tokens of real providers:

- ``tok_ok`` captures at once, ``tok_slow`` captures after ``slow_seconds``;
- ``tok_decline`` is declined (CARD_DECLINED);
- ``tok_timeout`` never answers within ``timeout_seconds``: nothing is captured;
- ``tok_renewal_decline`` captures a subscription's first charge and declines its renewals (a card
  that expired during the period), for the failed-renewal path.

It stands for a remote service, so it has a connection pool of its own: a transaction that holds
a row lock while it waits for the provider (a refund) can never starve the provider of a
connection. It is idempotent by the key it is called with, as real providers are: its own table
(``provider_operations``) records each capture and refund once, so a retried call answers the first
outcome and never moves money twice.

Like real providers it answers a charge with the card's fingerprint (:func:`card_fingerprint`): the
same for the same card whichever account uses it, and not the token itself. Billing puts it on
``PaymentFailed``; the anomaly detector counts declines per card by it.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from services.billing.adapters.db import Database, execute, fetch_one

CARD_TOKENS = ("tok_ok", "tok_decline", "tok_timeout", "tok_slow", "tok_renewal_decline")


class ProviderTimeout(Exception):
    """The provider did not answer in time; nothing is known to be captured."""


@dataclass(frozen=True)
class Outcome:
    captured: bool
    decline_reason: str | None = None
    card_fingerprint: str | None = None


def card_fingerprint(card_token: str) -> str:
    """The provider's fingerprint of the card behind a token: 16 hex digits of a salted SHA-256."""
    return hashlib.sha256(b"reelbus-provider-card:" + card_token.encode()).hexdigest()[:16]


class PaymentProvider:
    def __init__(self, db: Database, *, timeout_seconds: float, slow_seconds: float) -> None:
        self.db = db
        self.timeout_seconds = timeout_seconds
        self.slow_seconds = slow_seconds

    async def charge(self, key: str, card_token: str, amount_cents: int, *, renewal: bool = False) -> Outcome:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                if card_token == "tok_timeout":
                    await asyncio.Event().wait()  # the provider never answers
                if card_token == "tok_slow":
                    await asyncio.sleep(self.slow_seconds)
                captures = card_token in ("tok_ok", "tok_slow") or (
                    card_token == "tok_renewal_decline" and not renewal
                )
                outcome = "captured" if captures else "CARD_DECLINED"
                recorded = await self._record(key, "charge", card_token, amount_cents, outcome)
        except TimeoutError:
            raise ProviderTimeout(
                f"the payment provider did not answer within {self.timeout_seconds}s"
            ) from None
        fingerprint = card_fingerprint(card_token)
        if recorded == "captured":
            return Outcome(True, card_fingerprint=fingerprint)
        return Outcome(False, recorded, fingerprint)

    async def refund(self, key: str, amount_cents: int) -> None:
        await self._record(key, "refund", "", amount_cents, "refunded")

    async def _record(self, key: str, kind: str, card: str, amount: int, outcome: str) -> str:
        async def work(conn: Any) -> str:
            await execute(
                conn,
                "INSERT IGNORE INTO provider_operations"
                " (provider_key, kind, card_token, amount_cents, outcome) VALUES (%s, %s, %s, %s, %s)",
                (key, kind, card, amount, outcome),
            )
            row = await fetch_one(
                conn, "SELECT outcome FROM provider_operations WHERE provider_key=%s", (key,)
            )
            assert row is not None
            return str(row["outcome"])

        return (await self.db.in_transaction(work)).value
