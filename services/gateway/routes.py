"""The gateway's route table, in one place: which public path goes to which upstream service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    pattern: str  # an aiohttp path pattern
    upstream: str  # a key of ``Settings.upstreams()``


ROUTES: tuple[Route, ...] = (
    Route("/v1/accounts", "accounts"),
    Route("/v1/accounts/{rest:.+}", "accounts"),
    Route("/v1/auth/{rest:.+}", "accounts"),
    Route("/v1/catalog/{rest:.+}", "catalog"),
    Route("/v1/playback/{rest:.+}", "playback"),
    Route("/v1/profiles/{profile_id}/history", "history"),
    Route("/v1/profiles/{profile_id}/recommendations", "recommender"),
    Route("/v1/billing", "billing"),
    Route("/v1/billing/{rest:.+}", "billing"),
    # The live dashboard: its page (public) and its JSON (an ``ops:read`` token).
    Route("/dashboard", "dashboard"),
    Route("/dashboard/{rest:.*}", "dashboard"),
    Route("/v1/dashboard/{rest:.+}", "dashboard"),
    Route("/v1/sessions/{session_id}/telemetry", "abr"),
    Route("/v1/sessions/{session_id}/abr-decision", "abr"),
)

# Heartbeats go to playback; the answer is merged with the session's current ABR decision from the
# ABR service's read model (``{"abr": {...}}``, null when there is none or the ABR service cannot say).
HEARTBEAT_ROUTE = "/v1/playback/sessions/{session_id}/heartbeats"
ABR_DECISION_PATH = "/v1/sessions/{session_id}/abr-decision"

# (method, path) pairs that need no access token: sign-up and login. Rate-limited per client address.
PUBLIC_ROUTES: tuple[tuple[str, str], ...] = (("POST", "/v1/accounts"), ("POST", "/v1/auth/login"))
# The dashboard's static page holds no data (a browser cannot send a token on a navigation); the JSON
# it polls needs a token with the ``ops:read`` scope (services/dashboard/__init__.py).
DASHBOARD_PAGE = ("/dashboard", "/dashboard/", "/dashboard/app.js", "/dashboard/style.css")
PUBLIC_ROUTES += tuple(("GET", path) for path in DASHBOARD_PAGE)
