"""Sliding-window rate limits in Redis: one sorted set per identity, checked and updated atomically
by a Lua script that reads Redis's own clock (so gateway replicas need not agree on the time)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("reelbus.gateway.ratelimit")

SLIDING_WINDOW = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = redis.call('ZCARD', key)
if used < limit then
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window)
  return {1, limit - used - 1, 0}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, 0, tonumber(oldest[2]) + window - now}
"""


@dataclass(frozen=True)
class Limit:
    requests: int
    window_seconds: float


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after_ms: int


class RateLimiter:
    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self.redis = redis
        self.key_prefix = key_prefix
        self._script = redis.register_script(SLIDING_WINDOW)

    async def hit(self, identity: str, limit: Limit) -> Decision:
        """Count one request for ``identity``. When Redis does not answer, the request is let through
        (and logged): an outage of the limiter must not take the whole API down."""
        try:
            allowed, remaining, retry_ms = await self._script(
                keys=[f"{self.key_prefix}:{identity}"],
                args=[limit.requests, int(limit.window_seconds * 1000), uuid.uuid4().hex],
            )
        except (RedisError, OSError) as exc:
            log.warning("rate limiter unavailable (%r); letting the request through", exc)
            return Decision(True, limit.requests, 0)
        return Decision(bool(allowed), int(remaining), int(retry_ms))
