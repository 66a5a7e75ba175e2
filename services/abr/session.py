"""One live session's player state, built from its telemetry samples, and its next-chunk decision (pure).

The live ABR service keeps a :class:`Track` per playback session. Each telemetry sample is an
:class:`Observation` of the player: the chunk it just downloaded (its rung, measured throughput and
download time) and its buffer afterwards. :func:`observe` folds an observation into the track,
ignoring a duplicate or a late one; :func:`decide` then asks the algorithm for the next chunk's rung
with :func:`~services.abr.algorithms.state_before_chunk`, the very function the simulator uses, on the
same ladder and chunk sizes as :class:`~services.abr.simulator.PlayerConfig` gives. So a player that
reports what the simulator's player saw gets, chunk after chunk, the rungs the simulator chose.

The track keeps only the last ``history`` throughputs and download times: the algorithms read at most
the last ``2 * window - 1`` of them (RobustMPC's error window), so any ``history >= 2 * window - 1``
decides exactly as the full history does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from services.abr.algorithms import Algorithm, state_before_chunk
from services.abr.simulator import PlayerConfig

PLAYER = "player"
HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class Video:
    """What the service knows of a session's video: its ladder, chunk duration and chunk count."""

    ladder_kbps: tuple[int, ...]
    chunk_duration_s: float
    chunks: int

    @classmethod
    def of(cls, ladder_kbps: tuple[int, ...], chunk_duration_s: float, duration_ms: int) -> Video:
        chunks = max(1, math.ceil(duration_ms / 1000 / chunk_duration_s))
        return cls(ladder_kbps, chunk_duration_s, chunks)

    def sizes(self) -> tuple[tuple[int, ...], ...]:
        """The chunk sizes of the simulator's player for this video (CBR)."""
        return _chunk_sizes(self.ladder_kbps, self.chunk_duration_s, self.chunks)

    def rung_of(self, bitrate_kbps: int) -> int:
        """The rung of that bitrate: exact, else the highest rung below it, else the lowest."""
        below = [m for m, b in enumerate(self.ladder_kbps) if b <= bitrate_kbps]
        return below[-1] if below else 0


@lru_cache(maxsize=64)
def _chunk_sizes(
    ladder: tuple[int, ...], chunk_duration_s: float, chunks: int
) -> tuple[tuple[int, ...], ...]:
    config = PlayerConfig(
        ladder_kbps=ladder,
        chunk_duration_s=chunk_duration_s,
        chunks=chunks,
        buffer_capacity_s=max(60.0, chunk_duration_s),
    )
    return config.chunk_sizes()


@dataclass(frozen=True)
class Observation:
    """One sample, as the decision needs it (already validated)."""

    event_id: str
    source: str  # PLAYER or HEARTBEAT
    order: int  # the sender's sequence (or the interval's end, in ms, when it sent none)
    bitrate_kbps: int  # the rung the player fetched at
    throughput_kbps: float  # 0 when it measured none
    download_s: float
    buffer_s: float
    chunk_index: int | None  # the chunk just downloaded; None for heartbeats
    position_ms: int | None

    def next_chunk(self, video: Video) -> int | None:
        """The chunk the player requests next: after the one just downloaded, or the one at the end
        of the buffer."""
        if self.chunk_index is not None:
            return self.chunk_index + 1
        if self.position_ms is not None:
            return int((self.position_ms / 1000 + self.buffer_s) // video.chunk_duration_s)
        return None


@dataclass(frozen=True)
class Track:
    """A session's player as the service has seen it."""

    last_index: int | None = None
    buffer_s: float = 0.0
    throughputs_kbps: tuple[float, ...] = ()
    download_times_s: tuple[float, ...] = ()
    next_chunk: int | None = None
    orders: dict[str, int] = field(default_factory=dict)  # the last order applied, per source
    last_event_id: str | None = None
    player_seen: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "last_index": self.last_index,
            "buffer_s": self.buffer_s,
            "throughputs_kbps": list(self.throughputs_kbps),
            "download_times_s": list(self.download_times_s),
            "next_chunk": self.next_chunk,
            "orders": dict(self.orders),
            "last_event_id": self.last_event_id,
            "player_seen": self.player_seen,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Track:
        return cls(
            last_index=doc["last_index"],
            buffer_s=float(doc["buffer_s"]),
            throughputs_kbps=tuple(float(v) for v in doc["throughputs_kbps"]),
            download_times_s=tuple(float(v) for v in doc["download_times_s"]),
            next_chunk=doc["next_chunk"],
            orders={str(k): int(v) for k, v in doc["orders"].items()},
            last_event_id=doc["last_event_id"],
            player_seen=bool(doc["player_seen"]),
        )


class Ignored(Exception):
    """The observation changes nothing; ``reason`` says why (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def observe(track: Track, obs: Observation, video: Video, history: int) -> Track:
    """The track after ``obs``; :class:`Ignored` for a duplicate, a late sample, or a heartbeat once
    the player reports chunks itself."""
    if obs.event_id == track.last_event_id:
        raise Ignored("duplicate", f"sample {obs.event_id} was applied already")
    last = track.orders.get(obs.source)
    if last is not None and obs.order <= last:
        reason = "duplicate" if obs.order == last else "out_of_order"
        raise Ignored(reason, f"{obs.source} sample {obs.order} is not after {last}")
    if obs.source == HEARTBEAT and track.player_seen:
        raise Ignored("superseded", "the player reports its chunks; heartbeats do not steer it")
    throughputs, downloads = track.throughputs_kbps, track.download_times_s
    if obs.throughput_kbps > 0:
        throughputs = (*throughputs, obs.throughput_kbps)[-history:]
        downloads = (*downloads, obs.download_s)[-history:]
    return replace(
        track,
        last_index=video.rung_of(obs.bitrate_kbps),
        buffer_s=obs.buffer_s,
        throughputs_kbps=throughputs,
        download_times_s=downloads,
        next_chunk=obs.next_chunk(video),
        orders={**track.orders, obs.source: obs.order},
        last_event_id=obs.event_id,
        player_seen=track.player_seen or obs.source == PLAYER,
    )


@dataclass(frozen=True)
class Decision:
    rung: int
    bitrate_kbps: int
    algorithm: str
    chunk: int  # the chunk it is for


def decide(
    track: Track, video: Video, algorithm: Algorithm, buffer_capacity_s: float = 60.0
) -> Decision | None:
    """The rung for the track's next chunk, or None when it is unknown or past the end of the video."""
    n = track.next_chunk
    if n is None or not 0 <= n < video.chunks:
        return None
    state = state_before_chunk(
        video.ladder_kbps,
        video.chunk_duration_s,
        video.sizes(),
        n,
        track.buffer_s,
        track.last_index,
        track.throughputs_kbps,
        track.download_times_s,
        buffer_capacity_s,
    )
    rung = algorithm.choose(state)
    if not 0 <= rung < len(video.ladder_kbps):
        raise ValueError(f"{algorithm.name} chose rung {rung} of a {len(video.ladder_kbps)}-rung ladder")
    return Decision(rung, video.ladder_kbps[rung], algorithm.name, n)
