"""The cache's version rules against the real Redis: stale events and late fills never bring old data
back, and change events make list pages unreachable."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from services.catalog.adapters.cache import TitleCache
from services.cli.infra import Layout
from tests.catalog.conftest import redis_url

pytestmark = pytest.mark.infra


@pytest.fixture
async def cache(bus_infra: Layout, cache_prefix: str) -> AsyncIterator[TitleCache]:
    redis = Redis.from_url(redis_url(bus_infra))
    try:
        yield TitleCache(redis, cache_prefix, ttl_seconds=60, version_ttl_seconds=600)
    finally:
        await redis.aclose()


def body(version: int) -> str:
    return json.dumps({"title_id": "tt0000001", "name": f"v{version}", "version": version})


async def test_a_stale_event_does_not_drop_a_newer_copy(cache: TitleCache) -> None:
    assert await cache.invalidate("tt0000001", 3)
    assert await cache.put_title("tt0000001", 3, body(3))
    stale = await cache.invalidate("tt0000001", 2)
    assert not stale.newer and not stale.dropped
    assert await cache.get_title("tt0000001") == body(3)


async def test_a_fill_older_than_an_announced_version_is_refused(cache: TitleCache) -> None:
    # A request read version 1 just before version 2 committed; the event for 2 is handled first.
    assert await cache.put_title("tt0000002", 1, body(1))
    result = await cache.invalidate("tt0000002", 2)
    assert result.newer and result.dropped
    assert await cache.get_title("tt0000002") is None
    assert not await cache.put_title("tt0000002", 1, body(1)), "the late fill of version 1 is refused"
    assert await cache.get_title("tt0000002") is None
    assert await cache.put_title("tt0000002", 2, body(2))
    assert not await cache.put_title("tt0000002", 1, body(1)), "nor does it replace version 2"
    assert await cache.get_title("tt0000002") == body(2)


async def test_a_redelivered_event_changes_nothing(cache: TitleCache) -> None:
    await cache.invalidate("tt0000003", 5)
    await cache.put_title("tt0000003", 5, body(5))
    again = await cache.invalidate("tt0000003", 5)
    assert not again.newer and not again.dropped
    assert await cache.get_title("tt0000003") == body(5)


async def test_a_change_makes_cached_pages_unreachable(cache: TitleCache) -> None:
    generation, page = await cache.get_page("*:20:0")
    assert generation is not None and page is None
    await cache.put_page(generation, "*:20:0", '{"items": []}')
    assert await cache.get_page("*:20:0") == (generation, '{"items": []}')
    await cache.invalidate("tt0000004", 2)
    newer, page = await cache.get_page("*:20:0")
    assert newer == generation + 1 and page is None
    await cache.invalidate("tt0000004", 1)  # stale: lists stay
    assert await cache.get_page("*:20:0") == (newer, None)
