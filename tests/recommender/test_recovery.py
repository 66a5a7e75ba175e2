"""The recommender's lists against the batch algorithm, through crashes, rebalances and redeliveries:
worker processes against the real broker, on private copies of the topics."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from dataclasses import replace
from typing import Any

import pytest

from services.bus.auth import TokenIssuer
from services.bus.events import RecommendedItem
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import eval_recommender
from services.cli.infra import Layout
from services.recommender import offline, scoring
from services.recommender.handlers import LISTS, VIEWS
from services.recommender.scoring import Params
from tests.conftest import ServiceProcess, wait_for
from tests.recommender.conftest import StartRecommender, Topics, Worker

pytestmark = pytest.mark.infra

PARAMS = Params()
LOG = offline.synthetic(500, users=40, clusters=5, per_cluster=8, seed=11)
SPLIT = offline.leave_last_out(LOG)


def part(split: offline.Split, start: int, end: int | None = None) -> offline.Split:
    return replace(split, train=split.train[start:end])


def expected() -> dict[uuid.UUID, list[RecommendedItem]]:
    lists, _model = scoring.batch([r.view() for r in SPLIT.train], PARAMS)
    return lists


async def publish(layout: Layout, topics: Topics, split: offline.Split) -> None:
    serde = Serde(topics.contracts, RegistryClient(layout.registry_url))
    await asyncio.to_thread(eval_recommender.publish, layout, topics.contracts, serde, topics.prefix, split)


async def lists(layout: Layout, topics: Topics) -> dict[uuid.UUID, list[RecommendedItem]]:
    serde = Serde(topics.contracts, RegistryClient(layout.registry_url))
    return await asyncio.to_thread(eval_recommender.read_lists, layout, serde, topics.name(LISTS))


async def idle(layout: Layout, topics: Topics, *workers: Worker, timeout: float = 90) -> None:
    """Every viewing committed by the group, and every worker's model folded and re-ranked."""
    group = topics.prefix + "recommender"

    async def probe() -> bool:
        if not await asyncio.to_thread(eval_recommender._committed_all, layout, group, topics.name(VIEWS)):
            return False
        for w in workers:
            if w.process.proc.poll() is not None:
                raise AssertionError(f"a worker exited:\\n{w.process.output()[-3000:]}")
            if not (await asyncio.to_thread(w.status))["idle"]:
                return False
        return True

    try:
        await wait_for(probe, "the workers to be idle", timeout, 0.5)
    except AssertionError as exc:
        logs = "\n".join(f"--- worker log:\n{w.process.output()[-6000:]}" for w in workers)
        raise AssertionError(f"{exc}\n{logs}") from None


def committed_any(layout: Layout, topics: Topics) -> bool:
    from confluent_kafka import Consumer, TopicPartition

    group = topics.prefix + "recommender"
    consumer = Consumer({"bootstrap.servers": layout.bootstrap_servers, "group.id": group, "log_level": 3})
    try:
        tps = [TopicPartition(topics.name(VIEWS), p) for p in range(3)]
        return any(tp.offset > 0 for tp in consumer.committed(tps, timeout=10))
    finally:
        consumer.close()


async def start(start_recommender: StartRecommender, token: str, **kwargs: Any) -> Worker:
    process: ServiceProcess = start_recommender(**kwargs)
    try:
        await process.wait_ready(90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{process.output()[-4000:]}") from None
    return Worker(process, token)


@pytest.fixture
def token(token_issuer: TokenIssuer) -> str:
    return token_issuer.issue(str(uuid.uuid4()), "test", "TV")


async def test_streamed_lists_equal_the_batch(
    bus_infra: Layout, topics: Topics, start_recommender: StartRecommender, token: str
) -> None:
    worker = await start(start_recommender, token)
    await publish(bus_infra, topics, SPLIT)
    await idle(bus_infra, topics, worker)
    got = await lists(bus_infra, topics)
    want = expected()
    assert len(want) == SPLIT.users
    assert got == want


async def test_a_worker_killed_mid_stream_rebuilds_its_table_from_the_changelog(
    bus_infra: Layout, topics: Topics, start_recommender: StartRecommender, token: str
) -> None:
    worker = await start(start_recommender, token, instance="r0", data="before")
    half = len(SPLIT.train) // 2
    await publish(bus_infra, topics, part(SPLIT, 0, half))
    await wait_for(
        lambda: asyncio.to_thread(committed_any, bus_infra, topics), "some viewings committed", 60, 0.2
    )
    os.kill(worker.process.proc.pid, signal.SIGKILL)  # mid-stream: no commit, no flush, no goodbye
    worker.process.proc.wait(10)

    # A fresh data dir: the RocksDB table can only come back from its changelog topic.
    restarted = await start(start_recommender, token, instance="r0", data="after")
    assert (await asyncio.to_thread(restarted.status))["recovered_rows"] > 0, "rebuilt from the changelog"
    await publish(bus_infra, topics, part(SPLIT, half))
    await idle(bus_infra, topics, restarted)
    assert await lists(bus_infra, topics) == expected()


async def test_two_workers_split_the_partitions_and_their_lists_are_right_after_a_rebalance(
    bus_infra: Layout, topics: Topics, start_recommender: StartRecommender, token: str
) -> None:
    first = await start(start_recommender, token, instance="r0")
    third = len(SPLIT.train) // 3
    await publish(bus_infra, topics, part(SPLIT, 0, third))
    second = await start(start_recommender, token, instance="r1")  # joins: a rebalance mid-stream
    await publish(bus_infra, topics, part(SPLIT, third))
    await idle(bus_infra, topics, first, second)

    one = set((await asyncio.to_thread(first.status))["assigned"])
    two = set((await asyncio.to_thread(second.status))["assigned"])
    assert one and two and not one & two, f"each worker has partitions of its own: {one} {two}"
    assert one | two == {0, 1, 2}
    assert await lists(bus_infra, topics) == expected()


async def test_redelivered_viewings_change_nothing(
    bus_infra: Layout, topics: Topics, start_recommender: StartRecommender, token: str
) -> None:
    worker = await start(start_recommender, token)
    await publish(bus_infra, topics, SPLIT)
    await idle(bus_infra, topics, worker)
    before = await lists(bus_infra, topics)
    published = (await asyncio.to_thread(worker.status))["counts"]["lists_published"]

    again = part(SPLIT, 0, 60)
    await publish(bus_infra, topics, again)  # the same events, the same event ids
    await idle(bus_infra, topics, worker)

    status = await asyncio.to_thread(worker.status)
    assert status["counts"]["duplicate"] == 60
    assert status["counts"]["lists_published"] == published, "no list changed, so none was sent"
    assert await lists(bus_infra, topics) == before == expected()
