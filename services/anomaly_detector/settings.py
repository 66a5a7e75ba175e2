"""The anomaly detector's settings, from ``ANOMALY_DETECTOR_*`` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.bus.streams import StreamSettings


class Settings(StreamSettings):
    """The stream runtime's settings (``services/bus/streams.py``: topic prefix, RocksDB directory, commit
    interval) plus the rules' parameters. The group id must stay the service's name (the default): the
    tables' changelog topics are declared under it."""

    model_config = SettingsConfigDict(env_prefix="ANOMALY_DETECTOR_", extra="ignore", frozen=True)

    # Account sharing and impossible travel (services/anomaly_detector/rules.py: AccountConfig).
    default_stream_limit: int = Field(default=4, ge=1, le=100)
    max_speed_kmh: float = Field(default=1000.0, gt=0)
    session_slack_s: float = Field(default=7200.0, ge=0)
    # Payment fraud (DeclineConfig).
    decline_window_s: float = Field(default=3600.0, gt=0)
    decline_prior_per_day: float = Field(default=1.0, gt=0)
    decline_max_p_value: float = Field(default=1e-4, gt=0, lt=1)
    # Service and node series (SeriesConfig): the detector score that raises an anomaly, and the error
    # rate below which nothing is an anomaly (not a per-series threshold: one floor for every service).
    series_threshold: float = Field(default=0.5, gt=0, le=1)
    error_rate_floor: float = Field(default=0.01, ge=0, lt=1)
    stall_sustained: int = Field(default=2, ge=1)
