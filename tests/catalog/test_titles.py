"""Request bodies and changes to a title (pure logic)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydantic import ValidationError

from services.catalog.titles import Title, TitleCreate, TitlePatch, apply_changes

NOW = dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)
TITLE = Title("tt0000042", "Old Name", ("drama",), 6_000_000, 2001, "PG-13", (235, 750, 1750), 3, NOW)


def first_error_field(body: dict[str, Any], model: type[TitlePatch] | type[TitleCreate] = TitlePatch) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return str(info.value.errors()[0]["loc"][0])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"name": 42}, "name"),
        ({"genres": []}, "genres"),
        ({"genres": ["drama", "western"]}, "genres"),
        ({"genres": ["drama", "drama"]}, "genres"),
        ({"genres": ["drama", "comedy", "crime", "kids"]}, "genres"),
        ({"runtime_ms": "5400000"}, "runtime_ms"),
        ({"runtime_ms": -1}, "runtime_ms"),
        ({"runtime_ms": True}, "runtime_ms"),
        ({"maturity_rating": "X"}, "maturity_rating"),
        ({"ladder_kbps": [750, 235]}, "ladder_kbps"),
        ({"ladder_kbps": [235, 235]}, "ladder_kbps"),
        ({"ladder_kbps": [10]}, "ladder_kbps"),
        ({"ladder_kbps": []}, "ladder_kbps"),
        ({"release_year": 1700}, "release_year"),
        ({"version": 9}, "version"),
        ({"title_id": "tt0000001"}, "title_id"),
    ],
)
def test_a_bad_patch_names_its_field(body: dict[str, Any], field: str) -> None:
    assert first_error_field(body) == field


def test_a_patch_changes_only_what_differs_and_moves_the_version_once() -> None:
    patch = TitlePatch.model_validate({"name": "  New Name ", "genres": ["drama"], "ladder_kbps": [235, 560]})
    later = NOW + dt.timedelta(minutes=5)
    updated, changed = apply_changes(TITLE, patch.changes(), later)
    assert changed == ["name", "ladder_kbps"]
    assert updated.name == "New Name" and updated.ladder_kbps == (235, 560) and updated.genres == ("drama",)
    assert updated.version == 4 and updated.updated_at == later


def test_a_patch_that_changes_nothing_keeps_the_version() -> None:
    patch = TitlePatch.model_validate({"name": "Old Name"})
    same, changed = apply_changes(TITLE, patch.changes(), NOW + dt.timedelta(days=1))
    assert same is TITLE and changed == []


def test_a_create_needs_every_field_and_a_well_formed_id() -> None:
    body = {
        "name": "N",
        "genres": ["kids"],
        "runtime_ms": 1_500_000,
        "release_year": 2020,
        "maturity_rating": "TV-Y",
        "ladder_kbps": [235],
    }
    assert TitleCreate.model_validate(body).title_id is None
    assert first_error_field({**body, "title_id": "tt12"}, TitleCreate) == "title_id"
    assert first_error_field({k: v for k, v in body.items() if k != "genres"}, TitleCreate) == "genres"
