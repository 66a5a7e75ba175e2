"""Make the cluster and the registry match the contract: ``reelbus topics plan`` / ``apply``.

``plan`` compares the declared topics (and their implicit dead-letter topics) and schemas with what
the broker and the registry have, and lists the changes. ``apply`` refuses the whole plan, before
changing anything, when a schema would break compatibility (saying which field breaks what), and
otherwise carries it out. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)

from services.bus import compat
from services.bus.contracts import Contracts, Topic
from services.bus.registry import RegistryClient

TOPIC_CHANGES = frozenset({"create-topic", "add-partitions", "alter-config"})
DLQ_CONFIG = {"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3600 * 1000)}


@dataclass(frozen=True)
class Change:
    kind: str  # create-topic, add-partitions, alter-config, register-schema, set-compatibility
    target: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:<18} {self.target}: {self.detail}"


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.changes and not self.refusals


@dataclass(frozen=True)
class _TopicWant:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


def _wanted_topics(topics: Iterable[Topic]) -> list[_TopicWant]:
    wants: list[_TopicWant] = []
    for t in topics:
        wants.append(_TopicWant(t.name, t.partitions, t.replication_factor, dict(t.config)))
        wants.append(_TopicWant(t.dlq, t.partitions, t.replication_factor, dict(DLQ_CONFIG)))
    return wants


class Admin:
    def __init__(self, bootstrap_servers: str, registry: RegistryClient, timeout: float = 30.0) -> None:
        self.kafka = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 3})
        self.registry = registry
        self.timeout = timeout

    def existing_topics(self) -> dict[str, int]:
        metadata = self.kafka.list_topics(timeout=self.timeout)
        return {name: len(t.partitions) for name, t in metadata.topics.items() if not name.startswith("__")}

    def _configs(self, names: list[str]) -> dict[str, dict[str, str]]:
        if not names:
            return {}
        futures = self.kafka.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
        result: dict[str, dict[str, str]] = {}
        for resource, future in futures.items():
            entries = future.result(timeout=self.timeout)
            result[resource.name] = {k: str(v.value) for k, v in entries.items()}
        return result

    def plan(self, contracts: Contracts, only: Iterable[str] | None = None) -> Plan:
        selected = [contracts.topic(n) for n in only] if only is not None else list(contracts.topics.values())
        plan = Plan()
        existing = self.existing_topics()
        wants = _wanted_topics(selected)
        configs = self._configs([w.name for w in wants if w.name in existing])
        for want in wants:
            have = existing.get(want.name)
            if have is None:
                cfg = ", ".join(f"{k}={v}" for k, v in sorted(want.config.items()))
                plan.changes.append(
                    Change(
                        "create-topic",
                        want.name,
                        f"{want.partitions} partitions, rf {want.replication_factor}"
                        + (f", {cfg}" if cfg else ""),
                    )
                )
                continue
            if have < want.partitions:
                plan.changes.append(Change("add-partitions", want.name, f"{have} -> {want.partitions}"))
            elif have > want.partitions:
                plan.refusals.append(
                    f"{want.name}: has {have} partitions, the contract says {want.partitions}; Kafka cannot "
                    "remove partitions (create a new topic version instead)"
                )
            current = configs.get(want.name, {})
            for key, value in sorted(want.config.items()):
                if current.get(key) != value:
                    plan.changes.append(
                        Change("alter-config", want.name, f"{key}: {current.get(key)} -> {value}")
                    )
        for topic in selected:
            self._plan_schemas(contracts, topic, plan)
        return plan

    def _plan_schemas(self, contracts: Contracts, topic: Topic, plan: Plan) -> None:
        subjects = [(topic.key_subject, topic.key)] + [(topic.value_subject(v), v) for v in topic.values]
        for subject, fullname in subjects:
            schema = contracts.schema(fullname)
            level = topic.compatibility
            if self.registry.compatibility(subject) != level:
                plan.changes.append(Change("set-compatibility", subject, level))
            if self.registry.lookup(subject, schema.raw) is not None:
                continue
            versions = self.registry.versions(subject)
            previous = [self.registry.version(subject, v).schema for v in sorted(versions)]
            problems = compat.check(schema.raw, previous, level)
            if problems:
                for problem in problems:
                    plan.refusals.append(f"{subject} ({level}): {problem}")
                continue
            plan.changes.append(
                Change("register-schema", subject, f"{fullname} as version {len(versions) + 1}")
            )

    def apply(self, contracts: Contracts, only: Iterable[str] | None = None) -> Plan:
        """Carry out the plan; refuses everything, changing nothing, if any part is refused."""
        only_list = list(only) if only is not None else None
        plan = self.plan(contracts, only_list)
        if plan.refusals:
            return plan
        creates = [c for c in plan.changes if c.kind == "create-topic"]
        if creates:
            wants = {w.name: w for w in _wanted_topics(contracts.topics.values())}
            new = [
                NewTopic(
                    c.target,
                    num_partitions=wants[c.target].partitions,
                    replication_factor=wants[c.target].replication_factor,
                    config=wants[c.target].config,
                )
                for c in creates
            ]
            self._wait(self.kafka.create_topics(new, operation_timeout=self.timeout))
        grows = [c for c in plan.changes if c.kind == "add-partitions"]
        if grows:
            parts = [NewPartitions(c.target, int(c.detail.split("-> ")[1])) for c in grows]
            self._wait(self.kafka.create_partitions(parts, operation_timeout=self.timeout))
        alters: dict[str, list[ConfigEntry]] = {}
        for c in plan.changes:
            if c.kind == "alter-config":
                key, rest = c.detail.split(": ", 1)
                value = rest.split(" -> ", 1)[1]
                alters.setdefault(c.target, []).append(
                    ConfigEntry(key, value, incremental_operation=AlterConfigOpType.SET)
                )
        if alters:
            resources = [
                ConfigResource(ConfigResource.Type.TOPIC, t, incremental_configs=e) for t, e in alters.items()
            ]
            self._wait(self.kafka.incremental_alter_configs(resources))
        by_subject = {}
        for topic in contracts.topics.values():
            by_subject[topic.key_subject] = topic.key
            for v in topic.values:
                by_subject[topic.value_subject(v)] = v
        for c in plan.changes:
            if c.kind == "set-compatibility":
                self.registry.set_compatibility(c.target, c.detail)
        for c in plan.changes:
            if c.kind == "register-schema":
                self.registry.register(c.target, contracts.schema(by_subject[c.target]).raw)
        if any(c.kind in TOPIC_CHANGES for c in plan.changes):
            self._settle(contracts, only_list)
        return plan

    def _settle(self, contracts: Contracts, only: list[str] | None, timeout: float = 30.0) -> None:
        """Wait until the broker's metadata shows what was applied, so a plan right after is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(c.kind in TOPIC_CHANGES for c in self.plan(contracts, only).changes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the broker did not show the applied topic changes within {timeout:.0f}s")

    def _wait(self, futures: Mapping[Any, Future[Any]]) -> None:
        for target, future in futures.items():
            try:
                future.result(timeout=self.timeout)
            except KafkaException as exc:
                raise RuntimeError(f"{target}: {exc}") from exc

    def delete_topics(self, names: list[str]) -> None:
        if names:
            self._wait(self.kafka.delete_topics(names, operation_timeout=self.timeout))
