"""The ABR service's logic: telemetry in, per-session decisions out. One function per event or command.

- ``POST /v1/sessions/{id}/telemetry`` (:func:`ingest`): a player's per-chunk sample, validated (a 4xx
  naming the field, nothing published) and published as a BitrateSample on ``telemetry.bitrate``.
- Heartbeat on ``playback.events`` (:func:`heartbeat`): republished as a BitrateSample (source
  ``heartbeat``), so every player's telemetry lands on the topic.
- BitrateSample on ``telemetry.bitrate`` (:func:`sample`), in order per session (the key): folded into
  the session's player state, and the algorithm's decision for the next chunk stored in the read model.
  Duplicates, late samples, unknown or stopped sessions and bad values are counted and dropped with a
  log line; no decision is made from them.
- SessionStarted / SessionStopped (:func:`session_started`, :func:`session_stopped`): which sessions
  exist, whose they are, their ladder and length.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from opentelemetry import trace
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from services.abr import metrics
from services.abr.adapters.store import SessionInfo, SessionStore, SessionView
from services.abr.algorithms import Algorithm
from services.abr.session import HEARTBEAT, PLAYER, Ignored, Observation, Track, Video, decide, observe
from services.bus.auth import Claims
from services.bus.consumer import Record, Retryable
from services.bus.events import BitrateSample, Heartbeat, SessionStarted, SessionStopped
from services.bus.http import ApiError
from services.bus.producer import Producer
from services.bus.tracing import ATTR_SESSION_ID

log = logging.getLogger("reelbus.abr")

TELEMETRY = "telemetry.bitrate"
SAMPLE_IDS = uuid.UUID("6f1d3c1e-3a53-4b55-9a0c-5a3f2b1e0abc")  # uuid5 namespace: heartbeat -> sample

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# Beyond these a value is absurd, not a measurement.
MAX_THROUGHPUT_KBPS = 10_000_000  # 10 Gbit/s
MAX_BITRATE_KBPS = 1_000_000
MAX_BUFFER_S = 600.0
MAX_INTERVAL_MS = 600_000
MAX_DOWNLOAD_S = 600.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Limits:
    chunk_duration_s: float
    default_ladder_kbps: tuple[int, ...]
    buffer_capacity_s: float
    history: int
    max_clock_skew: timedelta
    max_sample_age: timedelta
    heartbeat_max_age: timedelta


@dataclass
class Dependencies:
    store: SessionStore
    producer: Producer
    algorithm: Algorithm
    limits: Limits
    clock: Callable[[], datetime] = field(default=utc_now)


# -- inputs -------------------------------------------------------------------------------------


class TelemetryReport(BaseModel):
    """A player's sample for one interval, normally one chunk download."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    sequence: Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]
    interval_start: AwareDatetime
    interval_ms: Annotated[int, Field(strict=True, ge=1, le=MAX_INTERVAL_MS)]
    throughput_kbps: Annotated[float, Field(gt=0, le=MAX_THROUGHPUT_KBPS)]
    buffer_s: Annotated[float, Field(ge=0, le=MAX_BUFFER_S)]
    bitrate_kbps: Annotated[int, Field(strict=True, gt=0, le=MAX_BITRATE_KBPS)]
    rebuffer_ms: Annotated[int, Field(strict=True, ge=0, le=MAX_INTERVAL_MS)] = 0
    chunk_index: Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)] | None = None
    download_s: Annotated[float, Field(gt=0, le=MAX_DOWNLOAD_S)] | None = None
    position_ms: Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)] | None = None
    dropped_frames: Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)] | None = None
    appliance_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None


# -- the read model's session info ----------------------------------------------------------------


async def _view(deps: Dependencies, session_id: str) -> SessionView:
    try:
        return await deps.store.view(session_id)
    except RedisError as exc:
        raise Retryable(f"redis: {exc}") from exc


async def session_started(event: SessionStarted, _record: Record, deps: Dependencies) -> None:
    if deps.clock() - event.event_time > deps.limits.max_sample_age:
        return  # long over: a new consumer group reading from the start keeps no stale sessions
    ladder = tuple(event.ladder_kbps or ()) or deps.limits.default_ladder_kbps
    if list(ladder) != sorted(set(ladder)) or ladder[0] <= 0:
        log.warning("session %s: ladder %s is not ascending; using the default", event.session_id, ladder)
        ladder = deps.limits.default_ladder_kbps
    info = SessionInfo(
        account_id=str(event.account_id),
        profile_id=str(event.profile_id),
        title_id=event.title_id,
        ladder_kbps=ladder,
        duration_ms=max(0, event.title_duration_ms),
    )
    try:
        await deps.store.started(str(event.session_id), info)
    except RedisError as exc:
        raise Retryable(f"redis: {exc}") from exc


async def session_stopped(event: SessionStopped, _record: Record, deps: Dependencies) -> None:
    if deps.clock() - event.event_time > deps.limits.max_sample_age:
        return
    try:
        await deps.store.stopped(str(event.session_id))
    except RedisError as exc:
        raise Retryable(f"redis: {exc}") from exc


def drop(reason: str, session_id: object, message: str) -> None:
    metrics.DROPPED.labels(reason).inc()
    log.info("dropped a sample of session %s (%s): %s", session_id, reason, message)


async def drop_known(deps: Dependencies, session_id: str, reason: str, message: str) -> None:
    drop(reason, session_id, message)
    try:
        await deps.store.count_drop(session_id, reason)
    except RedisError as exc:
        log.warning("could not count the drop on session %s: %s", session_id, exc)


# -- heartbeats become samples ----------------------------------------------------------------------


async def heartbeat(event: Heartbeat, _record: Record, deps: Dependencies) -> None:
    """Republish a fresh heartbeat of a known session as a BitrateSample (its id derived from the
    heartbeat's, so a redelivery republishes the same sample)."""
    if deps.clock() - event.event_time > deps.limits.heartbeat_max_age:
        metrics.DROPPED.labels("stale").inc()  # the start-up backlog: not logged one by one
        return
    session_id = str(event.session_id)
    view = await _view(deps, session_id)
    if view.info is None:
        drop("unknown_session", session_id, f"heartbeat {event.sequence} of a session never started")
        return
    at_ms = int(event.event_time.timestamp() * 1000)
    previous = view.heartbeat_at_ms
    interval_ms = max(0, at_ms - previous) if previous is not None and previous < at_ms else 0
    sample = BitrateSample(
        event_id=uuid.uuid5(SAMPLE_IDS, str(event.event_id)),
        event_time=event.event_time,
        session_id=event.session_id,
        profile_id=event.profile_id,
        title_id=event.title_id,
        interval_start=event.event_time - timedelta(milliseconds=interval_ms),
        interval_ms=min(interval_ms, INT32_MAX),
        throughput_kbps=event.throughput_kbps,
        buffer_ms=event.buffer_ms,
        selected_bitrate_kbps=event.bitrate_kbps,
        rebuffer_ms=event.rebuffer_ms,
        sequence=event.sequence,
        source=HEARTBEAT,
        position_ms=event.position_ms,
    )
    await deps.producer.send(TELEMETRY, session_id, sample)
    try:
        await deps.store.heartbeat_seen(session_id, at_ms)
    except RedisError as exc:
        raise Retryable(f"redis: {exc}") from exc


# -- the player's telemetry through the gateway --------------------------------------------------


def _owned(view: SessionView, session_id: str, claims: Claims) -> SessionInfo:
    if view.info is None or view.info.account_id != claims.account_id:
        raise ApiError(404, f"no playback session {session_id} of this account", field="session_id")
    return view.info


async def ingest(
    session_id: uuid.UUID, report: TelemetryReport, claims: Claims, deps: Dependencies
) -> BitrateSample:
    """Validate a player's sample against its session and publish it; ``ApiError`` names the field."""
    trace.get_current_span().set_attribute(ATTR_SESSION_ID, str(session_id))
    view = await _view(deps, str(session_id))
    info = _owned(view, str(session_id), claims)
    if view.stopped:
        raise ApiError(409, f"playback session {session_id} was stopped", field="session_id")
    now = deps.clock()
    interval_end = report.interval_start + timedelta(milliseconds=report.interval_ms)
    if interval_end - now > deps.limits.max_clock_skew:
        raise ApiError(
            422,
            f"interval_start: the interval ends {interval_end.isoformat()}, more than "
            f"{deps.limits.max_clock_skew.total_seconds():.0f}s ahead of the server's clock",
            field="interval_start",
        )
    if now - report.interval_start > deps.limits.max_sample_age:
        raise ApiError(
            422, "interval_start: the interval is too old to steer anything", field="interval_start"
        )
    if report.rebuffer_ms > report.interval_ms:
        raise ApiError(422, "rebuffer_ms: more stall than the interval lasted", field="rebuffer_ms")
    if report.bitrate_kbps not in info.ladder_kbps:
        raise ApiError(
            422,
            f"bitrate_kbps: {report.bitrate_kbps} is not a rung of this session's ladder "
            f"{list(info.ladder_kbps)}",
            field="bitrate_kbps",
        )
    video = Video.of(info.ladder_kbps, deps.limits.chunk_duration_s, info.duration_ms)
    if report.chunk_index is not None and report.chunk_index >= video.chunks:
        raise ApiError(
            422,
            f"chunk_index: the title has {video.chunks} chunks (0..{video.chunks - 1})",
            field="chunk_index",
        )
    sample = BitrateSample(
        event_time=now,
        session_id=session_id,
        profile_id=uuid.UUID(info.profile_id),
        title_id=info.title_id,
        interval_start=report.interval_start,
        interval_ms=report.interval_ms,
        throughput_kbps=min(round(report.throughput_kbps), INT32_MAX),
        buffer_ms=round(report.buffer_s * 1000),
        selected_bitrate_kbps=report.bitrate_kbps,
        rebuffer_ms=report.rebuffer_ms,
        dropped_frames=report.dropped_frames,
        appliance_id=report.appliance_id,
        sequence=report.sequence,
        source=PLAYER,
        chunk_index=report.chunk_index,
        download_s=report.download_s,
        throughput_exact_kbps=report.throughput_kbps,
        buffer_s=report.buffer_s,
        position_ms=report.position_ms,
    )
    await deps.producer.send(TELEMETRY, str(session_id), sample)
    return sample


async def current_decision(
    session_id: uuid.UUID, claims: Claims, deps: Dependencies
) -> dict[str, Any] | None:
    view = await _view(deps, str(session_id))
    _owned(view, str(session_id), claims)
    return view.decision


# -- samples become decisions ------------------------------------------------------------------------


def invalid_value(sample: BitrateSample, now: datetime, limits: Limits) -> tuple[str, str] | None:
    """Why a sample on the topic cannot be used (reason, message), or None. The topic's other producers
    are not validated by this service's HTTP handler, so the consumer checks again."""

    def bad(value: float | None, low: float, high: float, strict_low: bool = False) -> bool:
        if value is None:
            return False
        if not math.isfinite(value):
            return True
        return value > high or (value <= low if strict_low else value < low)

    checks: list[tuple[str, bool]] = [
        ("interval_ms", bad(sample.interval_ms, 0, MAX_INTERVAL_MS)),
        ("throughput_kbps", bad(sample.throughput_kbps, 0, MAX_THROUGHPUT_KBPS)),
        ("throughput_exact_kbps", bad(sample.throughput_exact_kbps, 0, MAX_THROUGHPUT_KBPS)),
        ("buffer_ms", bad(sample.buffer_ms, 0, MAX_BUFFER_S * 1000)),
        ("buffer_s", bad(sample.buffer_s, 0, MAX_BUFFER_S)),
        ("selected_bitrate_kbps", bad(sample.selected_bitrate_kbps, 0, MAX_BITRATE_KBPS, strict_low=True)),
        ("rebuffer_ms", bad(sample.rebuffer_ms, 0, MAX_INTERVAL_MS)),
        ("chunk_index", bad(sample.chunk_index, 0, INT32_MAX)),
        ("download_s", bad(sample.download_s, 0, MAX_DOWNLOAD_S, strict_low=True)),
        ("position_ms", bad(sample.position_ms, 0, INT64_MAX)),
    ]
    for name, is_bad in checks:
        if is_bad:
            return "invalid", f"{name} is negative or absurd"
    end = sample.interval_start + timedelta(milliseconds=sample.interval_ms)
    if end - now > limits.max_clock_skew:
        return "future", f"the interval ends {end.isoformat()}, ahead of the clock"
    if now - end > limits.max_sample_age:
        return "too_old", f"the interval ended {end.isoformat()}"
    return None


def observation_of(sample: BitrateSample) -> Observation:
    source = sample.source if sample.source in (PLAYER, HEARTBEAT) else PLAYER
    end_ms = int(sample.interval_start.timestamp() * 1000) + sample.interval_ms
    exact = sample.throughput_exact_kbps
    throughput = exact if exact is not None else sample.throughput_kbps
    buffer_s = sample.buffer_s if sample.buffer_s is not None else sample.buffer_ms / 1000
    download_s = sample.download_s if sample.download_s is not None else sample.interval_ms / 1000
    return Observation(
        event_id=str(sample.event_id),
        source=source,
        order=sample.sequence if sample.sequence is not None else end_ms,
        bitrate_kbps=sample.selected_bitrate_kbps,
        throughput_kbps=float(throughput),
        download_s=float(download_s),
        buffer_s=float(buffer_s),
        chunk_index=sample.chunk_index,
        position_ms=sample.position_ms,
    )


async def sample(event: BitrateSample, _record: Record, deps: Dependencies) -> None:
    """Fold a sample into its session's player state and store the decision for the next chunk."""
    session_id = str(event.session_id)
    trace.get_current_span().set_attribute(ATTR_SESSION_ID, session_id)
    view = await _view(deps, session_id)
    if view.info is None:
        drop("unknown_session", session_id, "no SessionStarted seen for it")
        return
    problem = invalid_value(event, deps.clock(), deps.limits)
    if problem is None and view.stopped:
        problem = ("session_stopped", "the session was stopped")
    if problem is not None:
        await drop_known(deps, session_id, *problem)
        return
    obs = observation_of(event)
    limits = deps.limits
    decided_at = deps.clock()

    def step(info: SessionInfo, track: Track) -> tuple[Track, dict[str, Any] | None]:
        video = Video.of(info.ladder_kbps, limits.chunk_duration_s, info.duration_ms)
        new_track = observe(track, obs, video, limits.history)
        decision = decide(new_track, video, deps.algorithm, limits.buffer_capacity_s)
        if decision is None:
            return new_track, None
        return new_track, {
            "bitrate_kbps": decision.bitrate_kbps,
            "rung": decision.rung,
            "algorithm": decision.algorithm,
            "decided_at": decided_at.isoformat().replace("+00:00", "Z"),
            "chunk_index": decision.chunk,
            "source": obs.source,
            "sequence": obs.order,
            "event_id": obs.event_id,
        }

    try:
        _, decision = await deps.store.apply(session_id, step)
    except Ignored as exc:
        await drop_known(deps, session_id, exc.reason, str(exc))
        return
    except KeyError:
        drop("unknown_session", session_id, "no SessionStarted seen for it")
        return
    except RedisError as exc:
        raise Retryable(f"redis: {exc}") from exc
    metrics.SAMPLES.labels(obs.source).inc()
    if decision is not None:
        metrics.DECISIONS.labels(decision["algorithm"]).inc()
