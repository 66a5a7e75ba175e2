"""``topics plan/apply`` and ``tail`` against the real broker and registry."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from services.bus.admin import Admin
from services.bus.contracts import Contracts, make_schema
from services.bus.registry import RegistryClient
from services.cli.infra import Layout
from tests.bus.test_bus import producer_for, view
from tests.conftest import TopicFactory

pytestmark = pytest.mark.infra
REPO = Path(__file__).resolve().parents[2]


def with_changed_view_schema(contracts: Contracts, change: Any) -> Contracts:
    raw = json.loads(json.dumps(contracts.schema("reelbus.history.ViewRecorded").raw))
    change(raw)
    schemas = dict(contracts.schemas)
    schemas["reelbus.history.ViewRecorded"] = make_schema(raw)
    return Contracts(contracts.topics.values(), schemas)


async def test_apply_twice_changes_nothing_the_second_time(admin: Admin, make_topic: TopicFactory) -> None:
    contracts, topic = await make_topic()
    second = await asyncio.to_thread(admin.apply, contracts, [topic.name])
    assert second.empty, [str(c) for c in second.changes]


async def test_an_incompatible_schema_is_refused_and_nothing_changes(
    admin: Admin, registry: RegistryClient, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic()
    subject = topic.value_subject("reelbus.history.ViewRecorded")
    before = registry.versions(subject)

    def add_required_field(raw: Any) -> None:
        raw["fields"].append({"name": "rating", "type": "int", "doc": "Stars given."})

    breaking = with_changed_view_schema(contracts, add_required_field)
    plan = await asyncio.to_thread(admin.apply, breaking, [topic.name])
    assert plan.refusals, "a field without a default must be refused under BACKWARD_TRANSITIVE"
    assert any("rating" in r and "default" in r and subject in r for r in plan.refusals), plan.refusals
    assert registry.versions(subject) == before, "a refused plan registers nothing"

    def add_optional_field(raw: Any) -> None:
        raw["fields"].append({"name": "rating", "type": ["null", "int"], "default": None, "doc": "Stars."})

    compatible = with_changed_view_schema(contracts, add_optional_field)
    plan = await asyncio.to_thread(admin.apply, compatible, [topic.name])
    assert not plan.refusals
    assert [c.kind for c in plan.changes] == ["register-schema"]
    assert len(registry.versions(subject)) == len(before) + 1


async def test_drifted_config_and_missing_partitions_are_planned_and_fixed(
    admin: Admin, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=2)
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic.name,
        incremental_configs=[
            ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.kafka.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    grown = Contracts(
        [replace(t, partitions=4) if t.name == topic.name else t for t in contracts.topics.values()],
        contracts.schemas,
    )
    plan = await asyncio.to_thread(admin.plan, grown, [topic.name])
    kinds = sorted((c.kind, c.target) for c in plan.changes)
    assert ("alter-config", topic.name) in kinds
    assert ("add-partitions", topic.name) in kinds
    await asyncio.to_thread(admin.apply, grown, [topic.name])
    assert (await asyncio.to_thread(admin.plan, grown, [topic.name])).empty
    assert admin.existing_topics()[topic.name] == 4


def reelbus(layout: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REELBUS_KAFKA_PORT": str(layout.kafka_port)}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_tail_prints_decoded_records_from_the_beginning_or_an_offset(
    bus_infra: Layout, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic(partitions=1)
    sent = [view(position_ms=i * 1000) for i in range(3)]
    async with producer_for(bus_infra, contracts, topic) as producer:
        for event in sent:
            await producer.send(topic.name, str(event.profile_id), event)
        await producer.send_raw(topic.name, b"k", b"not avro", [])

    everything = await asyncio.to_thread(reelbus, bus_infra, "tail", topic.name)
    assert everything.returncode == 0, everything.stderr
    lines = [json.loads(line) for line in everything.stdout.splitlines()]
    assert [line["offset"] for line in lines] == [0, 1, 2, 3]
    assert [line["value"]["position_ms"] for line in lines[:3]] == [0, 1000, 2000]
    assert lines[0]["type"] == "reelbus.history.ViewRecorded"
    assert lines[0]["value"]["event_id"] == str(sent[0].event_id)
    assert lines[0]["key"] == str(sent[0].profile_id)
    assert "not Avro" in lines[3]["undecodable"]

    from_offset = await asyncio.to_thread(
        reelbus, bus_infra, "tail", topic.name, "--offset", "2", "--max", "1"
    )
    assert [json.loads(line)["offset"] for line in from_offset.stdout.splitlines()] == [2]

    missing = await asyncio.to_thread(reelbus, bus_infra, "tail", "no.such.topic")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
