"""Unit tests of the appliances file."""

from __future__ import annotations

import json
from ipaddress import ip_network
from pathlib import Path

import pytest

from services.playback.appliances import ApplianceConfigError, load_appliances, parse_appliances

EXAMPLE = Path(__file__).resolve().parents[2] / "services" / "playback" / "appliances.example.yaml"


def test_the_example_file_loads() -> None:
    appliances = load_appliances(EXAMPLE)
    kinds = {a.id: a.kind for a in appliances}
    assert kinds["oca-isp1-lax-01"] == "embedded" and kinds["oca-ix-lax-01"] == "ixp"
    first = appliances[0]
    assert ip_network("2001:db8:100::/48") in first.prefixes
    assert first.base_url == "https://oca-isp1-lax-01.isp1.example.net"


def test_json_works_too(tmp_path: Path) -> None:
    path = tmp_path / "appliances.json"
    doc = {"appliances": [{"id": "ix", "base_url": "http://ix.example.net/", "kind": "ixp", "site": "ams"}]}
    path.write_text(json.dumps(doc))
    (only,) = load_appliances(path)
    assert only.site == "ams" and only.base_url == "http://ix.example.net"


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"id": "a", "base_url": "https://a", "kind": "embedded", "prefixes": []}, "prefixes"),
        ({"id": "a", "base_url": "https://a", "kind": "embedded", "prefixes": ["10.0.0.1/8"]}, "prefixes"),
        ({"id": "a", "base_url": "https://a", "kind": "ixp"}, "site"),
        ({"id": "a", "base_url": "https://a", "kind": "satellite", "site": "x"}, "kind"),
        ({"id": "a", "base_url": "ftp://a", "kind": "ixp", "site": "x"}, "base_url"),
    ],
)
def test_a_bad_entry_is_named(entry: dict[str, object], complaint: str) -> None:
    with pytest.raises(ApplianceConfigError) as err:
        parse_appliances({"appliances": [entry]})
    assert "appliances.0" in str(err.value) and complaint in str(err.value)


def test_duplicate_ids_and_missing_files_are_refused(tmp_path: Path) -> None:
    twice = {"id": "a", "base_url": "https://a", "kind": "ixp", "site": "x"}
    with pytest.raises(ApplianceConfigError, match="declared twice"):
        parse_appliances({"appliances": [twice, twice]})
    with pytest.raises(ApplianceConfigError, match="cannot read"):
        load_appliances(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("appliances: [\n")
    with pytest.raises(ApplianceConfigError, match="not valid YAML"):
        load_appliances(bad)
