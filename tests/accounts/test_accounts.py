"""The accounts service as a process against the real PostgreSQL, Kafka and registry."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.bus.auth import TokenIssuer
from services.bus.events import ProfileCreated
from services.cli.infra import Layout
from tests.accounts.service import (
    Account,
    accounts_database,
    call,
    fetch_value,
    now_ms,
    profile_events,
    sign_up_and_log_in,
    start_accounts,
)
from tests.conftest import SpawnService, unique, wait_for

pytestmark = pytest.mark.infra


@pytest.fixture
async def database(bus_infra: Layout) -> AsyncIterator[str]:
    async with accounts_database(bus_infra) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def create_profile(
    http: aiohttp.ClientSession, base: str, account: Account, name: str, kids: bool = False
) -> str:
    made = await call(
        http,
        "POST",
        f"{base}/v1/accounts/{account.account_id}/profiles",
        {"name": name, "kids": kids},
        token=account.token,
    )
    assert made.status == 201, made
    return str(made.body["profile_id"])


async def events_once_sent(
    layout: Layout, database: str, account: Account, since: int, count: int
) -> list[ProfileCreated]:
    """The account's events once ``count`` arrived and the outbox has nothing left to send."""

    async def arrived() -> list[ProfileCreated] | None:
        unsent = await fetch_value(database, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        found = await profile_events(layout, account.account_id, since)
        return found if unsent == 0 and len(found) >= count else None

    return await wait_for(arrived, f"{count} ProfileCreated event(s)", 30, 0.3)


async def test_sign_up_log_in_and_create_profiles_each_published_once(
    bus_infra: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    since = now_ms()
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)

    again = await call(
        http,
        "POST",
        f"{service.url}/v1/auth/login",
        {
            "email": f"  {account.email.upper()} ",
            "password": account.password,
            "device_id": "p",
            "device_type": "web",
        },
    )
    assert again.status == 200, "the email is normalised at login as at sign-up"
    assert again.body["token_type"] == "Bearer" and again.body["expires_in"] == 900

    kid = await create_profile(http, service.url, account, "Kid", kids=True)
    grown = await create_profile(http, service.url, account, "Grown-up")
    listed = await call(
        http, "GET", f"{service.url}/v1/accounts/{account.account_id}/profiles", token=account.token
    )
    assert listed.status == 200
    assert [(p["profile_id"], p["name"], p["kids"]) for p in listed.body["profiles"]] == [
        (kid, "Kid", True),
        (grown, "Grown-up", False),
    ]

    events = await events_once_sent(bus_infra, database, account, since, 2)
    assert [(str(e.profile_id), e.name, e.kids) for e in events] == [
        (kid, "Kid", True),
        (grown, "Grown-up", False),
    ]
    assert {str(e.account_id) for e in events} == {account.account_id}
    assert len({e.event_id for e in events}) == 2, "exactly one event per profile"


async def test_an_idempotency_key_replays_the_first_profile_and_publishes_once(
    bus_infra: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    since = now_ms()
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    url = f"{service.url}/v1/accounts/{account.account_id}/profiles"
    key = {"Idempotency-Key": unique("create")}
    first = await call(http, "POST", url, {"name": "Mum"}, token=account.token, headers=key)
    second = await call(http, "POST", url, {"name": "Mum"}, token=account.token, headers=key)
    assert first.status == second.status == 201
    assert first.body["profile_id"] == second.body["profile_id"]
    assert second.headers.get("Idempotent-Replayed") == "true"
    events = await events_once_sent(bus_infra, database, account, since, 1)
    assert len(events) == 1


async def test_a_taken_email_is_409_whatever_its_case(
    spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    taken = await call(
        http,
        "POST",
        f"{service.url}/v1/accounts",
        {"email": account.email.upper(), "password": "another long password"},
    )
    assert taken.status == 409
    assert taken.body["error"] == "conflict"
    assert account.account_id not in str(taken.body), "nothing more is revealed"


async def test_a_wrong_password_and_an_unknown_email_are_the_same_401(
    spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    login = f"{service.url}/v1/auth/login"
    device = {"device_id": "d", "device_type": "tv"}
    wrong = await call(
        http, "POST", login, {"email": account.email, "password": "not the password", **device}
    )
    unknown = await call(
        http, "POST", login, {"email": f"{unique('nobody')}@example.com", "password": "whatever123", **device}
    )
    assert wrong.status == unknown.status == 401
    assert wrong.body == unknown.body
    assert "access_token" not in wrong.body


async def test_repeated_failed_logins_for_an_email_are_throttled_with_429(
    spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    service = await start_accounts(
        spawn_service, database, ACCOUNTS_LOGIN_MAX_FAILURES="3", ACCOUNTS_LOGIN_FAILURE_WINDOW_SECONDS="60"
    )
    account = await sign_up_and_log_in(http, service.url)
    other = await sign_up_and_log_in(http, service.url)
    login = f"{service.url}/v1/auth/login"
    device = {"device_id": "d", "device_type": "tv"}
    for _ in range(3):
        failed = await call(
            http, "POST", login, {"email": account.email, "password": "wrong password", **device}
        )
        assert failed.status == 401
    throttled = await call(
        http, "POST", login, {"email": account.email, "password": account.password, **device}
    )
    assert throttled.status == 429, "even the right password waits out the window"
    assert throttled.body["error"] == "rate_limited"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    fine = await call(http, "POST", login, {"email": other.email, "password": other.password, **device})
    assert fine.status == 200, "the throttle is per email"


async def test_a_sixth_profile_is_409_naming_the_limit_and_is_not_published(
    bus_infra: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    since = now_ms()
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    made = await asyncio.gather(*(create_profile(http, service.url, account, f"P{i}") for i in range(5)))
    sixth = await call(
        http,
        "POST",
        f"{service.url}/v1/accounts/{account.account_id}/profiles",
        {"name": "One too many"},
        token=account.token,
    )
    assert sixth.status == 409
    assert "at most 5 profiles" in sixth.body["message"]
    events = await events_once_sent(bus_infra, database, account, since, 5)
    assert sorted(str(e.profile_id) for e in events) == sorted(made)


async def test_concurrent_requests_cannot_pass_the_profile_limit_together(
    spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    url = f"{service.url}/v1/accounts/{account.account_id}/profiles"
    replies = await asyncio.gather(
        *(call(http, "POST", url, {"name": f"P{i}"}, token=account.token) for i in range(8))
    )
    assert sorted(r.status for r in replies) == [201] * 5 + [409] * 3


async def test_another_accounts_token_is_403(
    spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    service = await start_accounts(spawn_service, database)
    owner = await sign_up_and_log_in(http, service.url)
    intruder = await sign_up_and_log_in(http, service.url)
    url = f"{service.url}/v1/accounts/{owner.account_id}/profiles"
    created = await call(http, "POST", url, {"name": "Theirs"}, token=intruder.token)
    listed = await call(http, "GET", url, token=intruder.token)
    assert created.status == listed.status == 403
    assert created.body["field"] == "account_id"
    assert await fetch_value(database, "SELECT count(*) FROM profiles") == 0


async def test_missing_forged_expired_and_foreign_audience_tokens_are_401(
    spawn_service: SpawnService, database: str, http: aiohttp.ClientSession, token_issuer: TokenIssuer
) -> None:
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    url = f"{service.url}/v1/accounts/{account.account_id}/profiles"
    forged = TokenIssuer(Ed25519PrivateKey.generate()).issue(account.account_id, "d", "tv")
    expired = TokenIssuer(token_issuer.key, ttl_seconds=-60).issue(account.account_id, "d", "tv")
    foreign = TokenIssuer(token_issuer.key, audience="someone-else").issue(account.account_id, "d", "tv")
    cases = {
        "missing": (None, "missing Authorization"),
        "forged": (forged, "signature"),
        "expired": (expired, "expired"),
        "foreign audience": (foreign, "audience"),
        "garbage": ("not-a-jwt", "malformed"),
    }
    for name, (token, why) in cases.items():
        for method in ("GET", "POST"):
            reply = await call(http, method, url, {"name": "X"} if method == "POST" else None, token=token)
            assert reply.status == 401, (name, reply)
            assert why in reply.body["message"], (name, reply.body)
            assert reply.body["field"] == "Authorization"
    assert (await call(http, "GET", url, token=account.token)).status == 200
    assert await fetch_value(database, "SELECT count(*) FROM outbox") == 0


async def test_bad_input_is_a_4xx_naming_the_field_and_publishes_nothing(
    bus_infra: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    since = now_ms()
    service = await start_accounts(spawn_service, database)
    account = await sign_up_and_log_in(http, service.url)
    signup = f"{service.url}/v1/accounts"
    login = f"{service.url}/v1/auth/login"
    profiles = f"{service.url}/v1/accounts/{account.account_id}/profiles"
    big = b'{"name": "' + b"x" * (70 * 1024) + b'"}'
    cases: list[tuple[str, str, object, bytes | None, int, str | None]] = [
        # (url, method, json, raw body, status, field)
        (signup, "POST", None, b'{"email": "a@b.co",', 400, None),
        (signup, "POST", None, b"[1, 2]", 400, None),
        (signup, "POST", {"password": "long enough pw"}, None, 422, "email"),
        (signup, "POST", {"email": "a@b.co"}, None, 422, "password"),
        (signup, "POST", {"email": "not an email", "password": "long enough pw"}, None, 422, "email"),
        (signup, "POST", {"email": "a@b.co", "password": "short"}, None, 422, "password"),
        (signup, "POST", {"email": 42, "password": "long enough pw"}, None, 422, "email"),
        (login, "POST", {"email": account.email, "password": account.password}, None, 422, "device_id"),
        (
            login,
            "POST",
            {"email": account.email, "password": 1, "device_id": "d", "device_type": "tv"},
            None,
            422,
            "password",
        ),
        (profiles, "POST", None, b"{nope", 400, None),
        (profiles, "POST", {}, None, 422, "name"),
        (profiles, "POST", {"name": ""}, None, 422, "name"),
        (profiles, "POST", {"name": 7}, None, 422, "name"),
        (profiles, "POST", {"name": "Kid", "kids": "yes"}, None, 422, "kids"),
        (profiles, "POST", {"name": "x" * 51}, None, 422, "name"),
        (profiles, "POST", None, big, 413, None),
        (f"{service.url}/v1/accounts/not-a-uuid/profiles", "POST", {"name": "Kid"}, None, 400, "account_id"),
    ]
    for url, method, body, raw, status, field in cases:
        reply = await call(http, method, url, body, raw=raw, token=account.token)
        assert reply.status == status, (url, body, raw and raw[:40], reply)
        assert isinstance(reply.body, dict) and reply.body["error"] and reply.body["message"], reply
        assert reply.body.get("field") == field, (body, reply.body)
    form = await call(
        http, "POST", profiles, raw=b"name=Kid", token=account.token,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert form.status == 415 and form.body["field"] == "Content-Type"

    assert await fetch_value(database, "SELECT count(*) FROM profiles") == 0
    assert await fetch_value(database, "SELECT count(*) FROM outbox") == 0
    # A good request after the bad ones: its event is the account's only one.
    good = await create_profile(http, service.url, account, "Kid")
    events = await events_once_sent(bus_infra, database, account, since, 1)
    assert [str(e.profile_id) for e in events] == [good]


async def test_a_profile_event_committed_before_a_crash_is_published_after_the_restart(
    bus_infra: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    since = now_ms()
    held = await start_accounts(spawn_service, database, ACCOUNTS_OUTBOX_RELAY_START_DELAY_SECONDS="600")
    account = await sign_up_and_log_in(http, held.url)
    profile_id = await create_profile(http, held.url, account, "Survivor")
    assert await fetch_value(database, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 1, "committed"
    assert await profile_events(bus_infra, account.account_id, since) == [], "not yet published"

    held.proc.kill()  # SIGKILL: between the commit and the publish
    assert await asyncio.to_thread(held.proc.wait, 10) == -9

    restarted = await start_accounts(spawn_service, database)
    events = await events_once_sent(bus_infra, database, account, since, 1)
    assert [str(e.profile_id) for e in events] == [profile_id]
    assert events[0].name == "Survivor" and str(events[0].account_id) == account.account_id
    listed = await call(
        http, "GET", f"{restarted.url}/v1/accounts/{account.account_id}/profiles", token=account.token
    )
    assert [p["profile_id"] for p in listed.body["profiles"]] == [profile_id]


async def test_a_private_key_that_cannot_be_read_exits_2_naming_the_setting(
    spawn_service: SpawnService, database: str, tmp_path: Path
) -> None:
    service = spawn_service(
        "services.accounts",
        "ACCOUNTS_",
        ACCOUNTS_DATABASE_URL=database,
        ACCOUNTS_TOKEN_PRIVATE_KEY_FILE=str(tmp_path / "absent.pem"),
    )
    code = await asyncio.to_thread(service.proc.wait, 30)
    assert code == 2
    assert "ACCOUNTS_TOKEN_PRIVATE_KEY_FILE" in service.output()


async def test_sigterm_stops_the_service_and_its_relay_within_the_grace_period(
    bus_infra: Layout, spawn_service: SpawnService, database: str, http: aiohttp.ClientSession
) -> None:
    since = now_ms()
    grace = 8.0
    service = await start_accounts(spawn_service, database, ACCOUNTS_SHUTDOWN_GRACE_SECONDS=str(grace))
    account = await sign_up_and_log_in(http, service.url)
    await create_profile(http, service.url, account, "Last one")
    await events_once_sent(bus_infra, database, account, since, 1)
    began = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(service.proc.wait, grace + 5) == 0, service.output()
    assert time.monotonic() - began < grace
    assert "shutdown complete" in service.output()
