"""``infra.up`` stops, by pid, what it started when another component then fails to start."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

import pytest

from services.cli import infra


def test_a_failed_up_stops_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = dataclasses.replace(infra.Layout.from_env(), home=tmp_path)
    spawned: list[infra.PidRecord] = []

    def running(layout: infra.Layout) -> bool:
        record = infra.read_pid(layout, "first")
        return record is not None and record.alive()

    def start_first(layout: infra.Layout) -> object:
        proc = infra.spawn(layout, "first", ["sleep", "300"])
        record = infra.read_pid(layout, "first")
        assert record is not None
        spawned.append(record)
        return proc

    def start_second(layout: infra.Layout) -> object:
        raise infra.InfraError("second: cannot start (on purpose)")

    def component(name: str, start: object, healthy: object, after: tuple[str, ...] = ()) -> infra.Component:
        return infra.Component(
            name=name,
            address=lambda _: name,
            healthy=healthy,  # type: ignore[arg-type]
            install=lambda _l, _p: None,
            start=start,  # type: ignore[arg-type]
            after=after,
        )

    fakes = [
        component("first", start_first, running),
        component("second", start_second, lambda _: False, ("first",)),
    ]
    monkeypatch.setattr(infra, "all_components", lambda: fakes)
    monkeypatch.setattr(infra, "generate_key_pair", lambda _: None)

    try:
        with pytest.raises(infra.InfraError, match="on purpose"):
            asyncio.run(infra.up(layout, ["first", "second"]))
        (record,) = spawned
        assert not record.alive(), "the component started before the failure was left running"
        assert infra.read_pid(layout, "first") is None
    finally:  # this test's own process, whatever happened: by its pid
        infra.stop_pid(layout, "first", signal.SIGKILL, timeout=5)
