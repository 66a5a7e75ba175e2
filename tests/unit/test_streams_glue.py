"""The Faust glue's guards, without a broker: the recovery resumes no partition before it has sought
and cleared (faust-streaming issue 596), and the commit watchdog tells a stalled partition apart from
a busy one."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest

from services.bus import streams


class TP(NamedTuple):
    topic: str
    partition: int


@dataclass
class FakeConsumer:
    calls: list[str]
    acked: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    committed: dict[str, int | None] = field(default_factory=dict)

    def resume_partitions(self, tps: set[str]) -> None:
        self.calls.append(f"resume {sorted(tps)}")

    def assignment(self) -> set[Any]:
        return {TP("views", 0), TP("views", 1), TP("views-changelog", 0)}

    async def seek_to_committed(self) -> dict[Any, int | None]:
        self.calls.append("seek to committed")
        return {TP("views", 0): 12, TP("views", 1): None, TP("views-changelog", 0): None}

    @property
    def _thread(self) -> Any:
        async def seek_to_beginning(*tps: Any) -> None:
            self.calls.append(f"seek to the start {sorted(tuple(tp) for tp in tps)}")

        return SimpleNamespace(seek_to_beginning=seek_to_beginning)

    # what the watchdog reads
    @property
    def _acked(self) -> dict[str, list[int]]:
        return self.acked

    @property
    def _committed_offset(self) -> dict[str, int | None]:
        return self.committed


class FakeRecovery:
    """faust's order: resume the stream partitions, then seek them and clear the queues."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        self.app.consumer.resume_partitions({TP("views", 0), TP("views", 1)})
        await self.app.consumer.seek_to_committed()
        self.app.consumer.calls.append("clear")

    async def _resume_streams(self, generation_id: int = 0) -> None:
        self.app.consumer.resume_partitions({TP("views", 0), TP("views", 1), TP("gone", 0)})
        await self.app.consumer.seek_to_committed()
        self.app.consumer.calls.append("clear")


async def test_the_stream_partitions_are_resumed_only_after_the_seek_and_the_clear() -> None:
    calls: list[str] = []
    app: Any = SimpleNamespace(consumer=FakeConsumer(calls), consumer_generation_id=7)
    app.conf = SimpleNamespace(consumer_auto_offset_reset="earliest")
    app.tables = SimpleNamespace(recovery=FakeRecovery(app), changelog_topics={"views-changelog"})
    streams._seek_before_resuming(app)
    sought = [
        "seek to committed",
        "seek to the start [('views', 1)]",  # no committed offset: from the start
        "clear",
    ]
    await app.tables.recovery.on_recovery_completed(7)
    resumed = "resume [TP(topic='views', partition=0), TP(topic='views', partition=1)]"
    assert calls == [*sought, resumed]
    assert "resume_partitions" not in vars(app.consumer), "faust's own method is back"
    calls.clear()
    await app.tables.recovery._resume_streams(7)
    assert calls == [*sought, resumed], "only what is still assigned is resumed"
    calls.clear()
    await app.tables.recovery.on_recovery_completed(6)  # a newer rebalance began: it resumes its own
    assert calls == sought


async def test_the_watchdog_reports_acked_records_that_stay_uncommitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = FakeConsumer([])
    app: Any = SimpleNamespace(consumer=consumer)
    dog = streams.CommitWatchdog(app, after=15.0)
    dog.state = lambda: {"stub": True}  # type: ignore[method-assign]
    consumer.committed["t-0"] = 32
    consumer.acked["t-0"] = [82, 83]
    assert not dog.check(100.0)
    assert not dog.check(110.0), "10 s without a commit: not yet"
    assert dog.check(116.0), "16 s: stalled"
    assert "no offsets committed for 16s" in caplog.text

    consumer.committed["t-0"] = 84  # a commit: the clock restarts
    consumer.acked["t-0"] = [84]
    assert not dog.check(117.0) and dog.stalled_for == 0.0
    consumer.acked["t-0"] = []  # nothing waiting: never stalled, however long
    assert not dog.check(500.0) and dog.stalled_for == 0.0
