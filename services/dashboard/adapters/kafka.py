"""Kafka for the dashboard: high watermarks and group offsets through the admin API (blocking, on a
worker thread), and a group-less tail of the viewed topics (manual assignment, no commits)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future, wait
from typing import Any

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, Message
from confluent_kafka import TopicPartition as CTopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from services.dashboard.handlers import Partition

log = logging.getLogger("reelbus.dashboard.kafka")


class OffsetsReader:
    """Watermarks and committed offsets. Blocking: call it on a worker thread."""

    def __init__(self, bootstrap_servers: str, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})

    def partitions(self, topics: Iterable[str]) -> list[Partition]:
        """The partitions of those topics that exist on the cluster."""
        wanted = set(topics)
        meta = self.admin.list_topics(timeout=self.timeout)
        return sorted(
            (name, p)
            for name, topic in meta.topics.items()
            if name in wanted and topic.error is None
            for p in topic.partitions
        )

    def high_watermarks(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        if not partitions:
            return {}
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        futures = self.admin.list_offsets(
            {CTopicPartition(t, p): latest for t, p in partitions},
            request_timeout=self.timeout,
        )
        out: dict[Partition, int] = {}
        for tp, future in futures.items():
            try:
                out[(tp.topic, tp.partition)] = int(future.result(timeout=self.timeout).offset)
            except KafkaException as exc:  # a partition without a leader right now: left out
                log.debug("no watermark for %s[%d]: %s", tp.topic, tp.partition, exc)
        return out

    def groups(self) -> dict[str, str]:
        """Every consumer group and its state (STABLE, EMPTY, ...)."""
        found = self.admin.list_consumer_groups(request_timeout=self.timeout).result(timeout=self.timeout)
        return {g.group_id: g.state.name if g.state is not None else "UNKNOWN" for g in found.valid}

    def committed(self, groups: Sequence[str]) -> dict[str, dict[Partition, int]]:
        """Committed offsets per group (one request per group, all in flight together)."""
        futures: dict[str, Future[Any]] = {}
        for group in groups:
            futures.update(
                self.admin.list_consumer_group_offsets(
                    [ConsumerGroupTopicPartitions(group)], request_timeout=self.timeout
                )
            )
        wait(list(futures.values()), timeout=self.timeout)
        out: dict[str, dict[Partition, int]] = {}
        for group, future in futures.items():
            try:
                result = future.result(timeout=0)
            except Exception as exc:  # a group deleted meanwhile, a coordinator moving: next time
                log.debug("no offsets for group %s: %r", group, exc)
                continue
            out[group] = {
                (tp.topic, tp.partition): int(tp.offset)
                for tp in result.topic_partitions or []
                if tp.error is None
            }
        return out


RecordHandler = Callable[[Message], Awaitable[None]]


class TopicTail:
    """Reads the viewed topics without joining a consumer group: every partition is assigned by hand,
    starting ``backlog`` records before its end, and nothing is ever committed. (librdkafka insists on
    a ``group.id`` setting even so; with manual assignment and no commits it is never registered at
    the broker, so no group shows up anywhere.) Partitions that appear later (a topic applied after
    the service started) are picked up every ``rescan_seconds``."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[str],
        backlog: int,
        client_id: str,
        rescan_seconds: float = 15.0,
        timeout: float = 5.0,
    ) -> None:
        self.topics = list(topics)
        self.backlog = backlog
        self.rescan_seconds = rescan_seconds
        self.timeout = timeout
        self.conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"{client_id}-unjoined",
            "client.id": client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "log_level": 3,
        }
        self.assigned: set[Partition] = set()

    def _assign_new(self, consumer: Consumer) -> None:
        """Blocking: assign the partitions not assigned yet, from ``backlog`` before their end."""
        meta = consumer.list_topics(timeout=self.timeout)
        found = {
            (name, p)
            for name, topic in meta.topics.items()
            if name in self.topics and topic.error is None
            for p in topic.partitions
        }
        fresh = sorted(found - self.assigned)
        if not fresh:
            return
        starts = []
        for topic, p in fresh:
            low, high = consumer.get_watermark_offsets(CTopicPartition(topic, p), timeout=self.timeout)
            starts.append(CTopicPartition(topic, p, max(low, high - self.backlog)))
        consumer.incremental_assign(starts)
        self.assigned.update(fresh)
        log.info("reading %d partition(s) of %s", len(self.assigned), ", ".join(self.topics))

    async def run(self, handle: RecordHandler) -> None:
        """Until cancelled: fetch and hand every record to ``handle``."""
        consumer = Consumer(self.conf)
        try:
            next_scan = 0.0
            while True:
                if time.monotonic() >= next_scan:
                    try:
                        await asyncio.to_thread(self._assign_new, consumer)
                    except KafkaException as exc:  # the broker away: tried again at the next scan
                        log.warning("cannot assign the viewed topics yet: %s", exc)
                    next_scan = time.monotonic() + self.rescan_seconds
                if not self.assigned:
                    await asyncio.sleep(1.0)
                    continue
                batch: list[Message] = await asyncio.to_thread(consumer.consume, 500, 0.5)
                for msg in batch:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise KafkaException(err)
                        log.warning("fetch error (librdkafka retries): %s", err.str())
                        continue
                    await handle(msg)
        finally:
            await asyncio.to_thread(consumer.close)
