"""Unit tests of the accounts service's pure logic (no infrastructure)."""

from __future__ import annotations

import uuid
from ipaddress import ip_network

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from pydantic import ValidationError

from services.accounts.adapters.outbox import DECODERS, to_payload
from services.accounts.app import client_address
from services.accounts.handlers import CreateProfile, LogIn, SignUp, normalise_email
from services.bus.events import ProfileCreated


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("  Ada@Example.COM ", "ada@example.com"),
        ("first.last+tag@sub.example.co.uk", "first.last+tag@sub.example.co.uk"),
        ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
    ],
)
def test_emails_are_trimmed_and_lower_cased(raw: str, normal: str) -> None:
    assert normalise_email(raw) == normal


@pytest.mark.parametrize(
    "raw",
    ["", "plain", "@example.com", "a@", "a@b", "a@@b.com", "a b@c.com", ".a@b.com", "a..b@c.com", "a@-b.com",
     "a@b.c", "a\n@b.com", "x" * 65 + "@b.com"],
)  # fmt: skip
def test_malformed_emails_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="not a valid email"):
        normalise_email(raw)


def test_bodies_are_strict_about_types() -> None:
    with pytest.raises(ValidationError) as info:
        CreateProfile.model_validate({"name": "Kid", "kids": "true"})
    assert info.value.errors()[0]["loc"] == ("kids",)
    with pytest.raises(ValidationError):
        SignUp.model_validate({"email": "a@b.co", "password": 1234567890})
    with pytest.raises(ValidationError) as info:
        LogIn.model_validate({"email": "a@b.co", "password": "p", "device_id": "d", "device_type": "t v"})
    assert info.value.errors()[0]["loc"] == ("device_type",)
    assert CreateProfile.model_validate({"name": "  Kid  "}).name == "Kid"


def test_the_outbox_payload_gives_back_the_same_event() -> None:
    event = ProfileCreated(account_id=uuid.uuid4(), profile_id=uuid.uuid4(), name="Kid", kids=True)
    assert DECODERS[ProfileCreated.SCHEMA_NAME](to_payload(event)) == event


def request_from(peer: str, forwarded_for: str | None) -> web.Request:
    headers = CIMultiDict({"X-Forwarded-For": forwarded_for} if forwarded_for else {})
    return make_mocked_request("GET", "/", headers=headers, transport=_Transport(peer))


class _Transport:
    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 4242) if name == "peername" else default


def test_x_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    gateway = (ip_network("10.0.0.0/8"),)
    spoofed = request_from("198.51.100.9", "203.0.113.7")
    assert client_address(spoofed, gateway) == "198.51.100.9"
    proxied = request_from("10.0.0.5", "1.2.3.4, 203.0.113.7")
    assert client_address(proxied, gateway) == "203.0.113.7"
    chained = request_from("10.0.0.5", "203.0.113.7, 10.0.0.6")
    assert client_address(chained, gateway) == "203.0.113.7"
    assert client_address(proxied, ()) == "10.0.0.5"
