"""Adaptive-bitrate algorithms: pure, deterministic functions from a player's state to a ladder index.

An :class:`Algorithm` sees an :class:`AbrState` before each chunk is requested and answers the index of
the rung (0 = lowest bitrate) to fetch it at. Nothing is remembered between calls: whatever an algorithm
needs from the past (the last rung, the throughput history) is in the state, so the same state always
gives the same answer.

The three algorithms of the papers, as the Pensieve evaluation (Mao et al. SIGCOMM 2017) ran them:

- :class:`BBA` -- BBA-0 of Huang et al. SIGCOMM 2014 ("A buffer-based approach to rate adaptation"):
  a rate map ``f(B)`` from buffer level to bitrate, ``R_min`` up to the *reservoir* ``r``, then linear
  in bitrate up to ``R_max`` at ``r + cushion``; the rate moves only when ``f(B)`` crosses the next rung
  up or down (the paper's Algorithm 1). The paper used r = 90 s and cu = 126 s for a 240-s buffer; with
  Pensieve's 60-s buffer we use Pensieve's r = 5 s, cu = 10 s (its ``test/bb.py``, which interpolates the
  ladder *index* instead of the bitrate; ``BBA(mapping="index")`` is that variant).
- :class:`BOLA` -- BOLA-BASIC of Spiteri et al. INFOCOM 2016: utilities ``v_m = ln(S_m/S_1)``, buffer
  ``Q`` in seconds, chunk duration ``p``; the rung maximizing ``(V*(v_m + gamma*p) - Q) / S_m``, with
  ``V = (Q_max - p) / (v_M + gamma*p)`` so that the buffer never has to exceed ``Q_max`` (the paper's
  choice of V from the buffer size, in seconds instead of chunks). ``gamma*p = 5 s`` and ``Q_max = 25 s``
  are the defaults of Sabre, the authors' reference simulator (github.com/UMass-LIDS/sabre, ``--gamma-p
  5 --max-buffer 25``). On the 6-rung Pensieve ladder the rung thresholds are then 12.0, 14.1, 15.3, 16.5
  and 17.7 s of buffer. BOLA-BASIC would pause its downloads when every score is negative (``Q > Q_max -
  p``); these algorithms answer a rung only, and there the argmax is the top rung anyway, so the player
  keeps fetching the top rung until its own buffer cap (60 s) makes it wait.
- :class:`RobustMPC` -- Yin et al. SIGCOMM 2015, as Pensieve's ``test/mpc.py``: the throughput
  prediction is the harmonic mean of the last 5 chunk throughputs divided by ``1 + max error``, the error
  of a chunk being ``|predicted - actual| / actual`` of the plain harmonic-mean prediction made before it,
  over the last 5 chunks; then every sequence of rungs over the next ``min(5, remaining)`` chunks is
  scored with the linear QoE (download time ``size / prediction``, rebuffer when it exceeds the buffer,
  ``+ p`` of buffer per chunk, no RTT and no buffer cap, as in ``mpc.py``) and the first rung of the best
  is fetched. The 6^5 = 7,776 sequences are searched exactly by depth-first branch and bound: a sequence
  whose prefix value plus an upper bound of what the rest can add (``(k-1)*q_max + q(last)`` for ``k``
  chunks left, less the rebuffering that even the lowest rungs cannot avoid) cannot beat the best so far
  is not expanded. That finds the same optimum as the flat enumeration (a test checks it) visiting about
  770 nodes a decision on the shared training traces, instead of 9,331 for the whole tree or 7,776 x 5
  steps for the flat enumeration: all 127 traces take about 7 s in plain Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from services.abr.qoe import REBUFFER_PENALTY, SMOOTHNESS_PENALTY


@dataclass(frozen=True, slots=True)
class AbrState:
    """What the player knows before it requests a chunk.

    ``throughputs_kbps[i]`` and ``download_times_s[i]`` are those of the i-th chunk downloaded (oldest
    first; the download time includes the request's round trip, the throughput is size over that time).
    ``next_chunk_sizes[k][m]`` is the size in bytes of the k-th chunk from now at rung ``m`` (k = 0 is the
    chunk being chosen), for every chunk left. ``last_index`` is None before the first chunk.
    """

    ladder_kbps: tuple[int, ...]
    chunk_duration_s: float
    buffer_s: float
    last_index: int | None
    throughputs_kbps: tuple[float, ...]
    download_times_s: tuple[float, ...]
    next_chunk_sizes: tuple[tuple[int, ...], ...]
    remaining_chunks: int
    buffer_capacity_s: float = 60.0


def state_before_chunk(
    ladder_kbps: tuple[int, ...],
    chunk_duration_s: float,
    chunk_sizes: Sequence[tuple[int, ...]],
    chunk: int,
    buffer_s: float,
    last_index: int | None,
    throughputs_kbps: Sequence[float],
    download_times_s: Sequence[float],
    buffer_capacity_s: float = 60.0,
) -> AbrState:
    """The state before requesting chunk ``chunk`` of a video of ``len(chunk_sizes)`` chunks.

    The one way an :class:`AbrState` is built, by the simulator and by the live ABR service alike, so
    that both hand their algorithm the same input for the same observations.
    """
    return AbrState(
        ladder_kbps=ladder_kbps,
        chunk_duration_s=chunk_duration_s,
        buffer_s=buffer_s,
        last_index=last_index,
        throughputs_kbps=tuple(throughputs_kbps),
        download_times_s=tuple(download_times_s),
        next_chunk_sizes=tuple(chunk_sizes[chunk:]),
        remaining_chunks=len(chunk_sizes) - chunk,
        buffer_capacity_s=buffer_capacity_s,
    )


class Algorithm(Protocol):
    """An ABR algorithm: a name and a pure choice of ladder index."""

    @property
    def name(self) -> str: ...

    def choose(self, state: AbrState) -> int: ...


@dataclass(frozen=True)
class BBA:
    """BBA-0 (Huang et al. 2014) with Pensieve's reservoir 5 s and cushion 10 s (see the module doc)."""

    reservoir_s: float = 5.0
    cushion_s: float = 10.0
    mapping: Literal["rate", "index"] = "rate"

    @property
    def name(self) -> str:
        return "bba" if self.mapping == "rate" else "bba-index"

    def rate_map_kbps(self, ladder_kbps: Sequence[int], buffer_s: float) -> float:
        """``f(B)``: R_min below the reservoir, R_max above reservoir + cushion, linear between."""
        r_min, r_max = ladder_kbps[0], ladder_kbps[-1]
        if buffer_s <= self.reservoir_s:
            return float(r_min)
        if buffer_s >= self.reservoir_s + self.cushion_s:
            return float(r_max)
        return r_min + (r_max - r_min) * (buffer_s - self.reservoir_s) / self.cushion_s

    def choose(self, state: AbrState) -> int:
        ladder = state.ladder_kbps
        top = len(ladder) - 1
        buffer_s = state.buffer_s
        if buffer_s <= self.reservoir_s:
            return 0
        if buffer_s >= self.reservoir_s + self.cushion_s:
            return top
        if self.mapping == "index":  # Pensieve's bb.py
            return int(top * (buffer_s - self.reservoir_s) / self.cushion_s)
        f = self.rate_map_kbps(ladder, buffer_s)
        prev = 0 if state.last_index is None else state.last_index
        rate_plus = ladder[min(prev + 1, top)]
        rate_minus = ladder[max(prev - 1, 0)]
        if f >= rate_plus:  # the highest rung strictly below f(B)
            return max((m for m in range(len(ladder)) if ladder[m] < f), default=0)
        if f <= rate_minus:  # the lowest rung strictly above f(B)
            return min((m for m in range(len(ladder)) if ladder[m] > f), default=top)
        return prev


@dataclass(frozen=True)
class BOLA:
    """BOLA-BASIC (Spiteri et al. 2016) with ``gamma*p = 5 s`` and ``Q_max = 25 s`` (see the module doc)."""

    gamma_p_s: float = 5.0
    buffer_target_s: float = 25.0

    @property
    def name(self) -> str:
        return "bola"

    def control_v(self, ladder_kbps: Sequence[int], chunk_duration_s: float) -> float:
        """``V = (Q_max - p) / (v_M + gamma*p)``, in seconds per unit of utility."""
        v_top = math.log(ladder_kbps[-1] / ladder_kbps[0])
        return (self.buffer_target_s - chunk_duration_s) / (v_top + self.gamma_p_s)

    def choose(self, state: AbrState) -> int:
        ladder = state.ladder_kbps
        v = self.control_v(ladder, state.chunk_duration_s)
        sizes = state.next_chunk_sizes[0] if state.next_chunk_sizes else tuple(ladder)
        best, best_score = 0, -math.inf
        for m, bitrate in enumerate(ladder):
            utility = math.log(bitrate / ladder[0])
            score = (v * (utility + self.gamma_p_s) - state.buffer_s) / sizes[m]
            if score > best_score:
                best, best_score = m, score
        return best


def harmonic_mean(values: Sequence[float]) -> float:
    return len(values) / sum(1.0 / v for v in values)


@dataclass(frozen=True)
class RobustMPC:
    """RobustMPC (Yin et al. 2015) as in Pensieve's ``mpc.py``: horizon 5, window 5 (see the module doc)."""

    horizon: int = 5
    window: int = 5
    rebuffer_penalty: float = REBUFFER_PENALTY
    smoothness_penalty: float = SMOOTHNESS_PENALTY

    @property
    def name(self) -> str:
        return "robustmpc"

    def predicted_throughput_kbps(self, throughputs_kbps: Sequence[float]) -> float | None:
        """Harmonic mean of the last ``window`` throughputs over ``1 +`` the largest recent error."""
        n = len(throughputs_kbps)
        if n == 0:
            return None
        w = self.window
        max_error = 0.0
        for k in range(max(1, n - w + 1), n):  # chunk k was predicted from chunks k-w .. k-1
            predicted = harmonic_mean(throughputs_kbps[max(0, k - w) : k])
            actual = throughputs_kbps[k]
            max_error = max(max_error, abs(predicted - actual) / actual)
        return harmonic_mean(throughputs_kbps[-w:]) / (1.0 + max_error)

    def choose(self, state: AbrState) -> int:
        bandwidth = self.predicted_throughput_kbps(state.throughputs_kbps)
        if bandwidth is None or bandwidth <= 0:
            return 0
        steps = min(self.horizon, state.remaining_chunks, len(state.next_chunk_sizes))
        if steps <= 0:
            return 0
        # predicted download time (s) of each of the next chunks at each rung: kbit / (kbit/s)
        times = [[size * 8 / 1000 / bandwidth for size in state.next_chunk_sizes[k]] for k in range(steps)]
        first, _ = best_plan(
            times,
            [b / 1000 for b in state.ladder_kbps],
            state.buffer_s,
            state.last_index,
            state.chunk_duration_s,
            self.rebuffer_penalty,
            self.smoothness_penalty,
        )
        return first


def plan_value(
    plan: Sequence[int],
    times_s: Sequence[Sequence[float]],
    qualities: Sequence[float],
    buffer_s: float,
    last_index: int | None,
    chunk_duration_s: float,
    rebuffer_penalty: float = REBUFFER_PENALTY,
    smoothness_penalty: float = SMOOTHNESS_PENALTY,
) -> float:
    """The linear QoE MPC expects of fetching the next chunks at ``plan`` (the flat, exhaustive form)."""
    value, prev = 0.0, last_index
    for k, m in enumerate(plan):
        dt = times_s[k][m]
        stall = max(dt - buffer_s, 0.0)
        buffer_s = max(buffer_s - dt, 0.0) + chunk_duration_s
        value += qualities[m] - rebuffer_penalty * stall
        if prev is not None:
            value -= smoothness_penalty * abs(qualities[m] - qualities[prev])
        prev = m
    return value


def best_plan(
    times_s: Sequence[Sequence[float]],
    qualities: Sequence[float],
    buffer_s: float,
    last_index: int | None,
    chunk_duration_s: float,
    rebuffer_penalty: float = REBUFFER_PENALTY,
    smoothness_penalty: float = SMOOTHNESS_PENALTY,
) -> tuple[int, float]:
    """The first rung of a plan maximizing :func:`plan_value`, and that value, by branch and bound.

    Children are tried from the top rung down; a plan replaces the best only when strictly better, so
    among equal plans the one found first wins (deterministic). The bound on what ``k`` more chunks can
    add after rung ``prev`` is ``(k-1)*q_max + q(prev) - mu * R_min(k, buffer)``: the quality minus
    smoothness terms of ``k`` chunks telescope to at most that (each rise is paid for), and
    ``R_min`` -- the rebuffering of fetching the smallest chunk every time -- is the least any plan
    stalls, the buffer being monotone in the download times.
    """
    steps = len(times_s)
    rungs = len(qualities)
    q_max = max(qualities)
    fastest = [min(row) for row in times_s]
    mu, lam, p = rebuffer_penalty, smoothness_penalty, chunk_duration_s
    best_value = -math.inf
    best_first = 0

    def least_stall(depth: int, buf: float) -> float:
        stall = 0.0
        for k in range(depth, steps):
            dt = fastest[k]
            if dt > buf:
                stall += dt - buf
                buf = p
            else:
                buf = buf - dt + p
        return stall

    def visit(depth: int, buf: float, prev: int | None, value: float, first: int) -> None:
        nonlocal best_value, best_first
        if depth == steps:
            if value > best_value:
                best_value, best_first = value, first
            return
        left = steps - depth
        q_prev = q_max if prev is None else qualities[prev]
        bound = value + (left - 1) * q_max + q_prev - mu * least_stall(depth, buf)
        if bound <= best_value:
            return
        row = times_s[depth]
        for m in range(rungs - 1, -1, -1):
            dt = row[m]
            if dt > buf:
                stall, nbuf = dt - buf, p
            else:
                stall, nbuf = 0.0, buf - dt + p
            gain = qualities[m] - mu * stall
            if prev is not None:
                gain -= lam * abs(qualities[m] - qualities[prev])
            visit(depth + 1, nbuf, m, value + gain, m if depth == 0 else first)

    visit(0, buffer_s, last_index, 0.0, 0)
    return best_first, best_value


ALGORITHMS: dict[str, Callable[[], Algorithm]] = {
    "bba": BBA,
    "bola": BOLA,
    "robustmpc": RobustMPC,
    "bba-index": lambda: BBA(mapping="index"),  # Pensieve's bb.py
}


def make_algorithm(name: str) -> Algorithm:
    """The algorithm of that name (``bba``, ``bola``, ``robustmpc``, ``bba-index``), documented parameters."""
    try:
        return ALGORITHMS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHMS)})") from None
