"""The ABR service's settings, from ``ABR_*`` variables."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.bus.runtime import BusSettings

PENSIEVE_LADDER_KBPS = (300, 750, 1200, 1850, 2850, 4300)  # the simulator's default ladder


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="ABR_", extra="ignore", frozen=True)

    http_port: int = 8109

    # The algorithm deciding every session's bitrate: the simulator's objects, same parameters.
    algorithm: Literal["bba", "bola", "robustmpc"] = "robustmpc"

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "abr"
    redis_timeout_seconds: float = Field(default=0.5, gt=0)
    # A session's state and decision live this long after its last change (EVCache-style TTL).
    session_ttl_seconds: int = Field(default=24 * 3600, ge=60)

    # The video model: every title is packaged in chunks of this length; a session's ladder comes with
    # its SessionStarted, else this one.
    chunk_duration_s: float = Field(default=4.0, gt=0, le=60)
    default_ladder_kbps: Annotated[tuple[int, ...], NoDecode] = PENSIEVE_LADDER_KBPS
    buffer_capacity_s: float = Field(default=60.0, gt=0)
    # Throughputs kept per session: the algorithms read at most the last 9 (RobustMPC's window of 5).
    history: int = Field(default=32, ge=9, le=1024)

    # Samples whose interval ends further ahead of this service's clock are refused, and so are those
    # older than the maximum age; heartbeats older than the last setting are not turned into samples
    # (a new consumer group reading playback.events from the start republishes nothing stale).
    max_clock_skew_seconds: float = Field(default=300.0, ge=0)
    max_sample_age_seconds: float = Field(default=24 * 3600.0, gt=0)
    heartbeat_max_age_seconds: float = Field(default=300.0, gt=0)

    @field_validator("default_ladder_kbps", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("default_ladder_kbps")
    @classmethod
    def _ascending(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or value[0] <= 0 or list(value) != sorted(set(value)):
            raise ValueError("a ladder is positive bitrates in kbit/s, strictly ascending")
        return value
