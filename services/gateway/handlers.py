"""The gateway's logic: who is asking (for the rate limit), what to pass on, and the forwarding.

Plain functions of their inputs and dependencies; ``app.py`` turns aiohttp requests into them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address

from services.gateway.adapters.ratelimit import Limit, RateLimiter
from services.gateway.adapters.upstream import Answer, Upstreams
from services.gateway.settings import Network

# Request headers passed on to the services (trace context is added by the CLIENT span).
FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "Idempotency-Key")
# Response headers passed back to the client.
RETURNED_HEADERS = (
    "Content-Type",
    "Retry-After",
    "WWW-Authenticate",
    "Location",
    "Cache-Control",
    "ETag",
    "Idempotent-Replayed",
)


@dataclass(frozen=True)
class Inbound:
    """What the gateway takes from a client's request."""

    method: str
    path_qs: str  # the raw path and query, as the client sent them
    headers: Mapping[str, str]
    forwarded_for: Sequence[str]  # the X-Forwarded-For values the request came with
    peer: str  # the connection's address
    body: bytes | None


class RateLimited(Exception):
    def __init__(self, who: str, retry_after_ms: int) -> None:
        self.retry_after_seconds = max(1, math.ceil(retry_after_ms / 1000))
        super().__init__(f"too many requests for this {who}; retry in {self.retry_after_seconds}s")


def forwarded_for_chain(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def client_address(forwarded_for: Iterable[str], peer: str, trusted: Sequence[Network]) -> str:
    """The peer, or, when the peer is a trusted proxy, the rightmost address in ``X-Forwarded-For``
    that is not one."""
    hops = [*forwarded_for_chain(forwarded_for), peer]
    for hop in reversed(hops):
        try:
            address = ip_address(hop)
        except ValueError:
            return hop  # not an address: nobody trusted wrote it
        if not any(address in net for net in trusted):
            return hop
    return hops[0]


def upstream_headers(inbound: Inbound) -> dict[str, str]:
    """The headers to pass on: the allowed ones, and ``X-Forwarded-For`` with the peer appended."""
    headers = {name: inbound.headers[name] for name in FORWARDED_HEADERS if name in inbound.headers}
    headers["X-Forwarded-For"] = ", ".join([*forwarded_for_chain(inbound.forwarded_for), inbound.peer])
    return headers


def returned_headers(answer: Answer) -> dict[str, str]:
    lower = {k.lower(): v for k, v in answer.headers.items()}
    return {name: lower[name.lower()] for name in RETURNED_HEADERS if name.lower() in lower}


async def admit(identity: str, who: str, limit: Limit, *, limiter: RateLimiter) -> None:
    """Count the request against ``identity``'s window; ``RateLimited`` once it is full."""
    decision = await limiter.hit(identity, limit)
    if not decision.allowed:
        raise RateLimited(who, decision.retry_after_ms)


async def forward(upstream: str, inbound: Inbound, *, upstreams: Upstreams) -> Answer:
    """Send the request on; the answer comes back as the service gave it (``UpstreamFailed`` when
    there is none)."""
    return await upstreams.send(
        upstream, inbound.method, inbound.path_qs, upstream_headers(inbound), inbound.body
    )
