"""The Kafka ecosystem's own clients read the bus's records: Confluent's ``AvroDeserializer``, with its
schema-registry client pointed at the registry's Confluent-compatible API, decodes what the bus
producer wrote (Confluent wire format, schema ids from the same registry)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from services.bus.contracts import Contracts
from services.cli.infra import Layout
from tests.bus.test_bus import producer_for, view
from tests.conftest import TopicFactory, unique

pytestmark = pytest.mark.infra


def read_all(layout: Layout, topic: str, count: int) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": layout.bootstrap_servers,
            "group.id": unique("interop"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions])
        out: list[Any] = []
        for _ in range(200):
            if len(out) >= count:
                break
            out.extend(m for m in consumer.consume(count, 0.2) if m.error() is None)
        return out
    finally:
        consumer.close()


async def test_confluent_avro_deserializer_reads_bus_records(
    bus_infra: Layout, contracts: Contracts, make_topic: TopicFactory
) -> None:
    contracts, topic = await make_topic("history.views", partitions=1)
    sent = [view(title_id=f"tt{n:07d}", completed=n % 2 == 0) for n in range(3)]
    async with producer_for(bus_infra, contracts, topic) as producer:
        for event in sent:
            await producer.send(topic.name, str(event.profile_id), event)

    messages = read_all(bus_infra, topic.name, len(sent))
    assert len(messages) == len(sent)
    with SchemaRegistryClient({"url": bus_infra.registry_url}) as client:
        deserialize = AvroDeserializer(client)
        context = SerializationContext(topic.name, MessageField.VALUE)
        decoded = [deserialize(m.value(), context) for m in messages]
    for event, got in zip(sent, decoded, strict=True):
        assert got is not None
        # Confluent's decoder knows nothing of our generated classes: a plain dict, with the
        # logical types as Python values (uuid.UUID, an aware datetime).
        assert isinstance(got, dict)
        assert got["event_id"] == event.event_id
        assert got["profile_id"] == event.profile_id
        assert got["title_id"] == event.title_id
        assert got["completed"] == event.completed
        assert got["watched_ms"] == event.watched_ms
        assert got["watched_at"] == event.watched_at.astimezone(dt.UTC)
