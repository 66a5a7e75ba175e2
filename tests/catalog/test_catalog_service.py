"""The catalog as a process against the real PostgreSQL, Redis, Kafka and registry."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import signal
import time
import uuid
from typing import Any

import asyncpg
import pytest

from services.bus.contracts import Contracts
from services.bus.events import ChangeType, TitleChanged
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.catalog.seed import generate_titles
from services.catalog.titles import GENRES, LADDER_RUNGS_KBPS, MATURITY_RATINGS
from services.cli.infra import Layout
from tests.catalog.conftest import TITLE_BODY, TOPIC, WRITE, Api, ChangesTail, Response, StartCatalog, metric
from tests.conftest import ServiceProcess, free_port, unique, wait_for

pytestmark = pytest.mark.infra
TITLES = "/v1/catalog/titles"


async def all_titles(api: Api, service: ServiceProcess, query: str = "") -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while True:
        page = await api.get(service, f"{TITLES}?limit=100&offset={len(items)}{query}")
        assert page.status == 200, page
        items += page.body["items"]
        if len(items) >= page.body["total"] or not page.body["items"]:
            return items


async def count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def stop(service: ServiceProcess) -> int:
    service.proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(service.proc.wait, 30)


def assert_field_error(resp: Response, status: int, field: str) -> None:
    assert resp.status == status, resp
    assert set(resp.body) >= {"error", "message", "field"}, resp.body
    assert str(resp.body["field"]).split(".")[0] == field, resp.body


async def test_the_seeded_catalog_has_300_titles_and_seeding_is_idempotent_across_restarts(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api, changes: ChangesTail
) -> None:
    # Two replicas start together on an empty database: the seed is written once.
    first, second = await asyncio.gather(
        start_catalog(catalog_db, cache_prefix), start_catalog(catalog_db, cache_prefix)
    )
    titles = await all_titles(api, first)
    expected = generate_titles(300)
    assert len(titles) == 300 and len({t["title_id"] for t in titles}) == 300
    by_id = {t["title_id"]: t for t in titles}
    for want in expected:
        got = by_id[want.title_id]
        assert got["name"] == want.name and tuple(got["genres"]) == want.genres
        assert got["runtime_ms"] == want.runtime_ms and got["release_year"] == want.release_year
        assert got["maturity_rating"] == want.maturity_rating
        assert tuple(got["ladder_kbps"]) == want.ladder_kbps
        assert got["version"] == 1 and dt.datetime.fromisoformat(got["updated_at"])
    for t in titles:
        assert 1 <= len(t["genres"]) <= 3 and set(t["genres"]) <= set(GENRES)
        assert 20 * 60_000 <= t["runtime_ms"] <= 181 * 60_000
        assert t["maturity_rating"] in MATURITY_RATINGS
        assert t["ladder_kbps"] == sorted(t["ladder_kbps"]) and set(t["ladder_kbps"]) <= set(
            LADDER_RUNGS_KBPS
        )
    assert await count(catalog_db, "SELECT count(*) FROM titles") == 300

    # A CREATED event per seeded title, with its snapshot, reaches catalog.changes.
    seeded_ids = {w.title_id for w in expected}

    def every_title_created(found: list[TitleChanged]) -> bool:
        return {e.title_id for e in found if e.change == ChangeType.CREATED} >= seeded_ids

    events = await changes.wait_for_events(every_title_created, seeded_ids, "a CREATED event per title", 60)
    created = {e.title_id: e for e in events if e.change == ChangeType.CREATED}
    for want in expected:
        event = created[want.title_id]
        assert event.title_version == 1 and event.fields_changed == []
        assert event.title is not None and event.title.name == want.name
        assert event.title.ladder_kbps == list(want.ladder_kbps)
    assert await count(catalog_db, "SELECT count(*) FROM outbox") == 0, "the outbox was relayed"

    # Restart: nothing is seeded again.
    assert await stop(first) == 0
    assert await stop(second) == 0
    again = await start_catalog(catalog_db, cache_prefix)
    assert "seeded the catalog" not in again.output()
    page = await api.get(again, f"{TITLES}?limit=1")
    assert page.body["total"] == 300
    assert await count(catalog_db, "SELECT count(*) FROM titles") == 300
    assert await count(catalog_db, "SELECT count(*) FROM outbox") == 0
    assert await count(catalog_db, "SELECT max(version) FROM titles") == 1


async def test_list_pages_and_the_genre_filter(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(catalog_db, cache_prefix)
    default = await api.get(service, TITLES)
    assert default.status == 200 and default.body["limit"] == 20 and default.body["offset"] == 0
    assert len(default.body["items"]) == 20 and default.body["total"] == 300
    second = await api.get(service, f"{TITLES}?limit=20&offset=20")
    ids = [t["title_id"] for t in default.body["items"] + second.body["items"]]
    assert ids == sorted(ids) and len(set(ids)) == 40, "pages are ordered by id and do not overlap"
    tail = await api.get(service, f"{TITLES}?limit=100&offset=290")
    assert len(tail.body["items"]) == 10
    past = await api.get(service, f"{TITLES}?offset=300")
    assert past.status == 200 and past.body["items"] == [] and past.body["total"] == 300

    everything = await all_titles(api, service)
    for genre in ("drama", "sci-fi", "kids"):
        filtered = await all_titles(api, service, f"&genre={genre}")
        assert filtered and all(genre in t["genres"] for t in filtered)
        assert {t["title_id"] for t in filtered} == {
            t["title_id"] for t in everything if genre in t["genres"]
        }

    for query, field in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
        ("genre=western", "genre"),
        ("genre=DRAMA", "genre"),
    ]:
        assert_field_error(await api.get(service, f"{TITLES}?{query}"), 400, field)


async def test_get_by_id_and_unknown_or_malformed_ids(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="20")
    want = generate_titles(20)[6]
    got = await api.get(service, f"{TITLES}/{want.title_id}")
    assert got.status == 200
    assert got.body["title_id"] == want.title_id and got.body["name"] == want.name
    assert set(got.body) == {
        "title_id",
        "name",
        "genres",
        "runtime_ms",
        "release_year",
        "maturity_rating",
        "ladder_kbps",
        "version",
        "updated_at",
    }
    assert_field_error(await api.get(service, f"{TITLES}/tt9999999"), 404, "title_id")
    assert_field_error(await api.get(service, f"{TITLES}/tt12"), 400, "title_id")
    assert_field_error(await api.get(service, f"{TITLES}/nm0000001"), 400, "title_id")
    unauthenticated = await api.get(service, f"{TITLES}/{want.title_id}", token=None)
    assert unauthenticated.status == 401 and unauthenticated.body["field"] == "Authorization"
    forged = await api.get(service, f"{TITLES}/{want.title_id}", token="not.a.token")
    assert forged.status == 401


async def test_a_miss_then_a_hit_for_titles_and_pages_with_counters(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="20")
    title = await api.create(service, name="Cache Me If You Can")
    path = f"{TITLES}/{title['title_id']}"
    hits = await metric(service, api, "catalog_cache_hits_total", kind="title")
    misses = await metric(service, api, "catalog_cache_misses_total", kind="title")

    first = await api.get(service, path)
    assert first.status == 200 and first.cache == "miss"
    second = await api.get(service, path)
    assert second.cache == "hit" and second.body == first.body
    assert await metric(service, api, "catalog_cache_misses_total", kind="title") == misses + 1
    assert await metric(service, api, "catalog_cache_hits_total", kind="title") == hits + 1

    # Pages: any change event (ours or another catalog's seeding) starts a new list generation, so
    # ask until a repeated request is answered from the cache. Each try asks for a page not asked
    # before, so its first request is a miss whatever the generation: once the cache has cached a page
    # under the last generation, asking that page again would only ever hit.
    tries = iter(range(3, 1000))

    async def miss_then_hit() -> tuple[Response, Response] | None:
        page = f"{TITLES}?limit=7&offset={next(tries)}&genre=documentary"
        a, b = await api.get(service, page), await api.get(service, page)
        assert a.cache == "miss", "a page never asked before cannot be cached"
        return (a, b) if b.cache == "hit" else None

    miss, hit = await wait_for(miss_then_hit, "a page miss followed by a hit", 30)
    assert hit.body == miss.body and hit.body["limit"] == 7
    assert await metric(service, api, "catalog_cache_hits_total", kind="list") >= 1


async def test_a_cached_title_expires_after_the_ttl(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(
        catalog_db, cache_prefix, CATALOG_SEED_TITLES="5", CATALOG_CACHE_TTL_SECONDS="1"
    )
    title = await api.create(service)
    path = f"{TITLES}/{title['title_id']}"
    assert (await api.get(service, path)).cache == "miss"
    filled = time.monotonic()
    assert (await api.get(service, path)).cache == "hit"

    async def expired() -> Response | None:
        resp = await api.get(service, path)
        return resp if resp.cache == "miss" else None

    resp = await wait_for(expired, "the cached title to expire", timeout=10, interval=0.05)
    assert time.monotonic() - filled >= 0.9, "not before the TTL"
    assert resp.body["title_id"] == title["title_id"]


async def test_an_update_through_one_replica_invalidates_the_other_replicas_cache(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api, changes: ChangesTail
) -> None:
    a = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="20")
    b = await start_catalog(catalog_db, cache_prefix)
    title = await api.create(a, name="Before The Change")
    path = f"{TITLES}/{title['title_id']}"
    page = f"{TITLES}?offset=20&limit=5"  # 20 seeded titles, then ours

    async def cached_on_b(p: str) -> Response | None:
        resp = await api.get(b, p)
        return resp if resp.cache == "hit" else None

    cached = await wait_for(lambda: cached_on_b(path), "the title cached on replica B", 30)
    assert cached.body["name"] == "Before The Change" and cached.body["version"] == 1
    cached_page = await wait_for(lambda: cached_on_b(page), "the page cached on replica B", 30)
    assert [t["name"] for t in cached_page.body["items"]] == ["Before The Change"]
    updates = "catalog_cache_invalidations_total"
    invalidated = [await metric(s, api, updates, change="UPDATED") for s in (a, b)]

    put = await api.call(a, "PUT", path, {"name": "After The Change", "ladder_kbps": [235, 560]}, WRITE)
    assert put.status == 200 and put.body["version"] == 2 and put.body["name"] == "After The Change"

    async def changed_on_b(p: str, name: str) -> list[Response] | None:
        seen.append(await api.get(b, p))
        return seen if name in str(seen[-1].body) else None

    seen: list[Response] = []
    responses = await wait_for(lambda: changed_on_b(path, "After The Change"), "B to serve the change", 30)
    assert responses[-1].cache == "miss", "the first read of the new data comes from PostgreSQL"
    assert all(r.body["name"] == "Before The Change" for r in responses[:-1])
    assert responses[-1].body["version"] == 2 and responses[-1].body["ladder_kbps"] == [235, 560]
    again = await api.get(b, path)
    assert again.cache == "hit" and again.body == responses[-1].body

    seen = []
    pages = await wait_for(lambda: changed_on_b(page, "After The Change"), "B to serve the new page", 30)
    assert pages[-1].cache == "miss"

    # Both replicas consumed the event (each in its own group), not one of them.
    for replica, before in zip((a, b), invalidated, strict=True):
        await wait_for(
            functools.partial(updated_events_above, replica, api, before),
            f"replica on port {replica.port} to handle the UPDATED event",
            30,
        )
    events = await changes.wait_for_events(
        lambda found: any(e.change == ChangeType.UPDATED for e in found),
        {title["title_id"]},
        "the UPDATED event",
    )
    updated = next(e for e in events if e.change == ChangeType.UPDATED)
    assert updated.title_version == 2 and updated.fields_changed == ["name", "ladder_kbps"]
    assert updated.title is not None and updated.title.name == "After The Change"


async def updated_events_above(service: ServiceProcess, api: Api, before: float) -> bool:
    return await metric(service, api, "catalog_cache_invalidations_total", change="UPDATED") > before


async def test_title_changed_events_carry_the_snapshot_and_the_version(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api, changes: ChangesTail
) -> None:
    service = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="5")
    title = await api.create(service, name="Evented", genres=["sci-fi", "drama"])
    title_id = title["title_id"]
    path = f"{TITLES}/{title_id}"
    trace_id = uuid.uuid4().hex
    traceparent = {"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"}
    put = await api.call(service, "PUT", path, {"runtime_ms": 6_000_000}, WRITE, headers=traceparent)
    assert put.status == 200
    same = await api.call(service, "PUT", path, {"runtime_ms": 6_000_000}, WRITE)
    assert same.status == 200 and same.body["version"] == 2, "a change to the same value is no change"
    assert (await api.call(service, "DELETE", path, scopes=WRITE)).status == 204
    assert_field_error(await api.get(service, path), 404, "title_id")
    assert_field_error(await api.call(service, "DELETE", path, scopes=WRITE), 404, "title_id")

    events = await changes.wait_for_events(lambda found: len(found) >= 3, {title_id}, "three events")
    assert [(e.change, e.title_version) for e in events] == [
        (ChangeType.CREATED, 1),
        (ChangeType.UPDATED, 2),
        (ChangeType.DELETED, 3),
    ]
    created, updated, deleted = events
    assert created.title is not None and created.title.name == "Evented"
    assert created.title.genres == ["sci-fi", "drama"] and created.title.ladder_kbps == [235, 750, 1750, 3000]
    assert updated.fields_changed == ["runtime_ms"]
    assert updated.title is not None and updated.title.runtime_ms == 6_000_000
    assert deleted.title is None
    assert len({e.event_id for e in events}) == 3

    # The update's event continues the request's trace (through the outbox) in its Kafka headers.
    headers = next(h for key, e, h in await changes.records() if e.event_id == updated.event_id)
    assert headers["traceparent"].decode().split("-")[1] == trace_id
    assert headers["reelbus.event-type"] == b"reelbus.catalog.TitleChanged"

    # Re-created, it goes on from the deleted version, so no cache takes it for older data.
    again = await api.create(service, title_id=title_id, name="Back Again")
    assert again["version"] == 4
    taken = await api.call(service, "POST", TITLES, {**TITLE_BODY, "title_id": title_id}, WRITE)
    assert_field_error(taken, 409, "title_id")


async def test_a_stale_event_does_not_resurrect_old_data(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api, bus_infra: Layout
) -> None:
    service = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="5")
    title = await api.create(service, name="Version One")
    path = f"{TITLES}/{title['title_id']}"
    put = await api.call(service, "PUT", path, {"name": "Version Two"}, WRITE)
    assert put.body["version"] == 2

    async def cached_v2() -> Response | None:
        resp = await api.get(service, path)
        return resp if resp.cache == "hit" and resp.body["version"] == 2 else None

    await wait_for(cached_v2, "version 2 cached", 30)
    stale_before = await metric(service, api, "catalog_cache_invalidations_total", outcome="stale")

    # A redelivered event of version 1 arrives late.
    contracts = Contracts.load()
    producer = Producer(
        ProducerConfig(bus_infra.bootstrap_servers, client_id=unique("test-producer")),
        contracts,
        Serde(contracts, RegistryClient(bus_infra.registry_url)),
    )
    await producer.start([TOPIC])
    try:
        await producer.send(
            TOPIC,
            title["title_id"],
            TitleChanged(
                event_id=uuid.uuid4(),
                title_id=title["title_id"],
                change=ChangeType.CREATED,
                fields_changed=[],
                title_version=1,
                title=None,
            ),
        )
    finally:
        await producer.close()

    async def handled() -> bool:
        return await metric(service, api, "catalog_cache_invalidations_total", outcome="stale") > stale_before

    await wait_for(handled, "the stale event to be handled", 30)
    resp = await api.get(service, path)
    assert resp.cache == "hit" and resp.body["name"] == "Version Two" and resp.body["version"] == 2


async def test_without_the_cache_reads_are_served_from_postgres(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(
        catalog_db,
        cache_prefix,
        CATALOG_SEED_TITLES="0",
        CATALOG_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    conn = await asyncpg.connect(catalog_db)
    try:
        await conn.execute(
            "INSERT INTO titles (title_id, name, genres, runtime_ms, release_year, maturity_rating,"
            " ladder_kbps, version) VALUES ('tt0000077', 'No Cache', '{drama}', 5400000, 2020, 'PG',"
            " '{235,560}', 1)"
        )
    finally:
        await conn.close()
    for _ in range(2):
        got = await api.get(service, f"{TITLES}/tt0000077")
        assert got.status == 200 and got.cache == "miss" and got.body["name"] == "No Cache"
        page = await api.get(service, f"{TITLES}?genre=drama")
        assert page.status == 200 and page.cache == "miss" and page.body["total"] == 1
    assert await metric(service, api, "catalog_cache_errors_total") >= 4


async def test_writes_need_the_catalog_write_scope(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="5")
    path = f"{TITLES}/tt0000001"
    for scopes in ([], ["catalog:read"], ["playback:write"]):
        put = await api.call(service, "PUT", path, {"name": "Hijacked"}, scopes)
        assert_field_error(put, 403, "Authorization")
        assert_field_error(await api.call(service, "DELETE", path, scopes=scopes), 403, "Authorization")
        post = await api.call(service, "POST", TITLES, {"name": "x"}, scopes)
        assert_field_error(post, 403, "Authorization")
    assert (await api.call(service, "PUT", path, {"name": "Hijacked"}, token=None)).status == 401
    read = await api.get(service, path, scopes=[])
    assert read.status == 200 and read.body["version"] == 1 and read.body["name"] != "Hijacked"
    assert await count(catalog_db, "SELECT max(version) FROM titles") == 1


async def test_bad_input_is_a_4xx_naming_the_field_and_changes_nothing(
    start_catalog: StartCatalog, catalog_db: str, cache_prefix: str, api: Api
) -> None:
    service = await start_catalog(catalog_db, cache_prefix, CATALOG_SEED_TITLES="5")
    path = f"{TITLES}/tt0000002"
    cases: list[tuple[Any, int, str]] = [
        ({"name": ""}, 422, "name"),
        ({"name": None}, 422, "name"),
        ({"genres": ["western"]}, 422, "genres"),
        ({"genres": []}, 422, "genres"),
        ({"runtime_ms": "long"}, 422, "runtime_ms"),
        ({"runtime_ms": 0}, 422, "runtime_ms"),
        ({"maturity_rating": "R18"}, 422, "maturity_rating"),
        ({"ladder_kbps": [3000, 235]}, 422, "ladder_kbps"),
        ({"ladder_kbps": "235,560"}, 422, "ladder_kbps"),
        ({"version": 7}, 422, "version"),
        ({"title_id": "tt0000003"}, 422, "title_id"),
        ({}, 400, "body"),
    ]
    for body, status, field in cases:
        assert_field_error(await api.call(service, "PUT", path, body, WRITE), status, field)
    not_json = await api.call(service, "PUT", path, scopes=WRITE, raw=b"{name: x")
    assert not_json.status == 400 and not_json.body["error"] == "bad_request"
    array = await api.call(service, "PUT", path, scopes=WRITE, raw=b"[1, 2]")
    assert array.status == 400
    assert_field_error(
        await api.call(service, "PUT", f"{TITLES}/tt9999999", {"name": "x"}, WRITE), 404, "title_id"
    )
    assert_field_error(
        await api.call(service, "PUT", f"{TITLES}/TT0000002", {"name": "x"}, WRITE), 400, "title_id"
    )
    assert_field_error(await api.call(service, "POST", TITLES, {"name": "Half"}, WRITE), 422, "genres")
    huge = await api.call(service, "PUT", path, {"name": "x" * 70_000}, WRITE)
    assert huge.status == 413
    assert await count(catalog_db, "SELECT max(version) FROM titles") == 1
    assert await count(catalog_db, "SELECT count(*) FROM outbox") == 0
