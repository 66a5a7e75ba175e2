"""The live service's per-session logic (pure): the simulator's player, reported chunk by chunk, gets
the simulator's decisions; duplicates and late samples change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.abr.algorithms import make_algorithm
from services.abr.session import HEARTBEAT, PLAYER, Ignored, Observation, Track, Video, decide, observe
from services.abr.simulator import (
    PENSIEVE_LADDER_KBPS,
    SYNTHETIC_TRACES,
    ChunkRecord,
    PlayerConfig,
    Trace,
    load_trace,
    load_traces,
    simulate,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "abr-traces" / "train"
HISTORY = 16  # shorter than the 48-chunk video: the bounded history must decide as the full one


def traces() -> list[Trace]:
    found = load_traces(SYNTHETIC_TRACES)
    if SHARED.is_dir():
        found += [load_trace(p) for p in sorted(SHARED.iterdir())[:6] if p.is_file()]
    return found


def observation(record: ChunkRecord, sequence: int) -> Observation:
    return Observation(
        event_id=f"e{sequence}",
        source=PLAYER,
        order=sequence,
        bitrate_kbps=record.bitrate_kbps,
        throughput_kbps=record.throughput_kbps,
        download_s=record.download_s,
        buffer_s=record.buffer_s,
        chunk_index=record.index,
        position_ms=None,
    )


VIDEO = Video(PENSIEVE_LADDER_KBPS, 4.0, 48)


@pytest.mark.parametrize("name", ["bba", "bola", "robustmpc"])
def test_reported_chunks_get_the_simulators_decisions(name: str) -> None:
    algorithm = make_algorithm(name)
    for trace in traces():
        result = simulate(trace, algorithm, PlayerConfig())
        track = Track()
        live: list[int] = []
        for k, record in enumerate(result.records[:-1]):
            track = observe(track, observation(record, k + 1), VIDEO, HISTORY)
            decision = decide(track, VIDEO, algorithm)
            assert decision is not None
            assert decision.chunk == k + 1
            live.append(decision.rung)
        assert live == list(result.rungs[1:]), trace.name
        track = observe(track, observation(result.records[-1], 48), VIDEO, HISTORY)
        assert decide(track, VIDEO, algorithm) is None  # past the last chunk: nothing to decide


def test_video_of_a_title_and_its_sizes_are_the_simulators() -> None:
    video = Video.of(PENSIEVE_LADDER_KBPS, 4.0, 192_000)
    assert video.chunks == 48
    assert video.sizes() == PlayerConfig().chunk_sizes()
    assert Video.of(PENSIEVE_LADDER_KBPS, 4.0, 192_001).chunks == 49
    assert [VIDEO.rung_of(b) for b in (300, 301, 4300, 9999, 100)] == [0, 0, 5, 5, 0]


def test_duplicates_and_late_samples_change_nothing() -> None:
    result = simulate(load_traces(SYNTHETIC_TRACES)[0], make_algorithm("bba"))
    first = observe(Track(), observation(result.records[0], 1), VIDEO, HISTORY)
    second = observe(first, observation(result.records[1], 2), VIDEO, HISTORY)
    with pytest.raises(Ignored) as dup:
        observe(second, observation(result.records[1], 2), VIDEO, HISTORY)
    assert dup.value.reason == "duplicate"
    with pytest.raises(Ignored) as late:
        observe(second, observation(result.records[0], 1), VIDEO, HISTORY)
    assert late.value.reason == "out_of_order"
    heartbeat = Observation("h1", HEARTBEAT, 1, 300, 500.0, 4.0, 2.0, None, 0)
    with pytest.raises(Ignored) as superseded:
        observe(second, heartbeat, VIDEO, HISTORY)
    assert superseded.value.reason == "superseded"


def test_heartbeats_alone_steer_a_player_that_reports_no_chunks() -> None:
    heartbeat = Observation("h1", HEARTBEAT, 1, 4300, 0.0, 10.0, 1.0, None, 40_000)
    track = observe(Track(), heartbeat, VIDEO, HISTORY)
    assert track.throughputs_kbps == ()  # no throughput measured: not a sample of the link
    assert track.next_chunk == 10  # (40 s + 1 s of buffer) // 4 s
    decision = decide(track, VIDEO, make_algorithm("bba"))
    assert decision is not None and decision.rung == 0  # 1 s of buffer: below BBA's reservoir
    assert Track.from_json(track.to_json()) == track
