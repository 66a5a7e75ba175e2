"""The sample catalog generator (pure logic): deterministic, plausible, within the vocabularies."""

from __future__ import annotations

from collections import Counter

from services.catalog.seed import DEFAULT_SEED, generate_titles
from services.catalog.titles import GENRES, LADDER_RUNGS_KBPS, MATURITY_RATINGS, TITLE_ID

FAMILY_RATINGS = {"G", "PG", "TV-Y", "TV-Y7", "TV-G", "TV-PG"}


def test_the_same_seed_gives_the_same_catalog_and_another_seed_another() -> None:
    assert generate_titles(300) == generate_titles(300, DEFAULT_SEED)
    assert generate_titles(300, 7) != generate_titles(300, DEFAULT_SEED)
    assert [t.title_id for t in generate_titles(3)] == ["tt0000001", "tt0000002", "tt0000003"]


def test_three_hundred_plausible_titles() -> None:
    titles = generate_titles(300)
    assert len(titles) == 300
    assert len({t.title_id for t in titles}) == 300 and all(TITLE_ID.match(t.title_id) for t in titles)
    assert len({t.name for t in titles}) == 300, "names do not repeat"
    kinds = Counter(t.kind for t in titles)
    assert kinds["film"] > 150 and kinds["episode"] > 50
    for t in titles:
        assert 1 <= len(t.genres) <= 3 and len(set(t.genres)) == len(t.genres)
        assert set(t.genres) <= set(GENRES)
        minutes = t.runtime_ms / 60_000
        assert (80 <= minutes < 181) if t.kind == "film" else (20 <= minutes < 61), t
        assert 1950 <= t.release_year <= 2026
        assert t.maturity_rating in MATURITY_RATINGS
        if t.kind == "episode":
            assert t.maturity_rating.startswith("TV-")
        if "kids" in t.genres:
            assert t.maturity_rating in FAMILY_RATINGS, t
            assert not {"horror", "crime", "thriller"} & set(t.genres)
    assert set(Counter(g for t in titles for g in t.genres)) == set(GENRES), "every genre is used"


def test_ladders_are_ascending_subsets_of_real_encodes_with_lower_tops_for_animation() -> None:
    titles = generate_titles(300)
    for t in titles:
        assert list(t.ladder_kbps) == sorted(set(t.ladder_kbps)), "strictly ascending"
        assert set(t.ladder_kbps) <= set(LADDER_RUNGS_KBPS)
        assert t.ladder_kbps[0] == 235
        if "animation" in t.genres:
            assert t.ladder_kbps[-1] <= 8000
    tops = Counter(t.ladder_kbps[-1] for t in titles)
    assert tops[16000] > 0, "some titles are 4K"
    assert all(t.release_year >= 2014 for t in titles if t.ladder_kbps[-1] == 16000)
    animation_tops = [t.ladder_kbps[-1] for t in titles if "animation" in t.genres]
    others = [t.ladder_kbps[-1] for t in titles if "animation" not in t.genres]
    assert sum(animation_tops) / len(animation_tops) < sum(others) / len(others)
