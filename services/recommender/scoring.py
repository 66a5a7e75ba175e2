"""The recommender's algorithm, pure: the same code runs in the stream processor and in the offline
batch (``reelbus eval recommender``), so the two give the same lists.

- **A profile's state** (:func:`apply_view`): its distinct titles, most recent first (at most
  ``history``), the titles it finished, and the event ids of its latest viewings (a redelivered viewing
  changes nothing). A title seen for the first time forms a **co-watch pair** with each of the
  profile's ``pair_window`` most recent titles before it: one :class:`CoWatched` record.
- **The model** (:class:`Model`), folded from all ``CoWatched`` records: item-to-item co-watch weights and
  "trending" counts. It does not depend on the order records are folded in (what makes the stream
  equal the batch, whatever the partitioning): records are deduplicated by event id; a pair's weight is
  ``2 ** floor((t - 2000-01-01) / half_life)`` with ``t`` the later of the two viewings' **event
  times** (a step decay: a co-watch one half-life newer counts twice as much), kept as an exact Python
  integer, so sums are exact in any order. "Trending" counts first viewings per hour bucket of event
  time, within ``trending_window`` of the latest event time folded (the watermark); a late record
  whose bucket fell out of the window is dropped, as it would be out of the window in any order.
- **The lists** (:func:`recommend`): candidates scored by the sum of their weights with the profile's
  ``anchors`` most recent titles ("because you watched X", X the anchor contributing most), best
  first (exact integer comparison, ties by title id), then trending titles; titles the profile finished
  and the anchors themselves are never recommended.
"""

from __future__ import annotations

import hashlib
import heapq
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from services.bus.events import (
    CoWatched,
    PriorView,
    ProfileHistory,
    ProfileRecommendations,
    RecommendedItem,
    TitleView,
    UnconfirmedCoWatch,
    UnconfirmedPrior,
)

T0_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: weights are 2 ** (half-lives since then)
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
COWATCH_IDS = uuid.UUID("0b7e4a52-3a1f-4d8e-9b61-6f0c2d9e7a31")  # namespace of CoWatched event ids
LIST_IDS = uuid.UUID("5d2c8f10-7e4b-4a9c-8d3e-1f6a0b9c2e47")  # namespace of ProfileRecommendations ids
BECAUSE = "because_you_watched:"
TRENDING = "trending"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Params:
    half_life_days: int = 30
    history: int = 50  # distinct titles kept per profile
    pair_window: int = 20  # a new title pairs with this many of the profile's latest titles
    anchors: int = 10  # the profile's latest titles that candidates are scored against
    because_items: int = 20
    trending_items: int = 10
    trending_window_hours: int = 7 * 24
    finished_kept: int = 1000
    seen_events_kept: int = 200
    unconfirmed_kept: int = 64  # co-watch records a row keeps until their viewings' offsets are committed

    @property
    def half_life_ms(self) -> int:
        return self.half_life_days * DAY_MS

    @property
    def version(self) -> str:
        window = f"t{self.trending_window_hours}h"
        return f"cowatch-v1:hl{self.half_life_days}d:w{self.pair_window}:a{self.anchors}:{window}"


def ms(when: datetime) -> int:
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def at_ms(millis: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=millis)


def weight(t_ms: int, params: Params) -> int:
    """The exact weight of a co-watch at event time ``t_ms`` (before 2000: as in 2000)."""
    return 1 << max(0, (t_ms - T0_MS) // params.half_life_ms)


@dataclass(frozen=True)
class View:
    """A viewing, as the algorithm needs it."""

    event_id: str
    profile_id: uuid.UUID
    title_id: str
    event_time_ms: int
    completed: bool
    region: str | None = None


def empty_history(profile_id: uuid.UUID) -> ProfileHistory:
    return ProfileHistory(
        event_id=uuid.UUID(int=0),
        event_time=_EPOCH,
        profile_id=profile_id,
        views=[],
        finished=[],
        seen_events=[],
    )


def _recency(view: TitleView) -> tuple[int, str]:
    return (-ms(view.last_at), view.title_id)


def apply_view(
    state: ProfileHistory | None, view: View, params: Params
) -> tuple[ProfileHistory | None, CoWatched | None]:
    """The profile's new state and the co-watch record of a first viewing; ``(None, None)`` when the
    viewing was already counted (a redelivery)."""
    state = state or empty_history(view.profile_id)
    if view.event_id in state.seen_events:
        return None, None
    t = view.event_time_ms
    when = at_ms(t)
    views = list(state.views)
    existing = next((v for v in views if v.title_id == view.title_id), None)
    cowatched: CoWatched | None = None
    if existing is None:
        others = [PriorView(title_id=v.title_id, watched_at=v.last_at) for v in views[: params.pair_window]]
        cowatched = CoWatched(
            event_id=uuid.uuid5(COWATCH_IDS, view.event_id),
            event_time=when,
            profile_id=view.profile_id,
            title_id=view.title_id,
            others=others,
            region=view.region,
        )
        views.append(TitleView(title_id=view.title_id, first_at=when, last_at=when))
    else:
        views.remove(existing)
        last = max(existing.last_at, when)
        views.append(TitleView(title_id=view.title_id, first_at=min(existing.first_at, when), last_at=last))
    views.sort(key=_recency)
    finished = list(state.finished)
    if view.completed and view.title_id not in finished:
        finished.append(view.title_id)
        del finished[: max(0, len(finished) - params.finished_kept)]
    seen = [*state.seen_events, view.event_id][-params.seen_events_kept :]
    new = ProfileHistory(
        event_id=uuid.UUID(view.event_id),
        event_time=max(state.event_time, when),
        profile_id=view.profile_id,
        views=views[: params.history],
        finished=finished,
        seen_events=seen,
        unconfirmed=state.unconfirmed,
    )
    return new, cowatched


# -- co-watch records not yet confirmed by a commit ------------------------------------------------
# The row of a profile and the co-watch record of its viewing leave the processor as two records (the
# changelog's and the output's); a crash can land the first without the second. The row therefore
# keeps the co-watch records of its viewings until their offsets are committed (faust flushes every
# output before it commits), and a redelivered viewing sends its record again: the model drops the
# copy by its event id.


def hold(state: ProfileHistory, offset: int, cowatched: CoWatched, params: Params) -> ProfileHistory:
    """``state`` keeping ``cowatched`` (of the viewing at ``offset``) until that offset is committed."""
    kept = UnconfirmedCoWatch(
        offset=offset,
        event_id=cowatched.event_id,
        event_time=cowatched.event_time,
        title_id=cowatched.title_id,
        others=[UnconfirmedPrior(title_id=o.title_id, watched_at=o.watched_at) for o in cowatched.others],
        region=cowatched.region,
    )
    return replace(state, unconfirmed=[*state.unconfirmed, kept][-params.unconfirmed_kept :])


def confirm(state: ProfileHistory, committed: int | None) -> ProfileHistory:
    """``state`` without the co-watch records of viewings before the committed offset ``committed``."""
    if committed is None or not state.unconfirmed:
        return state
    return replace(state, unconfirmed=[u for u in state.unconfirmed if u.offset >= committed])


def unconfirmed(state: ProfileHistory | None, view_event_id: str) -> CoWatched | None:
    """The co-watch record the counted viewing ``view_event_id`` produced, if not yet confirmed."""
    if state is None:
        return None
    wanted = uuid.uuid5(COWATCH_IDS, view_event_id)
    for kept in state.unconfirmed:
        if kept.event_id == wanted:
            return CoWatched(
                event_id=kept.event_id,
                event_time=kept.event_time,
                profile_id=state.profile_id,
                title_id=kept.title_id,
                others=[PriorView(title_id=o.title_id, watched_at=o.watched_at) for o in kept.others],
                region=kept.region,
            )
    return None


@dataclass
class Model:
    """Co-watch weights and trending counts folded from ``CoWatched`` records (module doc)."""

    params: Params
    pairs: dict[str, dict[str, int]] = field(default_factory=dict)
    buckets: dict[int, dict[str, int]] = field(default_factory=dict)  # hour bucket -> title -> count
    watermark_ms: int = 0
    seen: set[uuid.UUID] = field(default_factory=set)
    version: int = 0
    totals: dict[str, int] = field(default_factory=dict)  # title -> count over the buckets kept
    _ranked: tuple[int, list[tuple[str, int]]] = (-1, [])  # trending ranking, cached per version

    def apply(self, record: CoWatched) -> bool:
        """Fold one record; False for one already folded."""
        if record.event_id in self.seen:
            return False
        self.seen.add(record.event_id)
        t = ms(record.event_time)
        y = record.title_id
        pairs = self.pairs
        for other in record.others:
            x = other.title_id
            if x == y:
                continue
            w = weight(max(t, ms(other.watched_at)), self.params)
            row = pairs.setdefault(x, {})
            row[y] = row.get(y, 0) + w
            row = pairs.setdefault(y, {})
            row[x] = row.get(x, 0) + w
        if t > self.watermark_ms:
            self.watermark_ms = t
            self._prune()
        bucket = t // HOUR_MS
        if bucket >= self._oldest_bucket():
            counts = self.buckets.setdefault(bucket, {})
            counts[y] = counts.get(y, 0) + 1
            self.totals[y] = self.totals.get(y, 0) + 1
        self.version += 1
        return True

    def _oldest_bucket(self) -> int:
        """The oldest hour bucket that still overlaps the trending window."""
        window = self.params.trending_window_hours * HOUR_MS
        return (self.watermark_ms - window) // HOUR_MS + 1

    def _prune(self) -> None:
        oldest = self._oldest_bucket()
        for bucket in [b for b in self.buckets if b < oldest]:
            for title, n in self.buckets.pop(bucket).items():
                left = self.totals[title] - n
                if left:
                    self.totals[title] = left
                else:
                    del self.totals[title]

    def trending(self) -> list[tuple[str, int]]:
        """Titles by first viewings within the window, most first (ties by title id)."""
        version, ranked = self._ranked
        if version != self.version:
            ranked = sorted(self.totals.items(), key=lambda kv: (-kv[1], kv[0]))
            self._ranked = (self.version, ranked)
        return ranked


def recommend(state: ProfileHistory, model: Model) -> list[RecommendedItem]:
    """The profile's list, best first (module doc)."""
    params = model.params
    anchors = [v.title_id for v in state.views[: params.anchors]]
    excluded = set(state.finished) | set(anchors)
    scores: dict[str, int] = {}
    best: dict[str, int] = {}  # title -> its largest weight with one anchor
    because: dict[str, int] = {}  # title -> that anchor's rank (the most recent one on a tie)
    for rank, anchor in enumerate(anchors):
        row = model.pairs.get(anchor)
        if not row:
            continue
        for title, w in row.items():
            if title in excluded:
                continue
            found = scores.get(title)
            if found is None:
                scores[title] = best[title] = w
                because[title] = rank
            else:
                scores[title] = found + w
                if w > best[title]:
                    best[title] = w
                    because[title] = rank
    ranked = heapq.nsmallest(params.because_items, scores.items(), key=lambda kv: (-kv[1], kv[0]))
    unit = weight(max(ms(state.event_time), model.watermark_ms), params)
    items = [
        RecommendedItem(title_id=title, score=score / unit, reason=BECAUSE + anchors[because[title]])
        for title, score in ranked
    ]
    chosen = excluded | {title for title, _ in ranked}
    trending: list[tuple[str, int]] = []
    for title, n in model.trending():
        if len(trending) >= params.trending_items:
            break
        if title not in chosen:
            trending.append((title, n))
    items += [RecommendedItem(title_id=t, score=float(n), reason=TRENDING) for t, n in trending]
    return items


def digest(items: Iterable[RecommendedItem]) -> str:
    text = "\n".join(f"{i.title_id}\t{i.score!r}\t{i.reason}" for i in items)
    return hashlib.sha256(text.encode()).hexdigest()


def as_event(state: ProfileHistory, model: Model, items: list[RecommendedItem]) -> ProfileRecommendations:
    """The list as the event on ``recommendations.profiles``: its id and times depend only on the
    state and the list, so the same list is the same record (idempotent)."""
    when = at_ms(max(ms(state.event_time), model.watermark_ms))
    return ProfileRecommendations(
        event_id=uuid.uuid5(LIST_IDS, f"{state.profile_id}:{digest(items)}"),
        event_time=state.event_time,
        profile_id=state.profile_id,
        model_version=model.params.version,
        computed_at=when,
        items=items,
    )


def batch(views: Iterable[View], params: Params) -> tuple[dict[uuid.UUID, list[RecommendedItem]], Model]:
    """The whole log in one pass, in event-time order: every profile's list from the final state."""
    ordered = sorted(views, key=lambda v: (v.event_time_ms, v.event_id))
    states: dict[uuid.UUID, ProfileHistory] = {}
    model = Model(params)
    for view in ordered:
        new, cowatched = apply_view(states.get(view.profile_id), view, params)
        if new is None:
            continue
        states[view.profile_id] = new
        if cowatched is not None:
            model.apply(cowatched)
    return {p: recommend(s, model) for p, s in states.items()}, model


@dataclass(frozen=True)
class Row:
    name: str
    reason: str
    titles: list[str]


def rows(items: Iterable[RecommendedItem], names: Mapping[str, str]) -> list[Row]:
    """The list as the app's rows: one per reason, in the order of each reason's best title."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        grouped.setdefault(item.reason, []).append(item.title_id)
    out = []
    for reason, titles in grouped.items():
        if reason.startswith(BECAUSE):
            anchor = reason[len(BECAUSE) :]
            name = f"Because you watched {names.get(anchor, anchor)}"
        elif reason == TRENDING:
            name = "Trending now"
        else:
            name = reason
        out.append(Row(name, reason, titles))
    return out
