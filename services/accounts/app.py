"""The accounts service for the runtime: HTTP routes, the database and the outbox relay as resources."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import NoReturn

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from services.accounts import handlers
from services.accounts.adapters.db import AccountsStore, Profile, create_pool
from services.accounts.adapters.outbox import OutboxRelay
from services.accounts.passwords import Passwords
from services.accounts.settings import Network, Settings
from services.bus.auth import TokenIssuer, claims_of, load_private_key, load_public_key
from services.bus.http import parse_body
from services.bus.runtime import BUS, EXIT_BAD_SETTING, ServiceSpec

log = logging.getLogger("reelbus.accounts")

PUBLIC_ROUTES = (("POST", "/v1/accounts"), ("POST", "/v1/auth/login"))


@dataclass(frozen=True)
class Deps:
    settings: Settings
    issuer: TokenIssuer
    passwords: Passwords
    policy: handlers.LoginPolicy


DEPS = web.AppKey("deps", Deps)
STORE = web.AppKey("store", AccountsStore)
RELAY = web.AppKey("relay", OutboxRelay)


def load_issuer(settings: Settings) -> TokenIssuer:
    """The token issuer from the private key, which must pair with the public key services verify
    with; exits 2 naming the setting otherwise."""
    try:
        key = load_private_key(settings.token_private_key_file)
    except (OSError, ValueError) as exc:
        _bad_setting(
            "ACCOUNTS_TOKEN_PRIVATE_KEY_FILE", f"cannot load {settings.token_private_key_file}: {exc}"
        )
    try:
        public = load_public_key(settings.token_public_key_file)
    except (OSError, ValueError) as exc:
        where = settings.token_public_key_file
        _bad_setting("ACCOUNTS_TOKEN_PUBLIC_KEY_FILE", f"cannot load {where}: {exc}")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if key.public_key().public_bytes(*raw) != public.public_bytes(*raw):
        _bad_setting(
            "ACCOUNTS_TOKEN_PRIVATE_KEY_FILE",
            f"{settings.token_private_key_file} does not pair with {settings.token_public_key_file}",
        )
    return TokenIssuer(key, ttl_seconds=settings.token_ttl_seconds)


def _bad_setting(name: str, why: str) -> NoReturn:
    print(f"setting {name}: {why}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_SETTING)


def client_address(request: web.Request, trusted: Sequence[Network]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the rightmost address
    in ``X-Forwarded-For`` that is not one."""
    hops = [
        part.strip()
        for header in request.headers.getall("X-Forwarded-For", [])
        for part in header.split(",")
        if part.strip()
    ]
    hops.append(request.remote or "")
    for hop in reversed(hops):
        try:
            address = ip_address(hop)
        except ValueError:
            return hop  # not an address: nobody trusted wrote it
        if not any(address in net for net in trusted):
            return hop
    return hops[0]


# -- resources ---------------------------------------------------------------------------------


async def database(app: web.Application) -> AsyncIterator[None]:
    settings = app[DEPS].settings
    pool = await create_pool(settings.database_url, settings.database_pool_size)
    store = AccountsStore(pool)
    await store.create_schema()
    app[STORE] = store
    yield
    await pool.close()


async def outbox_relay(app: web.Application) -> AsyncIterator[None]:
    settings = app[DEPS].settings
    relay = OutboxRelay(
        app[STORE].pool,
        app[BUS],
        batch_size=settings.outbox_batch_size,
        poll_interval=settings.outbox_poll_interval_seconds,
        retention_hours=settings.outbox_retention_hours,
        start_delay=settings.outbox_relay_start_delay_seconds,
    )
    app[RELAY] = relay
    yield


async def run_relay(app: web.Application) -> None:
    """A root task: if the relay ever ends, the runtime stops the whole service with a failure."""
    await app[RELAY].run()


async def database_answers(app: web.Application) -> bool:
    async with app[STORE].pool.acquire() as conn:
        return bool(await conn.fetchval("SELECT 1"))


# -- HTTP --------------------------------------------------------------------------------------


async def post_account(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    cmd = await parse_body(request, handlers.SignUp)
    account_id = await handlers.sign_up(
        cmd,
        store=request.app[STORE],
        passwords=deps.passwords,
        min_password_length=deps.settings.password_min_length,
    )
    return web.json_response({"account_id": str(account_id)}, status=201)


async def post_login(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    cmd = await parse_body(request, handlers.LogIn)
    try:
        session = await handlers.log_in(
            cmd,
            store=request.app[STORE],
            passwords=deps.passwords,
            issuer=deps.issuer,
            policy=deps.policy,
            client=client_address(request, deps.settings.trusted_proxies),
        )
    except handlers.Throttled as exc:
        return web.json_response(
            {
                "error": "rate_limited",
                "message": f"too many failed logins for this email; retry in {exc.retry_after_seconds}s",
            },
            status=429,
            headers={"Retry-After": str(exc.retry_after_seconds)},
        )
    return web.json_response(
        {
            "access_token": session.access_token,
            "token_type": "Bearer",
            "expires_in": session.expires_in,
            "account_id": str(session.account_id),
        },
        headers={"Cache-Control": "no-store"},
    )


async def post_profile(request: web.Request) -> web.Response:
    account_id = handlers.owned_account(request.match_info["account_id"], claims_of(request))
    cmd = await parse_body(request, handlers.CreateProfile)
    profile, replayed = await handlers.create_profile(
        account_id,
        cmd,
        idempotency_key=request.headers.get("Idempotency-Key"),
        store=request.app[STORE],
        max_profiles=request.app[DEPS].settings.max_profiles_per_account,
        wake_relay=request.app[RELAY].wake,
    )
    headers = {"Idempotent-Replayed": "true"} if replayed else {}
    return web.json_response(_profile_doc(profile), status=201, headers=headers)


async def get_profiles(request: web.Request) -> web.Response:
    account_id = handlers.owned_account(request.match_info["account_id"], claims_of(request))
    profiles = await handlers.list_profiles(account_id, store=request.app[STORE])
    return web.json_response({"profiles": [_profile_doc(p) for p in profiles]})


def _profile_doc(profile: Profile) -> dict[str, object]:
    return {
        "profile_id": str(profile.profile_id),
        "name": profile.name,
        "kids": profile.kids,
        "created_at": profile.created_at.isoformat(),
    }


def create_spec(settings: Settings) -> ServiceSpec:
    deps = Deps(
        settings=settings,
        issuer=load_issuer(settings),
        passwords=Passwords(
            settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism
        ),
        policy=handlers.LoginPolicy(settings.login_max_failures, settings.login_failure_window_seconds),
    )

    def routes(app: web.Application) -> None:
        app[DEPS] = deps
        app.router.add_post("/v1/accounts", post_account)
        app.router.add_post("/v1/auth/login", post_login)
        app.router.add_post("/v1/accounts/{account_id}/profiles", post_profile)
        app.router.add_get("/v1/accounts/{account_id}/profiles", get_profiles)

    return ServiceSpec(
        name="accounts",
        produces=[handlers.PROFILES_TOPIC],
        routes=routes,
        resources=[database, outbox_relay],
        public_routes=PUBLIC_ROUTES,
        root_tasks={"outbox-relay": run_relay},
        ready_checks={"database": database_answers},
    )
