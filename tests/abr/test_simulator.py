"""Trace parsing, the looped link, the player's arithmetic, determinism."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.abr.algorithms import AbrState, make_algorithm
from services.abr.simulator import (
    SYNTHETIC_TRACES,
    Link,
    PlayerConfig,
    TraceError,
    load_trace,
    load_traces,
    parse_trace,
    simulate,
    summarize,
)


@dataclass(frozen=True)
class Fixed:
    """Always the same rung; records what it was shown."""

    rung: int
    seen: list[AbrState]

    @property
    def name(self) -> str:
        return f"fixed-{self.rung}"

    def choose(self, state: AbrState) -> int:
        self.seen.append(state)
        return self.rung


def constant(mbps: float, seconds: int = 100) -> str:
    return "".join(f"{t}\t{mbps}\n" for t in range(seconds + 1))


# parsing


def test_crlf_tabs_spaces_blank_lines_and_comments_parse_alike() -> None:
    lf = parse_trace("0.0\t1.5\n1.0\t2.0\n2.5\t0.25\n", "a")
    crlf = parse_trace("# measured\r\n0.0\t1.5\r\n\r\n1.0  2.0\r\n 2.5 \t 0.25 \r\n", "a")
    assert crlf == lf
    assert lf.times_s == (0.0, 1.0, 2.5)
    assert lf.mbps == (1.5, 2.0, 0.25)
    assert lf.period_s == 2.5
    assert lf.mean_mbps == pytest.approx((2.0 * 1.0 + 0.25 * 1.5) / 2.5)  # the first sample only sets t_0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 1\n", "at least two samples"),
        ("0 1\n0 2\n", "span no time"),
        ("0 1\n2 1\n1 1\n", "goes back"),
        ("0 1\n1 -1\n", "throughput >= 0"),
        ("0 1\n1 nan\n", "finite"),
        ("0 1\n1 fast\n", "not numbers"),
        ("0 1\n1\n", "expected '<seconds> <Mbit/s>'"),
        ("0 5\n1 0\n2 0\n", "never delivers"),
    ],
)
def test_bad_traces_are_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace(text, "bad")


def test_the_shared_format_reads(tmp_path: Path) -> None:
    path = tmp_path / "trace_1_http---example.com"
    path.write_bytes(b"0.0\t1.8051788211\r\n1.039\t1.5310259865\r\n2.15\t1.2666354635\r\n")
    trace = load_trace(path)
    assert trace.name == "trace_1_http---example.com"
    assert trace.times_s == (0.0, 1.039, 2.15)


def test_a_folder_reads_in_name_order_without_readme_licence_or_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "b").write_text(constant(1.0, 5))
    (tmp_path / "a").write_text(constant(2.0, 5))
    (tmp_path / "README.md").write_text("# not a trace\n")
    (tmp_path / "LICENCE").write_text("BSD\n")
    (tmp_path / ".hidden").write_text("junk\n")
    (tmp_path / "sub").mkdir()
    assert [t.name for t in load_traces(tmp_path)] == ["a", "b"]
    (tmp_path / "c").write_text("0 1\nnonsense\n")
    with pytest.raises(TraceError, match="c:2"):
        load_traces(tmp_path)


def test_an_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no trace files"):
        load_traces(tmp_path)
    with pytest.raises(TraceError, match="not a directory"):
        load_traces(tmp_path / "missing")


def test_the_synthetic_traces_ship_with_the_package() -> None:
    names = [t.name for t in load_traces(SYNTHETIC_TRACES)]
    assert names == ["constant-high-10mbps", "constant-low-0.5mbps", "drop-8-to-0.6mbps-at-60s"]


# the link


def test_transfer_at_the_trace_rate_then_loop() -> None:
    # [0, 1): 8 Mbit/s = 1 MB/s; [1, 2): nothing; then over again. The first sample's 9 is never used.
    link = Link(parse_trace("0 9\n1 8\n2 0\n"), payload_fraction=1.0)
    assert link.transfer(400_000) == pytest.approx(0.4)
    # 0.6 MB to the end of the first second, nothing in the second, 0.9 MB in the loop's first second
    assert link.transfer(1_500_000) == pytest.approx(0.6 + 1.0 + 0.9)
    link.wait(1.1)  # 0.1 s at 1 MB/s unused, then the dead second
    assert link.transfer(100_000) == pytest.approx(0.1)


def test_payload_fraction() -> None:
    link = Link(parse_trace(constant(8.0)), payload_fraction=0.95)
    assert link.transfer(950_000) == pytest.approx(1.0)


def test_a_looped_trace_plays_like_the_trace_written_out_again_and_again() -> None:
    rates = [3.0, 0.4, 2.5, 6.0, 0.2, 1.0, 4.0, 0.8, 3.5, 1.5]
    short = parse_trace("0 1\n" + "".join(f"{i + 1} {r}\n" for i, r in enumerate(rates)), "short")
    long_text = "0 1\n" + "".join(f"{k * 10 + i + 1} {r}\n" for k in range(60) for i, r in enumerate(rates))
    long = parse_trace(long_text, "long")
    for name in ("bba", "bola", "robustmpc"):
        looped = simulate(short, make_algorithm(name))
        unrolled = simulate(long, make_algorithm(name))
        assert looped.wall_clock_s > 3 * short.period_s  # the session did wrap around
        assert looped.rungs == unrolled.rungs
        assert looped.total_qoe == pytest.approx(unrolled.total_qoe)
        assert looped.rebuffer_s == pytest.approx(unrolled.rebuffer_s)


# the player


def test_the_first_chunk_by_hand() -> None:
    # 8 Mbit/s at 95 %: 950,000 B/s; the first chunk is 750 kbit/s x 4 s = 375,000 B at rung 1
    result = simulate(parse_trace(constant(8.0)), Fixed(5, []))
    first = result.records[0]
    assert (first.rung, first.size_bytes) == (1, 375_000)
    assert first.download_s == pytest.approx(0.08 + 375_000 / 950_000)
    assert result.startup_delay_s == pytest.approx(first.download_s)
    assert first.rebuffer_s == 0.0  # start-up is not rebuffering
    assert first.buffer_s == pytest.approx(4.0)
    assert first.throughput_kbps == pytest.approx(3000 / first.download_s)


def test_rebuffering_by_hand() -> None:
    # 1 Mbit/s at 95 %; the top rung's 2,150,000-B chunks take 0.08 + 18.105 s: each stalls that less 4 s
    seen: list[AbrState] = []
    cfg = PlayerConfig(first_index=None, chunks=5)
    result = simulate(parse_trace(constant(1.0, 200)), Fixed(5, seen), cfg)
    download = 0.08 + 2_150_000 / 118_750
    assert [r.download_s for r in result.records] == pytest.approx([download] * 5)
    assert result.startup_delay_s == pytest.approx(download)
    assert [r.rebuffer_s for r in result.records] == pytest.approx([0.0] + [download - 4.0] * 4)
    assert [r.buffer_s for r in result.records] == pytest.approx([4.0] * 5)
    assert result.rebuffer_ratio == pytest.approx(4 * (download - 4) / (4 * (download - 4) + 20))
    assert result.total_qoe == pytest.approx(5 * 4.3 - 4.3 * 4 * (download - 4))
    assert result.switches == 0
    # what the algorithm was shown
    assert seen[0].last_index is None and seen[0].throughputs_kbps == () and seen[0].buffer_s == 0.0
    assert seen[0].remaining_chunks == 5 and len(seen[0].next_chunk_sizes) == 5
    assert seen[2].last_index == 5
    assert seen[2].throughputs_kbps == pytest.approx([17_200 / download] * 2)
    assert seen[2].download_times_s == pytest.approx([download] * 2)
    assert seen[4].next_chunk_sizes == (
        (37_500 * 4, 93_750 * 4, 150_000 * 4, 231_250 * 4, 356_250 * 4, 537_500 * 4),
    )


def test_startup_can_be_counted_as_rebuffering() -> None:
    result = simulate(parse_trace(constant(1.0)), Fixed(0, []), PlayerConfig(startup_penalty=True))
    assert result.records[0].rebuffer_s == pytest.approx(result.startup_delay_s)


def test_the_buffer_never_exceeds_its_cap_the_player_sleeps() -> None:
    result = simulate(parse_trace(constant(50.0, 400)), Fixed(0, []))
    assert max(r.buffer_s for r in result.records) <= 60.0
    slept = [r for r in result.records if r.sleep_s > 0]
    assert slept, "a 50 Mbit/s link fills a 60-s buffer"
    assert all(r.sleep_s / 0.5 == pytest.approx(round(r.sleep_s / 0.5)) for r in slept)  # 500-ms steps
    assert all(59.5 <= r.buffer_s <= 60.0 for r in slept)


def test_switches_and_their_rate() -> None:
    result = simulate(parse_trace(constant(3.0)), make_algorithm("bba"), PlayerConfig(chunks=15))
    changes = sum(1 for a, b in zip(result.rungs, result.rungs[1:], strict=False) if a != b)
    assert result.switches == changes
    assert result.switches_per_minute == pytest.approx(changes / 1.0)  # 15 chunks x 4 s = 1 minute


def test_an_algorithm_answering_no_rung_is_an_error() -> None:
    with pytest.raises(ValueError, match="rung 6 of a 6-rung ladder"):
        simulate(parse_trace(constant(1.0)), Fixed(6, []))


def test_vbr_sizes_are_deterministic_and_bounded() -> None:
    cbr = PlayerConfig().chunk_sizes()
    assert cbr[0] == (150_000, 375_000, 600_000, 925_000, 1_425_000, 2_150_000)
    vbr = PlayerConfig(vbr=0.2, vbr_seed=3).chunk_sizes()
    assert vbr == PlayerConfig(vbr=0.2, vbr_seed=3).chunk_sizes()
    assert vbr != PlayerConfig(vbr=0.2, vbr_seed=4).chunk_sizes()
    for chunk in vbr:
        factor = chunk[0] / 150_000
        assert 0.8 <= factor <= 1.2
        assert [s / c for s, c in zip(chunk, cbr[0], strict=True)] == pytest.approx([factor] * 6, rel=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"ladder_kbps": (750, 300)},
        {"first_index": 6},
        {"chunks": 0},
        {"vbr": 1.0},
        {"buffer_capacity_s": 2.0},
    ],
)
def test_nonsense_configurations_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PlayerConfig(**bad)  # type: ignore[arg-type]


# determinism


@pytest.mark.parametrize("name", ["bba", "bola", "robustmpc"])
def test_two_runs_are_equal(name: str) -> None:
    cfg = PlayerConfig(vbr=0.15)
    for trace in load_traces(SYNTHETIC_TRACES):
        assert simulate(trace, make_algorithm(name), cfg) == simulate(trace, make_algorithm(name), cfg)


def test_summaries_are_means_over_sessions() -> None:
    traces = load_traces(SYNTHETIC_TRACES)
    results = [simulate(t, make_algorithm("bola")) for t in traces]
    summary = summarize("bola", results)
    assert summary.sessions == 3
    assert summary.qoe_per_session == pytest.approx(sum(r.total_qoe for r in results) / 3)
    assert summary.qoe_per_chunk == pytest.approx(summary.qoe_per_session / 48)
    assert summary.rebuffer_ratio == pytest.approx(sum(r.rebuffer_ratio for r in results) / 3)
    with pytest.raises(ValueError):
        summarize("bola", [])
