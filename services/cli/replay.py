"""``reelbus replay`` and ``reelbus dlq list|show|redrive``: re-running history and dead letters.

``replay TOPIC --from T1 --to T2 --into TOPIC2`` copies the records of that range (``T1 <= timestamp
<= T2``, found per partition with ``offsets_for_times``; or ``--from-offset/--to-offset``, inclusive,
in every partition or in ``--partition``) into ``TOPIC2`` byte for byte: key, value (schema ids
untouched) and headers, plus a ``reelbus.replay`` header (JSON: source topic, partition, offset,
replayed-at). Each record goes to the same partition number when ``TOPIC2`` has enough partitions,
else by key, so the order of a partition's records is kept. ``--group GROUP`` instead rewinds the
group's committed offsets on ``TOPIC`` to the start of the range (the group then reprocesses from
there on); a group with active members is refused. ``--dry-run`` prints the offsets and the count
and writes nothing. Everything reads by assignment, so nobody's committed offsets move but the
rewound group's.

``dlq`` reads ``TOPIC.dlq``: ``list`` prints one line per dead letter, ``show`` one in full (the value
decoded through the registry when it can be), ``redrive`` re-publishes selected ones to the topic
named by their ``reelbus.dlq.topic`` header, with their original key, value and headers (minus the
``reelbus.dlq.*`` ones) plus ``reelbus.redriven-from``. A dead letter already redriven (a record on
the original topic carries its ``reelbus.redriven-from``) is skipped, so a repeated redrive is a no-op.

Bad input (an unknown topic or group, a reversed or empty range, a record without dead-letter
headers) is refused with a message and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from services.bus.consumer import DLQ_PREFIX, FETCH_QUEUE_BACKOFF_MS, Incoming
from services.bus.contracts import DLQ_SUFFIX, Contracts
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.tracing import KafkaHeaders, header_bytes
from services.cli.infra import Layout
from services.cli.tail import _json_default, parse_time, render

EXIT_REFUSED = 2
HEADER_REPLAY = "reelbus.replay"
HEADER_REDRIVEN = "reelbus.redriven-from"
TIMEOUT = 15.0
DLQ_FIELDS = ("stage", "error", "reason", "topic", "partition", "offset")


class Refused(Exception):
    """Bad input: printed, exit code 2, nothing written."""


def _bootstrap(args: argparse.Namespace) -> str:
    return str(args.bootstrap or Layout.from_env().bootstrap_servers)


def _consumer(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "reelbus-replay",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,  # reading a backlog (consumer.py)
            "log_level": 3,
        }
    )


def _producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "log_level": 3,
        }
    )


def partitions_of(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=TIMEOUT).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise Refused(f"topic {topic!r} does not exist")
    return sorted(meta.partitions)


@dataclass(frozen=True)
class Span:
    """Offsets ``start`` (inclusive) to ``end`` (exclusive) of one partition."""

    partition: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return max(0, self.end - self.start)


def time_range(consumer: Consumer, topic: str, parts: list[int], from_ms: int, to_ms: int) -> list[Span]:
    if from_ms > to_ms:
        raise Refused("the range is reversed: --from is after --to")
    # One lookup per bound: librdkafka answers a partition once per call.
    bounds = []
    for at in (from_ms, to_ms + 1):
        found = consumer.offsets_for_times([TopicPartition(topic, p, at) for p in parts], timeout=TIMEOUT)
        bounds.append({tp.partition: tp.offset for tp in found})
    spans = []
    for p in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT)
        start, end = (b[p] if b.get(p, -1) >= 0 else high for b in bounds)
        spans.append(Span(p, max(start, low), end))
    return spans


def offset_range(
    consumer: Consumer, topic: str, parts: list[int], first: int, last: int | None
) -> list[Span]:
    if last is not None and first > last:
        raise Refused("the range is reversed: --from-offset is after --to-offset")
    spans = []
    for p in parts:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=TIMEOUT)
        end = high if last is None else min(high, last + 1)
        spans.append(Span(p, max(first, low), end))
    return spans


def read_spans(consumer: Consumer, topic: str, spans: Iterable[Span]) -> list[Incoming]:
    """The records of these spans, in offset order per partition (by assignment, nothing committed)."""
    wanted = {s.partition: s for s in spans if s.count > 0}
    if not wanted:
        return []
    consumer.assign([TopicPartition(topic, s.partition, s.start) for s in wanted.values()])
    out: list[Incoming] = []
    remaining = set(wanted)
    deadline = time.monotonic() + 60.0
    while remaining:
        if time.monotonic() > deadline:
            raise RuntimeError(f"reading {topic} did not reach the range's end within 60s")
        for raw in consumer.consume(500, 0.5):
            err = raw.error()
            p = raw.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(p)
                continue
            if p not in remaining:
                continue
            msg = Incoming.of(raw)
            if msg.offset < wanted[p].end:
                out.append(msg)
            if msg.offset + 1 >= wanted[p].end:
                remaining.discard(p)
    consumer.unassign()
    return out


class _Deliveries:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.delivered = 0

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(err.str())
        else:
            self.delivered += 1


def _publish(bootstrap: str, records: Iterable[tuple[str, int | None, Incoming, KafkaHeaders]]) -> int:
    producer = _producer(bootstrap)
    done = _Deliveries()
    for topic, partition, msg, headers in records:
        kwargs: dict[str, Any] = {"partition": partition} if partition is not None else {}
        while True:
            try:
                producer.produce(
                    topic, value=msg.value, key=msg.key, headers=headers, on_delivery=done, **kwargs
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60.0)
    if left or done.errors:
        raise RuntimeError(f"{left} record(s) undelivered, errors: {done.errors[:3]}")
    return done.delivered


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _print_spans(topic: str, spans: list[Span], counts: dict[int, int]) -> None:
    for s in spans:
        shown = f"{s.start}..{s.end - 1}" if s.count else f"{s.start} (none)"
        print(f"{topic} partition {s.partition}: offsets {shown}  records {counts.get(s.partition, 0)}")
    print(f"{sum(counts.values())} record(s)")


# -- replay -------------------------------------------------------------------------------------


def _group_members(admin: AdminClient, group: str) -> int:
    future = admin.describe_consumer_groups([group], request_timeout=TIMEOUT)[group]
    try:
        desc = future.result(timeout=TIMEOUT)
    except KafkaException as exc:
        raise Refused(f"consumer group {group!r} is unknown ({exc})") from None
    state = str(getattr(desc.state, "name", desc.state)).upper()
    if state in ("DEAD", "UNKNOWN") and not desc.members:
        raise Refused(f"consumer group {group!r} is unknown (state {state})")
    return len(desc.members)


def run_replay(args: argparse.Namespace) -> int:
    bootstrap = _bootstrap(args)
    consumer = _consumer(bootstrap)
    try:
        parts = partitions_of(consumer, args.topic)
        if args.partition is not None:
            if args.partition not in parts:
                raise Refused(f"topic {args.topic!r} has no partition {args.partition}")
            parts = [args.partition]
        if args.from_offset is not None:
            spans = offset_range(consumer, args.topic, parts, args.from_offset, args.to_offset)
        elif args.from_time is not None:
            to_ms = args.to_time if args.to_time is not None else int(time.time() * 1000)
            spans = time_range(consumer, args.topic, parts, args.from_time, to_ms)
        else:
            raise Refused("give --from (and --to) or --from-offset (and --to-offset)")
        target_parts: list[int] = []
        if args.into is not None:
            if args.into == args.topic:
                raise Refused("--into must name another topic than the one replayed")
            target_parts = partitions_of(consumer, args.into)
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        if args.group is not None:
            members = _group_members(admin, args.group)
            if members:
                raise Refused(
                    f"consumer group {args.group!r} has {members} active member(s): "
                    "stop them before rewinding its offsets"
                )
        records = read_spans(consumer, args.topic, spans)
    finally:
        consumer.close()
    counts: dict[int, int] = {}
    for msg in records:
        counts[msg.partition] = counts.get(msg.partition, 0) + 1
    if not records:
        raise Refused(f"no records of {args.topic!r} in that range: nothing to replay")
    _print_spans(args.topic, spans, counts)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if args.into is not None:
        same = len(target_parts) >= len(parts) and all(p in target_parts for p in counts)
        replayed_at = _now_iso()

        def marked(msg: Incoming) -> KafkaHeaders:
            mark = {
                "topic": msg.topic,
                "partition": msg.partition,
                "offset": msg.offset,
                "replayed_at": replayed_at,
            }
            return [*msg.headers, (HEADER_REPLAY, json.dumps(mark).encode())]

        n = _publish(
            bootstrap,
            ((args.into, msg.partition if same else None, msg, marked(msg)) for msg in records),
        )
        how = "same partitions" if same else "partitioned by key"
        print(f"replayed {n} record(s) from {args.topic} into {args.into} ({how})")
        return 0
    offsets = [TopicPartition(args.topic, s.partition, s.start) for s in spans]
    futures = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(args.group, offsets)])
    for future in futures.values():
        future.result(timeout=TIMEOUT)
    for s in spans:
        print(f"group {args.group}: {args.topic} partition {s.partition} rewound to offset {s.start}")
    return 0


# -- dlq ----------------------------------------------------------------------------------------


def _dlq_name(topic: str) -> str:
    return topic if topic.endswith(DLQ_SUFFIX) else topic + DLQ_SUFFIX


def _headers(msg: Incoming) -> dict[str, str]:
    return {k: header_bytes(v).decode(errors="replace") for k, v in msg.headers}


def _dead_letters(bootstrap: str, dlq: str, partition: int | None = None) -> list[Incoming]:
    consumer = _consumer(bootstrap)
    try:
        parts = partitions_of(consumer, dlq)
        if partition is not None:
            if partition not in parts:
                raise Refused(f"topic {dlq!r} has no partition {partition}")
            parts = [partition]
        return read_spans(consumer, dlq, offset_range(consumer, dlq, parts, 0, None))
    finally:
        consumer.close()


def _failed_at(headers: dict[str, str]) -> str:
    raw = headers.get(DLQ_PREFIX + "failed-at", "")
    if not raw.isdigit():
        return raw or "-"
    return dt.datetime.fromtimestamp(int(raw) / 1000, dt.UTC).isoformat(timespec="milliseconds")


def run_dlq_list(args: argparse.Namespace) -> int:
    dlq = _dlq_name(args.topic)
    letters = _dead_letters(_bootstrap(args), dlq)
    for msg in letters:
        h = _headers(msg)
        g = {name: h.get(DLQ_PREFIX + name, "-") for name in DLQ_FIELDS}
        print(
            f"{msg.partition}/{msg.offset}  failed-at={_failed_at(h)}  stage={g['stage']}  "
            f"error={g['error']}  reason={g['reason']!r}  "
            f"original={g['topic']}/{g['partition']}/{g['offset']}"
        )
    print(f"{len(letters)} dead letter(s) in {dlq}", file=sys.stderr)
    return 0


def _find(letters: list[Incoming], offset: int, partition: int | None) -> list[Incoming]:
    return [m for m in letters if m.offset == offset and (partition is None or m.partition == partition)]


def run_dlq_show(args: argparse.Namespace) -> int:
    dlq = _dlq_name(args.topic)
    found = _find(_dead_letters(_bootstrap(args), dlq, args.partition), args.offset, args.partition)
    if not found:
        raise Refused(f"no dead letter at offset {args.offset} of {dlq}")
    if len(found) > 1:
        raise Refused(f"offset {args.offset} exists in several partitions of {dlq}: give --partition")
    layout = Layout.from_env()
    serde = Serde(Contracts.load(), RegistryClient(args.registry or layout.registry_url))
    doc = asyncio.run(render(serde, found[0]))
    print(json.dumps(doc, indent=2, default=_json_default))
    return 0


def _redriven(bootstrap: str, topic: str) -> set[str]:
    """The ``reelbus.redriven-from`` values already on ``topic``."""
    consumer = _consumer(bootstrap)
    try:
        parts = partitions_of(consumer, topic)
        records = read_spans(consumer, topic, offset_range(consumer, topic, parts, 0, None))
    finally:
        consumer.close()
    return {header_bytes(v).decode() for m in records for k, v in m.headers if k == HEADER_REDRIVEN}


def run_dlq_redrive(args: argparse.Namespace) -> int:
    if not args.all and not args.offset:
        raise Refused("give --offset N (repeatable) or --all")
    bootstrap = _bootstrap(args)
    dlq = _dlq_name(args.topic)
    letters = _dead_letters(bootstrap, dlq, args.partition)
    if args.all:
        chosen = letters
    else:
        chosen = []
        for off in args.offset:
            found = _find(letters, off, args.partition)
            if not found:
                raise Refused(f"no dead letter at offset {off} of {dlq}")
            chosen.extend(found)
    if not chosen:
        raise Refused(f"{dlq} holds no dead letters")
    plan: list[tuple[str, int | None, Incoming, KafkaHeaders]] = []
    consumer = _consumer(bootstrap)
    try:
        for msg in chosen:
            h = _headers(msg)
            target = h.get(DLQ_PREFIX + "topic")
            if not target:
                raise Refused(f"{dlq} {msg.partition}/{msg.offset} has no {DLQ_PREFIX}* headers: refused")
            target_parts = partitions_of(consumer, target)
            orig = h.get(DLQ_PREFIX + "partition", "")
            partition = int(orig) if orig.isdigit() and int(orig) in target_parts else None
            headers: KafkaHeaders = [(k, v) for k, v in msg.headers if not k.startswith(DLQ_PREFIX)]
            headers.append((HEADER_REDRIVEN, f"{dlq}/{msg.partition}/{msg.offset}".encode()))
            plan.append((target, partition, msg, headers))
    finally:
        consumer.close()
    done: dict[str, set[str]] = {}
    todo = []
    for target, partition, msg, headers in plan:
        if target not in done:
            done[target] = _redriven(bootstrap, target)
        mark = f"{dlq}/{msg.partition}/{msg.offset}"
        if mark in done[target]:
            print(f"skip {mark}: already redriven to {target}")
            continue
        verb = "would redrive" if args.dry_run else "redrive"
        print(f"{verb} {mark} -> {target} partition {partition if partition is not None else '(by key)'}")
        todo.append((target, partition, msg, headers))
    if args.dry_run:
        print(f"dry run: {len(todo)} dead letter(s) would be redriven, nothing written")
        return 0
    n = _publish(bootstrap, todo) if todo else 0
    print(f"redrove {n} dead letter(s)")
    return 0


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except Refused as exc:
            print(f"reelbus {args.command}: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        return code

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the native bus)")
    p.add_argument("--registry", help="schema registry Confluent API URL (default: the native bus)")


def register(sub: Any) -> None:
    p = sub.add_parser("replay", help="copy a time or offset range to another topic, or rewind a group")
    p.add_argument("topic")
    p.add_argument("--from", dest="from_time", type=parse_time, help="ISO 8601 or epoch ms (inclusive)")
    p.add_argument("--to", dest="to_time", type=parse_time, help="ISO 8601 or epoch ms (inclusive)")
    p.add_argument("--from-offset", type=int, help="first offset, in every partition (inclusive)")
    p.add_argument("--to-offset", type=int, help="last offset, in every partition (inclusive)")
    p.add_argument("--partition", type=int, help="only this partition")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--into", help="copy the records into this topic")
    dest.add_argument("--group", help="rewind this consumer group's offsets to the range's start")
    p.add_argument("--dry-run", action="store_true", help="print offsets and counts, write nothing")
    _common(p)
    p.set_defaults(func=_guarded(run_replay))

    d = sub.add_parser("dlq", help="list, show or redrive the dead letters of a topic")
    dsub = d.add_subparsers(dest="dlq_command", required=True)
    lp = dsub.add_parser("list", help="one line per dead letter of TOPIC.dlq")
    lp.add_argument("topic")
    _common(lp)
    lp.set_defaults(func=_guarded(run_dlq_list))
    sp = dsub.add_parser("show", help="one dead letter in full")
    sp.add_argument("topic")
    sp.add_argument("--offset", type=int, required=True)
    sp.add_argument("--partition", type=int)
    _common(sp)
    sp.set_defaults(func=_guarded(run_dlq_show))
    rp = dsub.add_parser("redrive", help="re-publish dead letters to their original topic")
    rp.add_argument("topic")
    which = rp.add_mutually_exclusive_group()
    which.add_argument("--offset", type=int, action="append", help="this dead letter (repeatable)")
    which.add_argument("--all", action="store_true", help="every dead letter")
    rp.add_argument("--partition", type=int, help="only dead letters of this partition")
    rp.add_argument("--dry-run", action="store_true", help="print what would be redriven, write nothing")
    _common(rp)
    rp.set_defaults(func=_guarded(run_dlq_redrive))
