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
    Route("/v1/billing", "billing"),
    Route("/v1/billing/{rest:.+}", "billing"),
)

# (method, path) pairs that need no access token: sign-up and login. Rate-limited per client address.
PUBLIC_ROUTES: tuple[tuple[str, str], ...] = (("POST", "/v1/accounts"), ("POST", "/v1/auth/login"))
