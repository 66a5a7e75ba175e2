"""Offline evaluation of the recommender, pure: reading a ratings/viewing log, the leave-last-out split,
hit rate and NDCG at k, the popularity baseline, and a synthetic log with planted co-watch structure.

The protocol: each user's events in time order; the last is held out (the "next item"), the others are
the training log. A list is computed per user from the training log (by the stream processor, or by
:func:`services.recommender.scoring.batch`), and scored on whether, and how high, it holds the next item.
"""

from __future__ import annotations

import csv
import math
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.recommender.scoring import View

USER_IDS = uuid.UUID("9a0e6c4b-2f71-4c59-a3d8-6b1e0f2c7d95")  # namespace: user -> profile id
ACCOUNT_IDS = uuid.UUID("3c8d1f62-5b0a-4e97-8f24-7a9e6d1b0c58")  # namespace: user -> account id
EVENT_IDS = uuid.UUID("e41b7a09-6c3d-4f82-9b15-0d2a8c6f4e73")  # namespace: rating -> viewing id


@dataclass(frozen=True)
class Rating:
    user: str
    item: str
    timestamp_ms: int

    @property
    def profile_id(self) -> uuid.UUID:
        return uuid.uuid5(USER_IDS, self.user)

    @property
    def account_id(self) -> uuid.UUID:
        return uuid.uuid5(ACCOUNT_IDS, self.user)

    @property
    def event_id(self) -> uuid.UUID:
        return uuid.uuid5(EVENT_IDS, f"{self.user}\x1f{self.item}\x1f{self.timestamp_ms}")

    def view(self) -> View:
        return View(
            event_id=str(self.event_id),
            profile_id=self.profile_id,
            title_id=self.item,
            event_time_ms=self.timestamp_ms,
            completed=True,
        )


class LogError(ValueError):
    """The log file is not in the expected shape; the message says where."""


def _timestamp_ms(raw: str, where: str) -> int:
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise LogError(f"{where}: timestamp {raw!r} is neither epoch seconds/ms nor ISO 8601") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return int(when.timestamp() * 1000)
    return int(value) if value > 1e11 else int(value * 1000)  # epoch ms, or seconds (MovieLens)


def read_log(path: Path) -> list[Rating]:
    """A CSV with a header naming ``user``, ``item`` and ``timestamp`` (other columns are ignored;
    MovieLens' ``userId,movieId,rating,timestamp`` is accepted as well)."""
    aliases = {"userid": "user", "movieid": "item", "itemid": "item"}
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [aliases.get(h.strip().lower(), h.strip().lower()) for h in next(reader)]
        except StopIteration:
            raise LogError(f"{path}: empty file") from None
        missing = [c for c in ("user", "item", "timestamp") if c not in header]
        if missing:
            raise LogError(f"{path}: the header has no column {', '.join(missing)} (got {header})")
        iu, ii, it = header.index("user"), header.index("item"), header.index("timestamp")
        out = []
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < len(header):
                raise LogError(f"{path}:{n}: {len(row)} columns, expected {len(header)}")
            user, item = row[iu].strip(), row[ii].strip()
            if not user or not item:
                raise LogError(f"{path}:{n}: empty user or item")
            out.append(Rating(user, item, _timestamp_ms(row[it], f"{path}:{n}")))
    return out


def write_log(path: Path, ratings: Iterable[Rating]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "timestamp"])
        for r in ratings:
            writer.writerow([r.user, r.item, r.timestamp_ms // 1000])


def time_order(ratings: Iterable[Rating]) -> list[Rating]:
    """The replay order: event time, then event id (the batch's order too)."""
    return sorted(ratings, key=lambda r: (r.timestamp_ms, str(r.event_id)))


@dataclass(frozen=True)
class Split:
    train: list[Rating]  # in replay order
    test: dict[uuid.UUID, str]  # profile -> held-out next item
    users: int
    items: int


def leave_last_out(ratings: Sequence[Rating]) -> Split:
    """Each user's last event (by time, then item) is held out, for users with at least two distinct
    items; a repeated (user, item) pair is kept once, at its first time."""
    first: dict[tuple[str, str], Rating] = {}
    for r in time_order(ratings):
        first.setdefault((r.user, r.item), r)
    by_user: dict[str, list[Rating]] = {}
    for r in first.values():
        by_user.setdefault(r.user, []).append(r)
    train: list[Rating] = []
    test: dict[uuid.UUID, str] = {}
    for events in by_user.values():
        events.sort(key=lambda r: (r.timestamp_ms, r.item))
        if len(events) >= 2:
            held = events.pop()
            test[held.profile_id] = held.item
        train.extend(events)
    return Split(time_order(train), test, len(by_user), len({r.item for r in first.values()}))


@dataclass(frozen=True)
class Scores:
    hit_rate: float
    ndcg: float
    users: int


def evaluate(lists: Mapping[uuid.UUID, Sequence[str]], test: Mapping[uuid.UUID, str], k: int = 10) -> Scores:
    """Hit rate@k and NDCG@k over the test users (a user with no list counts as a miss)."""
    hits = 0
    gain = 0.0
    for profile, item in test.items():
        top = list(lists.get(profile, ()))[:k]
        if item in top:
            hits += 1
            gain += 1.0 / math.log2(top.index(item) + 2)
    n = len(test)
    return Scores(hits / n if n else 0.0, gain / n if n else 0.0, n)


def popularity(
    train: Sequence[Rating], test: Mapping[uuid.UUID, str], k: int = 10
) -> dict[uuid.UUID, list[str]]:
    """The baseline: the most watched items of the training log, minus what the user watched."""
    counts: dict[str, int] = {}
    seen: dict[uuid.UUID, set[str]] = {}
    for r in train:
        counts[r.item] = counts.get(r.item, 0) + 1
        seen.setdefault(r.profile_id, set()).add(r.item)
    ranked = [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    out: dict[uuid.UUID, list[str]] = {}
    for profile in test:
        mine = seen.get(profile, set())
        out[profile] = [i for i in ranked if i not in mine][:k]
    return out


def synthetic(
    events: int,
    *,
    users: int | None = None,
    clusters: int = 20,
    per_cluster: int = 15,
    noise: float = 0.2,
    seed: int = 7,
    start: datetime = datetime(2026, 9, 1, tzinfo=UTC),
    days: int = 60,
) -> list[Rating]:
    """A log with planted co-watch structure: items fall in ``clusters`` series of ``per_cluster``
    titles; each user follows one or two series, mostly in the series' order (the next item is the
    series' next title), with ``noise`` of their viewings drawn from a Zipf-popular long tail."""
    rng = random.Random(seed)
    users = users or max(10, events // 20)
    items = [[f"s{c:02d}e{e:02d}" for e in range(per_cluster)] for c in range(clusters)]
    tail = [f"x{n:03d}" for n in range(clusters * per_cluster)]
    zipf = [1.0 / (n + 1) for n in range(len(tail))]
    span_ms = days * 86_400_000
    base = int(start.timestamp() * 1000)
    out: list[Rating] = []
    per_user = [events // users + (1 if u < events % users else 0) for u in range(users)]
    for u, count in enumerate(per_user):
        user = f"u{u:05d}"
        series = rng.sample(range(clusters), k=2 if rng.random() < 0.3 else 1)
        progress = dict.fromkeys(series, 0)
        t = base + rng.randrange(span_ms // 2)
        watched: set[str] = set()
        for _ in range(count):
            t += rng.randrange(1, 36) * 3_600_000
            candidates = [c for c in series if progress[c] < per_cluster]
            if candidates and rng.random() >= noise:
                c = rng.choice(candidates)
                item = items[c][progress[c]]
                progress[c] += 1
            else:
                item = rng.choices(tail, weights=zipf)[0]
                if item in watched:
                    continue
            watched.add(item)
            out.append(Rating(user, item, min(t, base + span_ms)))
    return out
