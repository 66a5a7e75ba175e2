"""The history service's settings, from ``HISTORY_*`` variables."""

from __future__ import annotations

import re
from datetime import timedelta

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.bus.runtime import BusSettings

KEYSPACE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="HISTORY_", extra="ignore", frozen=True)

    cassandra_hosts: str = "127.0.0.1"  # comma-separated contact points
    cassandra_port: int = Field(default=9042, ge=1, le=65535)
    cassandra_protocol_version: int = Field(default=5, ge=3, le=5)
    cassandra_request_timeout: float = Field(default=10.0, gt=0)
    cassandra_connect_timeout: float = Field(default=60.0, gt=0)  # keep retrying the first connection
    keyspace: str = "history"
    # CompressedVH: live records whose viewing began longer ago than this (seconds, or an ISO 8601
    # duration) are rolled up; 0: never by age
    rollup_after: timedelta = timedelta(days=30)
    # ... and so are all but the newest N live records of a profile (unset: no count limit)
    rollup_keep_live: int | None = Field(default=None, ge=0)
    rollup_interval: timedelta = timedelta(hours=1)  # the periodic rollup; 0 turns it off
    chunk_bytes: int = Field(default=64 * 1024, ge=16, le=1024 * 1024)
    completed_fraction: float = Field(default=0.95, gt=0, le=1)  # a position this far in counts as watched

    @field_validator("keyspace")
    @classmethod
    def _keyspace(cls, value: str) -> str:
        if not KEYSPACE_NAME.match(value):
            raise ValueError("a keyspace is lower-case letters, digits and _, at most 48, not a digit first")
        return value

    @field_validator("cassandra_hosts")
    @classmethod
    def _hosts(cls, value: str) -> str:
        if not [h for h in value.split(",") if h.strip()]:
            raise ValueError("at least one host")
        return value

    @field_validator("rollup_after", "rollup_interval", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        """Plain numbers are seconds (``3600``); ISO 8601 durations (``PT1H``, ``P30D``) work too."""
        if isinstance(value, str):
            try:
                return timedelta(seconds=float(value))
            except ValueError:
                return value
        return value

    @field_validator("rollup_after", "rollup_interval")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @property
    def contact_points(self) -> list[str]:
        return [h.strip() for h in self.cassandra_hosts.split(",") if h.strip()]
