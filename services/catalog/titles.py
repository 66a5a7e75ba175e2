"""What a title is: the record, its vocabularies (genres, maturity ratings, bitrate rungs) and the
request bodies that create or change one, validated so that a bad field is named in the 4xx."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.bus.events import TitleSnapshot

TITLE_ID = re.compile(r"^tt[0-9]{7}$")

Genre = Literal[
    "drama",
    "comedy",
    "thriller",
    "documentary",
    "animation",
    "sci-fi",
    "horror",
    "romance",
    "crime",
    "kids",
    "action",
    "fantasy",
]
GENRES: tuple[str, ...] = get_args(Genre)

MaturityRating = Literal[
    "G", "PG", "PG-13", "R", "NC-17", "TV-Y", "TV-Y7", "TV-G", "TV-PG", "TV-14", "TV-MA"
]  # fmt: skip
MATURITY_RATINGS: tuple[str, ...] = get_args(MaturityRating)

# Bitrates (kbit/s) of the encodes a ladder is drawn from, 240p up to 4K HDR.
LADDER_RUNGS_KBPS: tuple[int, ...] = (235, 375, 560, 750, 1050, 1750, 2350, 3000, 4300, 5800, 8000, 16000)
MIN_RUNG_KBPS = 64
MAX_RUNG_KBPS = 100_000
MAX_RUNGS = 16

# The fields a change may touch, in the order events list them.
MUTABLE_FIELDS: tuple[str, ...] = (
    "name",
    "genres",
    "runtime_ms",
    "release_year",
    "maturity_rating",
    "ladder_kbps",
)


def valid_title_id(title_id: str) -> bool:
    return bool(TITLE_ID.match(title_id))


@dataclass(frozen=True, slots=True)
class Title:
    title_id: str
    name: str
    genres: tuple[str, ...]
    runtime_ms: int
    release_year: int
    maturity_rating: str
    ladder_kbps: tuple[int, ...]
    version: int
    updated_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "title_id": self.title_id,
            "name": self.name,
            "genres": list(self.genres),
            "runtime_ms": self.runtime_ms,
            "release_year": self.release_year,
            "maturity_rating": self.maturity_rating,
            "ladder_kbps": list(self.ladder_kbps),
            "version": self.version,
            "updated_at": self.updated_at.isoformat().replace("+00:00", "Z"),
        }

    def snapshot(self) -> TitleSnapshot:
        return TitleSnapshot(
            name=self.name,
            genres=list(self.genres),
            runtime_ms=self.runtime_ms,
            release_year=self.release_year,
            maturity_rating=self.maturity_rating,
            ladder_kbps=list(self.ladder_kbps),
        )


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("must not be null")
    return value


def _distinct_genres(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("genres must not repeat")
    return value


def _ascending_ladder(value: list[int]) -> list[int]:
    for low, high in itertools.pairwise(value):
        if high <= low:
            raise ValueError(f"bitrates must be strictly ascending ({low} then {high})")
    for rung in value:
        if not MIN_RUNG_KBPS <= rung <= MAX_RUNG_KBPS:
            raise ValueError(f"each bitrate must be between {MIN_RUNG_KBPS} and {MAX_RUNG_KBPS} kbit/s")
    return value


_BODY = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True, frozen=True)
MIN_RUNTIME_MS = 60_000  # one minute
MAX_RUNTIME_MS = 6 * 3_600_000  # six hours
MIN_YEAR, MAX_YEAR = 1888, 2100


class TitlePatch(BaseModel):
    """``PUT /v1/catalog/titles/{id}``: the fields to change; absent fields stay as they are."""

    model_config = _BODY

    name: str | None = Field(None, min_length=1, max_length=200)
    genres: list[Genre] | None = Field(None, min_length=1, max_length=3)
    runtime_ms: int | None = Field(None, ge=MIN_RUNTIME_MS, le=MAX_RUNTIME_MS)
    release_year: int | None = Field(None, ge=MIN_YEAR, le=MAX_YEAR)
    maturity_rating: MaturityRating | None = None
    ladder_kbps: list[int] | None = Field(None, min_length=1, max_length=MAX_RUNGS)

    _not_null = field_validator("*", mode="before")(_not_null)
    _genres = field_validator("genres")(_distinct_genres)
    _ladder = field_validator("ladder_kbps")(_ascending_ladder)

    def changes(self) -> dict[str, Any]:
        """The fields the body sets, as Title attribute values."""
        out: dict[str, Any] = {}
        for name in MUTABLE_FIELDS:
            if name in self.model_fields_set:
                value = getattr(self, name)
                out[name] = tuple(value) if isinstance(value, list) else value
        return out


class TitleCreate(BaseModel):
    """``POST /v1/catalog/titles``: a whole title; the id is generated when absent."""

    model_config = _BODY

    title_id: str | None = Field(None, pattern=TITLE_ID.pattern)
    name: str = Field(min_length=1, max_length=200)
    genres: list[Genre] = Field(min_length=1, max_length=3)
    runtime_ms: int = Field(ge=MIN_RUNTIME_MS, le=MAX_RUNTIME_MS)
    release_year: int = Field(ge=MIN_YEAR, le=MAX_YEAR)
    maturity_rating: MaturityRating
    ladder_kbps: list[int] = Field(min_length=1, max_length=MAX_RUNGS)

    _genres = field_validator("genres")(_distinct_genres)
    _ladder = field_validator("ladder_kbps")(_ascending_ladder)


def apply_changes(title: Title, changes: dict[str, Any], now: dt.datetime) -> tuple[Title, list[str]]:
    """The title after ``changes`` and the names of the fields that really changed; the version moves
    by one only when something changed."""
    changed = [name for name in MUTABLE_FIELDS if name in changes and changes[name] != getattr(title, name)]
    if not changed:
        return title, []
    updated = replace(
        title, **{name: changes[name] for name in changed}, version=title.version + 1, updated_at=now
    )
    return updated, changed
