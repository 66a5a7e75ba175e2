"""The catalog's settings: the bus settings plus its database, cache and seed, under ``CATALOG_``."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.bus.runtime import BusSettings


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="CATALOG_", extra="ignore", frozen=True)

    database_url: str = "postgresql://reelbus@127.0.0.1:5432/catalog"
    database_pool_size: int = Field(8, ge=2, le=100)
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every cache key starts with this; replicas sharing a cache share the prefix.
    cache_key_prefix: str = Field("reelbus:catalog:", min_length=1, max_length=200)
    cache_ttl_seconds: float = Field(300.0, gt=0, le=86_400)
    # How long the highest version seen in a change event is remembered per title; a cache fill with
    # an older version is refused meanwhile. Must outlive the slowest request (cache-aside race).
    cache_version_ttl_seconds: float = Field(86_400.0, gt=0)
    # The sample catalog written into an empty database at start (0: none); see services/catalog/seed.py.
    seed_titles: int = Field(300, ge=0, le=100_000)
    seed_rng_seed: int = 20261126
    # The outbox relay wakes on NOTIFY, and polls at this interval in case a notification is lost.
    outbox_poll_seconds: float = Field(1.0, gt=0, le=60)
    outbox_batch_size: int = Field(500, ge=1, le=10_000)
