"""Watching a title end to end, through the gateway only, against the whole stack as ``make up`` starts it.

Two tests publish the subscription events that playback projects directly (the journey is about
watching); a third subscribes and cancels through billing. The Open Connect appliances' health and
contents reports are published on their topic, as the appliances would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from services.bus.contracts import Contracts
from services.bus.events import (
    ApplianceContents,
    ApplianceHealth,
    Plan,
    SubscriptionStarted,
)
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import galera, infra, stack
from services.cli.infra import Layout
from tests.conftest import SpawnService, http_json, unique, wait_for

pytestmark = pytest.mark.infra
GATEWAY = stack.service("gateway").url
ZIPKIN = Layout.from_env().zipkin_url


@pytest.fixture(scope="module")
def services_up(bus_infra: Layout) -> Iterator[Layout]:
    """The services, started by the same code as ``make up``, for this module only: they consume the
    declared topics, and other modules' tests run services of their own on them."""
    names = [*stack.DATABASES, *(s.name for s in stack.SERVICES if s.exists())]
    result = asyncio.run(infra.up(bus_infra, names, progress=lambda m: print(f"[stack] {m}", flush=True)))
    try:
        yield bus_infra
    finally:
        if result.started:
            infra.down(bus_infra, result.started)


@pytest.fixture
async def producer(services_up: Layout) -> AsyncIterator[Producer]:
    contracts = Contracts.load()
    serde = Serde(contracts, RegistryClient(services_up.registry_url))
    p = Producer(ProducerConfig(services_up.bootstrap_servers, client_id=unique("e2e")), contracts, serde)
    await p.start(["billing.events", "opencdn.appliances"])
    yield p
    await p.close()


def call(
    method: str, path: str, body: Any = None, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(GATEWAY + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


async def acall(*args: Any, **kwargs: Any) -> tuple[int, Any]:
    return await asyncio.to_thread(call, *args, **kwargs)


async def signed_up_viewer() -> tuple[str, str, str]:
    email = f"{unique('viewer')}@example.com"
    status, body = await acall("POST", "/v1/accounts", {"email": email, "password": "correct horse battery"})
    assert status == 201, body
    account_id = body["account_id"]
    status, body = await acall(
        "POST",
        "/v1/auth/login",
        {"email": email, "password": "correct horse battery", "device_id": "tv-1", "device_type": "TV"},
    )
    assert status == 200, body
    token = body["access_token"]
    status, body = await acall("POST", f"/v1/accounts/{account_id}/profiles", {"name": "Ada"}, token)
    assert status == 201, body
    return account_id, token, body["profile_id"]


async def subscribe(producer: Producer, account_id: str) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    event = SubscriptionStarted(
        account_id=uuid.UUID(account_id),
        subscription_id=uuid.uuid4(),
        plan=Plan.STANDARD,
        period_start=now - dt.timedelta(days=1),
        period_end=now + dt.timedelta(days=30),
        amount_cents=1599,
        currency="USD",
    )
    await producer.send("billing.events", account_id, event)


async def stock_exchange_point(producer: Producer, title_id: str) -> None:
    """The IXP appliance of the example configuration is healthy and holds the title."""
    appliance = "oca-ix-lax-01"
    health = ApplianceHealth(
        appliance_id=appliance,
        healthy=True,
        load=0.2,
        reported_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
        base_url="https://oca-ix-lax-01.example.net",
        site="lax",
    )
    contents = ApplianceContents(appliance_id=appliance, title_ids=[title_id], full_snapshot=False)
    await producer.send("opencdn.appliances", appliance, health)
    await producer.send("opencdn.appliances", appliance, contents)


async def test_sign_up_browse_watch_and_find_it_in_the_history(producer: Producer) -> None:
    account_id, token, profile_id = await signed_up_viewer()
    status, page = await acall("GET", "/v1/catalog/titles?limit=5&genre=drama", token=token)
    assert status == 200 and page["items"], page
    title_id = page["items"][0]["title_id"]
    status, title = await acall("GET", f"/v1/catalog/titles/{title_id}", token=token)
    assert status == 200 and title["title_id"] == title_id

    await subscribe(producer, account_id)
    await stock_exchange_point(producer, title_id)

    async def started() -> dict[str, Any] | None:
        status, body = await acall(
            "POST", "/v1/playback/sessions", {"profile_id": profile_id, "title_id": title_id}, token
        )
        assert status in (201, 403, 404, 503), body  # until the projections have the events
        return body if status == 201 else None

    session = await wait_for(started, "an entitled session with a manifest", 60, 0.5)
    assert session["manifest"]["cdn"][0].startswith("https://oca-ix-lax-01.example.net/")
    assert session["manifest"]["ladder"] == sorted(session["manifest"]["ladder"])
    session_id = session["session_id"]

    for position in (10_000, 20_000, 30_000):
        status, body = await acall(
            "POST",
            f"/v1/playback/sessions/{session_id}/heartbeats",
            {
                "position_ms": position,
                "bitrate_kbps": 3000,
                "buffer_ms": 12_000,
                "throughput_kbps": 8000,
                "rebuffer_ms": 0,
            },
            token,
        )
        assert status == 202, body
    status, body = await acall(
        "POST", f"/v1/playback/sessions/{session_id}/stop", {"position_ms": 31_500}, token
    )
    assert status == 202, body

    async def in_history() -> dict[str, Any] | None:
        status, body = await acall("GET", f"/v1/profiles/{profile_id}/history?limit=10", token=token)
        assert status == 200, body
        items = [i for i in body["items"] if i["title_id"] == title_id and i["position_ms"] == 31_500]
        return items[0] if items else None

    record = await wait_for(in_history, "the viewing in the history with the last position", 60, 0.5)
    assert record["watched_at"]


async def test_start_and_stop_are_one_connected_trace_from_the_gateway_to_cassandra(
    producer: Producer,
) -> None:
    account_id, token, profile_id = await signed_up_viewer()
    status, page = await acall("GET", "/v1/catalog/titles?limit=1&offset=7", token=token)
    title_id = page["items"][0]["title_id"]
    await subscribe(producer, account_id)
    await stock_exchange_point(producer, title_id)

    async def started() -> dict[str, Any] | None:
        status, body = await acall(
            "POST", "/v1/playback/sessions", {"profile_id": profile_id, "title_id": title_id}, token
        )
        return body if status == 201 else None

    session = await wait_for(started, "a session", 60, 0.5)
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    status, _ = await acall(
        "POST",
        f"/v1/playback/sessions/{session['session_id']}/stop",
        {"position_ms": 5_000},
        token,
        headers={"traceparent": traceparent},
    )
    assert status == 202

    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = http_json(f"{ZIPKIN}/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:
            return None
        services = {s.get("localEndpoint", {}).get("serviceName") for s in found}
        cassandra = [s for s in found if s.get("name", "").startswith("cassandra")]
        return found if {"gateway", "playback", "history"} <= services and cassandra else None

    found = await wait_for(
        lambda: asyncio.to_thread(spans), "gateway, playback, history and Cassandra spans", 60, 1
    )
    by_id = {s["id"]: s for s in found}

    def chain(span: dict[str, Any]) -> list[str]:
        names = []
        while span is not None:
            names.append(f"{span['localEndpoint']['serviceName']}:{span.get('kind', 'INTERNAL')}")
            span = by_id.get(span.get("parentId", ""))  # type: ignore[assignment]
        return list(reversed(names))

    cassandra = next(
        s
        for s in found
        if s["name"].startswith("cassandra") and s["localEndpoint"]["serviceName"] == "history"
    )
    path = chain(cassandra)
    assert path[0] == "gateway:SERVER", path
    assert "playback:SERVER" in path and "playback:PRODUCER" in path and "history:CONSUMER" in path, path
    assert path.index("playback:PRODUCER") < path.index("history:CONSUMER") < len(path) - 1


async def test_subscribing_allows_playback_and_cancelling_now_refuses_it_through_the_gateway(
    producer: Producer,
) -> None:
    account_id, token, profile_id = await signed_up_viewer()
    status, page = await acall("GET", "/v1/catalog/titles?limit=1&offset=11", token=token)
    title_id = page["items"][0]["title_id"]
    await stock_exchange_point(producer, title_id)
    start = {"profile_id": profile_id, "title_id": title_id}

    status, body = await acall("POST", "/v1/playback/sessions", start, token)
    assert status in (403, 404), body  # no subscription yet (or the profile not projected yet)

    key = {"Idempotency-Key": unique("subscribe")}
    subscribe = {"account_id": account_id, "plan": "STANDARD", "card_token": "tok_ok"}
    status, sub = await acall("POST", "/v1/billing/subscriptions", subscribe, token, headers=key)
    assert status == 201, sub
    again, same = await acall("POST", "/v1/billing/subscriptions", subscribe, token, headers=key)
    assert (again, same["subscription_id"]) == (201, sub["subscription_id"]), "a repeat moves no money"

    async def allowed() -> dict[str, Any] | None:
        status, body = await acall("POST", "/v1/playback/sessions", start, token)
        assert status in (201, 403, 404), body
        return body if status == 201 else None

    await wait_for(allowed, "playback to be allowed after subscribing", 60, 0.5)

    cancel_path = f"/v1/billing/subscriptions/{sub['subscription_id']}/cancel"
    status, body = await acall("POST", cancel_path, {"at_period_end": False}, token,
                               headers={"Idempotency-Key": unique("cancel")})  # fmt: skip
    assert status in (200, 202), body

    async def refused() -> dict[str, Any] | None:
        status, body = await acall("POST", "/v1/playback/sessions", start, token)
        assert status in (201, 403), body
        return body if status == 403 else None

    refusal = await wait_for(refused, "playback to be refused after cancelling now", 60, 0.5)
    assert refusal.get("reason") == "cancelled", refusal

    status, account = await acall("GET", f"/v1/billing/accounts/{account_id}", token=token)
    assert status == 200, account


async def test_a_failed_renewal_refuses_playback_through_the_gateway(
    producer: Producer, spawn_service: SpawnService, services_up: Layout
) -> None:
    """Billing with 4-second periods (a process of this test's own, on a database of its own) renews
    a card that declines renewals: its PaymentFailed ends the entitlement playback projects."""
    database = f"billing_e2e_{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(
        galera.endpoint_sql, galera.Ports.from_env().write, f"CREATE DATABASE `{database}`"
    )
    billing = spawn_service(
        "services.billing",
        "BILLING_",
        BILLING_DATABASE_NAME=database,
        BILLING_WRITE_PORT=str(galera.Ports.from_env().write),
        BILLING_READ_PORT=str(galera.Ports.from_env().read),
        BILLING_PERIOD_SECONDS="4",
        BILLING_RENEWAL_INTERVAL_SECONDS="0.5",
        BILLING_OUTBOX_POLL_INTERVAL_SECONDS="0.2",
        OTEL_SERVICE_NAME=unique("billing-e2e"),
    )
    await billing.wait_ready()
    account_id, token, profile_id = await signed_up_viewer()
    status, page = await acall("GET", "/v1/catalog/titles?limit=1&offset=13", token=token)
    title_id = page["items"][0]["title_id"]
    await stock_exchange_point(producer, title_id)
    start = {"profile_id": profile_id, "title_id": title_id}

    subscribe = {"account_id": account_id, "plan": "BASIC", "card_token": "tok_renewal_decline"}
    status, sub = await asyncio.to_thread(
        call_url, f"{billing.url}/v1/billing/subscriptions", subscribe, token, unique("subscribe")
    )
    assert status == 201, sub

    async def refused_for_payment() -> dict[str, Any] | None:
        status, body = await acall("POST", "/v1/playback/sessions", start, token)
        assert status in (201, 403, 404), body
        return body if status == 403 and body.get("reason") == "payment_failed" else None

    refusal = await wait_for(refused_for_payment, "playback refused after the renewal was declined", 60, 0.5)
    assert "message" in refusal
    try:
        await asyncio.to_thread(
            galera.endpoint_sql, galera.Ports.from_env().write, f"DROP DATABASE `{database}`"
        )
    finally:
        billing.proc.terminate()


def call_url(url: str, body: Any, token: str, key: str) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Idempotency-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
