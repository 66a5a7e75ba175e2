"""The catalog's cache in Redis, in the role EVCache plays at Netflix: cache-aside, invalidated by
change events, shared by every replica that uses the same key prefix.

Keys (``P`` is the prefix):

- ``P title:<id>``: ``"<version>:<json>"``, the title as served, with the ``title_version`` it was read
  at; expires after the TTL.
- ``P title-seen:<id>``: the highest ``title_version`` any change event carried for the title;
  expires after ``CATALOG_CACHE_VERSION_TTL_SECONDS`` (default a day, at least twice the TTL).
- ``P list-gen``: a counter every newer change event bumps (it expires like ``title-seen``, long
  after every page cached under it); list pages live under
  ``P list:<gen>:<genre>:<limit>:<offset>``, so a bump makes every cached page unreachable at once
  (they expire by TTL).

Both writes are Lua scripts, so each is atomic:

- a fill (after a miss) stores a title only if its version is not lower than the one change events
  already announced, nor lower than what is cached. A request that read version 1 just before an
  update committed cannot store version 1 after the event for version 2 was handled (the cache-aside
  race), and a stale event or a late fill never brings old data back;
- an invalidation raises ``title-seen`` to the event's version and deletes the cached title only if it
  is older than the event; a redelivered or stale event (version not above what was seen) changes
  nothing and leaves list pages alone.

A read whose Redis call fails is a miss served from PostgreSQL; an invalidation whose Redis call fails
raises, so that the consumer retries it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.catalog import metrics

log = logging.getLogger("reelbus.catalog.cache")

FILL = """
local version = tonumber(ARGV[1])
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if version < seen then return 0 end
local current = redis.call('GET', KEYS[1])
if current then
  local cached = tonumber(string.match(current, '^(%d+):'))
  if cached and cached >= version then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
"""

INVALIDATE = """
local version = tonumber(ARGV[1])
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
local newer = 0
if version > seen then
  newer = 1
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
local dropped = 0
local current = redis.call('GET', KEYS[1])
if current then
  local cached = tonumber(string.match(current, '^(%d+):'))
  if (not cached) or cached < version then
    redis.call('DEL', KEYS[1])
    dropped = 1
  end
end
if newer == 1 then
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return {newer, dropped}
"""


@dataclass(frozen=True, slots=True)
class Invalidation:
    newer: bool  # the event's version is above every version seen before: lists were invalidated
    dropped: bool  # a cached copy older than the event was deleted


class CacheUnavailable(Exception):
    """Redis did not answer an invalidation; the caller retries."""


class TitleCache:
    def __init__(self, redis: Redis, prefix: str, ttl_seconds: float, version_ttl_seconds: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        # Outlives every cached copy, so that a generation counter that expired and restarts at 0
        # cannot find pages cached under an old generation 0.
        self.version_ttl_ms = max(2 * self.ttl_ms, int(version_ttl_seconds * 1000))
        self._fill = redis.register_script(FILL)
        self._invalidate = redis.register_script(INVALIDATE)

    def title_key(self, title_id: str) -> str:
        return f"{self.prefix}title:{title_id}"

    def seen_key(self, title_id: str) -> str:
        return f"{self.prefix}title-seen:{title_id}"

    @property
    def generation_key(self) -> str:
        return f"{self.prefix}list-gen"

    def page_key(self, generation: int, page: str) -> str:
        return f"{self.prefix}list:{generation}:{page}"

    # -- titles ---------------------------------------------------------------------------

    async def get_title(self, title_id: str) -> str | None:
        """The cached JSON of the title, or None (absent, or Redis failed)."""
        try:
            raw = await self.redis.get(self.title_key(title_id))
        except RedisError as exc:
            self._failed("get_title", exc)
            return None
        if raw is None:
            return None
        _version, sep, body = _text(raw).partition(":")
        return body if sep else None

    async def put_title(self, title_id: str, version: int, body: str) -> bool:
        """Cache the title read at ``version``, unless something newer is known; True if stored."""
        try:
            stored = await self._fill(
                keys=[self.title_key(title_id), self.seen_key(title_id)], args=[version, body, self.ttl_ms]
            )
        except RedisError as exc:
            self._failed("put_title", exc)
            return False
        return bool(stored)

    async def invalidate(self, title_id: str, version: int) -> Invalidation:
        try:
            newer, dropped = await self._invalidate(
                keys=[self.title_key(title_id), self.seen_key(title_id), self.generation_key],
                args=[version, self.version_ttl_ms],
            )
        except RedisError as exc:
            metrics.CACHE_ERRORS.labels("invalidate").inc()
            raise CacheUnavailable(f"cannot invalidate {title_id} v{version}: {exc}") from exc
        return Invalidation(newer=bool(newer), dropped=bool(dropped))

    # -- list pages -----------------------------------------------------------------------

    async def get_page(self, page: str) -> tuple[int | None, str | None]:
        """The current list generation and the cached page under it. The generation is None when
        Redis failed: the page must then not be cached."""
        try:
            generation = int(_text(await self.redis.get(self.generation_key) or "0"))
            raw = await self.redis.get(self.page_key(generation, page))
        except RedisError as exc:
            self._failed("get_page", exc)
            return None, None
        return generation, None if raw is None else _text(raw)

    async def put_page(self, generation: int, page: str, body: str) -> None:
        """Cache a page read after ``generation`` was current; a change since makes it unreachable."""
        try:
            await self.redis.set(self.page_key(generation, page), body, px=self.ttl_ms)
        except RedisError as exc:
            self._failed("put_page", exc)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    def _failed(self, op: str, exc: RedisError) -> None:
        metrics.CACHE_ERRORS.labels(op).inc()
        log.warning("cache %s failed, serving from PostgreSQL: %s", op, exc)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
