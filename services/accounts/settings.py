"""The accounts service's settings, from ``ACCOUNTS_*`` variables."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.bus.runtime import BusSettings, default_keys_dir

Network = IPv4Network | IPv6Network


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="ACCOUNTS_", extra="ignore", frozen=True)

    database_url: str = "postgresql://reelbus@127.0.0.1:5432/accounts"
    database_pool_size: int = Field(default=10, ge=1)

    token_private_key_file: Path = Field(default_factory=lambda: default_keys_dir() / "token-signing.pem")
    token_ttl_seconds: int = Field(default=900, gt=0)

    password_min_length: int = Field(default=10, ge=8)
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)
    argon2_parallelism: int = Field(default=4, ge=1)

    # Login throttling: this many failures for one email within the window answer 429 until the oldest
    # of them leaves the window.
    login_max_failures: int = Field(default=5, ge=1)
    login_failure_window_seconds: float = Field(default=60.0, gt=0)

    max_profiles_per_account: int = Field(default=5, ge=1)

    # The transactional outbox's relay.
    outbox_poll_interval_seconds: float = Field(default=1.0, gt=0)
    outbox_batch_size: int = Field(default=100, ge=1)
    outbox_retention_hours: float = Field(default=168.0, gt=0)
    # Hold the relay back this long after start (tests use it to crash between commit and publish).
    outbox_relay_start_delay_seconds: float = Field(default=0.0, ge=0)

    # Proxies (CIDRs, comma-separated) whose X-Forwarded-For is believed; the gateway's address, say.
    trusted_proxies: Annotated[tuple[Network, ...], NoDecode] = ()

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip())
        return value
