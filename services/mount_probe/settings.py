"""The mount probe's settings, from ``MOUNT_PROBE_*`` variables."""

from __future__ import annotations

import socket

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.bus.runtime import BusSettings
from services.mount_probe.probe import Mode

TOPIC = "nodes.mount-stall"


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="MOUNT_PROBE_", extra="ignore", frozen=True)

    interval: float = Field(default=60.0, gt=0)  # seconds between rounds (and samples)
    layers: int = Field(default=50, ge=1, le=64)  # image layers of each probe container
    mode: Mode = Mode.PER_LAYER
    concurrency: int = Field(default=4, ge=1, le=64)  # containers started at once per round
    starts_per_worker: int = Field(default=1, ge=1, le=32)
    idmap: bool = True  # try id-mapped mounts; plain binds (said so) when refused or turned off
    node_name: str = ""  # default: the host name
    baseline_rounds: int = Field(default=3, ge=1, le=20)  # rounds at start whose medians are the baseline
    stall_factor: float = Field(default=3.0, gt=1.0)  # stalled: a figure >= this times its baseline
    stall_rounds: int = Field(default=2, ge=1, le=20)  # consecutive rounds over the factor to say stalled
    round_timeout: float = Field(default=120.0, gt=0)  # a round still running then is killed: a stall
    topic: str = TOPIC  # tests give a private copy of nodes.mount-stall

    @field_validator("node_name")
    @classmethod
    def _node(cls, value: str) -> str:
        return value.strip()

    @property
    def node(self) -> str:
        return self.node_name or socket.gethostname()
