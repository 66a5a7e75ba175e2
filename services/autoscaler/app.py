"""The autoscaler for the runtime: its topics, handler table, resources and root tasks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from services.autoscaler import handlers
from services.autoscaler.adapters.kafka_lag import GroupLagProbe
from services.autoscaler.adapters.kubernetes import Actuator, KubernetesActuator, NoActuator
from services.autoscaler.handlers import Dependencies
from services.autoscaler.settings import Settings
from services.bus.consumer import Handler, Record
from services.bus.contracts import Contracts
from services.bus.events import LoadSample, MountStallSample, NodeStartThrottle, ScalingDecision
from services.bus.runtime import BUS, ServiceSpec

log = logging.getLogger("reelbus.autoscaler")

ACTUATOR = web.AppKey("actuator", Actuator)


class Reconciler:
    """Hands each service's newest decided replica count to the actuator, retrying with backoff; an
    older count still waiting is replaced, never applied after a newer one."""

    def __init__(self) -> None:
        self.wanted: dict[str, int] = {}
        self.wake = asyncio.Event()

    def want(self, service: str, replicas: int) -> None:
        self.wanted[service] = replicas
        self.wake.set()

    async def run(self, actuator: Actuator) -> None:
        delay = 1.0
        while True:
            await self.wake.wait()
            self.wake.clear()
            for service, replicas in list(self.wanted.items()):
                try:
                    await actuator.scale(service, replicas)
                except Exception as exc:
                    log.warning("cannot scale %s to %d (%r); retry in %.0fs", service, replicas, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
                    self.wake.set()
                    break
                delay = 1.0
                if self.wanted.get(service) == replicas:
                    del self.wanted[service]


def build_spec(settings: Settings, contracts: Contracts | None = None) -> ServiceSpec:
    contracts = contracts or Contracts.load()
    reconciler = Reconciler()
    holder: dict[str, web.Application] = {}

    async def publish(key: str, event: ScalingDecision | NodeStartThrottle) -> None:
        await holder["app"][BUS].producer.send(settings.decisions_topic, key, event)

    deps = Dependencies(
        policy=settings.policy,
        throttle_policy=settings.throttle_policy(),
        partitions={name: t.partitions for name, t in contracts.topics.items()},
        consumed_by=lambda service: [t.name for t in contracts.consumed_by(service)],
        publish=publish,
        actuate=reconciler.want,
        instance_ttl_s=settings.instance_ttl_s,
        hold_every_s=settings.hold_every_s,
    )

    async def actuator(app: web.Application) -> AsyncIterator[None]:
        holder["app"] = app
        made: Actuator
        if settings.actuator == "kubernetes":
            made = await KubernetesActuator.connect(
                settings.kube_namespace, settings.kubeconfig, settings.kube_context
            )
        else:
            made = NoActuator()
        app[ACTUATOR] = made
        yield
        await made.close()

    async def actuate(app: web.Application) -> None:
        await reconciler.run(app[ACTUATOR])

    async def wake_functions(app: web.Application) -> None:
        """Every ``wake_check_s``: a function-style service with no live replica has its group's
        lag read from the broker; lag waiting means a wake-up (0 -> 1)."""
        probe = GroupLagProbe(settings.kafka_bootstrap_servers)
        while True:
            await asyncio.sleep(settings.wake_check_s)
            now = time.time()
            for service in settings.function_services:
                state = deps.service(service)
                if state.fresh(now, settings.instance_ttl_s):
                    continue  # its replicas report their lag themselves
                topics = sorted(state.topics) or list(deps.consumed_by(service))
                topics = [t for t in topics if t in deps.partitions]
                if not topics:
                    continue
                try:
                    lag = await asyncio.to_thread(probe.lag, state.group or service, topics, deps.partitions)
                except Exception as exc:
                    log.warning("cannot read the lag of %s's group (%r)", service, exc)
                    continue
                state.partition_lag = {k: (now, max(0, end - c)) for k, (c, end) in lag.partitions.items()}
                state.topics.update(topics)
                if state.group is None:
                    state.group = service
                offsets = ",".join(f"{k}={c}:{end}" for k, (c, end) in sorted(lag.partitions.items()))
                await handlers.evaluate(deps, state, now, f"wake:{offsets}")

    def bind(fn: Any) -> Handler:
        async def handle(event: Any, record: Record) -> None:
            await fn(event, record, deps)

        return handle

    return ServiceSpec(
        name="autoscaler",
        consumes=(settings.load_topic, settings.mount_topic),
        produces=(settings.decisions_topic,),
        handlers={
            LoadSample.SCHEMA_NAME: bind(handlers.on_load_sample),
            MountStallSample.SCHEMA_NAME: bind(handlers.on_mount_sample),
        },
        resources=[actuator],
        root_tasks={"actuate": actuate, "wake-functions": wake_functions},
    )
