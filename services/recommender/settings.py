"""The recommender's settings, from ``RECOMMENDER_*`` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.bus.streams import StreamSettings
from services.recommender.scoring import Params


class Settings(StreamSettings):
    model_config = SettingsConfigDict(env_prefix="RECOMMENDER_", extra="ignore", frozen=True)

    half_life_days: int = Field(default=30, ge=1, le=3650)
    history: int = Field(default=50, ge=1, le=1000)
    pair_window: int = Field(default=20, ge=1, le=200)
    anchors: int = Field(default=10, ge=1, le=200)
    because_items: int = Field(default=20, ge=1, le=200)
    trending_items: int = Field(default=10, ge=0, le=200)
    trending_window_hours: int = Field(default=7 * 24, ge=1, le=24 * 365)
    # While the model moves, the lists of this worker's profiles are re-ranked once the viewings have
    # been quiet this long, and at least every refresh_max_seconds under a steady stream.
    refresh_interval_seconds: float = Field(default=5.0, gt=0)
    refresh_max_seconds: float = Field(default=60.0, gt=0)
    # An event naming a title or profile the replicas do not know yet waits this long for them to
    # catch up with their topics before it is counted and skipped.
    lookup_sync_seconds: float = Field(default=5.0, ge=0)

    def params(self) -> Params:
        return Params(
            half_life_days=self.half_life_days,
            history=self.history,
            pair_window=self.pair_window,
            anchors=self.anchors,
            because_items=self.because_items,
            trending_items=self.trending_items,
            trending_window_hours=self.trending_window_hours,
        )
