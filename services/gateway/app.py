"""The gateway for the runtime: the route table as aiohttp routes, the upstream session and Redis as
resources. The runtime's middlewares verify the access token (except on the public routes), turn
errors into JSON and continue the caller's trace in a SERVER span."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from opentelemetry import trace
from redis.asyncio import Redis

from services.bus.auth import Claims
from services.bus.http import MAX_BODY_BYTES, ApiError, Handler
from services.bus.runtime import ServiceSpec
from services.bus.tracing import ATTR_ACCOUNT_ID
from services.gateway import handlers
from services.gateway.adapters.ratelimit import Limit, RateLimiter
from services.gateway.adapters.upstream import UpstreamFailed, Upstreams, new_session
from services.gateway.routes import ABR_DECISION_PATH, HEARTBEAT_ROUTE, PUBLIC_ROUTES, ROUTES
from services.gateway.settings import Settings

BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


@dataclass(frozen=True)
class Limits:
    account: Limit
    public: Limit


SETTINGS = web.AppKey("gateway_settings", Settings)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
LIMITER = web.AppKey("limiter", RateLimiter)


# -- resources ---------------------------------------------------------------------------------


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = new_session(
        settings.upstream_max_connections,
        settings.upstream_timeout_seconds,
        settings.upstream_connect_timeout_seconds,
    )
    app[UPSTREAMS] = Upstreams(session, settings.upstreams())
    yield
    await session.close()


async def rate_limiter(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
    )
    app[LIMITER] = RateLimiter(redis, settings.redis_key_prefix)
    yield
    await redis.aclose()


# -- HTTP --------------------------------------------------------------------------------------


async def limit_rate(request: web.Request) -> None:
    """Per account when the request carries verified claims, else (public routes) per client address."""
    settings = request.app[SETTINGS]
    claims = request.get("claims")
    if isinstance(claims, Claims):
        trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, claims.account_id)
        identity, who = f"account:{claims.account_id}", "account"
        limit = Limit(settings.rate_limit_account_requests, settings.rate_limit_account_window_seconds)
    else:
        address = handlers.client_address(
            request.headers.getall("X-Forwarded-For", []), request.remote or "", settings.trusted_proxies
        )
        identity, who = f"address:{address}", "address"
        limit = Limit(settings.rate_limit_public_requests, settings.rate_limit_public_window_seconds)
    await handlers.admit(identity, who, limit, limiter=request.app[LIMITER])


def rate_limited(exc: handlers.RateLimited) -> web.Response:
    return web.json_response(
        {"error": "rate_limited", "message": str(exc)},
        status=429,
        headers={"Retry-After": str(exc.retry_after_seconds)},
    )


def proxy_to(upstream: str) -> Handler:
    async def proxy(request: web.Request) -> web.StreamResponse:
        try:
            await limit_rate(request)
        except handlers.RateLimited as exc:
            return rate_limited(exc)
        if any(segment in {".", ".."} for segment in request.path.split("/")):
            raise ApiError(400, "the path must not contain '.' or '..' segments", field="path")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, f"body is larger than {MAX_BODY_BYTES} bytes")
        body = await request.read()  # over client_max_size: a JSON 413 from the errors middleware
        inbound = handlers.Inbound(
            method=request.method,
            path_qs=request.raw_path,
            headers=request.headers,
            forwarded_for=request.headers.getall("X-Forwarded-For", []),
            peer=request.remote or "",
            body=body if body or request.method not in BODYLESS else None,
        )
        try:
            answer = await handlers.forward(upstream, inbound, upstreams=request.app[UPSTREAMS])
        except UpstreamFailed as exc:
            code = {502: "bad_gateway", 503: "upstream_unavailable", 504: "gateway_timeout"}[exc.status]
            return web.json_response(
                {"error": code, "message": exc.message, "upstream": exc.upstream}, status=exc.status
            )
        return web.Response(status=answer.status, body=answer.body, headers=handlers.returned_headers(answer))

    return proxy


async def abr_decision(request: web.Request, session_id: str) -> Any:
    """The session's current ABR decision from the ABR service's read model; None when there is none
    or the ABR service cannot say (a heartbeat never fails because of it)."""
    headers = {name: request.headers[name] for name in ("Authorization",) if name in request.headers}
    headers["Accept"] = "application/json"
    path = ABR_DECISION_PATH.format(session_id=quote(session_id, safe=""))
    try:
        answer = await request.app[UPSTREAMS].send("abr", "GET", path, headers, None)
    except UpstreamFailed:
        return None
    if answer.status != 200:
        return None
    try:
        return json.loads(answer.body).get("abr")
    except (ValueError, AttributeError):
        return None


def heartbeat_with_abr() -> Handler:
    """Heartbeats are proxied to playback; an accepted one's answer gains the session's ABR decision."""
    to_playback = proxy_to("playback")

    async def heartbeat(request: web.Request) -> web.StreamResponse:
        response = await to_playback(request)
        if response.status != 202 or not isinstance(response, web.Response):
            return response
        try:
            doc = json.loads(response.body) if isinstance(response.body, bytes) else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return response
        doc["abr"] = await abr_decision(request, request.match_info["session_id"])
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        headers["Content-Type"] = "application/json"
        return web.Response(status=response.status, body=json.dumps(doc).encode(), headers=headers)

    return heartbeat


async def no_route(request: web.Request) -> web.StreamResponse:
    try:
        await limit_rate(request)
    except handlers.RateLimited as exc:
        return rate_limited(exc)
    raise ApiError(404, f"no route for {request.method} {request.path}", code="not_found")


def create_spec(settings: Settings) -> ServiceSpec:
    def routes(app: web.Application) -> None:
        app[SETTINGS] = settings
        app.router.add_post(HEARTBEAT_ROUTE, heartbeat_with_abr())
        for route in ROUTES:
            app.router.add_route("*", route.pattern, proxy_to(route.upstream))
        app.router.add_route("*", "/{anything:.*}", no_route)

    return ServiceSpec(
        name="gateway",
        routes=routes,
        resources=[upstream_session, rate_limiter],
        public_routes=PUBLIC_ROUTES,
    )
