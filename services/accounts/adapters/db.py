"""The accounts database: accounts, profiles, login failures and the transactional outbox.

Every state change that other services must hear about writes its event into ``outbox`` in the same
transaction; :mod:`services.accounts.adapters.outbox` publishes those rows afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

SCHEMA_LOCK = 0x61636374  # "acct": one instance creates the tables at a time
SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id    uuid PRIMARY KEY,
    email         text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS profiles (
    profile_id      uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (account_id),
    name            text NOT NULL,
    kids            boolean NOT NULL DEFAULT false,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS profiles_by_account ON profiles (account_id, created_at);
CREATE TABLE IF NOT EXISTS login_failures (
    email     text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS login_failures_by_email ON login_failures (email, failed_at);
CREATE INDEX IF NOT EXISTS login_failures_by_time ON login_failures (failed_at);
CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    topic         text NOT NULL,
    key           text NOT NULL,
    event_type    text NOT NULL,
    event_id      uuid NOT NULL UNIQUE,
    payload       jsonb NOT NULL,
    trace_context jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
"""


@dataclass(frozen=True)
class Credentials:
    account_id: uuid.UUID
    password_hash: str


@dataclass(frozen=True)
class Profile:
    profile_id: uuid.UUID
    account_id: uuid.UUID
    name: str
    kids: bool
    created_at: dt.datetime


@dataclass(frozen=True)
class OutboxEvent:
    """An event to publish once the transaction that wrote it commits."""

    topic: str
    key: str
    event_type: str
    event_id: uuid.UUID
    payload: Mapping[str, Any]
    trace_context: Mapping[str, str]


@dataclass(frozen=True)
class ProfileCreatedResult:
    profile: Profile
    replayed: bool  # an earlier request with the same idempotency key made it


class NoSuchAccount(Exception):
    pass


class ProfileLimitReached(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"an account has at most {limit} profiles")
        self.limit = limit


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(url, min_size=1, max_size=size)
    return pool


class AccountsStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create_schema(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(SCHEMA)

    # -- accounts -------------------------------------------------------------------------

    async def insert_account(self, account_id: uuid.UUID, email: str, password_hash: str) -> bool:
        """False when the email is taken."""
        row = await self.pool.fetchrow(
            "INSERT INTO accounts (account_id, email, password_hash) VALUES ($1, $2, $3) "
            "ON CONFLICT (email) DO NOTHING RETURNING account_id",
            account_id,
            email,
            password_hash,
        )
        return row is not None

    async def credentials(self, email: str) -> Credentials | None:
        row = await self.pool.fetchrow(
            "SELECT account_id, password_hash FROM accounts WHERE email = $1", email
        )
        return None if row is None else Credentials(row["account_id"], row["password_hash"])

    async def replace_password_hash(self, account_id: uuid.UUID, password_hash: str) -> None:
        await self.pool.execute(
            "UPDATE accounts SET password_hash = $2 WHERE account_id = $1", account_id, password_hash
        )

    # -- login throttling -----------------------------------------------------------------

    async def throttled_for(self, email: str, max_failures: int, window_seconds: float) -> float | None:
        """Seconds until ``email`` may try again, or None when it has fewer than ``max_failures``
        failures within the window."""
        row = await self.pool.fetchrow(
            "SELECT EXTRACT(EPOCH FROM failed_at + make_interval(secs => $3) - clock_timestamp()) AS wait "
            "FROM login_failures "
            "WHERE email = $1 AND failed_at > clock_timestamp() - make_interval(secs => $3) "
            "ORDER BY failed_at DESC OFFSET $2 LIMIT 1",
            email,
            max_failures - 1,
            window_seconds,
        )
        return None if row is None else max(float(row["wait"]), 0.0)

    async def record_failure(self, email: str, window_seconds: float) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO login_failures (email) VALUES ($1)", email)
            await conn.execute(
                "DELETE FROM login_failures WHERE failed_at < clock_timestamp() - make_interval(secs => $1)",
                window_seconds,
            )

    async def clear_failures(self, email: str) -> None:
        await self.pool.execute("DELETE FROM login_failures WHERE email = $1", email)

    # -- profiles -------------------------------------------------------------------------

    async def create_profile(
        self,
        profile: Profile,
        *,
        limit: int,
        idempotency_key: str | None,
        event: OutboxEvent,
    ) -> ProfileCreatedResult:
        """Insert the profile and its event in one transaction, holding the account row so that
        concurrent requests cannot pass the limit together."""
        async with self.pool.acquire() as conn, conn.transaction():
            owner = await conn.fetchval(
                "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE", profile.account_id
            )
            if owner is None:
                raise NoSuchAccount(str(profile.account_id))
            if idempotency_key is not None:
                earlier = await conn.fetchrow(
                    "SELECT profile_id, account_id, name, kids, created_at FROM profiles "
                    "WHERE account_id = $1 AND idempotency_key = $2",
                    profile.account_id,
                    idempotency_key,
                )
                if earlier is not None:
                    return ProfileCreatedResult(_profile(earlier), replayed=True)
            count = await conn.fetchval(
                "SELECT count(*) FROM profiles WHERE account_id = $1", profile.account_id
            )
            if count >= limit:
                raise ProfileLimitReached(limit)
            created = await conn.fetchrow(
                "INSERT INTO profiles (profile_id, account_id, name, kids, idempotency_key, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) "
                "RETURNING profile_id, account_id, name, kids, created_at",
                profile.profile_id,
                profile.account_id,
                profile.name,
                profile.kids,
                idempotency_key,
                profile.created_at,
            )
            await add_to_outbox(conn, event)
        return ProfileCreatedResult(_profile(created), replayed=False)

    async def profiles(self, account_id: uuid.UUID) -> list[Profile]:
        rows = await self.pool.fetch(
            "SELECT profile_id, account_id, name, kids, created_at FROM profiles "
            "WHERE account_id = $1 ORDER BY created_at, profile_id",
            account_id,
        )
        return [_profile(r) for r in rows]


def _profile(row: Mapping[str, Any]) -> Profile:
    return Profile(row["profile_id"], row["account_id"], row["name"], row["kids"], row["created_at"])


async def add_to_outbox(conn: asyncpg.Connection, event: OutboxEvent) -> None:
    await conn.execute(
        "INSERT INTO outbox (topic, key, event_type, event_id, payload, trace_context) "
        "VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)",
        event.topic,
        event.key,
        event.event_type,
        event.event_id,
        json.dumps(dict(event.payload)),
        json.dumps(dict(event.trace_context)),
    )
