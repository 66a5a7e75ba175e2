"""The recommender as a process against the real Kafka and schema registry."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest

from services.bus.events import RecommendedItem
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli.infra import Layout
from services.recommender.handlers import LISTS
from tests.conftest import wait_for
from tests.recommender.conftest import Feed, StartRecommender, Topics, at, read_lists

pytestmark = pytest.mark.infra


async def lists_of(layout: Layout, topics: Topics) -> dict[uuid.UUID, list[RecommendedItem]]:
    serde = Serde(topics.contracts, RegistryClient(layout.registry_url))
    return await asyncio.to_thread(read_lists, layout, serde, topics.name(LISTS))


async def test_co_watched_titles_are_recommended_and_finished_ones_are_not(
    bus_infra: Layout, topics: Topics, feed: Feed, start_recommender: StartRecommender
) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for p in (a, b, c):
        await feed.profile(p)
    await feed.titles("t1", "t2", "t3", "t4")
    service = start_recommender()
    await service.wait_ready()
    await feed.views(
        feed.view(a, "t1", at(0)),
        feed.view(a, "t2", at(1)),
        feed.view(b, "t1", at(2)),
        feed.view(b, "t2", at(3)),
        feed.view(b, "t3", at(4)),
        feed.view(c, "t1", at(5)),
    )

    async def c_list() -> list[str] | None:
        found = (await lists_of(bus_infra, topics)).get(c)
        titles = [i.title_id for i in found or []]
        return titles if titles[:2] == ["t2", "t3"] else None

    titles = await wait_for(c_list, "c's list to lead with t2, t3", 30, 0.5)
    assert "t1" not in titles, "a title the profile finished is never recommended"

    service.proc.send_signal(signal.SIGTERM)  # staged shutdown: faust commits, the producer flushes
    assert await asyncio.to_thread(service.proc.wait, 20) == 0
    assert "shutdown complete" in service.output()
