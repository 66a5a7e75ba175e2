"""The contract itself: every schema and topic is well formed, and no schema breaks its history."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.bus import compat
from services.bus.contracts import SCHEMA_DIR, Contracts, load_schemas

REPO = Path(__file__).resolve().parents[2]


def test_the_topics_file_and_the_schemas_agree() -> None:
    contracts = Contracts.load()
    assert contracts.topics, "no topics declared"
    used = {v for t in contracts.topics.values() for v in t.values}
    defined = {n for n, s in contracts.schemas.items() if s.path is not None}
    assert defined - used == set(), f"schemas no topic carries: {sorted(defined - used)}"


@pytest.mark.parametrize("path", sorted(SCHEMA_DIR.rglob("*.avsc")), ids=lambda p: p.stem)
def test_every_schema_follows_the_conventions(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert raw["namespace"] == f"reelbus.{path.parent.name}"
    assert raw["name"] == path.stem
    assert raw.get("doc"), "record has no doc"
    names = [f["name"] for f in raw["fields"]]
    assert names[:2] == ["event_id", "event_time"], "every event starts with event_id and event_time"
    assert raw["fields"][0]["type"] == {"type": "string", "logicalType": "uuid"}
    assert raw["fields"][1]["type"] == {"type": "long", "logicalType": "timestamp-millis"}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "enum":
                assert node.get("default") == "UNKNOWN" == node["symbols"][0], f"{where}: enum needs UNKNOWN"
            if node.get("type") == "record":
                for f in node["fields"]:
                    assert f.get("doc"), f"{where}.{f['name']}: field has no doc"
                    walk(f["type"], f"{where}.{f['name']}")
            for key in ("items", "values"):
                if key in node:
                    walk(node[key], where)
        elif isinstance(node, list):
            for branch in node:
                walk(branch, where)

    walk(raw, raw["name"])


def _git(*args: str) -> str:
    """Output of a git command, or "" where it fails (a repository without commits yet)."""
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return result.stdout if result.returncode == 0 else ""


def _history(path: Path) -> list[Any]:
    """Every committed version of a schema file (oldest first), and main's, without duplicates."""
    rel = str(path.relative_to(REPO))
    versions: list[Any] = []
    commits = _git("log", "--format=%H", "--follow", "--", rel).split()
    refs = list(reversed(commits))
    if (
        subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "main"], cwd=REPO, capture_output=True, check=False
        ).returncode
        == 0
    ):
        refs.append("main")
    for ref in refs:
        shown = subprocess.run(
            ["git", "show", f"{ref}:{rel}"], cwd=REPO, capture_output=True, text=True, check=False
        )
        if shown.returncode == 0:
            raw = json.loads(shown.stdout)
            if raw not in versions:
                versions.append(raw)
    return versions


def test_no_schema_breaks_compatibility_with_its_committed_versions() -> None:
    """The gate: the working tree's schemas against every version on main's history."""
    if subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True, check=False).returncode != 0:
        pytest.skip("not a git checkout")
    contracts = Contracts.load()
    level = {v: t.compatibility for t in contracts.topics.values() for v in t.values}
    problems: list[str] = []
    for name, schema in load_schemas().items():
        if schema.path is None:
            continue
        previous = [v for v in _history(schema.path) if v != schema.raw]
        for problem in compat.check(schema.raw, previous, level.get(name, "BACKWARD_TRANSITIVE")):
            problems.append(f"{schema.path.relative_to(REPO)}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_gate_catches_a_field_added_without_a_default() -> None:
    old = json.loads((SCHEMA_DIR / "history" / "ViewRecorded.avsc").read_text())
    new = json.loads(json.dumps(old))
    new["fields"].append({"name": "rating", "type": "int", "doc": "Stars."})
    problems = compat.check(new, [old], "BACKWARD_TRANSITIVE")
    assert problems and "rating" in str(problems[0])
