"""Steering: which Open Connect appliances a client streams a title from, best first. Pure.

Candidates, in order:

1. the *embedded* tier: appliances inside the client's ISP, those whose declared prefixes contain the
   client address, the longest matching prefix first (then the least loaded, then by id);
2. the *exchange-point* (ixp) tier: appliances at internet exchange points, which serve anyone, least
   loaded first (then by id). It is the fallback when the embedded tier has nothing to offer, and
   the tail of the list otherwise, so a client that fails over walks down from its ISP to the IXP.

An appliance is skipped when it is not known to be healthy (unhealthy, or no health report yet) or
not known to hold the title (no contents report yet counts as not holding it). The manifest lists
at most ``limit`` URLs, ``{base_url}/titles/{title_id}/``; an empty list means nothing can serve it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal
from urllib.parse import quote

from services.playback.appliances import Appliance

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class ApplianceState:
    """What the projections know about one appliance, for one title."""

    healthy: bool = False  # False too when no health report arrived yet
    load: float = 0.0
    holds_title: bool = False  # False too when no contents report arrived yet


@dataclass(frozen=True)
class Candidate:
    appliance: Appliance
    tier: Literal["embedded", "ixp"]
    url: str
    prefix_length: int | None = None  # the matching prefix, for the embedded tier


def title_url(appliance: Appliance, title_id: str) -> str:
    return f"{appliance.base_url.rstrip('/')}/titles/{quote(title_id, safe='')}/"


def matching_prefix_length(appliance: Appliance, client: IPAddress | None) -> int | None:
    """The longest of the appliance's prefixes that contains ``client``, or None."""
    if client is None:
        return None
    lengths = [net.prefixlen for net in appliance.prefixes if client in net]
    return max(lengths) if lengths else None


def steer(
    client: IPAddress | None,
    title_id: str,
    appliances: Sequence[Appliance],
    states: Mapping[str, ApplianceState],
    limit: int = 3,
) -> list[Candidate]:
    """The appliances to offer for ``title_id`` to ``client``, in preference order, at most ``limit``."""

    def usable(appliance: Appliance) -> ApplianceState | None:
        state = states.get(appliance.id)
        return state if state is not None and state.healthy and state.holds_title else None

    embedded: list[tuple[tuple[int, float, str], Candidate]] = []
    exchange: list[tuple[tuple[float, str], Candidate]] = []
    for appliance in appliances:
        state = usable(appliance)
        if state is None:
            continue
        url = title_url(appliance, title_id)
        if appliance.kind == "embedded":
            length = matching_prefix_length(appliance, client)
            if length is not None:
                candidate = Candidate(appliance, "embedded", url, length)
                embedded.append(((-length, state.load, appliance.id), candidate))
        else:
            exchange.append(((state.load, appliance.id), Candidate(appliance, "ixp", url)))
    ordered = [c for _, c in sorted(embedded, key=lambda item: item[0])]
    ordered += [c for _, c in sorted(exchange, key=lambda item: item[0])]
    return ordered[:limit]
