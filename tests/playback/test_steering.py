"""Unit tests of the steering function (pure)."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from services.playback.appliances import Appliance
from services.playback.steering import ApplianceState, steer, title_url

TITLE = "tt0042"

ISP = Appliance("isp", "https://isp.example.net", "embedded", (ip_network("198.51.100.0/24"),))
ISP_WIDE = Appliance("isp-wide", "https://wide.example.net", "embedded", (ip_network("198.51.0.0/16"),))
ISP_V6 = Appliance(
    "isp-v6",
    "https://v6.example.net",
    "embedded",
    (ip_network("2001:db8:100::/48"), ip_network("203.0.113.0/24")),
)
OTHER_ISP = Appliance("other", "https://other.example.net", "embedded", (ip_network("192.0.2.0/24"),))
IXP_A = Appliance("ix-a", "https://ix-a.example.net/", "ixp", site="lax")
IXP_B = Appliance("ix-b", "https://ix-b.example.net", "ixp", site="sjc")
ALL = (ISP_WIDE, IXP_B, ISP, IXP_A, ISP_V6, OTHER_ISP)

OK = ApplianceState(healthy=True, load=0.5, holds_title=True)


def ids(client: str | None, states: dict[str, ApplianceState], limit: int = 10) -> list[str]:
    address = ip_address(client) if client is not None else None
    return [c.appliance.id for c in steer(address, TITLE, ALL, states, limit)]


def all_ok(**changes: ApplianceState) -> dict[str, ApplianceState]:
    states = {a.id: OK for a in ALL}
    states.update({k.replace("_", "-"): v for k, v in changes.items()})
    return states


def test_the_longest_matching_prefix_comes_first_then_the_exchange_points() -> None:
    assert ids("198.51.100.7", all_ok()) == ["isp", "isp-wide", "ix-a", "ix-b"]
    assert ids("198.51.7.7", all_ok()) == ["isp-wide", "ix-a", "ix-b"], "only the /16 contains it"


def test_the_manifest_holds_at_most_the_limit() -> None:
    assert ids("198.51.100.7", all_ok(), limit=3) == ["isp", "isp-wide", "ix-a"]
    assert ids("198.51.100.7", all_ok(), limit=1) == ["isp"]


def test_ipv6_clients_match_ipv6_prefixes_only() -> None:
    assert ids("2001:db8:100::42", all_ok()) == ["isp-v6", "ix-a", "ix-b"]
    assert ids("2001:db8:200::1", all_ok()) == ["ix-a", "ix-b"]
    assert ids("203.0.113.9", all_ok()) == ["isp-v6", "ix-a", "ix-b"], "the same appliance serves v4 too"


def test_an_unknown_prefix_gets_the_exchange_points() -> None:
    assert ids("100.64.0.1", all_ok()) == ["ix-a", "ix-b"]
    assert ids(None, all_ok()) == ["ix-a", "ix-b"], "no client address: exchange points only"


def test_an_unhealthy_embedded_appliance_falls_back_to_the_next_then_the_exchange_point() -> None:
    sick = ApplianceState(healthy=False, load=0.1, holds_title=True)
    assert ids("198.51.100.7", all_ok(isp=sick)) == ["isp-wide", "ix-a", "ix-b"]
    assert ids("198.51.100.7", all_ok(isp=sick, isp_wide=sick)) == ["ix-a", "ix-b"]


def test_an_appliance_without_the_title_is_skipped() -> None:
    lacks = ApplianceState(healthy=True, load=0.1, holds_title=False)
    assert ids("198.51.100.7", all_ok(isp=lacks, isp_wide=lacks)) == ["ix-a", "ix-b"]
    assert ids("198.51.100.7", all_ok(isp=lacks, ix_a=lacks)) == ["isp-wide", "ix-b"]


def test_no_report_yet_counts_as_neither_healthy_nor_holding() -> None:
    states = all_ok()
    del states["isp"]  # nothing known about it at all
    states["isp-wide"] = ApplianceState(healthy=True, load=0.0)  # healthy, no contents report yet
    assert ids("198.51.100.7", states) == ["ix-a", "ix-b"]


def test_empty_contents_everywhere_means_no_appliance() -> None:
    empty = ApplianceState(healthy=True, load=0.0, holds_title=False)
    assert ids("198.51.100.7", {a.id: empty for a in ALL}) == []
    assert ids("198.51.100.7", {}) == []


def test_least_loaded_first_within_a_tier() -> None:
    busy = ApplianceState(healthy=True, load=0.9, holds_title=True)
    idle = ApplianceState(healthy=True, load=0.1, holds_title=True)
    assert ids("100.64.0.1", all_ok(ix_a=busy, ix_b=idle)) == ["ix-b", "ix-a"]
    # the prefix length decides before the load does
    assert ids("198.51.100.7", all_ok(isp=busy, isp_wide=idle))[:2] == ["isp", "isp-wide"]


def test_urls_point_at_the_title_on_each_appliance() -> None:
    chosen = steer(ip_address("198.51.100.7"), TITLE, ALL, all_ok(), 3)
    assert [c.url for c in chosen] == [
        "https://isp.example.net/titles/tt0042/",
        "https://wide.example.net/titles/tt0042/",
        "https://ix-a.example.net/titles/tt0042/",
    ]
    assert [c.tier for c in chosen] == ["embedded", "embedded", "ixp"]
    assert chosen[0].prefix_length == 24
    assert title_url(IXP_B, "a/b c") == "https://ix-b.example.net/titles/a%2Fb%20c/"
