"""Has the service's consumer group caught up with the end of its topics as they were at start?

At start the tracker notes every consumed partition's high watermark. The projections have caught
up when the group's committed offset (the bus commits after the handler's work, see
services.bus.consumer) reached that mark in every partition. Readiness waits for it, so a replica
does not answer from half-built projections after a restart. It asks the broker with a client of its
own that never joins the group (an offset fetch only), so it does not disturb the assignment.

If the marks are not reached within ``timeout`` (a partition whose last offsets are transaction
markers would never be), the tracker stops waiting, logs the partitions still behind, and lets
readiness go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaException, TopicPartition

log = logging.getLogger("reelbus.playback.catch_up")

Partition = tuple[str, int]


class CatchUp:
    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        topics: Sequence[str],
        timeout: float,
        interval: float = 0.5,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.topics = list(topics)
        self.timeout = timeout
        self.interval = interval
        self.caught_up = False
        self.behind: dict[str, int] = {}  # "topic[partition]" -> records still to project

    def _client(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )

    def _marks(self, client: Consumer) -> dict[Partition, tuple[int, int]]:
        """(low, high) watermarks of every partition of the topics, now. Blocking."""
        meta = client.list_topics(timeout=5.0)
        marks: dict[Partition, tuple[int, int]] = {}
        for name in self.topics:
            topic = meta.topics.get(name)
            if topic is None or topic.error is not None or not topic.partitions:
                raise KafkaException(f"topic {name} is not available yet")
            for partition in sorted(topic.partitions):
                low, high = client.get_watermark_offsets(
                    TopicPartition(name, partition), timeout=5.0, cached=False
                )
                marks[(name, partition)] = (low, high)
        return marks

    def _remaining(self, client: Consumer, marks: dict[Partition, tuple[int, int]]) -> dict[Partition, int]:
        """Records between the group's committed offset and the mark, per partition. Blocking."""
        committed = client.committed([TopicPartition(t, p) for t, p in marks], timeout=5.0)
        remaining: dict[Partition, int] = {}
        for tp in committed:
            low, high = marks[(tp.topic, tp.partition)]
            position = max(tp.offset, low)  # no commit yet (negative): reading starts at the low mark
            remaining[(tp.topic, tp.partition)] = max(0, high - position)
        return remaining

    async def run(self) -> None:
        """Watch until caught up (or given up); Kafka errors are retried."""
        client = await asyncio.to_thread(self._client)
        try:
            marks: dict[Partition, tuple[int, int]] | None = None
            deadline: float | None = None
            delay = self.interval
            while True:
                try:
                    first = marks is None
                    if marks is None:
                        marks = await asyncio.to_thread(self._marks, client)
                        deadline = time.monotonic() + self.timeout
                    remaining = await asyncio.to_thread(self._remaining, client, marks)
                    if first:
                        total = sum(remaining.values())
                        log.info("catching up with %d record(s) of %s", total, ", ".join(self.topics))
                    delay = self.interval
                except KafkaException as exc:
                    log.warning("cannot read offsets yet (%s); retry in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                self.behind = {f"{t}[{p}]": n for (t, p), n in sorted(remaining.items()) if n}
                if not self.behind:
                    log.info("projections caught up with the end offsets seen at start")
                    self.caught_up = True
                    return
                if deadline is not None and time.monotonic() > deadline:
                    log.warning(
                        "projections not caught up after %.0fs, ready anyway; still behind: %s",
                        self.timeout,
                        self.behind,
                    )
                    self.caught_up = True
                    return
                await asyncio.sleep(self.interval)
        finally:
            await asyncio.to_thread(client.close)
