"""The bus producer: typed events to declared topics, Avro through the registry, trace context in headers.

Built on librdkafka (confluent-kafka): an idempotent producer with ``acks=all``, lz4 batches and a
short linger. Deliveries are reported by librdkafka on a poll thread and handed to the event loop as
futures, so ``await producer.send(...)`` returns once the broker has the record on all in-sync replicas.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka import Producer as KafkaProducer
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from services.bus import metrics
from services.bus.contracts import Contracts, Topic
from services.bus.events import AvroEvent
from services.bus.serde import Serde
from services.bus.tracing import ATTR_EVENT_ID, ATTR_EVENT_TYPE, KafkaHeaders, inject_headers

HEADER_EVENT_TYPE = "reelbus.event-type"
HEADER_EVENT_ID = "reelbus.event-id"
HEADER_PRODUCER = "reelbus.producer"


@dataclass(frozen=True)
class ProducerConfig:
    bootstrap_servers: str
    client_id: str
    linger_ms: int = 5
    compression: str = "lz4"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def librdkafka(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": self.linger_ms,
            "compression.type": self.compression,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
            "queue.buffering.max.kbytes": 512 * 1024,
            "message.timeout.ms": 120_000,
            "log_level": 3,
            **self.extra,
        }


@dataclass(frozen=True)
class Delivered:
    topic: str
    partition: int
    offset: int


class DeliveryFailed(RuntimeError):
    pass


class Producer:
    """``await start()`` (looks up schema ids), ``await send(...)``, ``await close()``."""

    def __init__(self, config: ProducerConfig, contracts: Contracts, serde: Serde) -> None:
        self.config = config
        self.contracts = contracts
        self.serde = serde
        self._kafka: KafkaProducer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self._pending: set[asyncio.Task[None]] = set()
        self._tracer = trace.get_tracer("reelbus.bus.producer")

    async def start(self, topics: Sequence[str]) -> None:
        """Prepare the schema ids of every topic this producer writes; never fetched again."""
        for name in topics:
            await asyncio.to_thread(self.serde.prepare, self.contracts.topic(name))
        self._loop = asyncio.get_running_loop()
        self._kafka = KafkaProducer(self.config.librdkafka())
        self._closing.clear()
        self._poller = threading.Thread(target=self._poll, name=f"{self.config.client_id}-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        kafka = self._kafka
        assert kafka is not None
        while not self._closing.is_set():
            kafka.poll(0.1)

    def _callback(self, future: asyncio.Future[Delivered]) -> Any:
        loop = self._loop
        assert loop is not None

        def settle(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                exc = DeliveryFailed(f"delivery to {msg.topic()} failed: {err.str()}")
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(
                    _set_result, future, Delivered(msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
                )

        return settle

    def produce(
        self,
        topic: Topic,
        key: Any,
        event: AvroEvent,
        headers: KafkaHeaders | None = None,
    ) -> asyncio.Future[Delivered]:
        """Queue one event; the future resolves on delivery. Call from the event loop."""
        kafka = self._kafka
        if kafka is None:
            raise RuntimeError("producer not started")
        all_headers: KafkaHeaders = list(headers or [])
        all_headers += [
            (HEADER_EVENT_TYPE, event.SCHEMA_NAME.encode()),
            (HEADER_EVENT_ID, str(event.event_id).encode()),
            (HEADER_PRODUCER, self.config.client_id.encode()),
        ]
        with self._tracer.start_as_current_span(
            f"send {topic.name}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": topic.name,
                "messaging.operation.type": "send",
                ATTR_EVENT_TYPE: event.SCHEMA_NAME,
                ATTR_EVENT_ID: str(event.event_id),
            },
        ):
            inject_headers(all_headers)
            future = self._raw_produce(
                topic.name,
                self.serde.encode_key(topic, key),
                self.serde.encode_value(topic, event),
                all_headers,
            )
        metrics.PRODUCED.labels(topic.name).inc()
        return future

    def _raw_produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: KafkaHeaders
    ) -> asyncio.Future[Delivered]:
        kafka = self._kafka
        assert kafka is not None and self._loop is not None
        future: asyncio.Future[Delivered] = self._loop.create_future()
        try:
            kafka.produce(topic, value=value, key=key, headers=headers, on_delivery=self._callback(future))
        except BufferError:
            # The local queue is full: hand back a future that queues once librdkafka drains a little.
            task = self._loop.create_task(self._produce_later(topic, key, value, headers, future))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        except KafkaException as exc:
            future.set_exception(DeliveryFailed(f"cannot produce to {topic}: {exc}"))
        return future

    async def _produce_later(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: KafkaHeaders,
        future: asyncio.Future[Delivered],
    ) -> None:
        kafka = self._kafka
        assert kafka is not None
        while True:
            try:
                kafka.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._callback(future)
                )
                return
            except BufferError:
                await asyncio.sleep(0.005)  # back-pressure: wait for the local queue to drain

    async def send(
        self, topic: str, key: Any, event: AvroEvent, headers: KafkaHeaders | None = None
    ) -> Delivered:
        return await self.produce(self.contracts.topic(topic), key, event, headers)

    async def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: KafkaHeaders
    ) -> Delivered:
        """Bytes as they are (dead letters, replays): no schema, no new trace context."""
        return await self._raw_produce(topic, key, value, headers)

    async def flush(self, timeout: float = 30.0) -> int:
        kafka = self._kafka
        if kafka is None:
            return 0
        remaining: int = await asyncio.to_thread(kafka.flush, timeout)
        return remaining

    async def close(self, timeout: float = 30.0) -> None:
        remaining = await self.flush(timeout)
        self._closing.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, 5.0)
        if self._kafka is not None:
            self._kafka.poll(0)
        self._kafka = None
        if remaining:
            raise DeliveryFailed(f"{remaining} record(s) were not delivered within {timeout:.0f}s")


def _set_result(future: asyncio.Future[Delivered], value: Delivered) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Delivered], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
