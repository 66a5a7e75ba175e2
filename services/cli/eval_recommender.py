"""``reelbus eval recommender``: the recommender's quality on a ratings/viewing log, streamed and batched.

``--ratings FILE.csv`` (columns ``user,item,timestamp``; MovieLens' ``ratings.csv`` works as it is) or
``--synthetic N`` (a log of N viewings with planted co-watch structure; ``--save FILE`` keeps it).

Each user's last item is held out; the rest is the training log. The training log is replayed in time
order **through real Kafka topics and a running recommender worker**: the command makes private copies
of the recommender's topics (``eval.<run>.<name>``, so live profiles' lists are untouched), starts
``python -m services.recommender`` on them, publishes the log's titles (``catalog.changes``), users
(``accounts.profiles``) and viewings (``history.views``), waits until the worker has committed every
viewing and its model is folded and re-ranked, and reads every list from ``recommendations.profiles``.
The same algorithm then runs offline in one batch over the same log (``scoring.batch``), and a
popularity baseline too. It prints hit rate@10 and NDCG@10 on the held-out items for all three, and
whether the streamed lists EQUAL the batch's (exit code 1 when they do not).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from services.bus.admin import Admin
from services.bus.auth import TokenIssuer, load_private_key
from services.bus.contracts import Contracts
from services.bus.events import (
    ChangeType,
    ProfileCreated,
    RecommendedItem,
    TitleChanged,
    TitleSnapshot,
    ViewRecorded,
)
from services.bus.producer import Producer, ProducerConfig
from services.bus.registry import RegistryClient
from services.bus.serde import SchemaNotCached, Serde
from services.cli.infra import REPO_ROOT, Layout
from services.recommender import offline, scoring
from services.recommender.handlers import COWATCH, LISTS, PROFILES, TITLES, VIEWS
from services.recommender.scoring import Params, at_ms

CHANGELOG = "recommender-profiles-changelog"
NAMES = (VIEWS, COWATCH, LISTS, PROFILES, TITLES, CHANGELOG)
K = 10


def _say(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_json(url: str, token: str | None = None, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def worker(layout: Layout, prefix: str, data_dir: Path, log_file: Path, env: dict[str, str]) -> Iterator[str]:
    """A recommender worker on the copies of the topics; stopped with SIGTERM at the end."""
    port = _free_port()
    full = {
        **os.environ,
        "RECOMMENDER_HTTP_PORT": str(port),
        "RECOMMENDER_KAFKA_BOOTSTRAP_SERVERS": layout.bootstrap_servers,
        "RECOMMENDER_REGISTRY_URL": layout.registry_url,
        "RECOMMENDER_TOPIC_PREFIX": prefix,
        "RECOMMENDER_INSTANCE_ID": f"{prefix}worker-0",
        "RECOMMENDER_DATA_DIR": str(data_dir),
        "RECOMMENDER_TOKEN_PUBLIC_KEY_FILE": str(layout.home / "keys" / "token-signing.pub.pem"),
        "OTEL_TRACES_EXPORTER": os.environ.get("OTEL_TRACES_EXPORTER", "none"),
        **env,
    }
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.recommender"], cwd=REPO_ROOT, env=full, stdout=out, stderr=out
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait(what: str, probe: Any, timeout: float, proc_log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
        except (urllib.error.URLError, OSError, ValueError):
            found = None
        if found:
            return found
        time.sleep(0.25)
    tail = proc_log.read_text(errors="replace")[-2000:] if proc_log.exists() else ""
    raise SystemExit(f"reelbus eval recommender: timed out waiting for {what}\n{tail}")


def _ends(consumer: Consumer, topic: str) -> dict[int, int]:
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions
    }


def _committed_all(layout: Layout, group: str, topic: str) -> bool:
    consumer = Consumer({"bootstrap.servers": layout.bootstrap_servers, "group.id": group, "log_level": 3})
    try:
        ends = _ends(consumer, topic)
        tps = [TopicPartition(topic, p) for p in ends]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
        return all(end == 0 or committed.get(p, -1) >= end for p, end in ends.items())
    finally:
        consumer.close()


def _decode(serde: Serde, data: bytes | None) -> Any:
    try:
        return serde.decode_event_nowait(None, data)
    except SchemaNotCached as exc:
        serde._readers[exc.schema_id] = serde._reader_for(exc.schema_id)
        return serde.decode_event_nowait(None, data)


def read_lists(layout: Layout, serde: Serde, topic: str) -> dict[uuid.UUID, list[RecommendedItem]]:
    """Each profile's latest list on the compacted topic (the whole topic, to its current end)."""
    consumer = Consumer(
        {
            "bootstrap.servers": layout.bootstrap_servers,
            "group.id": f"eval-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    out: dict[uuid.UUID, list[RecommendedItem]] = {}
    try:
        ends = {p: e for p, e in _ends(consumer, topic).items() if e > 0}
        if not ends:
            return out
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        position = dict.fromkeys(ends, 0)
        while any(position[p] < e for p, e in ends.items()):
            msg = consumer.poll(10.0)
            if msg is None:
                raise RuntimeError(f"{topic}: no record within 10 s before its end")
            if msg.error():
                continue
            event = _decode(serde, msg.value())
            out[event.profile_id] = list(event.items)
            position[msg.partition() or 0] = (msg.offset() or 0) + 1
    finally:
        consumer.close()
    return out


def publish(layout: Layout, contracts: Contracts, serde: Serde, prefix: str, split: offline.Split) -> None:
    async def run() -> None:
        producer = Producer(
            ProducerConfig(layout.bootstrap_servers, client_id=f"{prefix}eval"), contracts, serde
        )
        await producer.start([prefix + n for n in (VIEWS, PROFILES, TITLES)])
        try:
            items = sorted({r.item for r in split.train} | set(split.test.values()))
            titles = [
                (
                    item,
                    TitleChanged(
                        title_id=item,
                        change=ChangeType.CREATED,
                        fields_changed=[],
                        title_version=1,
                        title=TitleSnapshot(
                            name=f"item {item}",
                            genres=[],
                            runtime_ms=0,
                            release_year=0,
                            maturity_rating="",
                            ladder_kbps=[],
                        ),
                    ),
                )
                for item in items
            ]
            users: dict[str, offline.Rating] = {}
            for r in split.train:
                users.setdefault(r.user, r)
            profiles = [
                (
                    str(r.account_id),
                    ProfileCreated(account_id=r.account_id, profile_id=r.profile_id, name=r.user),
                )
                for r in users.values()
            ]
            for chunk in _chunks(titles, 2000):
                await producer.send_batch(prefix + TITLES, chunk)
            for chunk2 in _chunks(profiles, 2000):
                await producer.send_batch(prefix + PROFILES, chunk2)
            views = [
                (
                    str(r.profile_id),
                    ViewRecorded(
                        event_id=r.event_id,
                        event_time=at_ms(r.timestamp_ms),
                        profile_id=r.profile_id,
                        account_id=r.account_id,
                        title_id=r.item,
                        session_id=r.event_id,
                        position_ms=0,
                        duration_ms=0,
                        watched_ms=0,
                        watched_at=at_ms(r.timestamp_ms),
                        completed=True,
                    ),
                )
                for r in split.train  # in replay order: event time, then event id
            ]
            for chunk3 in _chunks(views, 1000):
                await producer.send_batch(prefix + VIEWS, chunk3)
        finally:
            await producer.close()

    asyncio.run(run())


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _titles(lists: dict[uuid.UUID, list[RecommendedItem]]) -> dict[uuid.UUID, list[str]]:
    return {p: [i.title_id for i in items] for p, items in lists.items()}


def stream(
    layout: Layout, split: offline.Split, params: Params, keep: bool
) -> tuple[dict[uuid.UUID, Any], float]:
    """Replay the training log through copies of the topics and a worker; every profile's list."""
    contracts = Contracts.load()
    prefix = f"eval.{uuid.uuid4().hex[:10]}."
    copies = [replace(contracts.topic(n), name=prefix + n) for n in NAMES]
    extended = contracts.with_topics(copies)
    admin = Admin(layout.bootstrap_servers, RegistryClient(layout.registry_url))
    plan = admin.apply(extended, [c.name for c in copies])
    if plan.refusals:
        raise SystemExit(f"reelbus eval recommender: cannot make the topics: {plan.refusals}")
    serde = Serde(extended, RegistryClient(layout.registry_url))
    issuer = TokenIssuer(load_private_key(layout.home / "keys" / "token-signing.pem"))
    token = issuer.issue(str(uuid.uuid4()), "eval", "DESKTOP_BROWSER", scopes=("recommender:eval",))
    env = {
        "RECOMMENDER_HALF_LIFE_DAYS": str(params.half_life_days),
        "RECOMMENDER_PAIR_WINDOW": str(params.pair_window),
        "RECOMMENDER_ANCHORS": str(params.anchors),
        "RECOMMENDER_HISTORY": str(params.history),
        "RECOMMENDER_BECAUSE_ITEMS": str(params.because_items),
        "RECOMMENDER_TRENDING_ITEMS": str(params.trending_items),
        "RECOMMENDER_TRENDING_WINDOW_HOURS": str(params.trending_window_hours),
        "RECOMMENDER_REFRESH_INTERVAL_SECONDS": "2",
        "RECOMMENDER_LOG_LEVEL": "WARNING",
    }
    try:
        with tempfile.TemporaryDirectory(prefix="reelbus-eval-") as tmp:
            log_file = Path(tmp) / "recommender.log"
            with worker(layout, prefix, Path(tmp) / "data", log_file, env) as url:
                _wait("the worker to be ready", lambda: _http_json(f"{url}/readyz")["ready"], 120, log_file)
                started = time.monotonic()
                _say(f"publishing {len(split.train)} viewings to {prefix}{VIEWS} ...")
                publish(layout, extended, serde, prefix, split)
                group = prefix + "recommender"

                def idle() -> bool:
                    if not _committed_all(layout, group, prefix + VIEWS):
                        return False
                    status = _http_json(f"{url}/v1/internal/recommender/status", token)
                    return bool(status["idle"])

                _wait("the worker to process the log", idle, 3600, log_file)
                elapsed = time.monotonic() - started
                status = _http_json(f"{url}/v1/internal/recommender/status", token)
                _say(f"processed in {elapsed:.1f}s; worker counts {status['counts']}")
                lists = read_lists(layout, serde, prefix + LISTS)
                if keep:
                    _say(f"worker log kept: {log_file.read_text(errors='replace')[-500:]}")
    finally:
        if not keep:
            admin.delete_topics([n for c in copies for n in (c.name, c.dlq)])
    return dict(lists), elapsed


def cmd_recommender(args: argparse.Namespace) -> int:
    if args.synthetic:
        ratings = offline.synthetic(args.synthetic, seed=args.seed)
        source = f"synthetic log of {len(ratings)} viewings (seed {args.seed})"
        if args.save:
            offline.write_log(Path(args.save), ratings)
            _say(f"wrote {args.save}")
    else:
        try:
            ratings = offline.read_log(Path(args.ratings))
        except (OSError, offline.LogError) as exc:
            print(f"reelbus eval recommender: {exc}", file=sys.stderr)
            return 2
        source = f"{args.ratings} ({len(ratings)} rows)"
    params = Params(half_life_days=args.half_life_days, pair_window=args.pair_window, anchors=args.anchors)
    split = offline.leave_last_out(ratings)
    _say(f"{source}: {split.users} users, {split.items} items, {len(split.train)} training viewings")
    started = time.monotonic()
    batch_lists, _model = scoring.batch([r.view() for r in split.train], params)
    batch_seconds = time.monotonic() - started
    popular = offline.popularity(split.train, split.test, K)
    results: dict[str, Any] = {
        "source": source,
        "users": split.users,
        "items": split.items,
        "train": len(split.train),
        "test_users": len(split.test),
        "params": params.version,
        "batch_seconds": round(batch_seconds, 2),
    }
    rows = [("popularity baseline", offline.evaluate(popular, split.test, K))]
    rows.append(("co-watch, offline batch", offline.evaluate(_titles(batch_lists), split.test, K)))
    equal = None
    if not args.batch_only:
        layout = Layout.from_env()
        streamed, seconds = stream(layout, split, params, args.keep)
        rows.append(
            ("co-watch, streamed (Kafka + worker)", offline.evaluate(_titles(streamed), split.test, K))
        )
        equal = streamed == batch_lists
        differing = sorted(
            str(p) for p in set(streamed) | set(batch_lists) if streamed.get(p) != batch_lists.get(p)
        )
        results["stream_seconds"] = round(seconds, 1)
        results["stream_equals_batch"] = equal
        results["profiles_differing"] = len(differing)
        if differing:
            results["first_differing"] = differing[:5]
    results["scores"] = {
        name: {"hit_rate@10": round(s.hit_rate, 4), "ndcg@10": round(s.ndcg, 4), "users": s.users}
        for name, s in rows
    }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{source}: {split.users} users, {split.items} items; {len(split.test)} held-out next items")
        print(f"{'':40s} {'HR@10':>8s} {'NDCG@10':>8s}")
        for name, s in rows:
            print(f"{name:40s} {s.hit_rate:8.4f} {s.ndcg:8.4f}")
        if equal is not None:
            verdict = "EQUAL" if equal else f"DIFFERENT for {results['profiles_differing']} profile(s)"
            print(f"streamed lists vs batch lists: {verdict} (stream {results['stream_seconds']}s)")
    return 0 if equal in (None, True) else 1


def register(which: Any) -> None:
    r = which.add_parser(
        "recommender",
        help="the recommender on a ratings log: streamed through Kafka vs batch vs popularity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = r.add_mutually_exclusive_group(required=True)
    source.add_argument("--ratings", help="CSV with user,item,timestamp (MovieLens ratings.csv works)")
    source.add_argument("--synthetic", type=int, metavar="N", help="a synthetic log of N viewings")
    r.add_argument("--save", help="with --synthetic: also write the log to this CSV")
    r.add_argument("--seed", type=int, default=7, help="with --synthetic: the generator's seed")
    r.add_argument("--half-life-days", type=int, default=30)
    r.add_argument("--pair-window", type=int, default=20)
    r.add_argument("--anchors", type=int, default=10)
    r.add_argument("--batch-only", action="store_true", help="skip the streamed run (no Kafka needed)")
    r.add_argument("--keep", action="store_true", help="keep the topics of the run")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_recommender)
