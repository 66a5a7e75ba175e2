"""The gateway's settings, from ``GATEWAY_*`` variables."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.bus.runtime import BusSettings

Network = IPv4Network | IPv6Network


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    http_port: int = 8080

    # Upstream base URLs (scheme, host, port; no path). Billing is optional: without it its routes
    # answer 503.
    accounts_url: str
    catalog_url: str
    playback_url: str
    history_url: str
    billing_url: str | None = None
    # The ABR service (player telemetry, bitrate decisions). Optional: without it its routes answer
    # 503 and heartbeat responses carry "abr": null.
    abr_url: str | None = None
    # The live dashboard (its page and JSON). Optional: without it its routes answer 503.
    dashboard_url: str | None = None
    # The recommender's read model (a profile's rows). Optional: without it its route answers 503.
    recommender_url: str | None = None

    upstream_timeout_seconds: float = Field(default=10.0, gt=0)
    upstream_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    upstream_max_connections: int = Field(default=200, ge=1)

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "gateway:ratelimit"
    redis_timeout_seconds: float = Field(default=0.5, gt=0)

    # Sliding-window limits: per account (the token's subject) on authenticated routes, and per
    # client address on the public ones (sign-up, login).
    rate_limit_account_requests: int = Field(default=300, ge=1)
    rate_limit_account_window_seconds: float = Field(default=60.0, gt=0)
    rate_limit_public_requests: int = Field(default=30, ge=1)
    rate_limit_public_window_seconds: float = Field(default=60.0, gt=0)

    # Proxies (CIDRs, comma-separated) in front of the gateway whose X-Forwarded-For is believed
    # when working out the client's address for the per-address limit.
    trusted_proxies: Annotated[tuple[Network, ...], NoDecode] = ()

    @field_validator(
        "accounts_url",
        "catalog_url",
        "playback_url",
        "history_url",
        "billing_url",
        "abr_url",
        "dashboard_url",
        "recommender_url",
    )
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("expected an http:// or https:// base URL")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())
        return value

    def upstreams(self) -> dict[str, str | None]:
        return {
            "accounts": self.accounts_url,
            "catalog": self.catalog_url,
            "playback": self.playback_url,
            "history": self.history_url,
            "billing": self.billing_url,
            "abr": self.abr_url,
            "dashboard": self.dashboard_url,
            "recommender": self.recommender_url,
        }
