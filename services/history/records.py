"""Viewing records and the pure rules around them: folding playback events into a session's state,
merging live and compressed records, choosing what to roll up, and the CompressedVH chunk format.

Nothing here does I/O; the handlers and the store build on it, and the unit tests call it directly.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from services.bus.events import (
    Heartbeat,
    SessionPaused,
    SessionResumed,
    SessionStarted,
    SessionStopped,
    StopReason,
)

PlaybackEvent = SessionStarted | Heartbeat | SessionPaused | SessionResumed | SessionStopped
PLAYBACK_EVENTS: tuple[type[Any], ...] = (
    SessionStarted,
    Heartbeat,
    SessionPaused,
    SessionResumed,
    SessionStopped,
)

CHUNK_FORMAT = 1  # the version of the JSON document inside a compressed rollup


@dataclass(frozen=True, slots=True)
class ViewingRecord:
    """One playback session in a profile's viewing history: a LiveVH row or a CompressedVH entry."""

    profile_id: UUID
    session_id: UUID
    watched_at: datetime  # when the viewing began: the session's earliest event; the row's clustering key
    title_id: str
    position_ms: int
    watched_ms: int
    started_at: datetime | None  # the SessionStarted event's time, once it has been seen
    last_heartbeat_at: datetime | None
    completed: bool
    stopped: bool
    updated_at: datetime  # the newest event folded in; the newer copy wins when a record is in two places

    def item(self) -> dict[str, Any]:
        """The record as the history API shows it."""
        return {
            "title_id": self.title_id,
            "position_ms": self.position_ms,
            "watched_at": iso(self.watched_at),
            "session_id": str(self.session_id),
            "completed": self.completed,
        }


@dataclass(frozen=True, slots=True)
class SessionState:
    """What the service knows about one playback session: its viewing record and the facts behind it."""

    record: ViewingRecord
    account_id: UUID | None
    duration_ms: int  # title runtime, from SessionStarted; 0 while unknown
    position_at: datetime  # the event time of ``record.position_ms``
    stopped_at: datetime | None
    completed_by_client: bool  # a SessionStopped said COMPLETED


def iso(when: datetime) -> str:
    """UTC, millisecond precision, ``Z``: ``2026-11-26T03:00:00.123Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def utc(when: datetime) -> datetime:
    """Aware UTC (the Cassandra driver hands back naive UTC datetimes)."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def apply_event(state: SessionState | None, event: PlaybackEvent, completed_fraction: float) -> SessionState:
    """Fold one playback event into a session's state.

    Every field is a maximum, a minimum or a sticky flag, and the position is the one carried by the
    newest event (by ``event_time``), so the result does not depend on the order events arrive in and
    applying the same event twice changes nothing: a redelivery is a no-op, and a late heartbeat
    cannot move the position back, while a newer event of the same session (a seek back) can.
    """
    at = utc(event.event_time)
    if state is None:
        record = ViewingRecord(
            profile_id=event.profile_id,
            session_id=event.session_id,
            watched_at=at,
            title_id=event.title_id,
            position_ms=event.position_ms,
            watched_ms=0,
            started_at=None,
            last_heartbeat_at=None,
            completed=False,
            stopped=False,
            updated_at=at,
        )
        state = SessionState(
            record=record,
            account_id=None,
            duration_ms=0,
            position_at=at,
            stopped_at=None,
            completed_by_client=False,
        )
    record = state.record
    position_ms, position_at = record.position_ms, state.position_at
    if at > position_at:
        position_ms, position_at = event.position_ms, at
    record = replace(
        record,
        watched_at=min(record.watched_at, at),
        position_ms=position_ms,
        updated_at=max(record.updated_at, at),
    )
    account_id, duration_ms = state.account_id, state.duration_ms
    stopped_at, completed_by_client = state.stopped_at, state.completed_by_client
    if isinstance(event, SessionStarted):
        account_id = event.account_id
        duration_ms = max(duration_ms, event.title_duration_ms)
        started = at if record.started_at is None else min(record.started_at, at)
        record = replace(record, started_at=started)
    elif isinstance(event, Heartbeat):
        record = replace(record, last_heartbeat_at=_latest(record.last_heartbeat_at, at))
    elif isinstance(event, SessionStopped):
        stopped_at = _latest(stopped_at, at)
        completed_by_client = completed_by_client or event.reason == StopReason.COMPLETED
        record = replace(record, stopped=True, watched_ms=max(record.watched_ms, event.watched_ms))
    near_end = duration_ms > 0 and record.position_ms >= completed_fraction * duration_ms
    record = replace(record, completed=record.completed or completed_by_client or near_end)
    return SessionState(
        record=record,
        account_id=account_id,
        duration_ms=duration_ms,
        position_at=position_at,
        stopped_at=stopped_at,
        completed_by_client=completed_by_client,
    )


def newest_first(records: Iterable[ViewingRecord]) -> list[ViewingRecord]:
    """Sorted as LiveVH clusters: ``watched_at`` descending, then session id."""
    by_session = sorted(records, key=lambda r: r.session_id.int)
    return sorted(by_session, key=lambda r: r.watched_at, reverse=True)


def merge(*sources: Iterable[ViewingRecord]) -> list[ViewingRecord]:
    """One record per session, newest first. A session found twice (live and compressed, between a
    rollup's metadata write and its live delete, or written again after it was rolled up) keeps the
    copy with the newer ``updated_at``; on a tie, the earlier source wins (pass live first)."""
    chosen: dict[UUID, ViewingRecord] = {}
    for source in sources:
        for record in source:
            held = chosen.get(record.session_id)
            if held is None or record.updated_at > held.updated_at:
                chosen[record.session_id] = record
    return newest_first(chosen.values())


def select_for_rollup(
    live: Sequence[ViewingRecord], now: datetime, rollup_after: timedelta, keep_live: int | None
) -> list[ViewingRecord]:
    """The live records a rollup moves into CompressedVH: those whose viewing began more than
    ``rollup_after`` ago (unless it is 0), and all but the newest ``keep_live`` (unless None)."""
    ordered = newest_first(live)
    chosen: dict[UUID, ViewingRecord] = {}
    if rollup_after > timedelta(0):
        cutoff = now - rollup_after
        chosen.update({r.session_id: r for r in ordered if r.watched_at < cutoff})
    if keep_live is not None:
        chosen.update({r.session_id: r for r in ordered[keep_live:]})
    return newest_first(chosen.values())


# -- the CompressedVH format -----------------------------------------------------------------------


def _ms(when: datetime | None) -> int | None:
    return None if when is None else int(utc(when).timestamp() * 1000)


def _time(ms: Any) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(int(ms) / 1000, UTC)


def _to_doc(record: ViewingRecord) -> dict[str, Any]:
    return {
        "profile_id": str(record.profile_id),
        "session_id": str(record.session_id),
        "watched_at": _ms(record.watched_at),
        "title_id": record.title_id,
        "position_ms": record.position_ms,
        "watched_ms": record.watched_ms,
        "started_at": _ms(record.started_at),
        "last_heartbeat_at": _ms(record.last_heartbeat_at),
        "completed": record.completed,
        "stopped": record.stopped,
        "updated_at": _ms(record.updated_at),
    }


def _from_doc(doc: dict[str, Any]) -> ViewingRecord:
    watched_at, updated_at = _time(doc["watched_at"]), _time(doc["updated_at"])
    assert watched_at is not None and updated_at is not None
    return ViewingRecord(
        profile_id=UUID(doc["profile_id"]),
        session_id=UUID(doc["session_id"]),
        watched_at=watched_at,
        title_id=str(doc["title_id"]),
        position_ms=int(doc["position_ms"]),
        watched_ms=int(doc["watched_ms"]),
        started_at=_time(doc.get("started_at")),
        last_heartbeat_at=_time(doc.get("last_heartbeat_at")),
        completed=bool(doc["completed"]),
        stopped=bool(doc["stopped"]),
        updated_at=updated_at,
    )


class CorruptRollup(ValueError):
    """Chunks that do not add up to what the metadata row promises."""


@dataclass(frozen=True, slots=True)
class Compressed:
    """A serialised, compressed and chunked set of records, with what the metadata row records."""

    chunks: list[bytes]
    record_count: int
    checksum: str  # sha256 of the compressed bytes (all chunks, in order)
    covered_from: datetime | None
    covered_to: datetime | None

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


def compress(records: Sequence[ViewingRecord], chunk_bytes: int) -> Compressed:
    """JSON, then zlib, then chunks of at most ``chunk_bytes``."""
    ordered = newest_first(records)
    doc = {"format": CHUNK_FORMAT, "records": [_to_doc(r) for r in ordered]}
    blob = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), level=6)
    chunks = [blob[i : i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)] or [b""]
    return Compressed(
        chunks=chunks,
        record_count=len(ordered),
        checksum=hashlib.sha256(blob).hexdigest(),
        covered_from=ordered[-1].watched_at if ordered else None,
        covered_to=ordered[0].watched_at if ordered else None,
    )


def decompress(chunks: Sequence[bytes], checksum: str, record_count: int) -> list[ViewingRecord]:
    """The records of one rollup version; ``CorruptRollup`` when the chunks are not all there."""
    blob = b"".join(chunks)
    if hashlib.sha256(blob).hexdigest() != checksum:
        raise CorruptRollup("the chunks do not match the rollup's checksum")
    try:
        doc = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError) as exc:
        raise CorruptRollup(f"the rollup does not decompress: {exc}") from None
    if doc.get("format") != CHUNK_FORMAT:
        raise CorruptRollup(f"unknown rollup format {doc.get('format')!r}")
    records = [_from_doc(d) for d in doc["records"]]
    if len(records) != record_count:
        raise CorruptRollup(f"{len(records)} records, the metadata says {record_count}")
    return records
