"""The pure rules of the history service: folding events, merging, choosing what to roll up, chunking."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest

from services.bus.events import StopReason
from services.history.records import (
    CorruptRollup,
    PlaybackEvent,
    SessionState,
    ViewingRecord,
    apply_event,
    compress,
    decompress,
    iso,
    merge,
    select_for_rollup,
)
from tests.history.conftest import Viewer, at

VIEWER = Viewer()
SESSION = uuid.uuid4()
EVENTS: list[PlaybackEvent] = [
    VIEWER.started(SESSION, "tt0000001", at(0), duration_ms=1_000_000),
    VIEWER.heartbeat(SESSION, "tt0000001", at(10), 10_000, sequence=1),
    VIEWER.heartbeat(SESSION, "tt0000001", at(20), 20_000, sequence=2),
    VIEWER.stopped(SESSION, "tt0000001", at(25), 25_000, watched_ms=24_000),
]


def fold(events: list[PlaybackEvent]) -> SessionState:
    state = None
    for event in events:
        state = apply_event(state, event, 0.95)
    assert state is not None
    return state


def test_a_session_folds_to_its_last_position() -> None:
    state = fold(EVENTS)
    r = state.record
    assert (r.position_ms, r.watched_ms, r.stopped, r.completed) == (25_000, 24_000, True, False)
    assert (r.watched_at, r.started_at, r.last_heartbeat_at, r.updated_at) == (at(0), at(0), at(20), at(25))
    assert (state.account_id, state.duration_ms, state.stopped_at) == (VIEWER.account_id, 1_000_000, at(25))


def test_the_state_does_not_depend_on_the_order_events_arrive_in() -> None:
    expected = fold(EVENTS)
    for order in itertools.permutations(EVENTS):
        assert fold(list(order)) == expected, [type(e).__name__ for e in order]


def test_an_event_applied_twice_changes_nothing() -> None:
    state = None
    for event in EVENTS:
        state = apply_event(state, event, 0.95)
        assert apply_event(state, event, 0.95) == state


def test_a_late_heartbeat_does_not_move_the_position_back_but_a_newer_seek_does() -> None:
    state = fold(EVENTS[:3])
    late = VIEWER.heartbeat(SESSION, "tt0000001", at(15), 15_000)
    assert apply_event(state, late, 0.95).record.position_ms == 20_000
    seek = VIEWER.heartbeat(SESSION, "tt0000001", at(21), 5_000)
    assert apply_event(state, seek, 0.95).record.position_ms == 5_000


def test_completed_when_the_client_says_so_or_near_the_end() -> None:
    said = VIEWER.stopped(SESSION, "tt0000001", at(30), 100_000, reason=StopReason.COMPLETED)
    assert fold([*EVENTS, said]).record.completed
    near_end = VIEWER.heartbeat(SESSION, "tt0000001", at(30), 960_000)
    assert fold([*EVENTS, near_end]).record.completed
    assert not fold(EVENTS).record.completed


def record(n: int, updated: float | None = None, position_ms: int = 0) -> ViewingRecord:
    return ViewingRecord(
        profile_id=VIEWER.profile_id,
        session_id=uuid.UUID(int=n + 1),
        watched_at=at(3600 * n),
        title_id=f"tt{n:07d}",
        position_ms=position_ms,
        watched_ms=0,
        started_at=at(3600 * n),
        last_heartbeat_at=None,
        completed=False,
        stopped=True,
        updated_at=at(3600 * n + (updated or 60)),
    )


def test_merge_keeps_one_record_per_session_the_newer_copy_and_on_a_tie_the_first_source() -> None:
    live = [record(2), record(1, updated=120, position_ms=7)]
    compressed = [record(1, position_ms=3), record(0), replace(record(2), position_ms=99)]
    merged = merge(live, compressed)
    assert [r.session_id for r in merged] == [uuid.UUID(int=3), uuid.UUID(int=2), uuid.UUID(int=1)]
    assert [r.position_ms for r in merged] == [0, 7, 0]


def test_rollup_selection_by_age_and_by_count() -> None:
    live = [record(n) for n in range(5)]
    now = at(3600 * 4 + 1)
    by_age = select_for_rollup(live, now, timedelta(hours=2), None)
    assert [r.title_id for r in by_age] == ["tt0000002", "tt0000001", "tt0000000"]
    by_count = select_for_rollup(live, now, timedelta(0), 4)
    assert [r.title_id for r in by_count] == ["tt0000000"]
    assert select_for_rollup(live, now, timedelta(0), None) == []
    assert len(select_for_rollup(live, now, timedelta(0), 0)) == 5


def test_compressed_chunks_round_trip_and_a_missing_chunk_is_detected() -> None:
    records = [record(n, position_ms=n * 1000) for n in range(40)]
    packed = compress(records, chunk_bytes=100)
    assert len(packed.chunks) > 3 and all(len(c) <= 100 for c in packed.chunks)
    assert packed.record_count == 40
    assert (packed.covered_from, packed.covered_to) == (at(0), at(3600 * 39))
    assert decompress(packed.chunks, packed.checksum, 40) == merge(records)
    with pytest.raises(CorruptRollup):
        decompress(packed.chunks[:-1], packed.checksum, 40)
    with pytest.raises(CorruptRollup):
        decompress(packed.chunks, packed.checksum, 41)
    empty = compress([], chunk_bytes=100)
    assert decompress(empty.chunks, empty.checksum, 0) == []


def test_times_are_shown_in_utc_with_milliseconds() -> None:
    assert iso(at(0.5)) == "2026-11-20T20:00:00.500Z"
