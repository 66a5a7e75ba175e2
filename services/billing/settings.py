"""The billing service's settings, from ``BILLING_*`` variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.bus.runtime import BusSettings


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore", frozen=True)

    # The Galera cluster through HAProxy: writes (galera-1, galera-2 as backup) and reads (the replica).
    database_name: str = "billing"
    database_user: str = "reelbus"
    database_password: str = "reelbus"
    write_host: str = "127.0.0.1"
    write_port: int = 3306
    read_host: str = "127.0.0.1"
    read_port: int = 3307
    database_pool_size: int = Field(default=10, ge=1)
    # Galera certification conflicts, deadlocks and a writer lost mid-transaction are retried this often.
    transaction_attempts: int = Field(default=8, ge=1)
    # How long a read-your-writes request waits for the replica before reading from the writer.
    read_your_writes_wait_seconds: float = Field(default=0.5, ge=0)

    # Billing periods and the renewal job.
    period_seconds: float = Field(default=30 * 86400, gt=0)
    renewal_interval_seconds: float = Field(default=60.0, gt=0)
    currency: str = "USD"

    # The simulated payment provider.
    provider_timeout_seconds: float = Field(default=3.0, gt=0)
    provider_slow_seconds: float = Field(default=1.0, ge=0)

    # The transactional outbox's relay.
    outbox_poll_interval_seconds: float = Field(default=1.0, gt=0)
    outbox_batch_size: int = Field(default=100, ge=1)
    outbox_retention_hours: float = Field(default=168.0, gt=0)
    # Hold the relay back this long after start (tests use it to crash between commit and publish).
    outbox_relay_start_delay_seconds: float = Field(default=0.0, ge=0)
