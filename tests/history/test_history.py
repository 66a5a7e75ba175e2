"""The history service as a process against the real Kafka, schema registry and Cassandra."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
import urllib.error
import uuid
from collections import Counter
from typing import Any

import pytest
from cassandra.cluster import Session
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.bus.auth import TokenIssuer, load_private_key
from services.bus.contracts import Contracts
from services.bus.events import StopReason, ViewRecorded
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from services.cli.tail import read
from tests.conftest import http_json, unique, wait_for
from tests.history.conftest import VIEWS, Bus, History, Viewer, at, iso

pytestmark = pytest.mark.infra


async def item_of(history: History, viewer: Viewer, session_id: uuid.UUID, **want: Any) -> dict[str, Any]:
    """Wait until the session's record in the recent history has the wanted fields."""

    async def probe() -> dict[str, Any] | None:
        body = await history.history(viewer)
        for item in body["items"]:
            if item["session_id"] == str(session_id) and all(item[k] == v for k, v in want.items()):
                return dict(item)
        return None

    return await wait_for(probe, f"session {session_id} with {want} in the history", 60, 0.2)


async def watch(
    bus: Bus, viewer: Viewer, title_id: str, start: float, positions: list[int], stop_at: int
) -> uuid.UUID:
    """A whole session: start, a heartbeat per position (10 s apart), stop."""
    session = uuid.uuid4()
    events: list[Any] = [viewer.started(session, title_id, at(start))]
    for i, position in enumerate(positions, 1):
        events.append(viewer.heartbeat(session, title_id, at(start + 10 * i), position, sequence=i))
    events.append(viewer.stopped(session, title_id, at(start + 10 * len(positions) + 5), stop_at))
    await bus.playback(*events)
    return session


def live_writetimes(cql: Session, keyspace: str, viewer: Viewer) -> dict[str, int]:
    rows = cql.execute(
        f"SELECT session_id, WRITETIME(position_ms) AS w FROM {keyspace}.live_vh WHERE profile_id = %s",
        [viewer.profile_id],
    )
    return {str(r["session_id"]): int(r["w"]) for r in rows}


async def test_heartbeats_and_a_stop_leave_the_title_at_its_last_position(
    start_history: Any, bus: Bus
) -> None:
    history: History = await start_history()
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)

    session = await watch(bus, viewer, "tt0111161", 0, [10_000, 20_000, 30_000], 35_000)

    item = await item_of(history, viewer, session, position_ms=35_000)
    assert item == {
        "title_id": "tt0111161",
        "position_ms": 35_000,
        "watched_at": iso(at(0)),
        "session_id": str(session),
        "completed": False,
    }
    body = await history.history(viewer)
    assert body["source"] == "live" and len(body["items"]) == 1
    assert await history.resume(viewer, "tt0111161") == 35_000
    assert await history.resume(viewer, "tt9999999") == 0, "a title never watched resumes at the start"


async def test_a_redelivered_event_changes_nothing(
    start_history: Any, bus: Bus, cql: Session, keyspace: str
) -> None:
    history: History = await start_history()
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    session = uuid.uuid4()
    beat = viewer.heartbeat(session, "tt0068646", at(10), 600_000)
    stop = viewer.stopped(session, "tt0068646", at(20), 610_000)
    await bus.playback(viewer.started(session, "tt0068646", at(0)), beat, stop)
    await item_of(history, viewer, session, position_ms=610_000)
    before = (await history.history(viewer), await history.resume(viewer, "tt0068646"))
    written = await asyncio.to_thread(live_writetimes, cql, history.keyspace, viewer)

    await bus.playback(beat, stop)  # the same events again: same event ids
    await history.processed(await bus.playback(beat))

    after = (await history.history(viewer), await history.resume(viewer, "tt0068646"))
    assert after == before
    assert await asyncio.to_thread(live_writetimes, cql, history.keyspace, viewer) == written, (
        "a redelivered event is not even written again"
    )


async def test_an_out_of_order_heartbeat_does_not_move_the_position_back(
    start_history: Any, bus: Bus
) -> None:
    history: History = await start_history()
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    title = "tt0133093"
    session = uuid.uuid4()
    await bus.playback(
        viewer.started(session, title, at(1000)),
        viewer.heartbeat(session, title, at(1020), 200_000, sequence=2),
    )
    await item_of(history, viewer, session, position_ms=200_000)

    late = viewer.heartbeat(session, title, at(1010), 100_000, sequence=1)
    await history.processed(await bus.playback(late))
    await item_of(history, viewer, session, position_ms=200_000)
    assert await history.resume(viewer, title) == 200_000

    # A newer event of the same session may move it back: the viewer seeked back.
    await bus.playback(viewer.heartbeat(session, title, at(1030), 50_000, sequence=3))
    await item_of(history, viewer, session, position_ms=50_000)
    assert await history.resume(viewer, title) == 50_000

    # A late event of an older session of the same title leaves the resume point alone.
    older = uuid.uuid4()
    stale = viewer.heartbeat(older, title, at(10), 900_000)
    await history.processed(await bus.playback(stale))
    await item_of(history, viewer, older, position_ms=900_000)
    assert await history.resume(viewer, title) == 50_000
    items = (await history.history(viewer))["items"]
    assert [i["session_id"] for i in items] == [str(session), str(older)], "newest first"


async def test_after_a_rollup_the_full_read_is_unchanged_and_the_recent_read_is_live_only(
    start_history: Any, bus: Bus, cql: Session
) -> None:
    history: History = await start_history(HISTORY_CHUNK_BYTES="64")
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    sessions = [
        await watch(bus, viewer, f"tt00000{i:02d}", 3600 * i, [60_000 * i], 60_000 * i + 1000)
        for i in range(6)
    ]
    await item_of(history, viewer, sessions[0], position_ms=1000)
    for i, session in enumerate(sessions):
        await item_of(history, viewer, session, position_ms=60_000 * i + 1000)
    full_before = await history.history(viewer, full=True)
    assert [i["session_id"] for i in full_before["items"]] == [str(s) for s in reversed(sessions)]
    assert full_before["source"] == "live+compressed"

    rolled = await history.rollup(viewer, keep_live=2)
    assert rolled["rolled"] == 4 and rolled["record_count"] == 4
    assert rolled["chunk_count"] > 1, "64-byte chunks: the compressed records span several rows"
    assert await history.history(viewer, full=True) == full_before
    recent = await history.history(viewer)
    assert recent == {"items": full_before["items"][:2], "source": "live"}

    again = await history.rollup(viewer, keep_live=0)
    assert again["rolled"] == 2 and again["record_count"] == 6 and again["generation"] == 2
    assert await history.history(viewer, full=True) == full_before
    assert (await history.history(viewer))["items"] == []
    versions = await asyncio.to_thread(
        lambda: {
            r["rollup_version"]
            for r in cql.execute(
                f"SELECT rollup_version FROM {history.keyspace}.compressed_vh_chunks "
                "WHERE profile_id = %s ALLOW FILTERING",
                [viewer.profile_id],
            )
        }
    )
    assert {str(v) for v in versions} == {again["rollup_version"]}, "the older version was deleted"
    assert await history.history(viewer, full=True, limit=3) == {
        "items": full_before["items"][:3],
        "source": "live+compressed",
    }

    # A redelivered stop of a rolled-up session does not bring it back into LiveVH ...
    newest = sessions[-1]
    stop = viewer.stopped(newest, "tt0000005", at(3600 * 5 + 15), 60_000 * 5 + 1000)
    await history.processed(await bus.playback(stop))
    assert (await history.history(viewer))["items"] == []
    # ... while a genuinely newer event does, and the full read shows the session once, updated.
    await bus.playback(viewer.heartbeat(newest, "tt0000005", at(3600 * 5 + 30), 7_000, sequence=9))
    await item_of(history, viewer, newest, position_ms=7_000)
    full = (await history.history(viewer, full=True))["items"]
    assert [i["session_id"] for i in full] == [str(s) for s in reversed(sessions)]
    assert full[0]["position_ms"] == 7_000 and full[1:] == full_before["items"][1:]
    assert await history.resume(viewer, "tt0000005") == 7_000


async def test_the_periodic_rollup_keeps_the_newest_live_and_the_service_stops_cleanly(
    start_history: Any, bus: Bus
) -> None:
    history: History = await start_history(
        HISTORY_ROLLUP_INTERVAL="0.5", HISTORY_ROLLUP_KEEP_LIVE="2", HISTORY_ROLLUP_AFTER="0"
    )
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    sessions = [await watch(bus, viewer, f"tt40000{i:02d}", 600 * i, [1000], 2000) for i in range(5)]
    newest_first = [str(s) for s in reversed(sessions)]

    async def rolled_up() -> bool:
        recent = [i["session_id"] for i in (await history.history(viewer))["items"]]
        full = [i["session_id"] for i in (await history.history(viewer, full=True))["items"]]
        return recent == newest_first[:2] and full == newest_first

    await wait_for(rolled_up, "the periodic rollup to keep two live records", 60, 0.3)
    assert "periodic rollup moved" in history.process.output()

    history.process.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(history.process.proc.wait, 15)
    assert code == 0, history.process.output()[-3000:]
    assert "shutdown complete" in history.process.output()


async def test_a_reader_concurrent_with_many_rollups_never_misses_or_doubles_a_record(
    start_history: Any, bus: Bus
) -> None:
    history: History = await start_history(HISTORY_CHUNK_BYTES="128")
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    initial = [await watch(bus, viewer, f"tt10000{i:02d}", 600 * i, [30_000], 31_000) for i in range(8)]
    for session in initial:
        await item_of(history, viewer, session, position_ms=31_000)
    baseline = {i["session_id"]: i for i in (await history.history(viewer, full=True))["items"]}
    assert len(baseline) == 8

    published: list[uuid.UUID] = list(initial)
    # Once a record is visible, it must stay visible to every read that starts after the read that saw
    # it returned (two readers run at once: a read already under way may not have it yet).
    seen: dict[str, float] = dict.fromkeys(baseline, 0.0)  # id -> when the read that saw it returned
    reads = rollups = moved = 0
    deadline = time.monotonic() + 30
    done = asyncio.Event()

    async def writer() -> None:
        n = 8
        while not done.is_set() and n < 60:
            published.append(await watch(bus, viewer, f"tt20000{n:02d}", 600 * n, [40_000], 41_000))
            n += 1
            await asyncio.sleep(0.15)

    async def roller() -> None:
        nonlocal rollups, moved
        while not done.is_set():
            result = await history.rollup(viewer, keep_live=random.choice([0, 1, 3]), force=True)
            rollups += 1
            moved += result["rolled"]

    async def reader() -> None:
        nonlocal reads
        while not done.is_set():
            started = time.monotonic()
            items = (await history.history(viewer, full=True))["items"]
            returned = time.monotonic()
            ids = [i["session_id"] for i in items]
            doubled = [s for s, n in Counter(ids).items() if n > 1]
            assert not doubled, f"read {reads}: doubled {doubled}"
            missing = {s for s, at in seen.items() if at < started} - set(ids)
            assert not missing, f"read {reads}: {len(missing)} record(s) seen before are missing: {missing}"
            for item in items:
                if item["session_id"] in baseline:
                    assert item == baseline[item["session_id"]]
            for s in ids:
                seen.setdefault(s, returned)
            reads += 1
            if (reads >= 60 and rollups >= 60) or time.monotonic() > deadline:
                done.set()

    tasks = [asyncio.create_task(f()) for f in (writer, roller, reader, reader)]
    try:
        await asyncio.gather(*tasks)
    finally:
        done.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert rollups >= 20 and reads >= 20, (rollups, reads)
    assert moved >= 10, f"the rollups moved live records while the reader read ({moved})"
    print(f"{rollups} rollups moving {moved} records, {reads} full reads, {len(published)} sessions")

    async def all_there() -> bool:
        items = (await history.history(viewer, full=True))["items"]
        return sorted(i["session_id"] for i in items) == sorted(str(s) for s in published)

    await wait_for(all_there, "every published session in the full history", 60, 0.2)


async def views_for(
    layout: Layout, contracts: Contracts, since_ms: int, viewer: Viewer, history: History
) -> list[ViewRecorded]:
    """The ViewRecorded events this test's history process published for the viewer's profile on the
    declared topic since ``since_ms`` (a history service of a running stack consumes the same
    playback events, and publishes its own)."""
    producer = f"history-{socket.gethostname()}-{history.process.proc.pid}".encode()
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    topic = contracts.topic(VIEWS)
    messages = await asyncio.to_thread(
        lambda: list(read(layout.bootstrap_servers, VIEWS, None, since_ms, follow=False, limit=None))
    )
    found: list[ViewRecorded] = []
    for msg in messages:
        event = await serde.decode_event(topic, msg.value)
        if dict(msg.headers).get("reelbus.producer") != producer:
            continue
        if isinstance(event, ViewRecorded) and event.profile_id == viewer.profile_id:
            assert await serde.decode_key(msg.key) == str(viewer.profile_id)
            found.append(event)
    return found


async def test_view_recorded_is_published_exactly_once_per_stopped_session(
    start_history: Any, bus: Bus, bus_infra: Layout, contracts: Contracts
) -> None:
    since_ms = int(time.time() * 1000) - 1000
    history: History = await start_history()
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    first, second = uuid.uuid4(), uuid.uuid4()
    stop_first = viewer.stopped(first, "tt0468569", at(100), 5_400_000, 5_300_000, StopReason.COMPLETED)
    stop_second = viewer.stopped(second, "tt1375666", at(300), 1_000_000, 900_000)
    await bus.playback(
        viewer.started(first, "tt0468569", at(0), duration_ms=5_500_000),
        viewer.heartbeat(first, "tt0468569", at(50), 2_000_000),
        stop_first,
        stop_first,  # redelivered
        viewer.started(second, "tt1375666", at(200), duration_ms=8_880_000),
        stop_second,
        stop_second,
    )
    # playback sending a second stop for the session, with a new event id
    last = await bus.playback(viewer.stopped(second, "tt1375666", at(301), 1_000_000, 900_000))
    await history.processed(last)
    await item_of(history, viewer, first, position_ms=5_400_000, completed=True)
    await item_of(history, viewer, second, position_ms=1_000_000, completed=False)

    async def both() -> list[ViewRecorded] | None:
        views = await views_for(bus_infra, contracts, since_ms, viewer, history)
        return views if {v.session_id for v in views} == {first, second} else None

    views = await wait_for(both, "the ViewRecorded events", 30, 0.5)
    assert Counter(v.session_id for v in views) == {first: 1, second: 1}
    by_session = {v.session_id: v for v in views}
    one, two = by_session[first], by_session[second]
    assert (one.account_id, one.title_id, one.position_ms, one.duration_ms) == (
        viewer.account_id,
        "tt0468569",
        5_400_000,
        5_500_000,
    )
    assert (one.watched_ms, one.watched_at, one.completed) == (5_300_000, at(100), True)
    assert (two.position_ms, two.duration_ms, two.watched_ms, two.completed) == (
        1_000_000,
        8_880_000,
        900_000,
        False,
    )
    assert two.watched_at == at(300), "when the viewing ended; the later, second stop published nothing"


async def test_authorisation(start_history: Any, bus: Bus, bus_infra: Layout) -> None:
    history: History = await start_history()
    owner, stranger = Viewer(), Viewer()
    await bus.profile(owner)
    await bus.profile(stranger)
    await history.known(owner)
    await history.known(stranger)
    paths = [
        f"/v1/profiles/{owner.profile_id}/history",
        f"/v1/profiles/{owner.profile_id}/history?full=true",
        f"/v1/profiles/{owner.profile_id}/titles/tt0000001/resume",
    ]
    for path in paths:
        status, body = await history.request("GET", path, history.token(owner))
        assert status == 200, (path, body)
        status, body = await history.request("GET", path, history.token(stranger))
        assert (status, body["error"], body["field"]) == (403, "forbidden", "profile_id"), (path, body)

        status, body = await history.request("GET", path, None)
        assert (status, body["field"]) == (401, "Authorization")
        assert "missing" in body["message"]
        expired = TokenIssuer(
            load_private_key(bus_infra.home / "keys" / "token-signing.pem"), ttl_seconds=-60
        )
        status, body = await history.request(
            "GET", path, expired.issue(str(owner.account_id), "device-1", "TV")
        )
        assert (status, body["message"]) == (401, "access token expired")
        forged = TokenIssuer(Ed25519PrivateKey.generate()).issue(str(owner.account_id), "device-1", "TV")
        status, body = await history.request("GET", path, forged)
        assert (status, body["message"]) == (401, "access token signature does not verify")
        status, body = await history.request("GET", path, "not-a-token")
        assert status == 401
        status, body = await history.request("GET", path, None, {"Authorization": "Basic dXNlcjpwdw=="})
        assert status == 401

    nobody = Viewer()
    status, body = await history.request(
        "GET", f"/v1/profiles/{nobody.profile_id}/history", history.token(nobody)
    )
    assert (status, body["error"], body["field"]) == (404, "not_found", "profile_id")

    rollup = f"/v1/internal/history/{owner.profile_id}/rollup"
    status, body = await history.request("POST", rollup, history.token(owner))
    assert (status, body["error"]) == (403, "forbidden"), "rollups need the history:admin scope"
    status, body = await history.request("POST", rollup, None)
    assert status == 401
    status, body = await history.request("POST", rollup, history.admin_token())
    assert status == 200 and body["rolled"] == 0


BAD_REQUESTS = [
    ("/v1/profiles/{p}/history?limit=ten", "limit"),
    ("/v1/profiles/{p}/history?limit=0", "limit"),
    ("/v1/profiles/{p}/history?limit=100000", "limit"),
    ("/v1/profiles/{p}/history?full=perhaps", "full"),
    ("/v1/profiles/not-a-uuid/history", "profile_id"),
    ("/v1/profiles/not-a-uuid/titles/tt1/resume", "profile_id"),
    ("/v1/profiles/{p}/titles/tt%20bad%20id/resume", "title_id"),
    ("/v1/profiles/{p}/titles/" + "t" * 65 + "/resume", "title_id"),
]


async def test_bad_query_params_are_a_400_naming_the_field(start_history: Any, bus: Bus) -> None:
    history: History = await start_history()
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    for path, field in BAD_REQUESTS:
        status, body = await history.request("GET", path.format(p=viewer.profile_id), history.token(viewer))
        assert status == 400, (path, body)
        assert (body["error"], body["field"]) == ("bad_request", field), (path, body)
        assert field in body["message"], (path, body)
    admin = history.admin_token()
    rollup = f"/v1/internal/history/{viewer.profile_id}/rollup"
    for query, field in [
        ("?keep_live=-1", "keep_live"),
        ("?keep_live=x", "keep_live"),
        ("?force=2", "force"),
    ]:
        status, body = await history.request("POST", rollup + query, admin)
        assert (status, body["field"]) == (400, field), (query, body)


async def test_the_trace_goes_from_the_event_through_history_to_cassandra_and_the_view(
    start_history: Any, bus: Bus, bus_infra: Layout, tracing: TracerProvider
) -> None:
    # A name of its own: a running stack's history service consumes the same events and traces them.
    name = unique("history")
    history: History = await start_history(OTEL_SERVICE_NAME=name)
    viewer = Viewer()
    await bus.profile(viewer)
    await history.known(viewer)
    session = uuid.uuid4()
    await bus.playback(viewer.started(session, "tt0076759", at(0)))
    with trace.get_tracer("tests").start_as_current_span(
        "playback request", kind=trace.SpanKind.CLIENT
    ) as root:
        await bus.playback(viewer.stopped(session, "tt0076759", at(60), 60_000))
    trace_id = format(root.get_span_context().trace_id, "032x")
    tracing.force_flush()

    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = http_json(f"{bus_infra.zipkin_url}/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:
            return None
        names = {s.get("name", "") for s in found if s["localEndpoint"]["serviceName"] == name}
        ready = "send history.views" in names and any(n.startswith("cassandra ") for n in names)
        return found if ready else None

    found = await wait_for(lambda: asyncio.to_thread(spans), "the history spans in Zipkin", 30, 0.5)
    producer = next(s for s in found if s["kind"] == "PRODUCER" and s["name"] == "send playback.events")
    consumer = next(s for s in found if s["kind"] == "CONSUMER" and s["localEndpoint"]["serviceName"] == name)
    assert consumer["parentId"] == producer["id"]
    assert consumer["tags"]["reelbus.profile_id"] == str(viewer.profile_id)
    assert consumer["tags"]["reelbus.playback.title_id"] == "tt0076759"
    ours = [s for s in found if s["localEndpoint"]["serviceName"] == name]
    writes = [s for s in ours if s["kind"] == "CLIENT" and s["name"].startswith("cassandra ")]
    assert any("live_vh" in s["name"] for s in writes), [s["name"] for s in writes]
    assert all(s["parentId"] == consumer["id"] for s in writes)
    assert {s["tags"]["db.system.name"] for s in writes} == {"cassandra"}
    view = next(s for s in ours if s["name"] == "send history.views")
    assert view["parentId"] == consumer["id"] and view["kind"] == "PRODUCER"
