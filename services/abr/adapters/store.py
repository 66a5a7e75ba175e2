"""The ABR read model in Redis (the EVCache role): one hash per session, written only by this service.

``<prefix>:session:<session_id>`` holds

- ``info``: what SessionStarted said (owner, title, ladder, duration) as JSON;
- ``stopped``: set once SessionStopped was seen;
- ``heartbeat_at``: the last heartbeat's time (ms), for the interval of the next heartbeat's sample;
- ``track``: the player state the decisions come from (:class:`~services.abr.session.Track`);
- ``decision``: the latest decision, as JSON; what ``GET /v1/sessions/{id}/abr-decision`` returns;
- ``dropped:<reason>``: how many of the session's samples were dropped, per reason.

Every write refreshes the hash's TTL. ``track`` and ``decision`` change together in one
``MULTI``/``EXEC`` under ``WATCH``, so two consumers briefly sharing a partition during a rebalance
cannot interleave their read-modify-writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from services.abr.session import Track


@dataclass(frozen=True)
class SessionInfo:
    account_id: str
    profile_id: str
    title_id: str
    ladder_kbps: tuple[int, ...]
    duration_ms: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "account_id": self.account_id,
                "profile_id": self.profile_id,
                "title_id": self.title_id,
                "ladder_kbps": list(self.ladder_kbps),
                "duration_ms": self.duration_ms,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> SessionInfo:
        doc = json.loads(raw)
        return cls(
            account_id=doc["account_id"],
            profile_id=doc["profile_id"],
            title_id=doc["title_id"],
            ladder_kbps=tuple(int(b) for b in doc["ladder_kbps"]),
            duration_ms=int(doc["duration_ms"]),
        )


@dataclass(frozen=True)
class SessionView:
    info: SessionInfo | None
    stopped: bool
    heartbeat_at_ms: int | None
    decision: dict[str, Any] | None


# What one step of a session's state machine returns: the new track and the decision to store (None:
# keep the last one).
Step = Callable[[SessionInfo, Track], tuple[Track, dict[str, Any] | None]]


class SessionStore:
    def __init__(self, redis: Redis, prefix: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl_seconds

    def key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    async def started(self, session_id: str, info: SessionInfo) -> None:
        """Idempotent: a redelivered SessionStarted writes the same info again."""
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "info", info.to_json())
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def stopped(self, session_id: str) -> None:
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "stopped", "1")
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def view(self, session_id: str) -> SessionView:
        info, stopped, heartbeat_at, decision = await self.redis.hmget(
            self.key(session_id), ["info", "stopped", "heartbeat_at", "decision"]
        )
        return SessionView(
            info=SessionInfo.from_json(info) if info is not None else None,
            stopped=stopped is not None,
            heartbeat_at_ms=int(heartbeat_at) if heartbeat_at is not None else None,
            decision=json.loads(decision) if decision is not None else None,
        )

    async def heartbeat_seen(self, session_id: str, at_ms: int) -> None:
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, "heartbeat_at", str(at_ms))
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def apply(self, session_id: str, step: Step) -> tuple[Track, dict[str, Any] | None]:
        """Run ``step`` on the session's info and track and store what it returns, atomically.
        ``step`` may raise to change nothing. ``KeyError`` when the session has no info."""
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    info_raw, track_raw = await pipe.hmget(key, ["info", "track"])
                    if info_raw is None:
                        raise KeyError(session_id)
                    track = Track.from_json(json.loads(track_raw)) if track_raw is not None else Track()
                    new_track, decision = step(SessionInfo.from_json(info_raw), track)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, "track", json.dumps(new_track.to_json()))
                    if decision is not None:
                        pipe.hset(key, "decision", json.dumps(decision))
                    pipe.expire(key, self.ttl)
                    await pipe.execute()
                    return new_track, decision
                except WatchError:
                    continue  # someone else wrote the session meanwhile: read it again

    async def count_drop(self, session_id: str, reason: str) -> None:
        """Count a dropped sample on its (known) session: ``dropped:<reason>``, for operators asking
        why a session got no decision."""
        key = self.key(session_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, f"dropped:{reason}", 1)
            pipe.expire(key, self.ttl)
            await pipe.execute()

    async def answers(self) -> bool:
        return bool(await self.redis.ping())
