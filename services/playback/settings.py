"""Playback's settings: the bus settings plus its own, from ``PLAYBACK_*`` variables."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.bus.runtime import BusSettings

Network = IPv4Network | IPv6Network


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="PLAYBACK_", extra="ignore", frozen=True)

    #: PostgreSQL database of this service (projections, sessions, outbox).
    database_url: str
    db_pool_max_size: int = Field(10, ge=1, le=200)
    #: YAML or JSON file declaring the Open Connect appliances (see appliances.example.yaml).
    appliances_file: Path
    #: Peers whose X-Forwarded-For is believed: a comma-separated CIDR list.
    trusted_proxies: Annotated[tuple[Network, ...], NoDecode] = (
        ip_network("127.0.0.1/32"),
        ip_network("::1/128"),
    )
    #: How far past the title's runtime a reported position may be (clock skew, credits, rounding).
    position_margin_ms: int = Field(60_000, ge=0)
    #: At most this many appliance URLs in a manifest.
    manifest_max_urls: int = Field(3, ge=1, le=10)
    #: Readiness waits at most this long for the projections to reach the end offsets seen at start.
    catch_up_timeout_seconds: float = Field(300.0, gt=0)
    #: The outbox relay looks for unpublished events at least this often (it is also woken on writes).
    outbox_poll_seconds: float = Field(1.0, gt=0)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _cidr_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())
        return value
