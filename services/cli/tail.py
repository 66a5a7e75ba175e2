"""``reelbus tail TOPIC``: decoded Avro records as JSON lines, from the beginning, an offset or a time.

It reads by assignment, not as a consumer group, so it never moves anyone's committed offsets.
Without ``--follow`` it stops at the end offsets it saw when it started.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import sys
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from services.bus.consumer import FETCH_QUEUE_BACKOFF_MS, Incoming
from services.bus.contracts import DLQ_SUFFIX, Contracts
from services.bus.registry import RegistryClient
from services.bus.serde import PoisonMessage, Serde, split_header
from services.bus.tracing import header_bytes
from services.cli.infra import Layout


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def parse_time(text: str) -> int:
    """ISO 8601 (naive means UTC) or epoch milliseconds, to epoch milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither ISO 8601 nor epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def start_positions(
    consumer: Consumer, topic: str, offset: int | None, since_ms: int | None, from_end: bool
) -> tuple[list[TopicPartition], dict[int, int]]:
    meta = consumer.list_topics(topic, timeout=10.0).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise SystemExit(f"reelbus tail: topic {topic!r} does not exist")
    parts = sorted(meta.partitions)
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10.0)[1] for p in parts}
    if since_ms is not None:
        found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in parts], timeout=10.0)
        assigned = [
            TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found
        ]
    elif offset is not None:
        assigned = [TopicPartition(topic, p, offset) for p in parts]
    else:
        assigned = [TopicPartition(topic, p, OFFSET_END if from_end else OFFSET_BEGINNING) for p in parts]
    return assigned, ends


def read(
    bootstrap: str, topic: str, offset: int | None, since_ms: int | None, follow: bool, limit: int | None
) -> Iterator[Incoming]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "reelbus-tail",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,  # reading a backlog (consumer.py)
            "log_level": 3,
        }
    )
    try:
        assigned, ends = start_positions(consumer, topic, offset, since_ms, from_end=False)
        consumer.assign(assigned)
        remaining = {p for p, end in ends.items() if end > 0}
        if since_ms is not None or offset is not None:
            positions = {tp.partition: tp.offset for tp in assigned}
            remaining = {
                p for p in remaining if positions[p] == OFFSET_BEGINNING or 0 <= positions[p] < ends[p]
            }
        count = 0
        while follow or remaining:
            for raw in consumer.consume(500, 0.5):
                err = raw.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(raw.partition() or 0)
                    continue
                msg = Incoming.of(raw)
                if not follow and msg.offset >= ends[msg.partition]:
                    remaining.discard(msg.partition)
                    continue
                yield msg
                count += 1
                if limit is not None and count >= limit:
                    return
                if not follow and msg.offset + 1 >= ends[msg.partition]:
                    remaining.discard(msg.partition)
    finally:
        consumer.close()


async def render(serde: Serde, msg: Incoming) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "timestamp": dt.datetime.fromtimestamp(msg.timestamp_ms / 1000, dt.UTC).isoformat(),
    }
    headers = {k: header_bytes(v).decode(errors="replace") for k, v in msg.headers}
    if headers:
        doc["headers"] = headers
    try:
        doc["key"] = await serde.decode_key(msg.key)
    except PoisonMessage:
        doc["key_raw"] = base64.b64encode(msg.key or b"").decode()
    try:
        schema_id, _ = split_header(msg.value)
        fullname, record = await serde.decode_record(msg.value)
        doc.update({"type": fullname, "schema_id": schema_id, "value": record})
    except PoisonMessage as exc:
        doc.update({"undecodable": exc.reason, "value_raw": base64.b64encode(msg.value or b"").decode()})
    return doc


def cmd_tail(args: argparse.Namespace) -> int:
    layout = Layout.from_env()
    serde = Serde(Contracts.load(), RegistryClient(args.registry or layout.registry_url))
    loop = asyncio.new_event_loop()
    shown = 0
    try:
        for msg in read(
            args.bootstrap or layout.bootstrap_servers,
            args.topic,
            args.offset,
            args.since,
            args.follow,
            args.max,
        ):
            doc = loop.run_until_complete(render(serde, msg))
            print(json.dumps(doc, default=_json_default), flush=args.follow)
            shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    if args.topic.endswith(DLQ_SUFFIX):
        print(f"{shown} dead letter(s)", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("tail", help="read a topic as decoded JSON lines")
    p.add_argument("topic")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--offset", type=int, help="start at this offset in every partition")
    where.add_argument("--since", type=parse_time, help="start at this time (ISO 8601 or epoch ms)")
    p.add_argument("--follow", "-f", action="store_true", help="keep reading new records")
    p.add_argument("--max", type=int, help="stop after this many records")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the native bus)")
    p.add_argument("--registry", help="schema registry Confluent API URL (default: the native bus)")
    p.set_defaults(func=cmd_tail)
