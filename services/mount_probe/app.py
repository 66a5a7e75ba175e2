"""The mount probe for the runtime: a producer-only service whose root task probes every interval."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from aiohttp import web

from services.bus.contracts import Contracts
from services.bus.events import MountStallSample
from services.bus.producer import Delivered
from services.bus.runtime import BUS, ServiceSpec
from services.mount_probe import handlers
from services.mount_probe.adapters.runner import RoundConfig, run_round_async
from services.mount_probe.probe import RoundResult
from services.mount_probe.settings import TOPIC, Settings

log = logging.getLogger("reelbus.mount_probe")

NAME = "mount-probe"  # its name in topics/topics.yaml


def contracts_for(settings: Settings) -> Contracts:
    """The repository's contracts; with ``topic`` set elsewhere, a copy of nodes.mount-stall named so."""
    contracts = Contracts.load()
    if settings.topic == TOPIC:
        return contracts
    return contracts.with_topics([dataclasses.replace(contracts.topic(TOPIC), name=settings.topic)])


def build_spec(settings: Settings) -> ServiceSpec:
    deps_holder: dict[str, handlers.Deps] = {}

    async def probe_loop(app: web.Application) -> None:
        producer = app[BUS].producer

        async def send(topic: str, key: str, event: MountStallSample) -> Delivered:
            return await producer.send(topic, key, event)

        async def run(config: RoundConfig, timeout: float) -> RoundResult:
            return await run_round_async(config, timeout)

        deps = handlers.Deps(settings, run, send, probe_id=f"{NAME}@{settings.node}")
        deps_holder["deps"] = deps
        await handlers.measure_baseline(deps)
        while True:
            await handlers.probe_once(deps)
            await asyncio.sleep(settings.interval)

    async def baseline_measured(_app: web.Application) -> bool:
        deps = deps_holder.get("deps")
        return deps is not None and deps.ready

    return ServiceSpec(
        name=NAME,
        produces=(settings.topic,),
        root_tasks={"probe": probe_loop},
        ready_checks={"baseline": baseline_measured},
    )
