"""The rollup and the full read against the real Cassandra, with their steps interleaved on purpose.

The concurrency test in ``test_history`` runs many rollups under a reader and hopes to hit the races;
here each race is forced: a store whose chosen steps wait at a gate until the test opens it, so a
rollup (or a late write) runs exactly between two steps of the other party.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from services.bus.events import AvroEvent
from services.cli.infra import Layout
from services.history.adapters.cassandra import CassandraClient
from services.history.adapters.store import HistoryStore, LiveRow, RollupMeta
from services.history.handlers import (
    Dependencies,
    RollupConflict,
    RollupPolicy,
    full_history,
    recent_history,
    rollup_profile,
)
from services.history.records import SessionState, ViewingRecord, apply_event
from tests.history.conftest import Viewer, at

pytestmark = pytest.mark.infra


class Gate:
    """Holds a step until the test opens it; says when the step has reached it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self) -> None:
        self.reached.set()
        await self.opened.wait()


class GatedStore(HistoryStore):
    """The real store; a step named in ``gates`` waits at its gate (once) before it runs."""

    def __init__(self, store: HistoryStore) -> None:
        super().__init__(store.client)
        self._s = store._s
        self.gates: dict[str, Gate] = {}

    async def _gate(self, name: str) -> None:
        gate = self.gates.pop(name, None)
        if gate is not None:
            await gate()

    async def recent(self, profile_id: UUID, limit: int) -> list[ViewingRecord]:
        await self._gate("recent")
        return await super().recent(profile_id, limit)

    async def chunks(self, profile_id: UUID, version: UUID) -> list[tuple[int, bytes]]:
        await self._gate("chunks")
        return await super().chunks(profile_id, version)

    async def swap_meta(self, new: RollupMeta, expected: UUID | None) -> bool:
        await self._gate("swap_meta")
        return await super().swap_meta(new, expected)

    async def delete_rolled_up(self, rows: Sequence[LiveRow]) -> None:
        await self._gate("delete_rolled_up")
        await super().delete_rolled_up(rows)


class Unused:
    async def send(self, topic: str, key: Any, event: AvroEvent) -> Any:
        raise AssertionError("nothing is published here")


@pytest.fixture
async def store(bus_infra: Layout, keyspace: str) -> AsyncIterator[HistoryStore]:
    client = await CassandraClient.connect(
        ["127.0.0.1"], bus_infra.cassandra_port, protocol_version=5, request_timeout=30, connect_timeout=30
    )
    opened = await HistoryStore.open(client, keyspace)
    yield opened
    await opened.close()


def deps_for(store: HistoryStore) -> Dependencies:
    policy = RollupPolicy(rollup_after=timedelta(0), keep_live=None, chunk_bytes=100)
    return Dependencies(store, Unused(), policy, completed_fraction=0.95)


async def viewed(store: HistoryStore, viewer: Viewer, count: int) -> list[SessionState]:
    """``count`` stopped sessions, an hour apart, written as the event handler writes them."""
    states = []
    for i in range(count):
        session, title = uuid.uuid4(), f"tt30000{i:02d}"
        state = None
        for event in (
            viewer.started(session, title, at(3600 * i)),
            viewer.stopped(session, title, at(3600 * i + 60), 60_000 + i),
        ):
            before, state = state, apply_event(state, event, 0.95)
            await store.save_session(state, before)
        assert state is not None
        states.append(state)
    return states


def ids(records: Sequence[ViewingRecord]) -> list[UUID]:
    return [r.session_id for r in records]


async def test_a_rollup_between_the_compressed_read_and_the_live_read_makes_the_reader_read_again(
    store: HistoryStore,
) -> None:
    viewer = Viewer()
    states = await viewed(store, viewer, 4)
    expected = ids(sorted((s.record for s in states), key=lambda r: r.watched_at, reverse=True))
    gated = GatedStore(store)
    gated.gates["recent"] = hold = Gate()
    # The reader takes the (empty) compressed side at once and waits before reading LiveVH ...
    reader = asyncio.create_task(full_history(gated, viewer.profile_id, 100))
    await hold.reached.wait()
    # ... while a rollup moves every live record into CompressedVH and deletes them from LiveVH.
    result = await rollup_profile(deps_for(store), viewer.profile_id, keep_live=0)
    assert result.rolled == 4 and await store.recent(viewer.profile_id, 100) == []
    hold.opened.set()
    # Taken alone, both reads are empty; the metadata check sees the new version and reads again.
    assert ids(await reader) == expected


async def test_a_record_in_both_live_and_compressed_is_shown_once(store: HistoryStore) -> None:
    viewer = Viewer()
    await viewed(store, viewer, 3)
    before = await full_history(store, viewer.profile_id, 100)
    gated = GatedStore(store)
    gated.gates["delete_rolled_up"] = hold = Gate()
    # The rollup has put its version in place but not yet deleted the live rows ...
    rollup = asyncio.create_task(rollup_profile(deps_for(gated), viewer.profile_id, keep_live=0))
    await hold.reached.wait()
    assert len(await store.recent(viewer.profile_id, 100)) == 3
    # ... so every record is in both places, and the reader shows each once.
    assert await full_history(store, viewer.profile_id, 100) == before
    hold.opened.set()
    assert (await rollup).rolled == 3
    assert await full_history(store, viewer.profile_id, 100) == before


async def test_a_version_deleted_under_the_reader_makes_it_read_again(store: HistoryStore) -> None:
    viewer = Viewer()
    await viewed(store, viewer, 3)
    deps = deps_for(store)
    await rollup_profile(deps, viewer.profile_id, keep_live=1)
    before = await full_history(store, viewer.profile_id, 100)
    gated = GatedStore(store)
    gated.gates["chunks"] = hold = Gate()
    # The reader has the metadata of version 1 and waits before reading its chunks ...
    reader = asyncio.create_task(full_history(gated, viewer.profile_id, 100))
    await hold.reached.wait()
    # ... while version 2 replaces it and version 1's chunks are deleted.
    second = await rollup_profile(deps, viewer.profile_id, keep_live=0)
    assert second.generation == 2 and second.rolled == 1
    hold.opened.set()
    assert await reader == before


async def test_two_rollups_racing_leave_one_version_and_lose_nothing(store: HistoryStore) -> None:
    viewer = Viewer()
    await viewed(store, viewer, 5)
    before = await full_history(store, viewer.profile_id, 100)
    gated = GatedStore(store)
    gated.gates["swap_meta"] = hold = Gate()
    # Two processes (separate locks): the first has written its chunks, not yet its metadata ...
    slow = asyncio.create_task(rollup_profile(deps_for(gated), viewer.profile_id, keep_live=2))
    await hold.reached.wait()
    fast = await rollup_profile(deps_for(store), viewer.profile_id, keep_live=0)
    assert fast.rolled == 5
    hold.opened.set()
    # ... so its compare-and-set fails, and it removes its chunks.
    with pytest.raises(RollupConflict):
        await slow
    assert await full_history(store, viewer.profile_id, 100) == before
    meta = await store.meta(viewer.profile_id)
    assert meta is not None and meta.rollup_version == fast.rollup_version
    versions = {
        row["rollup_version"]
        for row in await store.client.execute(
            f"SELECT rollup_version FROM {store.client.keyspace}.compressed_vh_chunks "
            f"WHERE profile_id = {viewer.profile_id} ALLOW FILTERING"
        )
    }
    assert versions == {fast.rollup_version}


async def test_a_live_row_written_again_during_a_rollup_survives_its_delete(store: HistoryStore) -> None:
    viewer = Viewer()
    states = await viewed(store, viewer, 2)
    gated = GatedStore(store)
    gated.gates["delete_rolled_up"] = hold = Gate()
    rollup = asyncio.create_task(rollup_profile(deps_for(gated), viewer.profile_id, keep_live=0))
    await hold.reached.wait()
    # A newer event of a session the rollup has just compressed arrives before the live delete.
    newest = states[-1]
    later = viewer.heartbeat(newest.record.session_id, newest.record.title_id, at(3600 + 120), 5_000)
    updated = apply_event(newest, later, 0.95)
    await store.save_session(updated, newest)
    hold.opened.set()
    assert (await rollup).rolled == 2
    # The delete carried the write time the rollup saw, so the newer row is still live ...
    assert await recent_history(store, viewer.profile_id, 10) == [updated.record]
    # ... and the full read shows the session once, as the newer copy.
    full = await full_history(store, viewer.profile_id, 10)
    assert full == [updated.record, states[0].record]
