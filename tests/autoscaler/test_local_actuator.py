"""The local actuator on the real broker: decisions start and stop real replicas of a consumer (the
sample service, whose effects are idempotent and whose deliveries are logged); scaling out adds
members to the group and spreads the partitions over them, scaling in drains them without losing
or repeating an effect."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from confluent_kafka.admin import AdminClient

from services.bus.contracts import Topic
from services.bus.events import ScalingAction, ScalingDecision
from services.cli import infra
from services.cli.actuator import LocalActuator, ReplicaTemplate, decisions_consumer
from services.cli.infra import Layout
from tests.bus.test_bus import producer_for, view
from tests.conftest import TopicFactory, free_port, unique, until, wait_for

PARTITIONS = 6


@pytest.fixture
async def database(bus_infra: Layout) -> AsyncIterator[str]:
    name = unique("scaled").replace("-", "_")
    await asyncio.to_thread(infra.ensure_database, bus_infra, name)
    yield f"postgresql://reelbus@127.0.0.1:{bus_infra.postgres_port}/{name}"
    await asyncio.to_thread(infra.psql, bus_infra, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sample_template(
    layout: Layout, name: str, topic: Topic, database_url: str, group: str
) -> ReplicaTemplate:
    ports = [free_port() for _ in range(4)]

    def env(index: int) -> dict[str, str]:
        return {
            "SAMPLE_TOPIC": topic.name,
            "SAMPLE_DATABASE_URL": database_url,
            "SAMPLE_GROUP_ID": group,
            "SAMPLE_INSTANCE_ID": f"{name}-{index}",
            "SAMPLE_HTTP_PORT": str(ports[index]),
            "SAMPLE_KAFKA_BOOTSTRAP_SERVERS": layout.bootstrap_servers,
            "SAMPLE_REGISTRY_URL": layout.registry_url,
            "SAMPLE_LOAD_SAMPLE_INTERVAL_S": "0",
            "SAMPLE_HANDLER_DELAY": "0.005",
            "OTEL_TRACES_EXPORTER": "zipkin",
            "OTEL_EXPORTER_ZIPKIN_ENDPOINT": f"{layout.zipkin_url}/api/v2/spans",
        }

    return ReplicaTemplate(name, [sys.executable, "-m", "tests.bus.sample_service"], env, lambda i: ports[i])


def members(bootstrap: str, group: str) -> dict[str, set[int]]:
    """The group's members (by instance id) and the partitions assigned to each."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    if str(desc.state) not in ("ConsumerGroupState.STABLE", "STABLE"):
        return {}
    return {
        str(m.group_instance_id or m.member_id): {tp.partition for tp in m.assignment.topic_partitions}
        for m in desc.members
    }


def balanced(assignment: dict[str, set[int]], n: int) -> bool:
    parts = list(assignment.values())
    union = set().union(*parts) if parts else set()
    disjoint = sum(len(p) for p in parts) == len(union)
    return len(parts) == n and all(parts) and disjoint and union == set(range(PARTITIONS))


async def count(database_url: str, sql: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_scale_out_rebalances_and_scale_in_drains_without_loss_or_duplicates(
    bus_infra: Layout, make_topic: TopicFactory, database: str, tmp_path: Path
) -> None:
    contracts, topic = await make_topic("history.views", partitions=PARTITIONS)
    _, decisions = await make_topic("scaling.decisions", partitions=3)
    contracts = contracts.with_topics([decisions])
    name = unique("sample")
    group = unique("scaled-group")
    layout = replace(bus_infra, home=tmp_path)
    actuator = LocalActuator(layout, {name: sample_template(bus_infra, name, topic, database, group)})
    consumer, dead_letters = decisions_consumer(
        actuator, contracts, decisions.name, unique("actuator"), bus_infra
    )
    await dead_letters.start([])
    follower = asyncio.create_task(consumer.run())
    produced = 0
    try:
        await wait_for(
            lambda: asyncio.wait_for(consumer.assigned_event.wait(), 30), "the actuator's assignment"
        )
        async with (
            producer_for(bus_infra, contracts, decisions) as control,
            producer_for(bus_infra, contracts, topic) as producer,
        ):

            async def decide(before: int, after: int) -> None:
                action = ScalingAction.SCALE_OUT if after > before else ScalingAction.SCALE_IN
                event = ScalingDecision(
                    service=name,
                    from_replicas=before,
                    to_replicas=after,
                    action=action,
                    reason="test",
                    signals={},
                )
                await control.send(decisions.name, name, event)

            async def produce(n: int, pause: float = 0.0) -> None:
                nonlocal produced
                for _ in range(n):
                    event = view()
                    await producer.send(topic.name, str(event.profile_id), event)
                    produced += 1
                    if pause:
                        await asyncio.sleep(pause)

            def settled(n: int) -> Callable[[], dict[str, set[int]] | None]:
                def probe() -> dict[str, set[int]] | None:
                    found = members(bus_infra.bootstrap_servers, group)
                    return found if balanced(found, n) else None

                return probe

            await decide(0, 1)
            one = await until(settled(1), "one replica holding every partition", timeout=60)
            assert set(one) == {f"{name}-0"}
            await produce(200)

            started = time.monotonic()
            await decide(1, 3)
            three = await until(settled(3), "three replicas sharing the partitions", timeout=60)
            print(f"scale-out 1 -> 3: group balanced over 3 members after {time.monotonic() - started:.1f}s")
            assert set(three) == {f"{name}-0", f"{name}-1", f"{name}-2"}
            assert all(len(p) == 2 for p in three.values()), three
            assert actuator.running(name) == [0, 1, 2]
            await produce(100)

            # Scale in while records keep coming: the stopped replicas finish, commit and leave.
            feeding = asyncio.create_task(produce(200, pause=0.01))
            started = time.monotonic()
            await decide(3, 1)
            await until(lambda: actuator.running(name) == [0], "replicas 1 and 2 stopped", timeout=60)
            await feeding
            back = await until(settled(1), "replica 0 holding every partition again", timeout=60)
            print(f"scale-in 3 -> 1: one member holds all partitions after {time.monotonic() - started:.1f}s")
            assert set(back) == {f"{name}-0"}

            async def all_effects() -> bool:
                return await count(database, "SELECT count(*) FROM effects") == produced

            await wait_for(all_effects, f"{produced} effects", timeout=60)
            assert await count(database, "SELECT count(*) FROM deliveries") == produced, (
                "a record was handled twice"
            )
            assert await count(database, "SELECT count(DISTINCT event_id) FROM deliveries") == produced
    finally:
        consumer.stop()
        await asyncio.wait_for(follower, 20)
        await dead_letters.close(timeout=5)
        await asyncio.to_thread(actuator.scale, name, 0)


def test_stack_replicas_get_their_own_port_instance_id_and_pid_file(bus_infra: Layout) -> None:
    from services.cli import stack
    from services.cli.actuator import stack_template

    svc = stack.service("history")
    template = stack_template(bus_infra, svc)
    env = template.env(2)
    assert env["HISTORY_HTTP_PORT"] == str(svc.port + 200)
    assert env["HISTORY_INSTANCE_ID"] == "history-2"
    assert env["HISTORY_KAFKA_BOOTSTRAP_SERVERS"] == bus_infra.bootstrap_servers
    assert template.env(0)["HISTORY_HTTP_PORT"] == str(svc.port)
    assert [template.component(i) for i in range(3)] == ["history", "history-replica-1", "history-replica-2"]
    assert template.command[1:] == ["-m", "services.history"]
