"""A trace-driven video player, after Pensieve's ``fixed_env.py`` (Mao et al. SIGCOMM 2017). Pure.

**Traces.** A trace is a text file of samples ``<seconds> <throughput in Mbit/s>``, one a line, the two
numbers separated by tabs or spaces (CRLF tolerated, blank lines and ``#`` comments skipped): the format
of the Pensieve/Comyco "cooked" FCC and HSDPA traces. As in ``fixed_env.py``, sample ``i`` gives the
throughput of the interval that ends at its time, ``[t_{i-1}, t_i)`` (the first sample only fixes the
origin), and a session that outlasts the trace starts it over from ``t_0`` (period ``t_last - t_0``).

**Video.** ``chunks`` chunks of ``chunk_duration_s`` (48 x 4 s) on the Pensieve ladder 300, 750, 1200,
1850, 2850, 4300 kbit/s. A chunk's size is its bitrate times its duration (CBR), or, with ``vbr = v > 0``,
that times ``1 + v*u_n``, ``u_n`` uniform in [-1, 1] drawn per chunk (the same factor on every rung, a
scene's complexity) from ``random.Random(vbr_seed)``: deterministic.

**Player.** For each chunk: the algorithm picks a rung (the first chunk is fetched at rung
``first_index``, Pensieve's ``DEFAULT_QUALITY = 1``, unless that is None); the request costs one round
trip (80 ms), during which the trace's clock runs and nothing is received, then the chunk arrives at 95 %
of the trace's throughput (Pensieve's ``PACKET_PAYLOAD_PORTION``). While it downloads the buffer drains;
what the download lasts beyond the buffer is rebuffering. The chunk then adds its duration to the
buffer; if that exceeds the cap (60 s) the player sleeps in 500-ms steps until it does not, the trace's
clock running on. The first chunk's download is the start-up delay: reported apart, not rebuffering,
unless ``startup_penalty`` (Pensieve counts it as rebuffering but leaves the first chunk out of its
results). Differences with ``fixed_env.py``: there the RTT is added to the download time without the
trace's clock moving, and the sizes are those of one real (VBR) video.

**Results.** Per chunk: rung, bitrate, size, download time, measured throughput, rebuffering, buffer
after the chunk (and after any sleep), sleep, QoE term. Per session: the linear QoE (``qoe.py``), mean
bitrate, rebuffering ratio = rebuffering / (rebuffering + video duration) -- start-up excluded --, and
bitrate switches per minute of video.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from statistics import fmean

from services.abr.algorithms import Algorithm, state_before_chunk
from services.abr.qoe import QoE, session_qoe

PENSIEVE_LADDER_KBPS: tuple[int, ...] = (300, 750, 1200, 1850, 2850, 4300)
SYNTHETIC_TRACES = Path(__file__).resolve().parent / "traces" / "synthetic"
_NOT_TRACES = ("readme", "licence", "license")


class TraceError(ValueError):
    """A trace file that cannot be read as ``<seconds> <Mbit/s>`` lines."""


@dataclass(frozen=True)
class Trace:
    """Throughput samples: ``mbps[i]`` holds over ``[times_s[i-1], times_s[i])``; looped."""

    name: str
    times_s: tuple[float, ...]
    mbps: tuple[float, ...]

    @property
    def period_s(self) -> float:
        return self.times_s[-1] - self.times_s[0]

    @property
    def mean_mbps(self) -> float:
        """Time-weighted mean throughput over one period."""
        t, b = self.times_s, self.mbps
        return sum(b[i] * (t[i] - t[i - 1]) for i in range(1, len(t))) / self.period_s


def parse_trace(text: str, name: str = "trace") -> Trace:
    """Parse ``<seconds> <Mbit/s>`` lines (tabs or spaces, LF or CRLF)."""
    times: list[float] = []
    rates: list[float] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise TraceError(f"{name}:{number}: expected '<seconds> <Mbit/s>', got {line.strip()!r}")
        try:
            t, r = float(fields[0]), float(fields[1])
        except ValueError:
            raise TraceError(f"{name}:{number}: not numbers: {line.strip()!r}") from None
        if not (math.isfinite(t) and math.isfinite(r)) or r < 0:
            raise TraceError(f"{name}:{number}: time and throughput must be finite, throughput >= 0")
        if times and t < times[-1]:
            raise TraceError(f"{name}:{number}: time {t} goes back from {times[-1]}")
        times.append(t)
        rates.append(r)
    if len(times) < 2:
        raise TraceError(f"{name}: a trace needs at least two samples")
    if times[-1] <= times[0]:
        raise TraceError(f"{name}: the samples span no time")
    if not any(rates[i] > 0 and times[i] > times[i - 1] for i in range(1, len(times))):
        raise TraceError(f"{name}: the trace never delivers anything")
    return Trace(name, tuple(times), tuple(rates))


def load_trace(path: Path) -> Trace:
    return parse_trace(path.read_text(encoding="utf-8"), path.name)


def load_traces(directory: Path) -> list[Trace]:
    """Every trace file of a folder, by name (hidden files, README and LICENCE files skipped)."""
    if not directory.is_dir():
        raise TraceError(f"{directory}: not a directory")
    paths = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.lower().startswith(_NOT_TRACES)
    )
    if not paths:
        raise TraceError(f"{directory}: no trace files")
    return [load_trace(p) for p in paths]


class Link:
    """A trace replayed in a loop: a clock that moves, and transfers at the trace's rate."""

    def __init__(self, trace: Trace, payload_fraction: float = 0.95) -> None:
        self._times = trace.times_s
        self._rates = tuple(mbps * 1e6 / 8 * payload_fraction for mbps in trace.mbps)  # bytes/s
        self._segment = 1  # the current interval is [times[segment-1], times[segment])
        self._now = trace.times_s[0]

    def _next_segment(self) -> None:
        self._now = self._times[self._segment]
        self._segment += 1
        if self._segment == len(self._times):
            self._segment = 1
            self._now = self._times[0]

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` of the trace go by without using it."""
        while seconds > 0:
            left_in_segment = self._times[self._segment] - self._now
            if left_in_segment > seconds:
                self._now += seconds
                return
            seconds -= left_in_segment
            self._next_segment()

    def transfer(self, size_bytes: float) -> float:
        """Receive ``size_bytes``; the seconds it took."""
        elapsed = 0.0
        left = float(size_bytes)
        while True:
            rate = self._rates[self._segment]
            span = self._times[self._segment] - self._now
            if rate > 0 and rate * span >= left:
                seconds = left / rate
                self._now += seconds
                return elapsed + seconds
            left -= rate * span
            elapsed += span
            self._next_segment()


@dataclass(frozen=True)
class PlayerConfig:
    """The simulated player and video (defaults: Pensieve's, see the module doc)."""

    ladder_kbps: tuple[int, ...] = PENSIEVE_LADDER_KBPS
    chunk_duration_s: float = 4.0
    chunks: int = 48
    rtt_s: float = 0.08
    buffer_capacity_s: float = 60.0
    drain_step_s: float = 0.5
    payload_fraction: float = 0.95
    first_index: int | None = 1
    startup_penalty: bool = False
    vbr: float = 0.0
    vbr_seed: int = 0

    def __post_init__(self) -> None:
        if not self.ladder_kbps or list(self.ladder_kbps) != sorted(set(self.ladder_kbps)):
            raise ValueError("the ladder must be strictly ascending")
        if self.ladder_kbps[0] <= 0 or self.chunk_duration_s <= 0 or self.chunks <= 0:
            raise ValueError("bitrates, chunk duration and chunk count must be positive")
        if self.first_index is not None and not 0 <= self.first_index < len(self.ladder_kbps):
            raise ValueError(f"first_index {self.first_index} is not a rung of the ladder")
        if not 0 <= self.vbr < 1:
            raise ValueError("vbr must be in [0, 1)")
        if self.buffer_capacity_s < self.chunk_duration_s or self.drain_step_s <= 0:
            raise ValueError("the buffer must hold a chunk and the drain step be positive")
        if not 0 < self.payload_fraction <= 1 or self.rtt_s < 0:
            raise ValueError("payload fraction in (0, 1], RTT >= 0")

    def chunk_sizes(self) -> tuple[tuple[int, ...], ...]:
        """``sizes[n][m]``: bytes of chunk ``n`` at rung ``m``."""
        rng = random.Random(self.vbr_seed)
        sizes = []
        for _ in range(self.chunks):
            factor = 1.0 + self.vbr * rng.uniform(-1.0, 1.0) if self.vbr else 1.0
            sizes.append(
                tuple(round(kbps * 1000 / 8 * self.chunk_duration_s * factor) for kbps in self.ladder_kbps)
            )
        return tuple(sizes)


@dataclass(frozen=True)
class ChunkRecord:
    index: int  # the chunk's position in the video
    rung: int
    bitrate_kbps: int
    size_bytes: int
    download_s: float  # round trip + transfer
    throughput_kbps: float  # size / download_s
    rebuffer_s: float  # 0 for the first chunk unless startup_penalty
    buffer_s: float  # after the chunk was added (and after any sleep)
    sleep_s: float
    qoe: float  # this chunk's QoE term


@dataclass(frozen=True)
class SessionResult:
    trace: str
    algorithm: str
    chunk_duration_s: float
    startup_delay_s: float
    records: tuple[ChunkRecord, ...]
    qoe: QoE
    wall_clock_s: float  # from the first request to the last chunk's arrival (and any sleep)

    @property
    def total_qoe(self) -> float:
        return self.qoe.total

    @property
    def qoe_per_chunk(self) -> float:
        return self.qoe.mean_per_chunk

    @property
    def mean_bitrate_kbps(self) -> float:
        return fmean(r.bitrate_kbps for r in self.records)

    @property
    def rebuffer_s(self) -> float:
        return sum(r.rebuffer_s for r in self.records)

    @property
    def video_s(self) -> float:
        return len(self.records) * self.chunk_duration_s

    @property
    def rebuffer_ratio(self) -> float:
        """Rebuffering over rebuffering plus video time (start-up excluded unless penalized)."""
        return self.rebuffer_s / (self.rebuffer_s + self.video_s)

    @property
    def switches(self) -> int:
        return sum(1 for a, b in pairwise(self.records) if a.rung != b.rung)

    @property
    def switches_per_minute(self) -> float:
        return self.switches / (self.video_s / 60.0)

    @property
    def rungs(self) -> tuple[int, ...]:
        return tuple(r.rung for r in self.records)


def simulate(trace: Trace, algorithm: Algorithm, config: PlayerConfig | None = None) -> SessionResult:
    """Play the video over ``trace`` with ``algorithm`` choosing the rungs."""
    cfg = config or PlayerConfig()
    ladder = cfg.ladder_kbps
    sizes = cfg.chunk_sizes()
    link = Link(trace, cfg.payload_fraction)
    buffer_s = 0.0
    last: int | None = None
    throughputs: list[float] = []
    download_times: list[float] = []
    rungs: list[int] = []
    stalls: list[float] = []
    partial: list[tuple[int, int, int, float, float, float, float, float]] = []
    startup = 0.0
    wall = 0.0
    for n in range(cfg.chunks):
        if n == 0 and cfg.first_index is not None:
            rung = cfg.first_index
        else:
            rung = algorithm.choose(
                state_before_chunk(
                    ladder, cfg.chunk_duration_s, sizes, n, buffer_s, last, throughputs, download_times,
                    cfg.buffer_capacity_s,
                )
            )  # fmt: skip
            if not 0 <= rung < len(ladder):
                raise ValueError(f"{algorithm.name} chose rung {rung} of a {len(ladder)}-rung ladder")
        size = sizes[n][rung]
        link.wait(cfg.rtt_s)
        download = cfg.rtt_s + link.transfer(size)
        stall = max(download - buffer_s, 0.0)
        buffer_s = max(buffer_s - download, 0.0) + cfg.chunk_duration_s
        sleep = 0.0
        if buffer_s > cfg.buffer_capacity_s:
            sleep = math.ceil((buffer_s - cfg.buffer_capacity_s) / cfg.drain_step_s) * cfg.drain_step_s
            buffer_s -= sleep
            link.wait(sleep)
        if n == 0:
            startup = stall
            if not cfg.startup_penalty:
                stall = 0.0
        wall += download + sleep
        throughput = size * 8 / 1000 / download
        throughputs.append(throughput)
        download_times.append(download)
        rungs.append(rung)
        stalls.append(stall)
        partial.append((n, rung, size, download, throughput, stall, buffer_s, sleep))
        last = rung
    qoe = session_qoe([ladder[m] for m in rungs], stalls)
    records = tuple(
        ChunkRecord(n, m, ladder[m], size, dl, tp, st, buf, sl, term)
        for (n, m, size, dl, tp, st, buf, sl), term in zip(partial, qoe.per_chunk, strict=True)
    )
    return SessionResult(trace.name, algorithm.name, cfg.chunk_duration_s, startup, records, qoe, wall)


@dataclass(frozen=True)
class Summary:
    """One algorithm over many traces: every figure is the mean over sessions (one session per trace)."""

    algorithm: str
    sessions: int
    qoe_per_session: float  # mean session QoE (sum over its chunks)
    qoe_per_chunk: float  # mean of the session QoE divided by its chunk count
    bitrate_kbps: float
    rebuffer_ratio: float  # a fraction
    switches_per_minute: float
    startup_delay_s: float
    results: tuple[SessionResult, ...] = field(repr=False, default=())


def summarize(algorithm: str, results: Sequence[SessionResult]) -> Summary:
    if not results:
        raise ValueError("no sessions to summarize")
    return Summary(
        algorithm=algorithm,
        sessions=len(results),
        qoe_per_session=fmean(r.total_qoe for r in results),
        qoe_per_chunk=fmean(r.qoe_per_chunk for r in results),
        bitrate_kbps=fmean(r.mean_bitrate_kbps for r in results),
        rebuffer_ratio=fmean(r.rebuffer_ratio for r in results),
        switches_per_minute=fmean(r.switches_per_minute for r in results),
        startup_delay_s=fmean(r.startup_delay_s for r in results),
        results=tuple(results),
    )


def run(
    traces: Iterable[Trace], algorithms: Iterable[Algorithm], config: PlayerConfig | None = None
) -> list[Summary]:
    """Every algorithm on every trace; one summary per algorithm, in the order given."""
    trace_list = list(traces)
    return [summarize(a.name, [simulate(t, a, config) for t in trace_list]) for a in algorithms]
