"""The gateway as a process in front of a real accounts service (and a recording stand-in for the
catalog), against the real Redis, PostgreSQL, Kafka, registry and Zipkin."""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.bus.auth import TokenIssuer
from services.cli.infra import Layout
from tests.accounts.service import accounts_database, call, sign_up_and_log_in, start_accounts
from tests.conftest import ServiceProcess, SpawnService, free_port, http_json, unique, wait_for
from tests.gateway.stub import StubUpstream, stub_upstream

pytestmark = pytest.mark.infra


@dataclass
class Stack:
    gateway: ServiceProcess
    accounts: ServiceProcess
    catalog: StubUpstream
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.gateway.url


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(bus_infra: Layout, spawn_service: SpawnService) -> AsyncIterator[StackFactory]:
    """accounts (own database) + a stand-in catalog + the gateway; playback and history point at a
    port nothing listens on."""
    async with (
        accounts_database(bus_infra) as database,
        stub_upstream() as catalog,
        aiohttp.ClientSession() as http,
    ):
        accounts = await start_accounts(spawn_service, database)

        async def make(**env: str) -> Stack:
            nowhere = f"http://127.0.0.1:{free_port()}"
            gateway = spawn_service(
                "services.gateway",
                "GATEWAY_",
                GATEWAY_ACCOUNTS_URL=accounts.url,
                GATEWAY_CATALOG_URL=catalog.url,
                GATEWAY_PLAYBACK_URL=nowhere,
                GATEWAY_HISTORY_URL=nowhere,
                GATEWAY_REDIS_URL=f"redis://127.0.0.1:{bus_infra.redis_port}/0",
                GATEWAY_REDIS_KEY_PREFIX=unique("test-ratelimit"),
                OTEL_SERVICE_NAME="gateway",
                **env,
            )
            await gateway.wait_ready()
            return Stack(gateway, accounts, catalog, http)

        yield make


async def test_sign_up_log_in_and_profiles_through_the_gateway(make_stack: StackFactory) -> None:
    stack = await make_stack()
    account = await sign_up_and_log_in(stack.http, stack.url)
    profiles = f"{stack.url}/v1/accounts/{account.account_id}/profiles"
    made = await call(stack.http, "POST", profiles, {"name": "Kid", "kids": True}, token=account.token)
    assert made.status == 201, made
    listed = await call(stack.http, "GET", profiles, token=account.token)
    assert listed.status == 200
    assert [p["profile_id"] for p in listed.body["profiles"]] == [made.body["profile_id"]]
    # The services' own answers come back as they are: status and JSON body.
    taken = await call(
        stack.http, "POST", f"{stack.url}/v1/accounts", {"email": account.email, "password": "long enough pw"}
    )
    assert taken.status == 409 and taken.body["error"] == "conflict"
    invalid = await call(stack.http, "POST", profiles, {"name": "Kid", "kids": "yes"}, token=account.token)
    assert invalid.status == 422 and invalid.body["field"] == "kids"


async def test_bad_tokens_are_rejected_at_the_gateway_and_never_forwarded(
    make_stack: StackFactory, token_issuer: TokenIssuer
) -> None:
    stack = await make_stack()
    account = await sign_up_and_log_in(stack.http, stack.url)
    sub = account.account_id
    cases = {
        "missing": (None, "missing Authorization"),
        "forged": (TokenIssuer(Ed25519PrivateKey.generate()).issue(sub, "d", "tv"), "signature"),
        "expired": (TokenIssuer(token_issuer.key, ttl_seconds=-60).issue(sub, "d", "tv"), "expired"),
        "foreign audience": (
            TokenIssuer(token_issuer.key, audience="other").issue(sub, "d", "tv"),
            "audience",
        ),
    }
    for name, (token, why) in cases.items():
        for url in (f"{stack.url}/v1/catalog/titles", f"{stack.url}/v1/accounts/{sub}/profiles"):
            reply = await call(stack.http, "GET", url, token=token)
            assert reply.status == 401, (name, url, reply)
            assert why in reply.body["message"] and reply.body["field"] == "Authorization", (name, reply.body)
    assert stack.catalog.seen == [], "nothing reached the upstream"
    fine = await call(stack.http, "GET", f"{stack.url}/v1/catalog/titles", token=account.token)
    assert fine.status == 200 and len(stack.catalog.seen) == 1


async def test_requests_are_forwarded_with_query_body_headers_and_x_forwarded_for_appended(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    account = await sign_up_and_log_in(stack.http, stack.url)
    reply = await call(
        stack.http,
        "POST",
        f"{stack.url}/v1/catalog/titles?genre=drama&limit=5&q=a%20b",
        {"title": "x"},
        token=account.token,
        headers={
            "Idempotency-Key": "key-1",
            "X-Forwarded-For": "203.0.113.7",
            "Cookie": "secret=1",
            "X-Internal": "should not pass",
        },
    )
    assert reply.status == 200, reply
    got = reply.body
    assert got["method"] == "POST"
    assert got["path_qs"] == "/v1/catalog/titles?genre=drama&limit=5&q=a%20b"
    assert got["body"] == '{"title": "x"}'
    headers = {k.lower(): v for k, v in got["headers"].items()}
    assert headers["authorization"] == f"Bearer {account.token}"
    assert headers["content-type"] == "application/json"
    assert headers["idempotency-key"] == "key-1"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["traceparent"].startswith("00-")
    assert "cookie" not in headers and "x-internal" not in headers
    assert "Set-Cookie" not in reply.headers and "X-Internal" not in reply.headers

    plain = await call(stack.http, "GET", f"{stack.url}/v1/catalog/titles/tt1", token=account.token)
    assert {k.lower(): v for k, v in plain.body["headers"].items()}["x-forwarded-for"] == "127.0.0.1"
    teapot = await call(stack.http, "GET", f"{stack.url}/v1/catalog/teapot", token=account.token)
    assert teapot.status == 418 and teapot.body == {"error": "teapot", "message": "short and stout"}


async def test_rate_limits_answer_429_with_retry_after_per_account_and_per_address(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        GATEWAY_RATE_LIMIT_ACCOUNT_REQUESTS="3",
        GATEWAY_RATE_LIMIT_PUBLIC_REQUESTS="4",
        GATEWAY_RATE_LIMIT_PUBLIC_WINDOW_SECONDS="60",
    )
    first = await sign_up_and_log_in(stack.http, stack.url)  # 2 public requests
    second = await sign_up_and_log_in(stack.http, stack.url)  # 4: the address's window is full
    titles = f"{stack.url}/v1/catalog/titles"
    for _ in range(3):
        assert (await call(stack.http, "GET", titles, token=first.token)).status == 200
    limited = await call(stack.http, "GET", titles, token=first.token)
    assert limited.status == 429
    assert limited.body["error"] == "rate_limited" and "account" in limited.body["message"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert len(stack.catalog.seen) == 3, "the limited request was not forwarded"
    assert (await call(stack.http, "GET", titles, token=second.token)).status == 200, "per account"

    login = {"email": first.email, "password": first.password, "device_id": "d", "device_type": "tv"}
    public = await call(stack.http, "POST", f"{stack.url}/v1/auth/login", login)
    assert public.status == 429 and "address" in public.body["message"]
    assert int(public.headers["Retry-After"]) >= 1
    spoofed = await call(
        stack.http, "POST", f"{stack.url}/v1/auth/login", login, headers={"X-Forwarded-For": "198.51.100.1"}
    )
    assert spoofed.status == 429, "an untrusted X-Forwarded-For does not make a new client"


async def test_an_upstream_that_is_down_is_502_and_one_that_hangs_is_504(make_stack: StackFactory) -> None:
    stack = await make_stack(GATEWAY_UPSTREAM_TIMEOUT_SECONDS="1")
    account = await sign_up_and_log_in(stack.http, stack.url)
    down = await call(
        stack.http, "POST", f"{stack.url}/v1/playback/sessions", {"profile_id": "p", "title_id": "t"},
        token=account.token,
    )  # fmt: skip
    assert down.status == 502
    assert down.body["upstream"] == "playback" and "playback" in down.body["message"]
    history = await call(stack.http, "GET", f"{stack.url}/v1/profiles/p1/history", token=account.token)
    assert history.status == 502 and history.body["upstream"] == "history"
    hung = await call(stack.http, "GET", f"{stack.url}/v1/catalog/hang", token=account.token)
    assert hung.status == 504
    assert hung.body["upstream"] == "catalog" and hung.body["error"] == "gateway_timeout"
    billing = await call(stack.http, "GET", f"{stack.url}/v1/billing/subscription", token=account.token)
    assert billing.status == 503 and billing.body["upstream"] == "billing", "not configured"


async def test_an_unknown_route_is_a_json_404(make_stack: StackFactory) -> None:
    stack = await make_stack()
    account = await sign_up_and_log_in(stack.http, stack.url)
    for path in ("/v1/nothing", "/v2/accounts", "/v1/profiles/p1/elsewhere", "/"):
        reply = await call(stack.http, "GET", f"{stack.url}{path}", token=account.token)
        assert reply.status == 404, (path, reply)
        assert reply.body["error"] == "not_found"
    assert stack.catalog.seen == []


async def test_a_body_over_64_kib_is_a_json_413_and_is_not_forwarded(make_stack: StackFactory) -> None:
    stack = await make_stack()
    account = await sign_up_and_log_in(stack.http, stack.url)
    big = b'{"name": "' + b"x" * (64 * 1024) + b'"}'
    sized = await call(stack.http, "POST", f"{stack.url}/v1/catalog/titles", raw=big, token=account.token)
    assert sized.status == 413 and sized.body["error"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    async with stack.http.post(
        f"{stack.url}/v1/catalog/titles",
        data=chunks(),
        headers={"Authorization": f"Bearer {account.token}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
    assert stack.catalog.seen == []


async def test_the_trace_continues_from_the_client_through_the_gateway_to_accounts(
    bus_infra: Layout, make_stack: StackFactory
) -> None:
    stack = await make_stack()
    account = await sign_up_and_log_in(stack.http, stack.url)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    reply = await call(
        stack.http,
        "POST",
        f"{stack.url}/v1/accounts/{account.account_id}/profiles",
        {"name": "Traced"},
        token=account.token,
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    assert reply.status == 201

    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = http_json(f"{bus_infra.zipkin_url}/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:
            return None
        kinds = {(s.get("localEndpoint", {}).get("serviceName"), s.get("kind")) for s in found}
        wanted = {
            ("gateway", "SERVER"),
            ("gateway", "CLIENT"),
            ("accounts", "SERVER"),
            ("accounts", "PRODUCER"),
        }
        return found if wanted <= kinds else None

    found = await wait_for(lambda: asyncio.to_thread(spans), "the gateway's and accounts' spans", 30, 0.5)

    def one(service: str, kind: str) -> dict[str, Any]:
        return next(
            s for s in found if s["localEndpoint"]["serviceName"] == service and s.get("kind") == kind
        )

    gateway_server, gateway_client = one("gateway", "SERVER"), one("gateway", "CLIENT")
    accounts_server, producer = one("accounts", "SERVER"), one("accounts", "PRODUCER")
    assert gateway_server["parentId"] == parent_id, "the gateway continues the caller's trace"
    assert gateway_client["parentId"] == gateway_server["id"]
    assert accounts_server["parentId"] == gateway_client["id"], (
        "the upstream's SERVER span is the CLIENT's child"
    )
    assert producer["parentId"] == accounts_server["id"], "the outbox carries the trace to the publish"
    assert gateway_server["tags"]["reelbus.account_id"] == account.account_id
    assert accounts_server["tags"]["reelbus.profile_id"] == reply.body["profile_id"]


async def test_a_missing_upstream_setting_exits_2_naming_it(spawn_service: SpawnService) -> None:
    gateway = spawn_service("services.gateway", "GATEWAY_", GATEWAY_ACCOUNTS_URL="http://127.0.0.1:1")
    assert await asyncio.to_thread(gateway.proc.wait, 30) == 2
    assert "GATEWAY_CATALOG_URL" in gateway.output()
