"""``reelbus autoscale``: the local actuator. It follows the autoscaler's decisions on the native
runner: a ScalingDecision for a service starts or stops replicas of it until ``to_replicas`` run.

Replica 0 is the process ``reelbus up`` started (pid file ``<name>.json``, the service's port);
replica ``i`` > 0 is ``python -m services.<name>`` with pid file ``<name>-replica-<i>.json``, log
``<name>-replica-<i>.log``, port ``<port> + 100·i`` and instance id ``<name>-<i>``. Replicas join the
service's consumer group, so each one added or stopped rebalances its partitions. A replica is stopped
by its recorded pid with SIGTERM: the runtime's staged shutdown finishes the record in hand, commits,
and leaves the group, so nothing is lost and nothing is handled twice.

A NodeStartThrottle for this host limits how many replicas start at once: they are started in
batches of ``max_concurrent_starts``, each batch waited for (``/readyz``) before the next.

Decisions are applied in order per service; one older than the last applied (a replay, a
redelivery) or seen before (its event id) is skipped, and a group with no committed offset starts
at the end of the topic, so history is never replayed into process starts and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from services.bus.consumer import BusConsumer, ConsumerConfig, Record
from services.bus.contracts import Contracts
from services.bus.events import NodeStartThrottle, ScalingDecision
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.cli import infra, stack
from services.cli.infra import Layout

log = logging.getLogger("reelbus.autoscale")

REPLICA_PORT_STEP = 100


@dataclass(frozen=True)
class ReplicaTemplate:
    """How to run replica ``i`` of one service."""

    name: str
    command: Sequence[str]
    env: Callable[[int], dict[str, str]]
    port: Callable[[int], int]

    def component(self, index: int) -> str:
        return self.name if index == 0 else f"{self.name}-replica-{index}"

    def ready_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port(index)}/readyz"


def stack_template(layout: Layout, svc: stack.ServiceDef) -> ReplicaTemplate:
    """Replicas of a service of the native stack, as ``reelbus up`` runs its replica 0."""

    def port(index: int) -> int:
        return svc.port + REPLICA_PORT_STEP * index

    def env(index: int) -> dict[str, str]:
        out = stack.service_env(layout, svc)
        out[f"{svc.prefix}HTTP_PORT"] = str(port(index))
        out[f"{svc.prefix}INSTANCE_ID"] = f"{svc.name}-{index}"
        return out

    return ReplicaTemplate(svc.name, [sys.executable, "-m", svc.module], env, port)


@dataclass
class LocalActuator:
    layout: Layout
    templates: dict[str, ReplicaTemplate]
    node: str = field(default_factory=socket.gethostname)
    max_concurrent_starts: int = 8
    ready_timeout: float = 60.0
    applied: dict[str, datetime] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def running(self, service: str) -> list[int]:
        """Indices of the replicas of ``service`` that are alive (by their pid records)."""
        template = self.templates[service]
        found = []
        for path in self.layout.run.glob(f"{service}*.json"):
            stem = path.stem
            if stem == service:
                index = 0
            elif stem.startswith(f"{service}-replica-") and stem.rsplit("-", 1)[1].isdigit():
                index = int(stem.rsplit("-", 1)[1])
            else:
                continue
            record = infra.read_pid(self.layout, template.component(index))
            if record is not None and record.alive():
                found.append(index)
        return sorted(found)

    def scale(self, service: str, replicas: int) -> list[str]:
        """Start or stop replicas until ``replicas`` run (blocking). What was done, line by line."""
        template = self.templates[service]
        running = self.running(service)
        done: list[str] = []
        for index in sorted((i for i in running if i >= replicas), reverse=True):
            outcome = infra.stop_pid(self.layout, template.component(index), signal.SIGTERM)
            done.append(f"{template.component(index)}: {outcome}")
        missing = [i for i in range(replicas) if i not in running]
        batch_size = max(1, self.max_concurrent_starts)
        for first in range(0, len(missing), batch_size):
            batch = missing[first : first + batch_size]
            for index in batch:
                proc = infra.spawn(
                    self.layout,
                    template.component(index),
                    template.command,
                    env=template.env(index),
                    cwd=infra.REPO_ROOT,
                )
                done.append(
                    f"{template.component(index)}: started (pid {proc.pid}, port {template.port(index)})"
                )
            deadline = time.monotonic() + self.ready_timeout
            waiting = set(batch)
            while waiting and time.monotonic() < deadline:
                waiting = {i for i in waiting if not infra.http_ok(template.ready_url(i))}
                if waiting:
                    time.sleep(0.2)
            for index in sorted(waiting):
                done.append(f"{template.component(index)}: not ready after {self.ready_timeout:.0f}s")
        return done

    async def on_decision(self, event: ScalingDecision, record: Record) -> None:
        if event.service not in self.templates:
            log.info("decision for %s, which this runner does not manage: skipped", event.service)
            return
        key = str(event.event_id)
        last = self.applied.get(event.service)
        if key in self.seen or (last is not None and event.event_time < last):
            log.info("decision %s for %s is old or seen: skipped", key, event.service)
            return
        for line in await asyncio.to_thread(self.scale, event.service, event.to_replicas):
            log.info("%s", line)
        log.info("%s: %s to %d replicas (%s)", event.service, event.action, event.to_replicas, event.reason)
        self.applied[event.service] = event.event_time
        self.seen.add(key)

    async def on_throttle(self, event: NodeStartThrottle, record: Record) -> None:
        if event.node != self.node:
            return
        self.max_concurrent_starts = event.max_concurrent_starts
        limit = event.max_concurrent_starts
        log.info("container starts on %s limited to %d at a time (%s)", self.node, limit, event.reason)

    def stop_extra(self) -> list[str]:
        """Stop every replica but replica 0 of every managed service (``reelbus autoscale`` exiting)."""
        done = []
        for service, template in self.templates.items():
            for index in self.running(service):
                if index > 0:
                    outcome = infra.stop_pid(self.layout, template.component(index), signal.SIGTERM)
                    done.append(f"{template.component(index)}: {outcome}")
        return done


def decisions_consumer(
    actuator: LocalActuator, contracts: Contracts, topic: str, group: str, layout: Layout
) -> tuple[BusConsumer, Producer]:
    serde = Serde(contracts, RegistryClient(layout.registry_url))
    dead_letters = Producer(ProducerConfig(layout.bootstrap_servers, client_id=group), contracts, serde)
    consumer = BusConsumer(
        ConsumerConfig(
            layout.bootstrap_servers,
            group_id=group,
            topics=[topic],
            client_id=group,
            auto_offset_reset="latest",
            batch_size=50,
        ),
        contracts,
        serde,
        {
            ScalingDecision.SCHEMA_NAME: actuator.on_decision,
            NodeStartThrottle.SCHEMA_NAME: actuator.on_throttle,
        },
        dead_letters,
    )
    return consumer, dead_letters


async def run(actuator: LocalActuator, topic: str, group: str, keep: bool) -> int:
    contracts = Contracts.load()
    consumer, dead_letters = decisions_consumer(actuator, contracts, topic, group, actuator.layout)
    await dead_letters.start([])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, consumer.stop)
    print(
        f"following {topic} for {', '.join(sorted(actuator.templates))} (group {group}); Ctrl-C stops",
        flush=True,
    )
    try:
        await consumer.run()
    finally:
        await dead_letters.close(timeout=5)
        if not keep:
            for line in await asyncio.to_thread(actuator.stop_extra):
                print(line, flush=True)
    return 0


def cmd_autoscale(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    layout = Layout.from_env()
    names = args.services or [s.name for s in stack.SERVICES if s.exists()]
    unknown = [n for n in names if n not in {s.name for s in stack.SERVICES}]
    if unknown:
        print(f"reelbus autoscale: unknown service(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    templates = {n: stack_template(layout, stack.service(n)) for n in names}
    actuator = LocalActuator(layout, templates, max_concurrent_starts=args.max_concurrent_starts)
    return asyncio.run(run(actuator, args.topic, args.group, args.keep_replicas))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "autoscale",
        help="follow the autoscaler's decisions: start and stop replicas of the native services",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("services", nargs="*", help="services to manage (default: every service of the stack)")
    p.add_argument("--topic", default="scaling.decisions")
    p.add_argument("--group", default="reelbus-autoscale")
    p.add_argument(
        "--max-concurrent-starts", type=int, default=8, help="until a NodeStartThrottle says otherwise"
    )
    p.add_argument(
        "--keep-replicas",
        action="store_true",
        help="on exit, leave the extra replicas running (default: stop them)",
    )
    p.set_defaults(func=cmd_autoscale)
