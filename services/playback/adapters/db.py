"""Playback's PostgreSQL database: the projections, the sessions and the outbox, one transaction per
unit of work (``async with store.transaction() as tx``)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from opentelemetry import propagate

from services.bus.events import AvroEvent, Heartbeat, SessionStarted, SessionStopped, TitleSnapshot
from services.playback.entitlement import Entitlement, Status
from services.playback.steering import ApplianceState

log = logging.getLogger("reelbus.playback.db")

SCHEMA_LOCK = 0x706C6179  # "play": one replica creates the tables at a time
SCHEMA = """
CREATE TABLE IF NOT EXISTS processed_events (
    event_id uuid PRIMARY KEY,
    event_type text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS entitlements (
    account_id uuid PRIMARY KEY,
    subscription_id uuid NOT NULL,
    status text NOT NULL,
    period_start timestamptz NOT NULL,
    entitled_until timestamptz NOT NULL,
    last_event_time timestamptz NOT NULL,
    last_event_id uuid NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (
    profile_id uuid PRIMARY KEY,
    account_id uuid NOT NULL,
    kids boolean NOT NULL,
    created_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS titles (
    title_id text PRIMARY KEY,
    version bigint NOT NULL,
    deleted boolean NOT NULL,
    name text,
    runtime_ms bigint,
    ladder_kbps integer[],
    changed_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS appliance_health (
    appliance_id text PRIMARY KEY,
    healthy boolean NOT NULL,
    load double precision NOT NULL,
    reported_at timestamptz NOT NULL,
    event_time timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS appliance_titles (
    appliance_id text NOT NULL,
    title_id text NOT NULL,
    present boolean NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (appliance_id, title_id));
CREATE TABLE IF NOT EXISTS sessions (
    session_id uuid PRIMARY KEY,
    account_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    title_id text NOT NULL,
    runtime_ms bigint NOT NULL,
    appliance_id text NOT NULL,
    cdn_url text NOT NULL,
    client_ip text NOT NULL,
    started_at timestamptz NOT NULL,
    heartbeats bigint NOT NULL DEFAULT 0,
    last_position_ms bigint NOT NULL,
    last_report_at timestamptz NOT NULL,
    watched_ms bigint NOT NULL DEFAULT 0,
    stopped_at timestamptz,
    stop_position_ms bigint);
CREATE INDEX IF NOT EXISTS sessions_by_profile ON sessions (profile_id, started_at);
CREATE TABLE IF NOT EXISTS outbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    key text NOT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    trace_context jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now());
"""

# Transient database failures: the consumer retries these with backoff (see services.bus.consumer).
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (OSError, *TRANSIENT_DB_ERRORS)


# The event types playback writes to its outbox, and how each is rebuilt from its stored record.
DECODERS: dict[str, Callable[[Mapping[str, Any]], AvroEvent]] = {
    SessionStarted.SCHEMA_NAME: SessionStarted.from_record,
    Heartbeat.SCHEMA_NAME: Heartbeat.from_record,
    SessionStopped.SCHEMA_NAME: SessionStopped.from_record,
}


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)  # epoch millis: what timestamp-millis holds
    raise TypeError(f"cannot store {type(value).__name__} in the outbox")


def encode_outbox_event(event: AvroEvent) -> tuple[str, str]:
    """The event's record as JSON, and the current trace context as JSON."""
    if event.SCHEMA_NAME not in DECODERS:
        raise TypeError(f"{event.SCHEMA_NAME} is not an outbox event type of playback")
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return json.dumps(event.to_record(), default=_json_default), json.dumps(carrier)


def decode_outbox_event(event_type: str, payload: str) -> AvroEvent:
    return DECODERS[event_type](json.loads(payload))


@dataclass(frozen=True)
class Title:
    title_id: str
    name: str
    runtime_ms: int
    ladder_kbps: tuple[int, ...]


@dataclass(frozen=True)
class Session:
    session_id: uuid.UUID
    account_id: uuid.UUID
    profile_id: uuid.UUID
    title_id: str
    runtime_ms: int
    appliance_id: str
    cdn_url: str
    client_ip: str
    started_at: datetime
    heartbeats: int
    last_position_ms: int
    last_report_at: datetime
    watched_ms: int
    stopped_at: datetime | None = None
    stop_position_ms: int | None = None


class Tx:
    """One transaction: typed reads and writes of playback's tables."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.queued = 0  # events put in the outbox by this transaction

    # -- idempotency ------------------------------------------------------------------------

    async def claim_event(self, event_id: uuid.UUID, event_type: str) -> bool:
        """True the first time an event id is seen; False for a redelivery (skip it)."""
        row = await self.conn.fetchval(
            "INSERT INTO processed_events (event_id, event_type) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING RETURNING true",
            event_id,
            event_type,
        )
        return bool(row)

    # -- entitlements ------------------------------------------------------------------------

    async def entitlement(self, account_id: uuid.UUID, *, for_update: bool = False) -> Entitlement | None:
        row = await self.conn.fetchrow(
            "SELECT subscription_id, status, period_start, entitled_until, last_event_time "
            "FROM entitlements WHERE account_id = $1" + (" FOR UPDATE" if for_update else ""),
            account_id,
        )
        if row is None:
            return None
        return Entitlement(
            subscription_id=row["subscription_id"],
            status=Status(row["status"]),
            period_start=row["period_start"],
            entitled_until=row["entitled_until"],
            last_event_time=row["last_event_time"],
        )

    async def save_entitlement(self, account_id: uuid.UUID, state: Entitlement, event_id: uuid.UUID) -> None:
        await self.conn.execute(
            "INSERT INTO entitlements (account_id, subscription_id, status, period_start, entitled_until, "
            "last_event_time, last_event_id) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (account_id) DO UPDATE SET subscription_id = EXCLUDED.subscription_id, "
            "status = EXCLUDED.status, period_start = EXCLUDED.period_start, "
            "entitled_until = EXCLUDED.entitled_until, last_event_time = EXCLUDED.last_event_time, "
            "last_event_id = EXCLUDED.last_event_id",
            account_id,
            state.subscription_id,
            state.status.value,
            state.period_start,
            state.entitled_until,
            state.last_event_time,
            event_id,
        )

    # -- profiles ----------------------------------------------------------------------------

    async def add_profile(
        self, profile_id: uuid.UUID, account_id: uuid.UUID, kids: bool, created_at: datetime
    ) -> None:
        """A profile's owner never changes: the first record of it stands."""
        await self.conn.execute(
            "INSERT INTO profiles (profile_id, account_id, kids, created_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (profile_id) DO NOTHING",
            profile_id,
            account_id,
            kids,
            created_at,
        )

    async def profile_owner(self, profile_id: uuid.UUID) -> uuid.UUID | None:
        owner: uuid.UUID | None = await self.conn.fetchval(
            "SELECT account_id FROM profiles WHERE profile_id = $1", profile_id
        )
        return owner

    # -- titles ------------------------------------------------------------------------------

    async def put_title(
        self, title_id: str, version: int, snapshot: TitleSnapshot | None, changed_at: datetime
    ) -> bool:
        """Store the title at ``version`` (deleted when ``snapshot`` is None) unless a version at least
        as new is stored already. True when it was stored."""
        applied = await self.conn.fetchval(
            "INSERT INTO titles (title_id, version, deleted, name, runtime_ms, ladder_kbps, changed_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (title_id) DO UPDATE SET version = EXCLUDED.version, deleted = EXCLUDED.deleted, "
            "name = EXCLUDED.name, runtime_ms = EXCLUDED.runtime_ms, ladder_kbps = EXCLUDED.ladder_kbps, "
            "changed_at = EXCLUDED.changed_at WHERE titles.version < EXCLUDED.version "
            "RETURNING true",
            title_id,
            version,
            snapshot is None,
            None if snapshot is None else snapshot.name,
            None if snapshot is None else snapshot.runtime_ms,
            None if snapshot is None else list(snapshot.ladder_kbps),
            changed_at,
        )
        return bool(applied)

    async def title(self, title_id: str) -> Title | None:
        row = await self.conn.fetchrow(
            "SELECT name, runtime_ms, ladder_kbps FROM titles WHERE title_id = $1 AND NOT deleted", title_id
        )
        if row is None:
            return None
        return Title(title_id, row["name"], int(row["runtime_ms"]), tuple(sorted(row["ladder_kbps"] or ())))

    # -- appliances --------------------------------------------------------------------------

    async def put_health(
        self, appliance_id: str, healthy: bool, load: float, reported_at: datetime, event_time: datetime
    ) -> bool:
        applied = await self.conn.fetchval(
            "INSERT INTO appliance_health (appliance_id, healthy, load, reported_at, event_time) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (appliance_id) DO UPDATE SET "
            "healthy = EXCLUDED.healthy, load = EXCLUDED.load, reported_at = EXCLUDED.reported_at, "
            "event_time = EXCLUDED.event_time WHERE appliance_health.event_time <= EXCLUDED.event_time "
            "RETURNING true",
            appliance_id,
            healthy,
            load,
            reported_at,
            event_time,
        )
        return bool(applied)

    async def mark_titles(
        self, appliance_id: str, title_ids: Sequence[str], present: bool, at: datetime
    ) -> None:
        """Last writer wins per (appliance, title): a change older than the stored one is ignored."""
        if not title_ids:
            return
        await self.conn.execute(
            "INSERT INTO appliance_titles (appliance_id, title_id, present, changed_at) "
            "SELECT $1, t, $3, $4 FROM unnest($2::text[]) AS t "
            "ON CONFLICT (appliance_id, title_id) DO UPDATE SET present = EXCLUDED.present, "
            "changed_at = EXCLUDED.changed_at WHERE appliance_titles.changed_at <= EXCLUDED.changed_at",
            appliance_id,
            sorted(set(title_ids)),
            present,
            at,
        )

    async def drop_titles_not_in(self, appliance_id: str, title_ids: Sequence[str], at: datetime) -> None:
        """A full snapshot at ``at``: every title not in it and not changed since is gone."""
        await self.conn.execute(
            "UPDATE appliance_titles SET present = false, changed_at = $3 "
            "WHERE appliance_id = $1 AND present AND changed_at <= $3 AND NOT (title_id = ANY($2::text[]))",
            appliance_id,
            list(title_ids),
            at,
        )

    async def appliance_states(
        self, appliance_ids: Sequence[str], title_id: str
    ) -> dict[str, ApplianceState]:
        rows = await self.conn.fetch(
            "SELECT c.id, h.healthy, h.load, t.present FROM unnest($1::text[]) AS c(id) "
            "LEFT JOIN appliance_health h ON h.appliance_id = c.id "
            "LEFT JOIN appliance_titles t ON t.appliance_id = c.id AND t.title_id = $2",
            list(appliance_ids),
            title_id,
        )
        return {
            row["id"]: ApplianceState(
                healthy=bool(row["healthy"]),
                load=float(row["load"] or 0.0),
                holds_title=bool(row["present"]),
            )
            for row in rows
        }

    # -- sessions ----------------------------------------------------------------------------

    async def insert_session(self, session: Session) -> None:
        await self.conn.execute(
            "INSERT INTO sessions (session_id, account_id, profile_id, title_id, runtime_ms, appliance_id, "
            "cdn_url, client_ip, started_at, heartbeats, last_position_ms, last_report_at, watched_ms) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            session.session_id,
            session.account_id,
            session.profile_id,
            session.title_id,
            session.runtime_ms,
            session.appliance_id,
            session.cdn_url,
            session.client_ip,
            session.started_at,
            session.heartbeats,
            session.last_position_ms,
            session.last_report_at,
            session.watched_ms,
        )

    async def session(self, session_id: uuid.UUID, *, for_update: bool = False) -> Session | None:
        row = await self.conn.fetchrow(
            "SELECT session_id, account_id, profile_id, title_id, runtime_ms, appliance_id, cdn_url, "
            "client_ip, started_at, heartbeats, last_position_ms, last_report_at, watched_ms, stopped_at, "
            "stop_position_ms FROM sessions WHERE session_id = $1" + (" FOR UPDATE" if for_update else ""),
            session_id,
        )
        return None if row is None else Session(**dict(row))

    async def save_progress(self, session: Session) -> None:
        await self.conn.execute(
            "UPDATE sessions SET heartbeats = $2, last_position_ms = $3, last_report_at = $4, "
            "watched_ms = $5, stopped_at = $6, stop_position_ms = $7 WHERE session_id = $1",
            session.session_id,
            session.heartbeats,
            session.last_position_ms,
            session.last_report_at,
            session.watched_ms,
            session.stopped_at,
            session.stop_position_ms,
        )

    # -- outbox ------------------------------------------------------------------------------

    async def publish(self, topic: str, key: str, event: AvroEvent) -> None:
        """Queue ``event`` for ``topic`` in this transaction; the relay sends it after the commit."""
        payload, trace_context = encode_outbox_event(event)
        await self.conn.execute(
            "INSERT INTO outbox (topic, key, event_type, payload, trace_context) "
            "VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
            topic,
            key,
            event.SCHEMA_NAME,
            payload,
            trace_context,
        )
        self.queued += 1


class PlaybackStore:
    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.published = asyncio.Event()  # set after a commit that queued events: wakes the relay

    @classmethod
    async def connect(cls, dsn: str, max_size: int, attempts: int = 10) -> PlaybackStore:
        """Open the pool (retrying while PostgreSQL is not there yet) and create the tables."""
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size)
                break
            except CONNECT_ERRORS as exc:
                if attempt == attempts:
                    raise
                log.warning("waiting for PostgreSQL (%r); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        store = cls(pool)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(SCHEMA)
        return store

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                tx = Tx(conn)
                yield tx
            if tx.queued:
                self.published.set()
