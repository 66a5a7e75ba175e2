"""The catalog's PostgreSQL: the ``titles`` table and the transactional ``outbox``.

Titles are soft-deleted (``deleted_at``) so that a title's version keeps increasing across a delete and
a re-create, and a cache that has seen version n never takes an older one for newer. The schema is
created at start, under an advisory lock so that replicas starting together do not race.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.catalog.titles import Title

log = logging.getLogger("reelbus.catalog.store")

SCHEMA_LOCK = 0x7265656C_0001  # pg advisory lock keys (bigint): schema + seed, and the outbox relay
RELAY_LOCK = 0x7265656C_0002
OUTBOX_CHANNEL = "catalog_outbox"

SCHEMA = """
CREATE TABLE IF NOT EXISTS titles (
    title_id        text PRIMARY KEY CHECK (title_id ~ '^tt[0-9]{7}$'),
    name            text NOT NULL,
    genres          text[] NOT NULL,
    runtime_ms      bigint NOT NULL CHECK (runtime_ms > 0),
    release_year    integer NOT NULL,
    maturity_rating text NOT NULL,
    ladder_kbps     integer[] NOT NULL,
    version         bigint NOT NULL CHECK (version >= 1),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE INDEX IF NOT EXISTS titles_genres ON titles USING gin (genres);
CREATE TABLE IF NOT EXISTS outbox (
    id          bigserial PRIMARY KEY,
    topic       text NOT NULL,
    key         text NOT NULL,
    payload     jsonb NOT NULL,
    trace       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
"""

COLUMNS = (
    "title_id, name, genres, runtime_ms, release_year, maturity_rating, ladder_kbps, version, updated_at"
)


def _title(row: Mapping[str, Any]) -> Title:
    return Title(
        title_id=row["title_id"],
        name=row["name"],
        genres=tuple(row["genres"]),
        runtime_ms=int(row["runtime_ms"]),
        release_year=int(row["release_year"]),
        maturity_rating=row["maturity_rating"],
        ladder_kbps=tuple(row["ladder_kbps"]),
        version=int(row["version"]),
        updated_at=row["updated_at"],
    )


@dataclass(frozen=True, slots=True)
class Locked:
    """A title row held with ``FOR UPDATE``; ``deleted`` when it is a tombstone."""

    title: Title
    deleted: bool


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    topic: str
    key: str
    payload: Mapping[str, Any]
    trace: Mapping[str, str]


class Tx:
    """Operations inside one transaction: a state change and its outbox entry commit together."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def lock(self, title_id: str) -> Locked | None:
        row = await self.conn.fetchrow(
            f"SELECT {COLUMNS}, deleted_at FROM titles WHERE title_id = $1 FOR UPDATE", title_id
        )
        return None if row is None else Locked(_title(row), row["deleted_at"] is not None)

    async def insert(self, title: Title) -> bool:
        """Insert a new title; False when the id is taken (a concurrent create)."""
        inserted = await self.conn.fetchval(
            f"INSERT INTO titles ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (title_id) DO NOTHING RETURNING true",
            *_values(title),
        )
        return bool(inserted)

    async def save(self, title: Title) -> None:
        """Write a locked title back (its new version), undeleting it if it was a tombstone."""
        await self.conn.execute(
            "UPDATE titles SET name = $2, genres = $3, runtime_ms = $4, release_year = $5, "
            "maturity_rating = $6, ladder_kbps = $7, version = $8, updated_at = $9, deleted_at = NULL "
            "WHERE title_id = $1",
            *_values(title),
        )

    async def mark_deleted(self, title_id: str, version: int, when: dt.datetime) -> None:
        await self.conn.execute(
            "UPDATE titles SET version = $2, updated_at = $3, deleted_at = $3 WHERE title_id = $1",
            title_id,
            version,
            when,
        )

    async def enqueue(self, entries: Sequence[OutboxEntry]) -> None:
        """Add events to the outbox; the relay is woken when the transaction commits."""
        await self.conn.executemany(
            "INSERT INTO outbox (topic, key, payload, trace) VALUES ($1, $2, $3::jsonb, $4::jsonb)",
            [(e.topic, e.key, json.dumps(e.payload), json.dumps(dict(e.trace))) for e in entries],
        )
        await self.conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")

    async def is_empty(self) -> bool:
        """True when no title was ever written (tombstones count); takes the seed lock first."""
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        return not await self.conn.fetchval("SELECT EXISTS (SELECT 1 FROM titles)")

    async def insert_many(self, titles: Sequence[Title]) -> None:
        await self.conn.executemany(
            f"INSERT INTO titles ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            [_values(t) for t in titles],
        )


def _values(title: Title) -> tuple[Any, ...]:
    return (
        title.title_id,
        title.name,
        list(title.genres),
        title.runtime_ms,
        title.release_year,
        title.maturity_rating,
        list(title.ladder_kbps),
        title.version,
        title.updated_at,
    )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, max_size: int, wait_seconds: float = 30.0) -> AsyncIterator[Store]:
        """A pool, retrying with backoff for ``wait_seconds`` while PostgreSQL does not answer; the
        schema is created before it is handed out."""
        delay, waited = 0.5, 0.0
        while True:
            try:
                pool = await asyncpg.create_pool(url, min_size=1, max_size=max_size)
                break
            except (OSError, asyncpg.PostgresError) as exc:
                if waited >= wait_seconds:
                    raise
                log.warning("waiting for PostgreSQL (%s); retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 5.0)
        try:
            store = cls(pool)
            await store.migrate()
            yield store
        finally:
            await pool.close()

    async def migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(SCHEMA)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield Tx(conn)

    async def get(self, title_id: str) -> Title | None:
        row = await self.pool.fetchrow(
            f"SELECT {COLUMNS} FROM titles WHERE title_id = $1 AND deleted_at IS NULL", title_id
        )
        return None if row is None else _title(row)

    async def page(self, limit: int, offset: int, genre: str | None) -> tuple[list[Title], int]:
        """Titles ordered by id, optionally of one genre, and how many there are in all."""
        where = "deleted_at IS NULL AND ($1::text IS NULL OR $1 = ANY(genres))"
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM titles WHERE {where} ORDER BY title_id LIMIT $2 OFFSET $3",
                genre,
                limit,
                offset,
            )
            total = await conn.fetchval(f"SELECT count(*) FROM titles WHERE {where}", genre)
        return [_title(r) for r in rows], int(total)
