"""A consumer group's lag read from the broker, for a service with no replica left to report it
(the way KEDA's Kafka scaler wakes a deployment scaled to zero)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec


@dataclass(frozen=True)
class GroupLag:
    """Committed offset and end offset per partition; a partition never committed counts from 0."""

    group: str
    partitions: dict[str, tuple[int, int]]  # "<topic>/<partition>" -> (committed, end)

    @property
    def total(self) -> int:
        return sum(max(0, end - committed) for committed, end in self.partitions.values())


class GroupLagProbe:
    def __init__(self, bootstrap_servers: str) -> None:
        self._admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})

    def lag(
        self, group: str, topics: Sequence[str], partitions: dict[str, int], timeout: float = 5.0
    ) -> GroupLag:
        """Blocking: the lag of ``group`` on ``topics`` (``partitions``: each topic's count)."""
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions[t])]
        if not tps:
            return GroupLag(group, {})
        committed: dict[tuple[str, int], int] = {}
        futures = self._admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, tps)], request_timeout=timeout
        )
        for future in futures.values():
            result = future.result()
            for tp in result.topic_partitions or []:
                committed[(tp.topic, tp.partition)] = max(0, tp.offset)
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        ends = self._admin.list_offsets(
            {TopicPartition(t, p): latest for t in topics for p in range(partitions[t])},
            request_timeout=timeout,
        )
        out: dict[str, tuple[int, int]] = {}
        for tp, future in ends.items():
            end = int(future.result().offset)
            out[f"{tp.topic}/{tp.partition}"] = (committed.get((tp.topic, tp.partition), 0), end)
        return GroupLag(group, out)
