"""Playback's business logic: one function per consumed event (the projections) and per command
(start, heartbeat, stop), each a plain async function of (input, dependencies)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field

from services.bus.auth import Claims
from services.bus.events import (
    ApplianceContents,
    ApplianceHealth,
    ChangeType,
    DeviceType,
    Heartbeat,
    ProfileCreated,
    SessionStarted,
    SessionStopped,
    StopReason,
    TitleChanged,
)
from services.bus.http import ApiError
from services.bus.tracing import ATTR_ACCOUNT_ID, ATTR_PROFILE_ID, ATTR_SESSION_ID, ATTR_TITLE_ID
from services.playback import entitlement
from services.playback.adapters.db import PlaybackStore, Session
from services.playback.appliances import Appliance
from services.playback.steering import IPAddress, steer

log = logging.getLogger("reelbus.playback")

PLAYBACK_EVENTS = "playback.events"
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

Int32 = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
Millis = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]


def utc_now() -> datetime:
    return datetime.now(UTC)


# -- inputs -------------------------------------------------------------------------------------


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StartSession(_Input):
    profile_id: uuid.UUID
    title_id: Annotated[str, Field(strict=True, min_length=1, max_length=256)]
    position_ms: Millis = 0  # where playback starts (a resume); at most the title's runtime


class HeartbeatReport(_Input):
    position_ms: Millis
    bitrate_kbps: Int32
    buffer_ms: Int32
    throughput_kbps: Int32
    rebuffer_ms: Int32


class StopSession(_Input):
    position_ms: Millis


# -- outcomes -----------------------------------------------------------------------------------


class Refused(ApiError):
    """A refusal with a machine-readable ``reason`` besides the message."""

    def __init__(self, status: int, message: str, reason: str, code: str | None = None) -> None:
        super().__init__(status, message, code=code)
        self.reason = reason


@dataclass(frozen=True)
class StartedSession:
    session_id: uuid.UUID
    cdn: list[str]
    ladder_kbps: list[int]
    appliance_ids: list[str]


@dataclass(frozen=True)
class Stopped:
    session_id: uuid.UUID
    already_stopped: bool


@dataclass(frozen=True)
class Playback:
    """What the commands depend on."""

    store: PlaybackStore
    appliances: tuple[Appliance, ...]
    manifest_max_urls: int = 3
    position_margin_ms: int = 60_000
    clock: Callable[[], datetime] = field(default=utc_now)


# -- projections ---------------------------------------------------------------------------------


async def on_billing_event(event: entitlement.BillingEvent, store: PlaybackStore) -> None:
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, str(event.account_id))
    async with store.transaction() as tx:
        if not await tx.claim_event(event.event_id, event.SCHEMA_NAME):
            return
        state = await tx.entitlement(event.account_id, for_update=True)
        new = entitlement.apply(state, event)
        if new is None:
            log.debug(
                "%s %s changes nothing for account %s", event.SCHEMA_NAME, event.event_id, event.account_id
            )
            return
        await tx.save_entitlement(event.account_id, new, event.event_id)


async def on_profile_created(event: ProfileCreated, store: PlaybackStore) -> None:
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(event.profile_id))
    span.set_attribute(ATTR_ACCOUNT_ID, str(event.account_id))
    async with store.transaction() as tx:
        if await tx.claim_event(event.event_id, event.SCHEMA_NAME):
            await tx.add_profile(event.profile_id, event.account_id, event.kids, event.event_time)


async def on_title_changed(event: TitleChanged, store: PlaybackStore) -> None:
    """The title's snapshot at ``title_version``; a DELETED removes it. An older version than the
    stored one is ignored (a late event never rolls the title back, nor resurrects a deleted one)."""
    trace.get_current_span().set_attribute(ATTR_TITLE_ID, event.title_id)
    async with store.transaction() as tx:
        if not await tx.claim_event(event.event_id, event.SCHEMA_NAME):
            return
        if event.change is ChangeType.DELETED:
            snapshot = None
        elif event.title is None:
            log.warning("TitleChanged %s for %s has no snapshot; ignored", event.event_id, event.title_id)
            return
        else:
            snapshot = event.title
        if not await tx.put_title(event.title_id, event.title_version, snapshot, event.event_time):
            log.debug(
                "TitleChanged %s: %s v%d is not newer", event.event_id, event.title_id, event.title_version
            )


async def on_appliance_health(event: ApplianceHealth, store: PlaybackStore, known: Collection[str]) -> None:
    if event.appliance_id not in known:
        log.info(
            "ignoring ApplianceHealth %s for undeclared appliance %r", event.event_id, event.appliance_id
        )
        return
    async with store.transaction() as tx:
        if await tx.claim_event(event.event_id, event.SCHEMA_NAME):
            await tx.put_health(
                event.appliance_id, event.healthy, event.load, event.reported_at, event.event_time
            )


async def on_appliance_contents(
    event: ApplianceContents, store: PlaybackStore, known: Collection[str]
) -> None:
    """A full snapshot replaces what is known (titles changed by a later delta excepted); a delta adds
    ``title_ids`` and removes ``removed_title_ids``. Per title, the latest change wins."""
    if event.appliance_id not in known:
        log.info(
            "ignoring ApplianceContents %s for undeclared appliance %r", event.event_id, event.appliance_id
        )
        return
    at = event.event_time
    async with store.transaction() as tx:
        if not await tx.claim_event(event.event_id, event.SCHEMA_NAME):
            return
        await tx.mark_titles(event.appliance_id, event.title_ids, True, at)
        if event.full_snapshot:
            await tx.drop_titles_not_in(event.appliance_id, event.title_ids, at)
        else:
            removed = [t for t in event.removed_title_ids if t not in set(event.title_ids)]
            await tx.mark_titles(event.appliance_id, removed, False, at)


# -- commands ------------------------------------------------------------------------------------


def caller_account(claims: Claims) -> uuid.UUID | None:
    try:
        return uuid.UUID(claims.account_id)
    except ValueError:
        return None


def device_type(claimed: str) -> DeviceType:
    name = claimed.strip().upper().replace("-", "_").replace(" ", "_")
    aliases = {"BROWSER": "DESKTOP_BROWSER", "WEB": "DESKTOP_BROWSER", "DESKTOP": "DESKTOP_BROWSER",
               "PHONE": "MOBILE", "CONSOLE": "GAME_CONSOLE", "STICK": "STREAMING_STICK",
               "STB": "SET_TOP_BOX"}  # fmt: skip
    name = aliases.get(name, name)
    return DeviceType(name) if name in DeviceType.__members__ else DeviceType.UNKNOWN


def watched_since(session: Session, position_ms: int, now: datetime, stalled_ms: int = 0) -> int:
    """Content played since the previous report: how far the playhead moved forward, but never more
    than the wall-clock time that passed minus the time spent stalled (a seek forward is not
    watching; a seek back adds nothing)."""
    advanced = position_ms - session.last_position_ms
    if advanced <= 0:
        return 0
    elapsed = int((now - session.last_report_at).total_seconds() * 1000)
    return max(0, min(advanced, elapsed - stalled_ms))


async def start_session(
    command: StartSession, claims: Claims, client: IPAddress | None, deps: Playback
) -> StartedSession:
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(command.profile_id))
    span.set_attribute(ATTR_TITLE_ID, command.title_id)
    span.set_attribute(ATTR_ACCOUNT_ID, claims.account_id)
    now = deps.clock()
    async with deps.store.transaction() as tx:
        owner = await tx.profile_owner(command.profile_id)
        if owner is None:
            raise ApiError(404, f"no profile {command.profile_id}", field="profile_id")
        if owner != caller_account(claims):
            raise ApiError(403, "the profile belongs to another account", field="profile_id")
        decision = entitlement.decide(await tx.entitlement(owner), now)
        if not decision.entitled:
            raise Refused(403, f"not entitled to play: {decision.message}", reason=decision.reason or "")
        title = await tx.title(command.title_id)
        if title is None:
            raise ApiError(404, f"no title {command.title_id!r}", field="title_id")
        if command.position_ms > title.runtime_ms:
            message = f"position_ms {command.position_ms} is past the title's runtime ({title.runtime_ms} ms)"
            raise ApiError(422, message, field="position_ms")
        if not title.ladder_kbps:
            raise ApiError(409, f"title {title.title_id!r} has no encoded renditions yet", "title_id")
        states = await tx.appliance_states([a.id for a in deps.appliances], title.title_id)
        candidates = steer(client, title.title_id, deps.appliances, states, deps.manifest_max_urls)
        if not candidates:
            where = f"client {client}" if client is not None else "the client"
            raise Refused(
                503,
                f"no healthy Open Connect appliance holds title {title.title_id!r} for {where}, "
                "neither in its ISP nor at an exchange point; try again later",
                reason="no_appliance",
                code="unavailable",
            )
        session_id = uuid.uuid4()
        span.set_attribute(ATTR_SESSION_ID, str(session_id))
        first = candidates[0]
        session = Session(
            session_id=session_id,
            account_id=owner,
            profile_id=command.profile_id,
            title_id=title.title_id,
            runtime_ms=title.runtime_ms,
            appliance_id=first.appliance.id,
            cdn_url=first.url,
            client_ip="" if client is None else str(client),
            started_at=now,
            heartbeats=0,
            last_position_ms=command.position_ms,
            last_report_at=now,
            watched_ms=0,
        )
        await tx.insert_session(session)
        await tx.publish(
            PLAYBACK_EVENTS,
            str(session_id),
            SessionStarted(
                event_time=now,
                session_id=session_id,
                account_id=owner,
                profile_id=command.profile_id,
                title_id=title.title_id,
                device_type=device_type(claims.device_type),
                client_ip=session.client_ip,
                appliance_id=first.appliance.id,
                cdn_url=first.url,
                initial_bitrate_kbps=title.ladder_kbps[0],  # start at the lowest rung; ABR climbs
                position_ms=command.position_ms,
                title_duration_ms=title.runtime_ms,
                ladder_kbps=list(title.ladder_kbps),  # for the ABR service's decisions
            ),
        )
    return StartedSession(
        session_id=session_id,
        cdn=[c.url for c in candidates],
        ladder_kbps=list(title.ladder_kbps),
        appliance_ids=[c.appliance.id for c in candidates],
    )


def _owned_session(tx_session: Session | None, session_id: uuid.UUID, claims: Claims) -> Session:
    if tx_session is None:
        raise ApiError(404, f"no playback session {session_id}", field="session_id")
    if tx_session.account_id != caller_account(claims):
        raise ApiError(403, "the session belongs to another account", field="session_id")
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(tx_session.profile_id))
    span.set_attribute(ATTR_TITLE_ID, tx_session.title_id)
    return tx_session


def _check_position(session: Session, position_ms: int, margin_ms: int) -> None:
    limit = session.runtime_ms + margin_ms
    if position_ms > limit:
        raise ApiError(
            422,
            f"position_ms {position_ms} is past the title's runtime ({session.runtime_ms} ms) "
            f"plus the {margin_ms} ms margin",
            field="position_ms",
        )


async def record_heartbeat(
    session_id: uuid.UUID, report: HeartbeatReport, claims: Claims, deps: Playback
) -> int:
    """Record a progress report; the heartbeat's per-session sequence number (from 1)."""
    trace.get_current_span().set_attribute(ATTR_SESSION_ID, str(session_id))
    now = deps.clock()
    async with deps.store.transaction() as tx:
        session = _owned_session(await tx.session(session_id, for_update=True), session_id, claims)
        if session.stopped_at is not None:
            raise ApiError(409, f"playback session {session_id} was stopped", field="session_id")
        _check_position(session, report.position_ms, deps.position_margin_ms)
        watched = watched_since(session, report.position_ms, now, report.rebuffer_ms)
        updated = replace(
            session,
            heartbeats=session.heartbeats + 1,
            last_position_ms=report.position_ms,
            last_report_at=now,
            watched_ms=session.watched_ms + watched,
        )
        await tx.save_progress(updated)
        await tx.publish(
            PLAYBACK_EVENTS,
            str(session_id),
            Heartbeat(
                event_time=now,
                session_id=session_id,
                profile_id=session.profile_id,
                title_id=session.title_id,
                sequence=updated.heartbeats,
                position_ms=report.position_ms,
                bitrate_kbps=report.bitrate_kbps,
                buffer_ms=report.buffer_ms,
                throughput_kbps=report.throughput_kbps,
                rebuffer_ms=report.rebuffer_ms,
            ),
        )
    return updated.heartbeats


async def stop_session(
    session_id: uuid.UUID, command: StopSession, claims: Claims, deps: Playback
) -> Stopped:
    """Stop the session. Idempotent: stopping a stopped session changes and publishes nothing."""
    trace.get_current_span().set_attribute(ATTR_SESSION_ID, str(session_id))
    now = deps.clock()
    async with deps.store.transaction() as tx:
        session = _owned_session(await tx.session(session_id, for_update=True), session_id, claims)
        if session.stopped_at is not None:
            return Stopped(session_id, already_stopped=True)
        _check_position(session, command.position_ms, deps.position_margin_ms)
        updated = replace(
            session,
            last_position_ms=command.position_ms,
            last_report_at=now,
            watched_ms=session.watched_ms + watched_since(session, command.position_ms, now),
            stopped_at=now,
            stop_position_ms=command.position_ms,
        )
        await tx.save_progress(updated)
        await tx.publish(
            PLAYBACK_EVENTS,
            str(session_id),
            SessionStopped(
                event_time=now,
                session_id=session_id,
                profile_id=session.profile_id,
                title_id=session.title_id,
                position_ms=command.position_ms,
                reason=StopReason.USER_STOPPED,
                watched_ms=updated.watched_ms,
            ),
        )
    return Stopped(session_id, already_stopped=False)
