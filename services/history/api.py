"""The history HTTP API: request parsing, authorisation and JSON; the logic is in ``handlers``."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import wraps
from uuid import UUID

from aiohttp import web
from opentelemetry import trace

from services.bus.auth import Claims, claims_of
from services.bus.consumer import Retryable
from services.bus.http import ApiError, query_int
from services.bus.tracing import ATTR_ACCOUNT_ID, ATTR_PROFILE_ID, ATTR_TITLE_ID
from services.history import handlers
from services.history.handlers import Dependencies, RollupConflict
from services.history.records import iso

DEPS = web.AppKey("history_deps", Dependencies)
ADMIN_SCOPE = "history:admin"
TITLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
TRUE, FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})

View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes(app: web.Application) -> None:
    app.router.add_get("/v1/profiles/{profile_id}/history", get_history)
    app.router.add_get("/v1/profiles/{profile_id}/titles/{title_id}/resume", get_resume)
    app.router.add_post("/v1/internal/history/{profile_id}/rollup", post_rollup)


def store_errors(view: View) -> View:
    """Cassandra unavailable or a read that kept racing rollups: 503, with a hint to retry."""

    @wraps(view)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await view(request)
        except RollupConflict as exc:
            raise ApiError(409, str(exc), code="conflict") from None
        except Retryable as exc:
            raise ApiError(503, f"history is unavailable, retry: {exc}", code="unavailable") from None

    return wrapped


def path_uuid(request: web.Request, name: str) -> UUID:
    raw = request.match_info[name]
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a UUID, got {raw[:64]!r}", field=name) from None


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise ApiError(400, f"{name} must be true or false, got {raw[:32]!r}", field=name)


async def authorise(request: web.Request, profile_id: UUID) -> Claims:
    """The token's account must own the profile: 404 for a profile nobody owns, 403 for another's."""
    claims = claims_of(request)
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(profile_id))
    span.set_attribute(ATTR_ACCOUNT_ID, claims.account_id)
    owner = await handlers.owner_of(request.app[DEPS].store, profile_id)
    if owner is None:
        raise ApiError(404, f"profile {profile_id} is unknown", field="profile_id")
    if str(owner) != claims.account_id.lower():
        raise ApiError(403, "the profile belongs to another account", field="profile_id")
    return claims


@store_errors
async def get_history(request: web.Request) -> web.StreamResponse:
    profile_id = path_uuid(request, "profile_id")
    limit = query_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    full = query_bool(request, "full", False)
    await authorise(request, profile_id)
    store = request.app[DEPS].store
    if full:
        records = await handlers.full_history(store, profile_id, limit)
    else:
        records = await handlers.recent_history(store, profile_id, limit)
    return web.json_response(
        {"items": [r.item() for r in records], "source": "live+compressed" if full else "live"}
    )


@store_errors
async def get_resume(request: web.Request) -> web.StreamResponse:
    profile_id = path_uuid(request, "profile_id")
    title_id = request.match_info["title_id"]
    if not TITLE_ID.match(title_id):
        raise ApiError(400, "title_id must be 1-64 letters, digits, '.', '_', ':' or '-'", field="title_id")
    trace.get_current_span().set_attribute(ATTR_TITLE_ID, title_id)
    await authorise(request, profile_id)
    position_ms, updated_at = await handlers.resume_point(request.app[DEPS].store, profile_id, title_id)
    return web.json_response(
        {
            "profile_id": str(profile_id),
            "title_id": title_id,
            "position_ms": position_ms,
            "updated_at": None if updated_at is None else iso(updated_at),
        }
    )


@store_errors
async def post_rollup(request: web.Request) -> web.StreamResponse:
    profile_id = path_uuid(request, "profile_id")
    keep_live = query_int(request, "keep_live", -1, 0, 1_000_000)
    force = query_bool(request, "force", False)
    if ADMIN_SCOPE not in claims_of(request).scopes:
        raise ApiError(403, f"rollups need a token with the {ADMIN_SCOPE!r} scope", field="Authorization")
    result = await handlers.rollup_profile(
        request.app[DEPS], profile_id, keep_live=None if keep_live < 0 else keep_live, force=force
    )
    return web.json_response(result.as_json())
