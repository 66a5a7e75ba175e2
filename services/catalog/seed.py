"""The sample catalog written into an empty database at start.

Deterministic: ``generate_titles(count, seed)`` draws everything from one ``random.Random(seed)``
(Mersenne Twister; ``randint``, ``choice``, ``sample``, ``random`` give the same sequence on every
CPython 3.x for the same seed) in a fixed order, and reads no clock, environment or database. The same
``(count, seed)`` therefore gives the same titles, byte for byte, on every machine and every start;
the default seed is ``CATALOG_SEED_RNG_SEED``. Ids are sequential (``tt0000001``, ``tt0000002``, ...),
so the first ``n`` titles of a bigger catalog are the ``n`` titles of a smaller one with the same seed
only in their ids, not in their content.

What is drawn, per title:
- kind: a film (70 %) running 80-180 min, or an episode of a series (30 %) running 20-60 min;
- a name from word lists ("The Silent Harbor", "Letters from Lisbon", "Night Shift: S2E5 Undertow");
- 1-3 distinct genres from the fixed list; maturity ratings that fit the kind and genres (films get
  MPAA ratings, episodes TV ratings; kids and animation titles stay family-friendly, horror does not);
- a release year skewed to recent years (1950-2026);
- a bitrate ladder: a subset of the encodes in ``LADDER_RUNGS_KBPS`` starting at 235 kbit/s and ending
  at a top rung that depends on the title: animation encodes cheaply (tops 1750-3000, or 8000 in 4K),
  older live action tops at 1750-3000, HD at 4300-5800, and 4K titles reach 16000. One or two middle
  rungs may be skipped, as per-title encoding does; the ladder stays strictly ascending.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.catalog.titles import GENRES, LADDER_RUNGS_KBPS

DEFAULT_SEED = 20261126
FIRST_YEAR, LAST_YEAR = 1950, 2026

ADJECTIVES = (
    "Silent", "Broken", "Hidden", "Last", "Crimson", "Golden", "Midnight", "Frozen", "Wild", "Hollow",
    "Electric", "Lost", "Burning", "Quiet", "Endless", "Savage", "Distant", "Restless", "Iron", "Paper",
    "Velvet", "Northern", "Bitter", "Secret", "Little", "Dark", "Bright", "Forgotten", "Lucky", "Stolen",
)  # fmt: skip
NOUNS = (
    "Harbor", "Kingdom", "Signal", "Orchard", "Witness", "Frontier", "Lighthouse", "Garden", "Empire",
    "River", "Mirror", "Station", "Crossing", "Island", "Machine", "Promise", "Storm", "Summer", "Heist",
    "Detective", "Circus", "Voyage", "Forest", "Engine", "Letter", "Comet", "Tide", "Bridge", "Secret",
    "Dynasty", "Kitchen", "Orbit", "Shadow", "Dragon", "Canyon", "Symphony", "Alibi", "Outpost",
)  # fmt: skip
PLACES = (
    "Lisbon", "the North", "Marrakesh", "Nowhere", "the Valley", "Saturn", "Kyoto", "the Deep",
    "Brooklyn", "the Fjords", "Atlantis", "Havana", "the Outback", "Glasgow", "Tomorrow", "the Dunes",
)  # fmt: skip
PEOPLE = (
    "Mara", "Theo", "Ines", "Kofi", "Yuki", "Rosa", "Elias", "Noor", "Dmitri", "June", "Amara", "Felix",
    "Lena", "Tomas", "Priya", "Oskar",
)  # fmt: skip
SHOWS = (
    "Night Shift", "Dead Reckoning", "The Bureau", "Salt & Stone", "Parallel Lines", "Second Chances",
    "Outer Rim", "Family Recipe", "Cold Case Unit", "Tiny Explorers", "The Long Con", "Home Front",
    "Starlight Academy", "Borderlands", "Motor City", "Open Water",
)  # fmt: skip
EPISODE_WORDS = (
    "Pilot", "Undertow", "Crossfire", "Homecoming", "The Reckoning", "Blackout", "Aftermath",
    "Fault Lines", "Ghosts", "Exit Strategy", "Loose Ends", "First Light", "Checkmate", "Landfall",
)  # fmt: skip
NAME_PATTERNS = (
    "The {adj} {noun}",
    "{noun} of {place}",
    "{person}'s {noun}",
    "{adj} {noun}s",
    "Letters from {place}",
    "The {noun} and the {noun2}",
    "{person} in {place}",
    "A {adj} {noun}",
)

FILM_RATINGS = ("PG", "PG-13", "PG-13", "R", "R", "NC-17")
TV_RATINGS = ("TV-PG", "TV-14", "TV-14", "TV-MA", "TV-MA")
FAMILY_FILM_RATINGS = ("G", "G", "PG")
FAMILY_TV_RATINGS = ("TV-Y", "TV-Y7", "TV-G", "TV-PG")
ADULT_FILM_RATINGS = ("R", "NC-17")
ADULT_TV_RATINGS = ("TV-14", "TV-MA", "TV-MA")
FAMILY_GENRES = frozenset({"kids", "animation"})
# Kids titles do not mix with these.
NOT_FOR_KIDS = frozenset({"horror", "crime", "thriller"})


@dataclass(frozen=True, slots=True)
class SeedTitle:
    title_id: str
    name: str
    genres: tuple[str, ...]
    runtime_ms: int
    release_year: int
    maturity_rating: str
    ladder_kbps: tuple[int, ...]
    kind: str  # "film" or "episode"


def seed_title_id(index: int) -> str:
    """``tt0000001`` for index 0."""
    return f"tt{index + 1:07d}"


def _name(rng: random.Random, kind: str) -> str:
    if kind == "episode":
        show = rng.choice(SHOWS)
        return f"{show}: S{rng.randint(1, 6)}E{rng.randint(1, 12)} {rng.choice(EPISODE_WORDS)}"
    pattern = rng.choice(NAME_PATTERNS)
    noun, noun2 = rng.sample(NOUNS, 2)
    return pattern.format(
        adj=rng.choice(ADJECTIVES),
        noun=noun,
        noun2=noun2,
        place=rng.choice(PLACES),
        person=rng.choice(PEOPLE),
    )


def _genres(rng: random.Random) -> tuple[str, ...]:
    count = rng.choice((1, 1, 2, 2, 2, 3))
    picked = rng.sample(GENRES, count)
    if "kids" in picked:
        picked = [g for g in picked if g not in NOT_FOR_KIDS] or ["kids"]
    return tuple(picked)


def _rating(rng: random.Random, kind: str, genres: tuple[str, ...]) -> str:
    film = kind == "film"
    if FAMILY_GENRES & set(genres) and "horror" not in genres:
        return rng.choice(FAMILY_FILM_RATINGS if film else FAMILY_TV_RATINGS)
    if "horror" in genres:
        return rng.choice(ADULT_FILM_RATINGS if film else ADULT_TV_RATINGS)
    return rng.choice(FILM_RATINGS if film else TV_RATINGS)


def _release_year(rng: random.Random) -> int:
    return max(FIRST_YEAR, LAST_YEAR - int(rng.expovariate(1 / 12)))


def _ladder(rng: random.Random, genres: tuple[str, ...], year: int) -> tuple[int, ...]:
    uhd = year >= 2014 and rng.random() < 0.2
    if "animation" in genres:
        top = 8000 if uhd else rng.choice((1750, 2350, 3000))
    elif uhd:
        top = 16000
    elif year < 1995:
        top = rng.choice((1750, 2350, 3000))
    else:
        top = rng.choice((4300, 5800))
    rungs = [r for r in LADDER_RUNGS_KBPS if r <= top]
    middle = rungs[1:-1]
    skipped = set(rng.sample(middle, rng.randint(0, min(2, max(0, len(middle) - 3)))))
    return tuple(r for r in rungs if r not in skipped)


def generate_titles(count: int, seed: int = DEFAULT_SEED) -> list[SeedTitle]:
    """``count`` plausible titles, the same ones for the same ``(count, seed)``; names do not repeat."""
    rng = random.Random(seed)
    titles: list[SeedTitle] = []
    names: set[str] = set()
    for index in range(count):
        kind = "film" if rng.random() < 0.7 else "episode"
        name = _name(rng, kind)
        while name in names:
            name = _name(rng, kind)
        names.add(name)
        genres = _genres(rng)
        minutes = rng.randint(80, 180) if kind == "film" else rng.randint(20, 60)
        runtime_ms = (minutes * 60 + rng.randint(0, 59)) * 1000
        year = _release_year(rng)
        titles.append(
            SeedTitle(
                title_id=seed_title_id(index),
                name=name,
                genres=genres,
                runtime_ms=runtime_ms,
                release_year=year,
                maturity_rating=_rating(rng, kind, genres),
                ladder_kbps=_ladder(rng, genres, year),
                kind=kind,
            )
        )
    return titles
