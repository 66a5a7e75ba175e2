"""The history service's business logic: one function per event and per command, of (input, dependencies).

Write path: a playback event is folded into its session's state (``records.apply_event``); if that
changes anything, the state, the LiveVH row and the resume point are written in one logged batch.
A redelivered or stale event folds to the same state and writes nothing. On ``SessionStopped`` the
session's ``ViewRecorded`` is published once, guarded by an LWT marker row.

Rollup (CompressedVH): chunks of the new version first, then the metadata row (a compare-and-set on
the version it replaces), then the rolled-up LiveVH rows are deleted, then the old version's chunks.
A full read takes the metadata, exactly that version's chunks and LiveVH, and accepts the result only
if the metadata still names the same version afterwards; duplicates between live and compressed are
merged by session id. So a reader never sees a half-written rollup, nor misses or doubles a record.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from opentelemetry import trace

from services.bus.consumer import Record, Retryable
from services.bus.events import AvroEvent, ProfileCreated, SessionStopped, ViewRecorded
from services.bus.tracing import ATTR_ACCOUNT_ID, ATTR_PROFILE_ID, ATTR_SESSION_ID, ATTR_TITLE_ID
from services.history import metrics
from services.history.adapters.store import MAX_LIVE_ROWS, HistoryStore, LiveRow, RollupMeta
from services.history.records import (
    CorruptRollup,
    PlaybackEvent,
    SessionState,
    ViewingRecord,
    apply_event,
    compress,
    decompress,
    merge,
    select_for_rollup,
    utc,
)

log = logging.getLogger("reelbus.history")

VIEWS_TOPIC = "history.views"
VIEW_IDS = uuid.UUID("6f1d3c0e-9a57-4b8e-8c53-2d0f4b7e1a10")  # namespace of ViewRecorded event ids
FULL_READ_ATTEMPTS = 25


class Publisher(Protocol):
    async def send(self, topic: str, key: Any, event: AvroEvent) -> Any: ...


@dataclass(frozen=True)
class RollupPolicy:
    rollup_after: timedelta  # 0: not by age
    keep_live: int | None  # None: not by count
    chunk_bytes: int


@dataclass
class Dependencies:
    """What the handlers use; built once at start by the app's resources."""

    store: HistoryStore
    publisher: Publisher
    policy: RollupPolicy
    completed_fraction: float
    # Rollups of one profile in this process run one at a time (striped locks, a bounded set);
    # across processes the compare-and-set on the metadata row decides.
    rollup_locks: tuple[asyncio.Lock, ...] = field(
        default_factory=lambda: tuple(asyncio.Lock() for _ in range(64))
    )


# -- events ----------------------------------------------------------------------------------------


async def record_playback(event: PlaybackEvent, record: Record, deps: Dependencies) -> None:
    """Fold a playback event into its session; publish ``ViewRecorded`` once when it stops."""
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(event.profile_id))
    span.set_attribute(ATTR_TITLE_ID, event.title_id)
    span.set_attribute(ATTR_SESSION_ID, str(event.session_id))
    before = await deps.store.load_session(event.session_id)
    after = apply_event(before, event, deps.completed_fraction)
    if after != before:
        await deps.store.save_session(after, before)
        accepted = utc(event.event_time).timestamp()
        metrics.ACCEPT_TO_WRITE.labels(type(event).__name__).observe(max(0.0, time.time() - accepted))
    else:
        span.set_attribute("reelbus.history.unchanged", True)  # a redelivery or a stale event
    if isinstance(event, SessionStopped):
        await publish_view_once(after, deps)


async def publish_view_once(state: SessionState, deps: Dependencies) -> None:
    """``ViewRecorded`` for a stopped session, once: an LWT claim on the session's marker row, the
    send, then the marker set to ``published``. A redelivery finds ``published`` and sends nothing;
    a crash between the send and the marker sends again with the same (deterministic) event id."""
    r = state.record
    event_id = uuid.uuid5(VIEW_IDS, f"view:{r.session_id}")
    found = await deps.store.claim_view(r.session_id, event_id)
    if found == "published":
        return
    account_id = state.account_id or await deps.store.owner(r.profile_id) or UUID(int=0)
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, str(account_id))
    view = ViewRecorded(
        event_id=event_id,
        profile_id=r.profile_id,
        account_id=account_id,
        title_id=r.title_id,
        session_id=r.session_id,
        position_ms=r.position_ms,
        duration_ms=state.duration_ms,
        watched_ms=r.watched_ms,
        watched_at=state.stopped_at or r.updated_at,
        completed=r.completed,
    )
    await deps.publisher.send(VIEWS_TOPIC, str(r.profile_id), view)
    await deps.store.view_published(r.session_id)


async def record_profile(event: ProfileCreated, record: Record, deps: Dependencies) -> None:
    """The ownership projection: which account owns the profile."""
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(event.profile_id))
    span.set_attribute(ATTR_ACCOUNT_ID, str(event.account_id))
    await deps.store.put_profile(event.profile_id, event.account_id, event.event_time)


EventHandler = Callable[[Any, Record, Dependencies], Awaitable[None]]


# -- reads -----------------------------------------------------------------------------------------


class HistoryBusy(Retryable):
    """Rollups kept replacing the compressed version under a full read; the caller may retry."""


async def owner_of(store: HistoryStore, profile_id: UUID) -> UUID | None:
    return await store.owner(profile_id)


async def recent_history(store: HistoryStore, profile_id: UUID, limit: int) -> list[ViewingRecord]:
    """LiveVH only: the newest records, uncompressed."""
    return merge(await store.recent(profile_id, limit))[:limit]


async def _compressed(
    store: HistoryStore, profile_id: UUID
) -> tuple[UUID | None, list[ViewingRecord] | None]:
    """The current rollup version and its records; ``None`` records when that version's chunks are
    no longer all there (a newer rollup replaced it while we read)."""
    meta = await store.meta(profile_id)
    if meta is None:
        return None, []
    chunks = await store.chunks(profile_id, meta.rollup_version)
    if len(chunks) != meta.chunk_count:
        return meta.rollup_version, None
    try:
        records = decompress([data for _, data in sorted(chunks)], meta.checksum, meta.record_count)
    except CorruptRollup:
        return meta.rollup_version, None
    return meta.rollup_version, records


async def full_history(store: HistoryStore, profile_id: UUID, limit: int) -> list[ViewingRecord]:
    """LiveVH and CompressedVH read in parallel and merged by session id.

    Every record is, at every moment, in LiveVH or in the current compressed version (in both between
    a rollup's metadata write and its live delete). The result is accepted only if the metadata names
    the same version after both reads finished: then no rollup moved records between the two reads.
    """
    for attempt in range(FULL_READ_ATTEMPTS):
        live, (version, compressed) = await asyncio.gather(
            store.recent(profile_id, MAX_LIVE_ROWS), _compressed(store, profile_id)
        )
        if compressed is not None:
            check = await store.meta(profile_id)
            if (check.rollup_version if check else None) == version:
                return merge(live, compressed)[:limit]
        trace.get_current_span().add_event("compressed version changed during the read; reading again")
        await asyncio.sleep(min(0.002 * 2**attempt, 0.1))
    raise HistoryBusy(
        f"the compressed history of {profile_id} kept changing during {FULL_READ_ATTEMPTS} reads"
    )


async def resume_point(store: HistoryStore, profile_id: UUID, title_id: str) -> tuple[int, datetime | None]:
    found = await store.resume(profile_id, title_id)
    return (0, None) if found is None else found


# -- rollup ----------------------------------------------------------------------------------------


class RollupConflict(Retryable):
    """Another rollup of the same profile put its version in place first."""


@dataclass(frozen=True)
class RollupResult:
    profile_id: UUID
    rolled: int  # live records moved into the compressed version by this rollup
    rollup_version: UUID | None
    generation: int
    record_count: int  # records in the current compressed version
    chunk_count: int
    compressed_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "profile_id": str(self.profile_id),
            "rolled": self.rolled,
            "rollup_version": str(self.rollup_version) if self.rollup_version else None,
            "generation": self.generation,
            "record_count": self.record_count,
            "chunk_count": self.chunk_count,
            "compressed_bytes": self.compressed_bytes,
        }


def _unchanged(profile_id: UUID, meta: RollupMeta | None) -> RollupResult:
    if meta is None:
        return RollupResult(profile_id, 0, None, 0, 0, 0, 0)
    return RollupResult(
        profile_id,
        0,
        meta.rollup_version,
        meta.generation,
        meta.record_count,
        meta.chunk_count,
        meta.compressed_bytes,
    )


async def rollup_profile(
    deps: Dependencies,
    profile_id: UUID,
    *,
    now: datetime | None = None,
    keep_live: int | None = None,
    force: bool = False,
) -> RollupResult:
    """Move a profile's old live records into a new compressed version (see the module doc).

    ``keep_live`` overrides the policy's count; ``force`` writes a new version even when no live
    record qualifies (it re-packs the compressed records)."""
    async with deps.rollup_locks[profile_id.int % len(deps.rollup_locks)]:
        return await _rollup(deps, profile_id, now or datetime.now(UTC), keep_live, force)


async def _rollup(
    deps: Dependencies, profile_id: UUID, now: datetime, keep_live: int | None, force: bool
) -> RollupResult:
    store, policy = deps.store, deps.policy
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(profile_id))
    meta = await store.meta(profile_id)
    old: list[ViewingRecord] = []
    if meta is not None:
        chunks = await store.chunks(profile_id, meta.rollup_version)
        try:
            if len(chunks) != meta.chunk_count:
                raise CorruptRollup(f"{len(chunks)} chunks, the metadata says {meta.chunk_count}")
            old = decompress([d for _, d in sorted(chunks)], meta.checksum, meta.record_count)
        except CorruptRollup as exc:
            raise RollupConflict(
                f"compressed version {meta.rollup_version} changed under the rollup"
            ) from exc
    live_rows = await store.live_for_rollup(profile_id)
    chosen = select_for_rollup(
        [row.record for row in live_rows],
        now,
        policy.rollup_after,
        policy.keep_live if keep_live is None else keep_live,
    )
    if not chosen and not force:
        return _unchanged(profile_id, meta)
    chosen_ids = {r.session_id for r in chosen}
    rolled: list[LiveRow] = [row for row in live_rows if row.record.session_id in chosen_ids]
    packed = compress(merge(chosen, old), policy.chunk_bytes)
    new = RollupMeta(
        profile_id=profile_id,
        rollup_version=uuid.uuid4(),
        generation=(meta.generation + 1) if meta else 1,
        chunk_count=len(packed.chunks),
        record_count=packed.record_count,
        compressed_bytes=packed.size,
        checksum=packed.checksum,
        covered_from=packed.covered_from,
        covered_to=packed.covered_to,
        previous_version=meta.rollup_version if meta else None,
        rolled_at=now,
    )
    await store.write_chunks(profile_id, new.rollup_version, packed.chunks)  # 1. the chunks
    if not await store.swap_meta(new, meta.rollup_version if meta else None):  # 2. the metadata
        await store.delete_version(profile_id, new.rollup_version)
        raise RollupConflict(f"another rollup of {profile_id} replaced version {new.previous_version}")
    await store.delete_rolled_up(rolled)  # 3. the live rows now in the compressed version
    if meta is not None:  # 4. what the new version replaces (and a leftover of a rollup that died)
        await store.delete_version(profile_id, meta.rollup_version)
        if meta.previous_version is not None:
            await store.delete_version(profile_id, meta.previous_version)
    span.set_attribute("reelbus.history.rolled", len(rolled))
    return RollupResult(
        profile_id,
        len(rolled),
        new.rollup_version,
        new.generation,
        new.record_count,
        new.chunk_count,
        new.compressed_bytes,
    )


async def rollup_all(deps: Dependencies) -> int:
    """One pass of the periodic rollup over every profile with live records; returns records moved."""
    moved = 0
    async for profile_id in deps.store.live_profiles():
        try:
            moved += (await rollup_profile(deps, profile_id)).rolled
        except Retryable as exc:  # the next pass tries again; the data stays readable meanwhile
            log.warning("rollup of %s skipped: %s", profile_id, exc)
    return moved
