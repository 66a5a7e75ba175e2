"""The recommender's HTTP API (through the gateway): a profile's rows, from the replica of the
compacted ``recommendations.profiles``; and the processor's progress, for evaluations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from aiohttp import web
from opentelemetry import trace

from services.bus.auth import claims_of
from services.bus.http import ApiError
from services.bus.tracing import ATTR_ACCOUNT_ID, ATTR_PROFILE_ID
from services.recommender import scoring
from services.recommender.adapters.replicas import Catalog, Lists, Owners
from services.recommender.handlers import Dependencies


@dataclass
class ReadModel:
    deps: Dependencies
    lists: Lists
    catalog: Catalog
    owners: Owners
    status: Any  # async () -> dict: the processor's progress


READ_MODEL = web.AppKey("recommender_read_model", ReadModel)


def routes(read_model: ReadModel) -> Any:
    def add(app: web.Application) -> None:
        app[READ_MODEL] = read_model
        app.router.add_get("/v1/profiles/{profile_id}/recommendations", get_recommendations)
        app.router.add_get("/v1/internal/recommender/status", get_status)

    return add


def path_uuid(request: web.Request, name: str) -> UUID:
    raw = request.match_info[name]
    try:
        return UUID(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a UUID, got {raw[:64]!r}", field=name) from None


async def get_recommendations(request: web.Request) -> web.StreamResponse:
    profile_id = path_uuid(request, "profile_id")
    claims = claims_of(request)
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(profile_id))
    span.set_attribute(ATTR_ACCOUNT_ID, claims.account_id)
    model = request.app[READ_MODEL]
    owner = model.owners.accounts.get(profile_id)
    if owner is None:
        raise ApiError(404, f"profile {profile_id} is unknown", field="profile_id")
    if str(owner) != claims.account_id.lower():
        raise ApiError(403, "the profile belongs to another account", field="profile_id")
    latest = model.lists.latest.get(profile_id)
    names = model.catalog.names
    rows = [] if latest is None else scoring.rows(latest.items, names)
    body = {
        "profile_id": str(profile_id),
        "rows": [
            {
                "name": row.name,
                "reason": row.reason,
                "titles": [{"title_id": t, "name": names.get(t, t)} for t in row.titles],
            }
            for row in rows
        ],
        "model_version": None if latest is None else latest.model_version,
        "computed_at": None if latest is None else latest.computed_at.isoformat().replace("+00:00", "Z"),
    }
    return web.json_response(body)


async def get_status(request: web.Request) -> web.StreamResponse:
    return web.json_response(await request.app[READ_MODEL].status())
