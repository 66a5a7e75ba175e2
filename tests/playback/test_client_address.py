"""Unit tests of the client address rule (pure)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from services.playback.client_address import client_address, parse_address

LOOPBACK = (ip_network("127.0.0.1/32"), ip_network("::1/128"))
PROXIES = (*LOOPBACK, ip_network("10.0.0.0/8"))


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    assert client_address("203.0.113.5", ["198.51.100.7"], LOOPBACK) == ip_address("203.0.113.5")


def test_a_trusted_peer_passes_on_the_right_most_untrusted_address() -> None:
    assert client_address("127.0.0.1", ["198.51.100.7"], LOOPBACK) == ip_address("198.51.100.7")
    # the client forged the first entry; the right-most one was appended by the trusted proxy
    assert client_address("127.0.0.1", ["6.6.6.6, 198.51.100.7"], LOOPBACK) == ip_address("198.51.100.7")


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    xff = ["6.6.6.6, 198.51.100.7, 10.1.2.3", "10.9.9.9"]
    assert client_address("127.0.0.1", xff, PROXIES) == ip_address("198.51.100.7")


def test_only_trusted_hops_gives_the_left_most_of_them() -> None:
    assert client_address("127.0.0.1", ["10.1.1.1, 10.2.2.2"], PROXIES) == ip_address("10.1.1.1")
    assert client_address("127.0.0.1", [], PROXIES) == ip_address("127.0.0.1")


def test_an_unparsable_hop_stops_at_the_last_trusted_one() -> None:
    assert client_address("127.0.0.1", ["198.51.100.7, unknown"], LOOPBACK) == ip_address("127.0.0.1")
    assert client_address("127.0.0.1", ["garbage, 10.0.0.1"], PROXIES) == ip_address("10.0.0.1")


def test_ipv6_and_ports_and_mapped_addresses() -> None:
    assert client_address("::1", ["2001:db8:100::42"], LOOPBACK) == ip_address("2001:db8:100::42")
    assert client_address("::1", ["[2001:db8::1]:4711"], LOOPBACK) == ip_address("2001:db8::1")
    assert client_address("::ffff:127.0.0.1", ["198.51.100.7:80"], LOOPBACK) == ip_address("198.51.100.7")
    assert parse_address("fe80::1%eth0") == ip_address("fe80::1")
    assert parse_address(None) is None and parse_address("") is None and parse_address("x") is None
    assert client_address(None, ["198.51.100.7"], LOOPBACK) is None
