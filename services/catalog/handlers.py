"""The catalog's business logic: plain async functions of (input, dependencies).

Reads are cache-aside (the cache first, PostgreSQL on a miss, then a version-checked fill); writes
change the title and add its ``TitleChanged`` to the outbox in one transaction; the change events,
consumed back by every replica, invalidate the cache.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from opentelemetry import trace

from services.bus.consumer import Record, Retryable
from services.bus.events import ChangeType, TitleChanged
from services.bus.http import ApiError
from services.bus.tracing import ATTR_ACCOUNT_ID, ATTR_TITLE_ID
from services.catalog import metrics
from services.catalog.adapters.cache import CacheUnavailable, TitleCache
from services.catalog.adapters.outbox import outbox_entry
from services.catalog.adapters.store import Store, Tx
from services.catalog.seed import generate_titles
from services.catalog.titles import GENRES, Title, TitleCreate, TitlePatch, apply_changes, valid_title_id

CHANGES_TOPIC = "catalog.changes"
WRITE_SCOPE = "catalog:write"

# Span attributes of the catalog (to move to services/bus/tracing.py, where the names are listed).
ATTR_CACHE = "reelbus.catalog.cache"
ATTR_TITLE_VERSION = "reelbus.catalog.title_version"
ATTR_CHANGE = "reelbus.catalog.change"

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _span_title(title_id: str, version: int | None = None) -> None:
    span = trace.get_current_span()
    span.set_attribute(ATTR_TITLE_ID, title_id)
    if version is not None:
        span.set_attribute(ATTR_TITLE_VERSION, version)


def _cache_outcome(kind: str, hit: bool) -> None:
    (metrics.CACHE_HITS if hit else metrics.CACHE_MISSES).labels(kind).inc()
    trace.get_current_span().set_attribute(ATTR_CACHE, "hit" if hit else "miss")


def check_title_id(title_id: str) -> str:
    if not valid_title_id(title_id):
        raise ApiError(400, f"title_id must be 'tt' and 7 digits, got {title_id!r}", field="title_id")
    return title_id


def check_genre(genre: str | None) -> str | None:
    if genre is None or genre == "":
        return None
    if genre not in GENRES:
        raise ApiError(400, f"genre must be one of {', '.join(GENRES)}; got {genre!r}", field="genre")
    return genre


def require_scope(scopes: tuple[str, ...], account_id: str, scope: str = WRITE_SCOPE) -> None:
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, account_id)
    if scope not in scopes:
        raise ApiError(403, f"this needs a token with the {scope!r} scope", field="Authorization")


def change_event(title: Title, change: ChangeType, fields: list[str], now: dt.datetime) -> TitleChanged:
    return TitleChanged(
        event_time=now.replace(microsecond=now.microsecond // 1000 * 1000),
        title_id=title.title_id,
        change=change,
        fields_changed=fields if change == ChangeType.UPDATED else [],
        title_version=title.version,
        title=None if change == ChangeType.DELETED else title.snapshot(),
    )


async def _record_change(
    tx: Tx, title: Title, change: ChangeType, fields: list[str], now: dt.datetime
) -> None:
    trace.get_current_span().set_attribute(ATTR_CHANGE, change.value)
    await tx.enqueue([outbox_entry(CHANGES_TOPIC, change_event(title, change, fields, now))])


# -- reads ----------------------------------------------------------------------------------


async def get_title(title_id: str, store: Store, cache: TitleCache) -> tuple[str, bool]:
    """The title's JSON and whether it came from the cache."""
    check_title_id(title_id)
    _span_title(title_id)
    cached = await cache.get_title(title_id)
    _cache_outcome("title", cached is not None)
    if cached is not None:
        return cached, True
    title = await store.get(title_id)
    if title is None:
        raise ApiError(404, f"no title {title_id}", field="title_id")
    body = json.dumps(title.to_json())
    await cache.put_title(title_id, title.version, body)
    return body, False


@dataclass(frozen=True, slots=True)
class PageQuery:
    limit: int
    offset: int
    genre: str | None

    @property
    def cache_key(self) -> str:
        return f"{self.genre or '*'}:{self.limit}:{self.offset}"


async def list_titles(query: PageQuery, store: Store, cache: TitleCache) -> tuple[str, bool]:
    """One page of titles ordered by id, as JSON, and whether it came from the cache."""
    generation, cached = await cache.get_page(query.cache_key)
    _cache_outcome("list", cached is not None)
    if cached is not None:
        return cached, True
    titles, total = await store.page(query.limit, query.offset, query.genre)
    body = json.dumps(
        {
            "items": [t.to_json() for t in titles],
            "total": total,
            "limit": query.limit,
            "offset": query.offset,
            "genre": query.genre,
        }
    )
    if generation is not None:
        await cache.put_page(generation, query.cache_key, body)
    return body, False


# -- writes ---------------------------------------------------------------------------------


async def update_title(title_id: str, patch: TitlePatch, store: Store, now: Clock = utc_now) -> Title:
    """Apply a partial change; the version moves (and an event is written) only if a field changed."""
    check_title_id(title_id)
    changes = patch.changes()
    if not changes:
        raise ApiError(400, "the body names no field to change", field="body")
    async with store.transaction() as tx:
        locked = await tx.lock(title_id)
        if locked is None or locked.deleted:
            raise ApiError(404, f"no title {title_id}", field="title_id")
        updated, changed = apply_changes(locked.title, changes, now())
        if changed:
            await tx.save(updated)
            await _record_change(tx, updated, ChangeType.UPDATED, changed, updated.updated_at)
    _span_title(title_id, updated.version)
    return updated


async def delete_title(title_id: str, store: Store, now: Clock = utc_now) -> int:
    """Delete the title (a tombstone keeps its version); the version of the deletion."""
    check_title_id(title_id)
    async with store.transaction() as tx:
        locked = await tx.lock(title_id)
        if locked is None or locked.deleted:
            raise ApiError(404, f"no title {title_id}", field="title_id")
        when = now()
        gone = replace(locked.title, version=locked.title.version + 1, updated_at=when)
        await tx.mark_deleted(title_id, gone.version, when)
        await _record_change(tx, gone, ChangeType.DELETED, [], when)
    _span_title(title_id, gone.version)
    return gone.version


def random_title_id(rng: random.Random | None = None) -> str:
    """An id outside the seeded range (``tt1000000`` and up)."""
    return f"tt{(rng or random.SystemRandom()).randint(1_000_000, 9_999_999):07d}"


async def create_title(
    body: TitleCreate, store: Store, now: Clock = utc_now, new_id: Callable[[], str] = random_title_id
) -> Title:
    """Create a title (or bring a deleted one back, one version on); 409 when the id is taken."""
    for _attempt in range(10):
        title_id = body.title_id or new_id()
        async with store.transaction() as tx:
            locked = await tx.lock(title_id)
            if locked is not None and not locked.deleted:
                if body.title_id:
                    raise ApiError(409, f"title {title_id} exists", field="title_id")
                continue  # a generated id that is taken: draw another
            when = now()
            title = Title(
                title_id=title_id,
                name=body.name,
                genres=tuple(body.genres),
                runtime_ms=body.runtime_ms,
                release_year=body.release_year,
                maturity_rating=body.maturity_rating,
                ladder_kbps=tuple(body.ladder_kbps),
                version=1 if locked is None else locked.title.version + 1,
                updated_at=when,
            )
            if locked is None:
                if not await tx.insert(title):
                    raise ApiError(409, f"title {title_id} exists", field="title_id")
            else:
                await tx.save(title)
            await _record_change(tx, title, ChangeType.CREATED, [], when)
        _span_title(title_id, title.version)
        return title
    raise ApiError(409, "could not find a free title id; try again", field="title_id")


# -- seed -----------------------------------------------------------------------------------


async def seed_catalog(store: Store, count: int, seed: int, now: Clock = utc_now) -> int:
    """Write the sample catalog (see ``seed.py``) and a CREATED event per title, in one transaction,
    only into a catalog that never had a title; how many titles were written."""
    if count <= 0:
        return 0
    generated = generate_titles(count, seed)
    async with store.transaction() as tx:
        if not await tx.is_empty():
            return 0
        when = now()
        titles = [
            Title(
                title_id=g.title_id,
                name=g.name,
                genres=g.genres,
                runtime_ms=g.runtime_ms,
                release_year=g.release_year,
                maturity_rating=g.maturity_rating,
                ladder_kbps=g.ladder_kbps,
                version=1,
                updated_at=when,
            )
            for g in generated
        ]
        await tx.insert_many(titles)
        await tx.enqueue(
            [outbox_entry(CHANGES_TOPIC, change_event(t, ChangeType.CREATED, [], when)) for t in titles]
        )
    return len(titles)


# -- events ---------------------------------------------------------------------------------


async def on_title_changed(event: TitleChanged, record: Record, *, cache: TitleCache) -> None:
    """Invalidate the title and the list pages; an event older than what the cache has seen changes
    nothing. Redis not answering is retryable."""
    _span_title(event.title_id, event.title_version)
    trace.get_current_span().set_attribute(ATTR_CHANGE, event.change.value)
    if not valid_title_id(event.title_id):
        # No catalog id looks like this, so nothing under it can be cached (reads reject it first).
        metrics.INVALIDATIONS.labels(event.change.value, "ignored").inc()
        return
    try:
        result = await cache.invalidate(event.title_id, event.title_version)
    except CacheUnavailable as exc:
        raise Retryable(str(exc)) from exc
    metrics.INVALIDATIONS.labels(event.change.value, "applied" if result.newer else "stale").inc()
