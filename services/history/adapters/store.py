"""The history keyspace: its tables, its prepared statements, and one method per thing the service does.

Tables
- ``sessions``: the state of each playback session (the write path's read-modify-write source).
- ``live_vh``: LiveVH, recent records per profile, uncompressed; clustered newest first.
- ``resume``: the resume point per (profile, title), written with the event time as the write
  timestamp, so Cassandra's last-write-wins keeps the newest position whatever order events arrive in.
- ``compressed_vh_chunks`` / ``compressed_vh_meta``: CompressedVH, a profile's older records as
  zlib-compressed chunks of one rollup version, and the row saying which version is current.
- ``profiles``: which account owns which profile (the ``ProfileCreated`` projection).
- ``view_published``: one row per session whose ``ViewRecorded`` was published (claimed with LWT).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from services.history.adapters.cassandra import CassandraClient, Row, Statement
from services.history.records import SessionState, ViewingRecord, utc

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sessions (
        session_id uuid PRIMARY KEY,
        profile_id uuid, title_id text, watched_at timestamp, account_id uuid,
        started_at timestamp, duration_ms bigint, position_ms bigint, position_at timestamp,
        watched_ms bigint, last_heartbeat_at timestamp, completed boolean, completed_by_client boolean,
        stopped boolean, stopped_at timestamp, updated_at timestamp
    ) WITH default_time_to_live = 7776000""",  # 90 days: long after the last late event
    """CREATE TABLE IF NOT EXISTS live_vh (
        profile_id uuid, watched_at timestamp, session_id uuid,
        title_id text, position_ms bigint, watched_ms bigint, started_at timestamp,
        last_heartbeat_at timestamp, completed boolean, stopped boolean, updated_at timestamp,
        PRIMARY KEY ((profile_id), watched_at, session_id)
    ) WITH CLUSTERING ORDER BY (watched_at DESC, session_id ASC)""",
    """CREATE TABLE IF NOT EXISTS resume (
        profile_id uuid, title_id text, position_ms bigint, session_id uuid, updated_at timestamp,
        PRIMARY KEY ((profile_id), title_id)
    )""",
    """CREATE TABLE IF NOT EXISTS compressed_vh_chunks (
        profile_id uuid, rollup_version uuid, chunk_no int, data blob,
        PRIMARY KEY ((profile_id, rollup_version), chunk_no)
    )""",
    """CREATE TABLE IF NOT EXISTS compressed_vh_meta (
        profile_id uuid PRIMARY KEY,
        rollup_version uuid, generation bigint, chunk_count int, record_count int, compressed_bytes int,
        checksum text, covered_from timestamp, covered_to timestamp, previous_version uuid,
        rolled_at timestamp
    )""",
    """CREATE TABLE IF NOT EXISTS profiles (
        profile_id uuid PRIMARY KEY, account_id uuid, created_at timestamp
    )""",
    """CREATE TABLE IF NOT EXISTS view_published (
        session_id uuid PRIMARY KEY, event_id uuid, state text, claimed_at timestamp,
        published_at timestamp
    )""",
)

LIVE_COLUMNS = (
    "profile_id, watched_at, session_id, title_id, position_ms, watched_ms, started_at, "
    "last_heartbeat_at, completed, stopped, updated_at"
)
MAX_LIVE_ROWS = 10_000
PARALLEL_WRITES = 16  # a profile's live rows read at once; rollups keep LiveVH far smaller


@dataclass(frozen=True, slots=True)
class LiveRow:
    """A LiveVH row as a rollup saw it: the record and the write time of its cells (microseconds)."""

    record: ViewingRecord
    written_us: int


@dataclass(frozen=True, slots=True)
class RollupMeta:
    """The current CompressedVH version of a profile."""

    profile_id: UUID
    rollup_version: UUID
    generation: int
    chunk_count: int
    record_count: int
    compressed_bytes: int
    checksum: str
    covered_from: datetime | None
    covered_to: datetime | None
    previous_version: UUID | None
    rolled_at: datetime


def _opt_time(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def _record(row: Row) -> ViewingRecord:
    return ViewingRecord(
        profile_id=row["profile_id"],
        session_id=row["session_id"],
        watched_at=utc(row["watched_at"]),
        title_id=row["title_id"],
        position_ms=int(row["position_ms"] or 0),
        watched_ms=int(row["watched_ms"] or 0),
        started_at=_opt_time(row["started_at"]),
        last_heartbeat_at=_opt_time(row["last_heartbeat_at"]),
        completed=bool(row["completed"]),
        stopped=bool(row["stopped"]),
        updated_at=utc(row["updated_at"]),
    )


def _meta(row: Row) -> RollupMeta:
    return RollupMeta(
        profile_id=row["profile_id"],
        rollup_version=row["rollup_version"],
        generation=int(row["generation"]),
        chunk_count=int(row["chunk_count"]),
        record_count=int(row["record_count"]),
        compressed_bytes=int(row["compressed_bytes"] or 0),
        checksum=row["checksum"],
        covered_from=_opt_time(row["covered_from"]),
        covered_to=_opt_time(row["covered_to"]),
        previous_version=row["previous_version"],
        rolled_at=utc(row["rolled_at"]),
    )


def _micros(when: datetime) -> int:
    return int(utc(when).timestamp() * 1000) * 1000


class HistoryStore:
    """All CQL the service runs, as prepared statements, behind methods named after what they do."""

    def __init__(self, client: CassandraClient) -> None:
        self.client = client
        self._s: dict[str, Statement] = {}

    @classmethod
    async def open(cls, client: CassandraClient, keyspace: str) -> HistoryStore:
        """Create the keyspace (SimpleStrategy, rf 1) and the tables if missing; prepare the statements."""
        await client.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {keyspace} "
            "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        await client.use(keyspace)
        for ddl in SCHEMA:
            await client.execute(ddl)
        store = cls(client)
        await store._prepare()
        return store

    async def _prepare(self) -> None:
        statements = {
            "ping": "SELECT release_version FROM system.local",
            "load_session": "SELECT * FROM sessions WHERE session_id = ?",
            "save_session": (
                "INSERT INTO sessions (session_id, profile_id, title_id, watched_at, account_id, started_at, "
                "duration_ms, position_ms, position_at, watched_ms, last_heartbeat_at, completed, "
                "completed_by_client, stopped, stopped_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            "put_live": f"INSERT INTO live_vh ({LIVE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "drop_live": "DELETE FROM live_vh WHERE profile_id = ? AND watched_at = ? AND session_id = ?",
            "drop_live_seen": (
                "DELETE FROM live_vh USING TIMESTAMP ? "
                "WHERE profile_id = ? AND watched_at = ? AND session_id = ?"
            ),
            "put_resume": (
                "INSERT INTO resume (profile_id, title_id, position_ms, session_id, updated_at) "
                "VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ),
            "get_resume": "SELECT position_ms, updated_at FROM resume WHERE profile_id = ? AND title_id = ?",
            "recent_live": f"SELECT {LIVE_COLUMNS} FROM live_vh WHERE profile_id = ? LIMIT ?",
            "live_for_rollup": (
                f"SELECT {LIVE_COLUMNS}, WRITETIME(position_ms) AS w1, WRITETIME(updated_at) AS w2, "
                "WRITETIME(title_id) AS w3 FROM live_vh WHERE profile_id = ? LIMIT ?"
            ),
            "live_profiles": "SELECT DISTINCT profile_id FROM live_vh",
            "get_meta": "SELECT * FROM compressed_vh_meta WHERE profile_id = ?",
            "first_meta": (
                "INSERT INTO compressed_vh_meta (profile_id, rollup_version, generation, chunk_count, "
                "record_count, compressed_bytes, checksum, covered_from, covered_to, previous_version, "
                "rolled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ),
            "swap_meta": (
                "UPDATE compressed_vh_meta SET rollup_version = ?, generation = ?, chunk_count = ?, "
                "record_count = ?, compressed_bytes = ?, checksum = ?, covered_from = ?, covered_to = ?, "
                "previous_version = ?, rolled_at = ? WHERE profile_id = ? IF rollup_version = ?"
            ),
            "put_chunk": (
                "INSERT INTO compressed_vh_chunks (profile_id, rollup_version, chunk_no, data) "
                "VALUES (?, ?, ?, ?)"
            ),
            "get_chunks": (
                "SELECT chunk_no, data FROM compressed_vh_chunks WHERE profile_id = ? AND rollup_version = ?"
            ),
            "drop_version": "DELETE FROM compressed_vh_chunks WHERE profile_id = ? AND rollup_version = ?",
            "put_profile": "INSERT INTO profiles (profile_id, account_id, created_at) VALUES (?, ?, ?)",
            "get_owner": "SELECT account_id FROM profiles WHERE profile_id = ?",
            "claim_view": (
                "INSERT INTO view_published (session_id, event_id, state, claimed_at) "
                "VALUES (?, ?, 'claimed', ?) IF NOT EXISTS"
            ),
            "view_published": (
                "UPDATE view_published SET state = 'published', published_at = ? "
                "WHERE session_id = ? IF state = 'claimed'"
            ),
        }
        for key, cql in statements.items():
            self._s[key] = await self.client.prepare(cql)

    async def close(self) -> None:
        await self.client.close()

    async def answers(self) -> bool:
        """For readiness: a real query, not a port check."""
        return bool(await self.client.execute(self._s["ping"], traced=False))

    # -- sessions and LiveVH ---------------------------------------------------------------------

    async def load_session(self, session_id: UUID) -> SessionState | None:
        rows = await self.client.execute(self._s["load_session"], [session_id])
        if not rows:
            return None
        row = rows[0]
        if row["profile_id"] is None:
            return None
        record = ViewingRecord(
            profile_id=row["profile_id"],
            session_id=row["session_id"],
            watched_at=utc(row["watched_at"]),
            title_id=row["title_id"],
            position_ms=int(row["position_ms"]),
            watched_ms=int(row["watched_ms"]),
            started_at=_opt_time(row["started_at"]),
            last_heartbeat_at=_opt_time(row["last_heartbeat_at"]),
            completed=bool(row["completed"]),
            stopped=bool(row["stopped"]),
            updated_at=utc(row["updated_at"]),
        )
        return SessionState(
            record=record,
            account_id=row["account_id"],
            duration_ms=int(row["duration_ms"] or 0),
            position_at=utc(row["position_at"]),
            stopped_at=_opt_time(row["stopped_at"]),
            completed_by_client=bool(row["completed_by_client"]),
        )

    async def save_session(self, state: SessionState, before: SessionState | None) -> None:
        """One logged batch: the session's state, its LiveVH row (moved if its viewing began earlier
        than first thought) and its resume point (the event time as the write timestamp)."""
        r = state.record
        live = [
            r.profile_id,
            r.watched_at,
            r.session_id,
            r.title_id,
            r.position_ms,
            r.watched_ms,
            r.started_at,
            r.last_heartbeat_at,
            r.completed,
            r.stopped,
            r.updated_at,
        ]
        session = [
            r.session_id,
            r.profile_id,
            r.title_id,
            r.watched_at,
            state.account_id,
            r.started_at,
            state.duration_ms,
            r.position_ms,
            state.position_at,
            r.watched_ms,
            r.last_heartbeat_at,
            r.completed,
            state.completed_by_client,
            r.stopped,
            state.stopped_at,
            r.updated_at,
        ]
        parts: list[tuple[Statement, Sequence[Any]]] = [
            (self._s["save_session"], session),
            (self._s["put_live"], live),
        ]
        if before is not None and before.record.watched_at != r.watched_at:
            old = before.record
            parts.append((self._s["drop_live"], [old.profile_id, old.watched_at, old.session_id]))
        if before is None or before.position_at != state.position_at:
            resume = [r.profile_id, r.title_id, r.position_ms, r.session_id, state.position_at]
            parts.append((self._s["put_resume"], [*resume, _micros(state.position_at)]))
        await self.client.batch(parts, logged=True)

    async def recent(self, profile_id: UUID, limit: int) -> list[ViewingRecord]:
        rows = await self.client.execute(self._s["recent_live"], [profile_id, limit])
        return [_record(row) for row in rows]

    async def live_for_rollup(self, profile_id: UUID) -> list[LiveRow]:
        rows = await self.client.execute(self._s["live_for_rollup"], [profile_id, MAX_LIVE_ROWS])
        return [
            LiveRow(_record(row), max(int(row[k]) for k in ("w1", "w2", "w3") if row[k] is not None))
            for row in rows
        ]

    async def delete_rolled_up(self, rows: Sequence[LiveRow]) -> None:
        """Delete rolled-up LiveVH rows as they were seen: the tombstone carries the write time the
        rollup read, so a row written again since (a late event of that session) survives it."""
        await self._all(
            (
                self._s["drop_live_seen"],
                [row.written_us, row.record.profile_id, row.record.watched_at, row.record.session_id],
            )
            for row in rows
        )

    async def live_profiles(self) -> AsyncIterator[UUID]:
        for row in await self.client.execute(self._s["live_profiles"]):
            yield row["profile_id"]

    # -- resume ----------------------------------------------------------------------------------

    async def resume(self, profile_id: UUID, title_id: str) -> tuple[int, datetime] | None:
        rows = await self.client.execute(self._s["get_resume"], [profile_id, title_id])
        if not rows:
            return None
        return int(rows[0]["position_ms"]), utc(rows[0]["updated_at"])

    # -- CompressedVH ----------------------------------------------------------------------------

    async def meta(self, profile_id: UUID) -> RollupMeta | None:
        rows = await self.client.execute(self._s["get_meta"], [profile_id])
        return _meta(rows[0]) if rows and rows[0]["rollup_version"] is not None else None

    async def chunks(self, profile_id: UUID, version: UUID) -> list[tuple[int, bytes]]:
        rows = await self.client.execute(self._s["get_chunks"], [profile_id, version])
        return [(int(row["chunk_no"]), bytes(row["data"] or b"")) for row in rows]

    async def write_chunks(self, profile_id: UUID, version: UUID, chunks: Sequence[bytes]) -> None:
        await self._all(
            (self._s["put_chunk"], [profile_id, version, number, data]) for number, data in enumerate(chunks)
        )

    async def _all(self, requests: Iterable[tuple[Statement, Sequence[Any]]]) -> None:
        """Requests in parallel, at most ``PARALLEL_WRITES`` in flight; fails if any fails."""
        gate = asyncio.Semaphore(PARALLEL_WRITES)

        async def one(statement: Statement, params: Sequence[Any]) -> None:
            async with gate:
                await self.client.execute(statement, params)

        await asyncio.gather(*(one(s, p) for s, p in requests))

    async def swap_meta(self, new: RollupMeta, expected: UUID | None) -> bool:
        """Make ``new`` the current version if the current one is still ``expected`` (LWT)."""
        values = [
            new.rollup_version,
            new.generation,
            new.chunk_count,
            new.record_count,
            new.compressed_bytes,
            new.checksum,
            new.covered_from,
            new.covered_to,
            new.previous_version,
            new.rolled_at,
        ]
        if expected is None:
            rows = await self.client.execute(self._s["first_meta"], [new.profile_id, *values])
        else:
            rows = await self.client.execute(self._s["swap_meta"], [*values, new.profile_id, expected])
        return bool(rows and rows[0].get("[applied]"))

    async def delete_version(self, profile_id: UUID, version: UUID) -> None:
        await self.client.execute(self._s["drop_version"], [profile_id, version])

    # -- profiles --------------------------------------------------------------------------------

    async def put_profile(self, profile_id: UUID, account_id: UUID, created_at: datetime) -> None:
        await self.client.execute(self._s["put_profile"], [profile_id, account_id, created_at])

    async def owner(self, profile_id: UUID) -> UUID | None:
        rows = await self.client.execute(self._s["get_owner"], [profile_id])
        owner: UUID | None = rows[0]["account_id"] if rows else None
        return owner

    # -- the ViewRecorded marker -----------------------------------------------------------------

    async def claim_view(self, session_id: UUID, event_id: UUID) -> str | None:
        """Claim the publication of a session's ViewRecorded (LWT). ``None`` when this call made the
        claim, else the state it found: ``claimed`` (not yet confirmed published) or ``published``."""
        now = datetime.now(UTC)
        rows = await self.client.execute(self._s["claim_view"], [session_id, event_id, now])
        if rows and rows[0].get("[applied]"):
            return None
        state: str | None = rows[0].get("state") if rows else None
        return state or "claimed"

    async def view_published(self, session_id: UUID) -> None:
        await self.client.execute(self._s["view_published"], [datetime.now(UTC), session_id])
