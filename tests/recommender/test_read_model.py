"""The read model through the gateway, tokens, bad input, dead letters and unknown titles/profiles."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import Producer as RawProducer

from services.bus.auth import TokenIssuer
from services.cli.infra import Layout
from services.recommender.handlers import VIEWS
from tests.conftest import SpawnService, free_port, unique, wait_for
from tests.recommender.conftest import Feed, StartRecommender, Topics, Worker, at

pytestmark = pytest.mark.infra


def get(url: str, token: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def test_a_profiles_rows_through_the_gateway(
    bus_infra: Layout,
    topics: Topics,
    feed: Feed,
    start_recommender: StartRecommender,
    spawn_service: SpawnService,
    token_issuer: TokenIssuer,
) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for p in (a, b, c):
        await feed.profile(p)
    await feed.titles("tt1", "tt2", "tt3")
    recommender = start_recommender()
    await recommender.wait_ready()
    nowhere = f"http://127.0.0.1:{free_port()}"
    gateway = spawn_service(
        "services.gateway",
        "GATEWAY_",
        GATEWAY_ACCOUNTS_URL=nowhere,
        GATEWAY_CATALOG_URL=nowhere,
        GATEWAY_PLAYBACK_URL=nowhere,
        GATEWAY_HISTORY_URL=nowhere,
        GATEWAY_RECOMMENDER_URL=recommender.url,
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{bus_infra.redis_port}/0",
        GATEWAY_REDIS_KEY_PREFIX=unique("test-ratelimit"),
    )
    await gateway.wait_ready()
    await feed.views(
        feed.view(a, "tt1", at(0)),
        feed.view(a, "tt2", at(1)),
        feed.view(b, "tt1", at(2)),
        feed.view(b, "tt3", at(3)),
        feed.view(c, "tt1", at(4)),
        feed.view(c, "tt2", at(5), completed=False),  # started, not finished: may still be offered
    )
    owner = token_issuer.issue(str(feed.accounts[c]), "tv-1", "TV")
    url = f"{gateway.url}/v1/profiles/{c}/recommendations"

    async def rows() -> list[dict[str, Any]] | None:
        status, body = await asyncio.to_thread(get, url, owner)
        found = body.get("rows") if status == 200 else None
        titles = [t["title_id"] for r in found or [] for t in r["titles"]]
        return found if "tt3" in titles else None

    found = await wait_for(rows, "c's rows to offer tt3", 60, 0.3)
    because = found[0]
    assert because["name"] == "Because you watched Title tt1"  # b watched tt1, then tt3
    assert because["reason"] == "because_you_watched:tt1"
    titles = [t for r in found for t in r["titles"]]
    assert {"title_id": "tt3", "name": "Title tt3"} in titles
    assert "tt1" not in [t["title_id"] for t in titles], "finished titles are never offered"

    assert (await asyncio.to_thread(get, url, None))[0] == 401
    stranger = token_issuer.issue(str(uuid.uuid4()), "tv-2", "TV")
    status, body = await asyncio.to_thread(get, url, stranger)
    assert (status, body["field"]) == (403, "profile_id")
    status, body = await asyncio.to_thread(
        get, f"{gateway.url}/v1/profiles/{uuid.uuid4()}/recommendations", owner
    )
    assert (status, body["field"]) == (404, "profile_id")
    status, body = await asyncio.to_thread(
        get, f"{recommender.url}/v1/profiles/not-a-uuid/recommendations", owner
    )
    assert (status, body["field"]) == (400, "profile_id")


def dead_letters(layout: Layout, topic: str) -> list[dict[str, bytes]]:
    consumer = Consumer(
        {"bootstrap.servers": layout.bootstrap_servers, "group.id": unique("dlq"), "log_level": 3}
    )
    found: list[dict[str, bytes]] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        while len(found) < sum(ends.values()):
            msg = consumer.poll(10)
            if msg is None:
                break
            raw: Any = msg.headers() or []
            headers: dict[str, bytes] = dict(raw)
            found.append(headers | {"value": msg.value() or b""})
    finally:
        consumer.close()
    return found


async def test_bad_records_go_to_the_dlq_and_unknown_titles_and_profiles_are_skipped(
    bus_infra: Layout,
    topics: Topics,
    feed: Feed,
    start_recommender: StartRecommender,
    token_issuer: TokenIssuer,
) -> None:
    known = uuid.uuid4()
    await feed.profile(known)
    await feed.titles("k1", "k2")
    process = start_recommender()
    await process.wait_ready()
    worker = Worker(process, token_issuer.issue(str(uuid.uuid4()), "t", "TV"))
    raw = RawProducer({"bootstrap.servers": bus_infra.bootstrap_servers, "log_level": 3})
    raw.produce(topics.name(VIEWS), key=b"k", value=b"not avro at all")
    raw.flush(10)
    await feed.views(
        feed.view(known, "nope", at(0)),  # a title the catalog does not have
        feed.view(uuid.uuid4(), "k1", at(1)),  # a profile nobody created
        feed.view(known, "k1", at(2)),
    )

    async def counted() -> dict[str, int] | None:
        counts = (await asyncio.to_thread(worker.status))["counts"]
        wanted = ("dead_lettered", "unknown_title", "unknown_profile", "lists_published")
        return counts if all(counts.get(k) for k in wanted) else None

    counts = await wait_for(counted, "the bad record, the unknowns and the good one", 60, 0.3)
    assert (counts["dead_lettered"], counts["unknown_title"], counts["unknown_profile"]) == (1, 1, 1)
    letters = await asyncio.to_thread(dead_letters, bus_infra, topics.name(VIEWS) + ".dlq")
    assert len(letters) == 1
    assert letters[0]["value"] == b"not avro at all"
    assert letters[0]["reelbus.dlq.stage"] == b"decode"
    assert b"Confluent wire format" in letters[0]["reelbus.dlq.reason"]
    assert letters[0]["reelbus.dlq.topic"] == topics.name(VIEWS).encode()
    assert process.proc.poll() is None, "bad input never stops the worker"


async def test_the_trace_continues_from_the_viewing_to_the_list(
    bus_infra: Layout, topics: Topics, feed: Feed, start_recommender: StartRecommender, tracing: Any
) -> None:
    from opentelemetry import trace

    viewer = uuid.uuid4()
    await feed.profile(viewer)
    await feed.titles("z1")
    process = start_recommender(OTEL_SERVICE_NAME="recommender")
    await process.wait_ready()
    event = feed.view(viewer, "z1", at(0))
    with trace.get_tracer("tests").start_as_current_span("test request") as span:
        await feed.producer.send(topics.name(VIEWS), str(viewer), event)
        trace_id = format(span.get_span_context().trace_id, "032x")
    tracing.force_flush()

    def spans() -> list[dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"{bus_infra.zipkin_url}/api/v2/trace/{trace_id}", timeout=5) as resp:
                found: list[dict[str, Any]] = json.loads(resp.read())
        except urllib.error.HTTPError:
            return None
        names = {s.get("name", "") for s in found}
        return (
            found
            if any(n.startswith("send ") and n.endswith("recommendations.profiles") for n in names)
            else None
        )

    found = await wait_for(lambda: asyncio.to_thread(spans), "the recommender's spans in Zipkin", 30, 0.5)
    sent = next(s for s in found if s.get("kind") == "PRODUCER" and s["name"].endswith(VIEWS))
    consumed = next(s for s in found if s.get("kind") == "CONSUMER")
    assert consumed["parentId"] == sent["id"], "the CONSUMER span is a child of the producer's span"
    assert consumed["localEndpoint"]["serviceName"] == "recommender"
    assert consumed["tags"]["reelbus.event.id"] == str(event.event_id)
    listed = next(
        s for s in found if s.get("kind") == "PRODUCER" and s["name"].endswith("recommendations.profiles")
    )
    assert listed["parentId"] == consumed["id"], "the list is sent inside the CONSUMER span"
