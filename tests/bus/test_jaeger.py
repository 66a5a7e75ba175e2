"""The same service sends its spans to Jaeger instead of Zipkin when the standard ``OTEL_*`` variables
say so: a native Jaeger (built from the Go module proxy by ``reelbus up jaeger``) receives the
consumer's span over OTLP, in the trace and under the span that the producer put in the Kafka headers."""

from __future__ import annotations

import asyncio
import signal
import urllib.error
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.bus.events import ViewRecorded
from services.cli import infra, jaeger
from services.cli.infra import Layout
from tests.bus.test_bus import producer_for, view
from tests.bus.test_service_process import (  # noqa: F401 (fixtures)
    Service,
    client_span,
    database,
    exited,
    start_service,
)
from tests.conftest import TopicFactory, http_json, unique, wait_for

pytestmark = pytest.mark.infra


@pytest.fixture(scope="session")
def native_jaeger(bus_infra: Layout) -> Iterator[jaeger.Ports]:
    say = lambda m: print(f"[infra] {m}", flush=True)  # noqa: E731
    result = asyncio.run(infra.up(bus_infra, ["jaeger"], progress=say))
    try:
        yield jaeger.Ports.from_env()
    finally:
        if result.started:
            infra.down(bus_infra, result.started)


async def test_otlp_exporter_sends_the_consumer_span_to_jaeger(
    bus_infra: Layout,
    native_jaeger: jaeger.Ports,
    make_topic: TopicFactory,
    database: str,  # noqa: F811
    start_service: Any,  # noqa: F811
    tracing: TracerProvider,
) -> None:
    contracts, topic = await make_topic(partitions=1)
    service: Service = start_service(
        topic,
        database,
        unique("sample"),
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=native_jaeger.otlp_endpoint,
        OTEL_SERVICE_NAME="sample-to-jaeger",
    )
    await wait_for(lambda: asyncio.to_thread(service.ready), "the service to be ready", 60)
    event = view()
    async with producer_for(bus_infra, contracts, topic) as producer:
        with client_span("test request") as span:
            await producer.send(topic.name, str(event.profile_id), event)
            trace_id = format(span.get_span_context().trace_id, "032x")

    def consumer_span() -> dict[str, Any] | None:
        try:
            found = http_json(f"{native_jaeger.query_url}/api/traces/{trace_id}")
        except urllib.error.HTTPError:  # 404 until the span arrives
            return None
        for trace_ in found.get("data") or []:
            for s in trace_["spans"]:
                tags = {t["key"]: t["value"] for t in s.get("tags", [])}
                if tags.get("span.kind") == "consumer":
                    return {**s, "tags": tags, "process": trace_["processes"][s["processID"]]}
        return None

    got = await wait_for(lambda: asyncio.to_thread(consumer_span), "the consumer span in Jaeger", 30, 0.5)
    assert got["process"]["serviceName"] == "sample-to-jaeger"
    assert got["tags"]["reelbus.event.id"] == str(event.event_id)
    assert got["tags"]["reelbus.event.type"] == ViewRecorded.SCHEMA_NAME
    # Its parent is the PRODUCER span, which this test process exported to Zipkin: one trace, two backends.
    tracing.force_flush()

    def producer_span_id() -> str | None:
        try:
            spans = http_json(f"{bus_infra.zipkin_url}/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:
            return None
        return next((str(s["id"]) for s in spans if s.get("kind") == "PRODUCER"), None)

    producer_id = await wait_for(lambda: asyncio.to_thread(producer_span_id), "the producer span", 30, 0.5)
    parents = [(r["traceID"], r["spanID"]) for r in got.get("references", []) if r["refType"] == "CHILD_OF"]
    assert parents == [(trace_id, producer_id)]
    service.proc.send_signal(signal.SIGTERM)
    assert await exited(service, 30) == 0
