"""Unit tests of the gateway's pure logic and its OpenAPI description (no infrastructure)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import yaml
from multidict import CIMultiDict

from services.gateway.adapters.upstream import Answer
from services.gateway.handlers import Inbound, client_address, returned_headers, upstream_headers
from services.gateway.routes import PUBLIC_ROUTES, ROUTES
from services.gateway.settings import Settings

OPENAPI = Path(__file__).resolve().parents[2] / "services" / "gateway" / "openapi.yaml"
METHODS = {"get", "post", "put", "patch", "delete"}


def inbound(headers: dict[str, str], forwarded_for: list[str], peer: str = "192.0.2.1") -> Inbound:
    return Inbound("GET", "/v1/x", CIMultiDict(headers), forwarded_for, peer, None)


def test_only_the_listed_headers_are_passed_on_and_the_peer_is_appended() -> None:
    sent = upstream_headers(
        inbound(
            {"authorization": "Bearer t", "Idempotency-Key": "k", "Cookie": "c", "Host": "evil"},
            ["203.0.113.7", "198.51.100.2, 10.0.0.1"],
        )
    )
    assert sent == {
        "Authorization": "Bearer t",
        "Idempotency-Key": "k",
        "X-Forwarded-For": "203.0.113.7, 198.51.100.2, 10.0.0.1, 192.0.2.1",
    }


def test_the_client_address_believes_only_trusted_proxies() -> None:
    lb = (ip_network("10.0.0.0/8"),)
    assert client_address(["203.0.113.7"], "198.51.100.9", lb) == "198.51.100.9"
    assert client_address(["1.1.1.1, 203.0.113.7"], "10.1.2.3", lb) == "203.0.113.7"
    assert client_address(["203.0.113.7, 10.9.9.9"], "10.1.2.3", lb) == "203.0.113.7"
    assert client_address([], "10.1.2.3", lb) == "10.1.2.3"


def test_only_safe_response_headers_come_back() -> None:
    answer = Answer(429, b"{}", {"content-type": "application/json", "retry-after": "3", "Set-Cookie": "x=1"})
    assert returned_headers(answer) == {"Content-Type": "application/json", "Retry-After": "3"}


def test_every_route_names_a_configured_upstream() -> None:
    settings = Settings(
        accounts_url="http://a:1/",
        catalog_url="http://c:1",
        playback_url="http://p:1",
        history_url="http://h:1",
    )
    assert settings.accounts_url == "http://a:1"
    assert {r.upstream for r in ROUTES} == set(settings.upstreams())


def pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", pattern)
    out = ""
    for part in parts:
        if part.startswith("{"):
            _, _, rx = part[1:-1].partition(":")
            out += f"(?:{rx or '[^/]+'})"
        else:
            out += re.escape(part)
    return re.compile(out)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_the_openapi_file_describes_the_public_api_through_the_route_table() -> None:
    doc = yaml.safe_load(OPENAPI.read_text())
    assert doc["openapi"].startswith("3.1")
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]
    paths: dict[str, Any] = doc["paths"]
    expected = {
        ("post", "/v1/accounts"),
        ("post", "/v1/auth/login"),
        ("post", "/v1/accounts/{account_id}/profiles"),
        ("get", "/v1/accounts/{account_id}/profiles"),
        ("get", "/v1/catalog/titles"),
        ("get", "/v1/catalog/titles/{title_id}"),
        ("post", "/v1/playback/sessions"),
        ("post", "/v1/playback/sessions/{session_id}/heartbeats"),
        ("post", "/v1/playback/sessions/{session_id}/stop"),
        ("get", "/v1/profiles/{profile_id}/history"),
        ("post", "/v1/billing/subscriptions"),
        ("post", "/v1/billing/subscriptions/{subscription_id}/cancel"),
        ("post", "/v1/billing/refunds"),
        ("get", "/v1/billing/accounts/{account_id}"),
    }
    described = {(m, p) for p, ops in paths.items() for m in ops if m in METHODS}
    assert expected <= described
    regexes = [pattern_regex(r.pattern) for r in ROUTES]
    for method, path in described:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        assert any(rx.fullmatch(concrete) for rx in regexes), f"{path} is not in the route table"
        operation = paths[path][method]
        public = (method.upper(), path) in PUBLIC_ROUTES
        assert (operation.get("security") == []) == public, f"{method} {path}: security"
        if not public:
            assert "401" in operation["responses"], f"{method} {path} documents no 401"
        assert {"429", "502"} <= set(operation["responses"]), f"{method} {path}"
    for ref in set(refs(doc)):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref
    assert set(doc["components"]["schemas"]["Error"]["properties"]) == {"error", "message", "field"}
