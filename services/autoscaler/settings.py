"""The autoscaler's settings, from ``AUTOSCALER_*`` variables."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from services.autoscaler.hpa import ScalingPolicy
from services.autoscaler.throttle import ThrottlePolicy
from services.bus.runtime import BusSettings


class PolicyOverride(BaseModel):
    """Per-service changes to the default policy (``AUTOSCALER_POLICIES``, JSON by service name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(default=None, ge=1)
    cpu_target: float | None = Field(default=None, gt=0)
    in_flight_target: float | None = Field(default=None, gt=0)
    request_rate_target: float | None = Field(default=None, gt=0)
    lag_target: float | None = Field(default=None, gt=0)
    scale_up_window_s: float | None = Field(default=None, ge=0)
    scale_down_window_s: float | None = Field(default=None, ge=0)
    idle_s: float | None = Field(default=None, ge=0)


class Settings(BusSettings):
    model_config = SettingsConfigDict(env_prefix="AUTOSCALER_", extra="ignore", frozen=True)

    load_topic: str = "scaling.load"
    mount_topic: str = "nodes.mount-stall"
    decisions_topic: str = "scaling.decisions"
    # The default policy (Kubernetes' HPA defaults where it has them)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=10, ge=1)
    cpu_target: float = Field(default=0.7, gt=0)  # mean utilization per replica; see hpa.py
    in_flight_target: float = Field(default=0, ge=0)  # 0: not a scaling metric
    request_rate_target: float = Field(default=0, ge=0)  # 0: not a scaling metric
    lag_target: float = Field(default=1000, gt=0)  # messages of group lag per replica
    tolerance: float = Field(default=0.1, ge=0, lt=1)
    scale_up_window_s: float = Field(default=0, ge=0)
    scale_down_window_s: float = Field(default=300, ge=0)
    policies: dict[str, PolicyOverride] = Field(default_factory=dict)
    # Function-style services: scale to zero after idle_s without work, woken by their first event
    function_services: list[str] = Field(default_factory=list)
    idle_s: float = Field(default=300, ge=0)
    wake_check_s: float = Field(default=5, gt=0)  # how often the lag of a service at zero is checked
    instance_ttl_s: float = Field(default=30, gt=0)  # an instance silent this long is gone
    hold_every_s: float = Field(default=60, ge=0)  # an unchanged decision is republished this often; 0: never
    # Node mount-stall throttle (throttle.py)
    node_max_starts: int = Field(default=8, ge=1)
    node_min_starts: int = Field(default=1, ge=1)
    node_degraded_ms: float = Field(default=100, gt=0)
    node_stalled_ms: float = Field(default=1000, gt=0)
    node_recover_after: int = Field(default=3, ge=1)
    # Where decisions go besides the topic: none, or the Deployments' scale subresource
    actuator: Literal["none", "kubernetes"] = "none"
    kube_namespace: str = "reelbus"
    kubeconfig: Path | None = None  # unset: in-cluster credentials when in a pod, else ~/.kube/config
    kube_context: str | None = None

    def policy(self, service: str) -> ScalingPolicy:
        base = ScalingPolicy(
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            cpu_target=self.cpu_target,
            in_flight_target=self.in_flight_target or None,
            request_rate_target=self.request_rate_target or None,
            lag_target=self.lag_target,
            tolerance=self.tolerance,
            scale_up_window_s=self.scale_up_window_s,
            scale_down_window_s=self.scale_down_window_s,
            function=service in self.function_services,
            idle_s=self.idle_s,
        )
        override = self.policies.get(service)
        if override is None:
            return base
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        return replace(base, **changes)

    def throttle_policy(self) -> ThrottlePolicy:
        return ThrottlePolicy(
            max_starts=self.node_max_starts,
            min_starts=min(self.node_min_starts, self.node_max_starts),
            degraded_ms=self.node_degraded_ms,
            stalled_ms=self.node_stalled_ms,
            recover_after=self.node_recover_after,
        )
