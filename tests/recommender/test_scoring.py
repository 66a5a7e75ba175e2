"""Unit tests of the recommender's pure algorithm and of the offline evaluation (no broker)."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from services.bus.events import CoWatched
from services.recommender import offline, scoring
from services.recommender.scoring import Model, Params, View

PARAMS = Params()
DAY = scoring.DAY_MS
T = scoring.T0_MS + 9000 * DAY


def views(log: list[offline.Rating]) -> list[View]:
    return [r.view() for r in log]


def test_a_co_watch_weighs_twice_as_much_one_half_life_later() -> None:
    assert scoring.weight(T + PARAMS.half_life_ms, PARAMS) == 2 * scoring.weight(T, PARAMS)
    assert scoring.weight(scoring.T0_MS - DAY, PARAMS) == 1, "before 2000: as in 2000"


def test_the_model_does_not_depend_on_the_order_records_are_folded_in() -> None:
    log = offline.synthetic(1500, users=60, clusters=4, per_cluster=6, seed=3)
    split = offline.leave_last_out(log)
    records = []
    states: dict[uuid.UUID, object] = {}
    for view in views(split.train):
        state, cowatched = scoring.apply_view(states.get(view.profile_id), view, PARAMS)  # type: ignore[arg-type]
        states[view.profile_id] = state
        if cowatched is not None:
            records.append(cowatched)
    ordered, shuffled = Model(PARAMS), Model(PARAMS)
    for record in records:
        ordered.apply(record)
    mixed = records + records[:100]  # with redeliveries
    random.Random(1).shuffle(mixed)
    for record in mixed:
        shuffled.apply(record)
    assert ordered.pairs == shuffled.pairs
    assert ordered.trending() == shuffled.trending()
    assert ordered.watermark_ms == shuffled.watermark_ms


def test_a_redelivered_viewing_changes_nothing_and_finished_titles_are_not_offered() -> None:
    p, q = uuid.uuid4(), uuid.uuid4()
    model = Model(PARAMS)
    state = None
    other = None
    for n, (who, title) in enumerate([(q, "a"), (q, "b"), (p, "a")]):
        view = View(str(uuid.uuid4()), who, title, T + n * 1000, completed=True)
        if who == q:
            other, cowatched = scoring.apply_view(other, view, PARAMS)
        else:
            state, cowatched = scoring.apply_view(state, view, PARAMS)
            again, nothing = scoring.apply_view(state, view, PARAMS)
            assert (again, nothing) == (None, None)
        if cowatched is not None:
            model.apply(cowatched)
    assert state is not None
    items = scoring.recommend(state, model)
    assert [(i.title_id, i.reason) for i in items] == [("b", "because_you_watched:a")]


def test_a_row_keeps_its_co_watch_records_until_their_offsets_are_committed() -> None:
    """A crash can land a row's changelog record without the co-watch record of the same viewing:
    the row keeps that record, so the redelivered viewing can send it again, until its offset commits."""
    p = uuid.uuid4()
    state = None
    sent: list[CoWatched] = []
    viewings = [View(str(uuid.uuid4()), p, t, T + n * 1000, completed=False) for n, t in enumerate("abc")]
    for offset, view in enumerate(viewings, start=10):
        new, cowatched = scoring.apply_view(state, view, PARAMS)
        assert new is not None and cowatched is not None
        state = scoring.hold(scoring.confirm(new, 11), offset, cowatched, PARAMS)
        sent.append(cowatched)
    assert state is not None
    assert [u.offset for u in state.unconfirmed] == [11, 12], "offset 10 is below the committed 11"
    assert scoring.unconfirmed(state, viewings[0].event_id) is None
    assert scoring.unconfirmed(state, viewings[1].event_id) == sent[1]
    assert scoring.unconfirmed(state, viewings[2].event_id) == sent[2]
    assert scoring.confirm(state, 13).unconfirmed == []
    assert scoring.confirm(state, None) == state
    bounded = Params(unconfirmed_kept=1)
    assert len(scoring.hold(state, 13, sent[2], bounded).unconfirmed) == 1


def test_trending_counts_first_viewings_within_the_window_by_event_time() -> None:
    model = Model(Params(trending_window_hours=24))
    for n, (title, hours) in enumerate([("old", 0), ("x", 30), ("y", 40), ("y", 41), ("late", 1)]):
        record = CoWatched(
            event_id=uuid.uuid4(),
            event_time=scoring.at_ms(T + hours * scoring.HOUR_MS),
            profile_id=uuid.UUID(int=n),
            title_id=title,
            others=[],
        )
        model.apply(record)
    assert model.trending() == [("y", 2), ("x", 1)], "'old' and the late one are out of the window"


def test_hit_rate_and_ndcg() -> None:
    p, q = uuid.uuid4(), uuid.uuid4()
    scores = offline.evaluate({p: ["a", "b"], q: ["c"]}, {p: "b", q: "z"}, k=10)
    assert scores.hit_rate == 0.5
    assert scores.ndcg == pytest.approx(0.5 * (1 / 1.5849625007211563))


def test_the_log_reader_takes_movielens_and_refuses_a_bad_header(tmp_path: Path) -> None:
    good = tmp_path / "ratings.csv"
    good.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n")
    ratings = offline.read_log(good)
    assert [(r.user, r.item, r.timestamp_ms) for r in ratings] == [
        ("1", "31", 1260759144000),
        ("1", "1029", 1260759179000),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("who,what\n1,2\n")
    with pytest.raises(offline.LogError, match="timestamp"):
        offline.read_log(bad)


def test_the_synthetic_log_has_structure_the_algorithm_finds() -> None:
    split = offline.leave_last_out(offline.synthetic(4000, seed=5))
    lists, _ = scoring.batch(views(split.train), PARAMS)
    titles = {p: [i.title_id for i in items] for p, items in lists.items()}
    cowatch = offline.evaluate(titles, split.test)
    popular = offline.evaluate(offline.popularity(split.train, split.test), split.test)
    assert cowatch.hit_rate > 2 * popular.hit_rate
