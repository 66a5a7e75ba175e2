"""Which data node bootstraps the cluster, decided from the Galera state on disk (no servers run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.cli import galera, infra

UUID = "c6aec621-e94d-11f1-9920-935caafc0d84"


@pytest.fixture
def layout(tmp_path: Path) -> infra.Layout:
    return dataclasses.replace(infra.Layout.from_env(), home=tmp_path)


def saved(layout: infra.Layout, name: str, seqno: int, safe: bool, uuid: str = UUID) -> None:
    folder = layout.data / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grastate.dat").write_text(
        "# GALERA saved state\nversion: 2.1\n"
        f"uuid:    {uuid}\nseqno:   {seqno}\nsafe_to_bootstrap: {int(safe)}\n"
    )


def chosen(layout: infra.Layout) -> list[str]:
    ports = galera.Ports.from_env()
    return [n for n in galera.DATA_NODES if galera._should_bootstrap(layout, n, ports)]


def test_a_new_cluster_is_bootstrapped_by_galera_1(layout: infra.Layout) -> None:
    assert chosen(layout) == ["galera-1"]


def test_the_node_that_left_last_bootstraps(layout: infra.Layout) -> None:
    saved(layout, "galera-1", 41, safe=False)
    saved(layout, "galera-2", 42, safe=True)
    assert chosen(layout) == ["galera-2"]


def test_without_a_safe_node_the_highest_seqno_bootstraps(layout: infra.Layout) -> None:
    saved(layout, "galera-1", 57, safe=False)
    saved(layout, "galera-2", 55, safe=False)
    assert chosen(layout) == ["galera-1"]
    saved(layout, "galera-1", 50, safe=False)
    assert chosen(layout) == ["galera-2"]


def test_a_tie_goes_to_galera_1(layout: infra.Layout) -> None:
    saved(layout, "galera-1", 9, safe=False)
    saved(layout, "galera-2", 9, safe=False)
    assert chosen(layout) == ["galera-1"]


def test_a_node_that_never_joined_does_not_bootstrap(layout: infra.Layout) -> None:
    saved(layout, "galera-1", 12, safe=False)
    saved(layout, "galera-2", -1, safe=False, uuid="00000000-0000-0000-0000-000000000000")
    assert chosen(layout) == ["galera-1"]


def test_grastate_is_read(layout: infra.Layout) -> None:
    saved(layout, "galera-2", -1, safe=False)
    assert galera.grastate(layout, "galera-2") == galera.GraState(UUID, -1, False)
    assert galera.grastate(layout, "galera-1") is None
