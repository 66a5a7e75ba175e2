"""The suite runs the linters and the type checker, and keeps services from importing each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES = REPO / "services"
SHARED = {"bus"}  # the one library services share


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    lint = run(sys.executable, "-m", "ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def imported_services(path: Path) -> set[str]:
    """Top-level service packages that a file imports (``services.X``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "services" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_services_share_only_the_bus_library() -> None:
    packages = [p for p in SERVICES.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert {p.name for p in packages} >= {"bus", "cli"}
    violations = []
    everything = {p.name for p in packages}
    for package in packages:
        allowed = {package.name} | SHARED
        if package.name == "bus":
            allowed = {"bus"}  # the library depends on no service
        if package.name == "cli":
            allowed = everything  # the operator tool drives services (simulators, evaluations)
        for path in package.rglob("*.py"):
            for other in imported_services(path) - allowed:
                violations.append(f"{path.relative_to(REPO)} imports services.{other}")
    assert not violations, "\n".join(violations)


def test_the_independence_check_sees_a_violation(tmp_path: Path) -> None:
    offender = tmp_path / "handlers.py"
    offender.write_text("from services.playback.handlers import start\nimport services.bus.producer\n")
    assert imported_services(offender) == {"playback", "bus"}
