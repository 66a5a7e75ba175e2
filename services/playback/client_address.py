"""The client's address: the connection's peer, or, when the peer is a trusted proxy, the right-most
address of ``X-Forwarded-For`` that is not itself a trusted proxy. Pure.

Walking from the right means a client cannot spoof its address by sending its own
``X-Forwarded-For``: only the hops appended by trusted proxies are believed. An entry that is not an
IP address stops the walk at the last trusted hop (what appended it cannot be believed either).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def parse_address(text: str | None) -> IPAddress | None:
    """An address from a peer name or a forwarded hop: ports, brackets and zones are dropped; an
    IPv4-mapped IPv6 address is its IPv4 address. None when it is not an address."""
    if not text:
        return None
    value = text.strip().strip('"')
    if value.startswith("["):  # [v6]:port
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    value = value.split("%", 1)[0]  # fe80::1%eth0
    try:
        address = ip_address(value)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(address: IPAddress, trusted: Sequence[Network]) -> bool:
    return any(address in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> IPAddress | None:
    """The address steering uses. ``forwarded_for`` holds every ``X-Forwarded-For`` header value."""
    current = parse_address(peer)
    if current is None or not is_trusted(current, trusted):
        return current
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return current
        if not is_trusted(address, trusted):
            return address
        current = address
    return current
