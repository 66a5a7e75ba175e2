"""The Kafka client under the bus consumer: where its records come from, and what a fetch looks like.

``BusConsumer`` drives a ``Source`` (subscribe with rebalance callbacks, ``fetch``, synchronous
``commit``, ``committed``, watermarks, ``close``) and reads each fetch by index through ``Fetch``.
Two implementations:

- ``reelbus_native.KafkaConsumer`` (``services/bus/native/src/kafka.rs``): librdkafka built into the
  bus's native extension. A fetch is copied out of librdkafka without the GIL into one
  ``reelbus_native.Fetched``; the consumer's common case (a span group's extent, a run of decoded
  ``(event, record)`` pairs) is one native call each, with no Python object per record but the ones a
  handler gets. ``confluent-kafka``'s ``Consumer`` builds a ``Message`` object per record and costs a
  Python call per accessor: ``reelbus bench bus`` measured it alone, reading value, key and headers and
  nothing else, at 0.23-0.48 of Kafka's own ``ConsumerPerformance``.
- ``ConfluentSource`` over ``confluent_kafka.Consumer``, with ``MessageFetch``: where the extension is
  not built (the container image), or with ``REELBUS_NATIVE_CONSUMER=0``. Same behaviour, slower.

Both use librdkafka with the same configuration, so the group protocol, static membership, offsets
and errors are the same; ``tests/bus/test_kafka_clients.py`` holds the two to each other on a real
broker and ``tests/unit/test_native_consumer.py`` holds the consumer's fast path to its slow one.
"""

from __future__ import annotations

import collections.abc
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from services.bus import wire
from services.bus.tracing import KafkaHeaders, normalize_headers, trace_key

Partitions = list[tuple[str, int]]
Callback = Callable[[Partitions], None]


class Fetch(Protocol):
    """The records of one fetch, by index."""

    def __len__(self) -> int: ...
    def error(self, i: int) -> tuple[str, bool] | None:
        """``(text, fatal)`` when librdkafka reported an error in place of a record."""

    def topic(self, i: int) -> str: ...
    def partition(self, i: int) -> int: ...
    def offset(self, i: int) -> int: ...
    def timestamp(self, i: int) -> int: ...
    def key(self, i: int) -> bytes | None: ...
    def value(self, i: int) -> bytes | None: ...
    def headers(self, i: int) -> KafkaHeaders: ...
    def group_end(self, start: int, fields: list[str]) -> int:
        """The first record after ``start`` not in its span group: another topic or partition, an
        error, or other trace-context headers (those named in ``fields``)."""

    def decode_run(
        self, start: int, end: int, readers: dict[int, Any], allowed: Any, make_record: Any
    ) -> tuple[list[tuple[Any, Any]], int]:
        """The natively decodable run from ``start`` (``Serde.decode_run``); ``([], start)`` if none."""


class Source(Protocol):
    """The Kafka consumer under ``BusConsumer``."""

    def subscribe(
        self, topics: list[str], on_assign: Callback, on_revoke: Callback, on_lost: Callback
    ) -> None: ...
    def fetch(self, max: int, timeout: float) -> Fetch:
        """Wait up to ``timeout`` s for a record, then take what else is already fetched, up to ``max``
        in all. Blocking; the rebalance callbacks run in here."""

    def commit(self, offsets: list[tuple[str, int, int]]) -> None:
        """Commit ``(topic, partition, next offset)`` and wait for the broker. Blocking."""

    def committed(self, partitions: Partitions, timeout: float) -> list[tuple[str, int, int]]: ...
    def watermarks(
        self, topic: str, partition: int, cached: bool = True, timeout: float = 5.0
    ) -> tuple[int, int]: ...
    def close(self) -> None: ...


def _native_consumer() -> Any:
    if os.environ.get("REELBUS_NATIVE_CONSUMER", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return getattr(wire.NATIVE, "KafkaConsumer", None)


NATIVE_CONSUMER: Any = _native_consumer()

if NATIVE_CONSUMER is not None:  # a record's headers from the native fetch: a read-only sequence
    collections.abc.Sequence.register(wire.NATIVE.Headers)

# What a Source raises when librdkafka refuses or reports something.
KAFKA_ERRORS: tuple[type[BaseException], ...] = (KafkaException,) + (
    (wire.NATIVE.KafkaError,) if NATIVE_CONSUMER is not None else ()
)


def open_source(config: dict[str, Any], native: bool | None = None) -> Source:
    """A consumer with librdkafka's ``config``: the native one when built (and not turned off)."""
    if native is None:
        native = NATIVE_CONSUMER is not None
    if native:
        if NATIVE_CONSUMER is None:
            raise RuntimeError("the native consumer is not built (services/bus/native) or is turned off")
        source: Source = NATIVE_CONSUMER(config)
        return source
    return ConfluentSource(config)


# --- confluent-kafka ---------------------------------------------------------------------------


def _as_bytes(data: str | bytes | None) -> bytes | None:
    return data.encode() if isinstance(data, str) else data


class MessageFetch:
    """``Fetch`` over confluent-kafka's messages."""

    __slots__ = ("msgs",)

    def __init__(self, msgs: Sequence[Message]) -> None:
        self.msgs = msgs

    def __len__(self) -> int:
        return len(self.msgs)

    def error(self, i: int) -> tuple[str, bool] | None:
        err = self.msgs[i].error()
        return None if err is None else (str(err.str()), bool(err.fatal()))

    def topic(self, i: int) -> str:
        return self.msgs[i].topic() or ""

    def partition(self, i: int) -> int:
        return self.msgs[i].partition() or 0

    def offset(self, i: int) -> int:
        return self.msgs[i].offset() or 0

    def timestamp(self, i: int) -> int:
        return int(self.msgs[i].timestamp()[1])

    def key(self, i: int) -> bytes | None:
        return _as_bytes(self.msgs[i].key())

    def value(self, i: int) -> bytes | None:
        return _as_bytes(self.msgs[i].value())

    def headers(self, i: int) -> KafkaHeaders:
        raw = self.msgs[i].headers()
        if raw is None:
            return []
        return raw if type(raw) is list else normalize_headers(raw)

    def group_end(self, start: int, fields: list[str]) -> int:
        msgs = self.msgs
        first = msgs[start]
        topic, partition = first.topic(), first.partition()
        key = trace_key(self.headers(start), fields)
        end = start + 1
        while end < len(msgs):
            msg = msgs[end]
            if msg.error() is not None or msg.partition() != partition or msg.topic() != topic:
                break
            if trace_key(self.headers(end), fields) != key:
                break
            end += 1
        return end

    def decode_run(
        self, start: int, end: int, readers: dict[int, Any], allowed: Any, make_record: Any
    ) -> tuple[list[tuple[Any, Any]], int]:
        return [], start  # no fast path: the consumer's usual path takes every record


class ConfluentSource:
    """``Source`` over ``confluent_kafka.Consumer``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._consumer = Consumer(config)

    def subscribe(
        self, topics: list[str], on_assign: Callback, on_revoke: Callback, on_lost: Callback
    ) -> None:
        def adapt(fn: Callback) -> Callable[[Consumer, list[TopicPartition]], None]:
            return lambda _, partitions: fn([(p.topic, p.partition) for p in partitions])

        self._consumer.subscribe(
            topics, on_assign=adapt(on_assign), on_revoke=adapt(on_revoke), on_lost=adapt(on_lost)
        )

    def fetch(self, max: int, timeout: float) -> MessageFetch:
        # One consume(max, timeout) would sit out the whole timeout whenever fewer than max come.
        first: list[Message] = self._consumer.consume(1, timeout)
        if not first or max <= 1:
            return MessageFetch(first)
        return MessageFetch(first + self._consumer.consume(max - 1, 0))

    def commit(self, offsets: list[tuple[str, int, int]]) -> None:
        if offsets:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for t, p, o in offsets], asynchronous=False
            )

    def committed(self, partitions: Partitions, timeout: float) -> list[tuple[str, int, int]]:
        found = self._consumer.committed([TopicPartition(t, p) for t, p in partitions], timeout=timeout)
        return [(tp.topic, tp.partition, tp.offset) for tp in found]

    def watermarks(
        self, topic: str, partition: int, cached: bool = True, timeout: float = 5.0
    ) -> tuple[int, int]:
        tp = TopicPartition(topic, partition)
        if cached:
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
        else:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        return int(low), int(high)

    def close(self) -> None:
        self._consumer.close()
