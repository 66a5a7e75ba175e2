"""The linear QoE of the adaptive-bitrate literature (MPC, Yin et al. SIGCOMM 2015; Pensieve, Mao et al.
SIGCOMM 2017, its ``QoE_lin``)::

    QoE = sum_{n=1..N} q(R_n)  -  mu * sum_{n=1..N} T_n  -  lambda * sum_{n=1..N-1} |q(R_{n+1}) - q(R_n)|

- ``q(R) = R`` in Mbit/s (the chunk's ladder bitrate in kbit/s divided by 1000);
- ``T_n``: the rebuffering (stall) time in seconds that the download of chunk ``n`` caused;
- ``mu = 4.3`` per second of rebuffering (Pensieve's ``REBUF_PENALTY``: one second of stall costs as much
  as the top rung, 4.3 Mbit/s, over one chunk), ``lambda = 1`` (``SMOOTH_PENALTY``).

Per chunk, ``QoE_n = q(R_n) - mu * T_n - lambda * |q(R_n) - q(R_{n-1})|``, with no smoothness term for the
first chunk; the session's QoE is the sum over its chunks and its "QoE per chunk" that sum over ``N``.
The start-up delay (the first chunk's download) is not rebuffering unless the caller says so (the
simulator's ``startup_penalty``). Pensieve's published numbers are the mean of ``QoE_n`` over chunks
2..N (their ``plot_results.py`` drops the first chunk); the two differ by at most ``q(R_1)/N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

REBUFFER_PENALTY = 4.3  # mu, per second of rebuffering
SMOOTHNESS_PENALTY = 1.0  # lambda, per Mbit/s of bitrate change between consecutive chunks


def quality(bitrate_kbps: float) -> float:
    """``q(R)``: the bitrate in Mbit/s."""
    return bitrate_kbps / 1000.0


def chunk_qoe(
    bitrate_kbps: float,
    rebuffer_s: float,
    previous_bitrate_kbps: float | None,
    rebuffer_penalty: float = REBUFFER_PENALTY,
    smoothness_penalty: float = SMOOTHNESS_PENALTY,
) -> float:
    """One chunk's term: ``q(R_n) - mu*T_n - lambda*|q(R_n) - q(R_{n-1})|`` (no last term for the first)."""
    value = quality(bitrate_kbps) - rebuffer_penalty * rebuffer_s
    if previous_bitrate_kbps is not None:
        value -= smoothness_penalty * abs(quality(bitrate_kbps) - quality(previous_bitrate_kbps))
    return value


@dataclass(frozen=True)
class QoE:
    """A session's QoE and its three parts (``total = quality - rebuffer_penalty - smoothness_penalty``)."""

    quality: float  # sum of q(R_n)
    rebuffer_penalty: float  # mu * sum of T_n
    smoothness_penalty: float  # lambda * sum of |q(R_{n+1}) - q(R_n)|
    per_chunk: tuple[float, ...]  # QoE_n, summing to total

    @property
    def total(self) -> float:
        return self.quality - self.rebuffer_penalty - self.smoothness_penalty

    @property
    def mean_per_chunk(self) -> float:
        return self.total / len(self.per_chunk) if self.per_chunk else 0.0


def session_qoe(
    bitrates_kbps: Sequence[float],
    rebuffers_s: Sequence[float],
    rebuffer_penalty: float = REBUFFER_PENALTY,
    smoothness_penalty: float = SMOOTHNESS_PENALTY,
) -> QoE:
    """The QoE of chunks played in order at ``bitrates_kbps`` having caused ``rebuffers_s`` of stall."""
    if len(bitrates_kbps) != len(rebuffers_s):
        raise ValueError(f"{len(bitrates_kbps)} bitrates but {len(rebuffers_s)} rebuffering times")
    if any(t < 0 for t in rebuffers_s):
        raise ValueError("rebuffering times cannot be negative")
    per_chunk: list[float] = []
    previous: float | None = None
    for bitrate, stall in zip(bitrates_kbps, rebuffers_s, strict=True):
        per_chunk.append(chunk_qoe(bitrate, stall, previous, rebuffer_penalty, smoothness_penalty))
        previous = bitrate
    q = [quality(b) for b in bitrates_kbps]
    return QoE(
        quality=sum(q),
        rebuffer_penalty=rebuffer_penalty * sum(rebuffers_s),
        smoothness_penalty=smoothness_penalty * sum(abs(b - a) for a, b in pairwise(q)),
        per_chunk=tuple(per_chunk),
    )
