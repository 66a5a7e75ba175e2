"""The dashboard's settings, from ``DASHBOARD_*`` variables."""

from __future__ import annotations

import re

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.bus.runtime import BusSettings


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="DASHBOARD_", extra="ignore", frozen=True)

    http_port: int = 8110

    # How often topic high watermarks and group offsets are sampled (the page polls once a second).
    sample_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    # Rates are the high-watermark delta over this window (smooths the per-second jitter).
    rate_window_seconds: float = Field(default=5.0, gt=0, le=600)
    # Consumer groups shown: those whose id matches this regular expression. Empty: the groups named
    # exactly after a consumer service in topics/topics.yaml (the services' default group ids).
    group_pattern: str = ""
    group_refresh_seconds: float = Field(default=10.0, gt=0)  # how often the group list is re-read
    max_groups: int = Field(default=40, ge=1, le=500)

    # The views of scaling.decisions, anomalies.detected and nodes.mount-stall start this many
    # records before each partition's end (no consumer group: see services/dashboard/__init__.py).
    backlog_per_partition: int = Field(default=200, ge=0, le=100_000)
    recent_items: int = Field(default=25, ge=1, le=1000)  # decisions and anomalies kept and shown
    mount_stall_window_seconds: float = Field(default=600.0, gt=0)  # the chart's time span
    mount_stall_max_points: int = Field(default=600, ge=10, le=100_000)  # per node

    # Zipkin: its API (queried by the service) and its UI (linked from the page, opened by a browser).
    zipkin_url: str = "http://localhost:9411"
    zipkin_ui_url: str = "http://localhost:9411/zipkin"
    trace_service: str = "gateway"  # recent requests = recent traces of this service
    trace_limit: int = Field(default=15, ge=1, le=200)
    trace_lookback_seconds: float = Field(default=900.0, gt=0)
    trace_poll_seconds: float = Field(default=2.0, gt=0)
    zipkin_timeout_seconds: float = Field(default=2.0, gt=0)

    # The scope a token needs for the JSON endpoints (the static page itself is public).
    read_scope: str = "ops:read"

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("zipkin_url", "zipkin_ui_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("expected an http:// or https:// base URL")
        return value
