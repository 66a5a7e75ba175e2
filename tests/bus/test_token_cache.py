"""The token verifier's cache: a verified token is remembered until its expiry (plus the leeway) and
never stands in for any other string."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.bus.auth import TokenError, TokenIssuer, TokenVerifier


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    key = Ed25519PrivateKey.generate()
    token = TokenIssuer(key, ttl_seconds=60).issue("account-1", "device-1", "TV")
    clock = Clock()
    verifier = TokenVerifier(key.public_key(), leeway_seconds=5, clock=clock)
    claims = verifier.verify(token)
    assert verifier.verify(token) is claims  # from the cache
    clock.now = claims.expires_at + 4.9
    assert verifier.verify(token) is claims
    clock.now = claims.expires_at + 5  # jwt refuses from exp + leeway on: the cache lets jwt decide
    assert verifier.verify(token) is not claims


def test_an_expired_token_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    token = TokenIssuer(key, ttl_seconds=-60).issue("account-1", "device-1", "TV")
    verifier = TokenVerifier(key.public_key())
    for _ in range(2):
        with pytest.raises(TokenError, match="expired"):
            verifier.verify(token)


def test_a_tampered_token_is_verified_in_full() -> None:
    key = Ed25519PrivateKey.generate()
    token = TokenIssuer(key).issue("account-1", "device-1", "TV")
    verifier = TokenVerifier(key.public_key())
    verifier.verify(token)
    head, payload, signature = token.split(".")
    tampered = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"
    with pytest.raises(TokenError):
        verifier.verify(tampered)
    other = TokenIssuer(Ed25519PrivateKey.generate()).issue("account-1", "device-1", "TV")
    with pytest.raises(TokenError, match="signature"):
        verifier.verify(other)


def test_the_cache_is_bounded() -> None:
    key = Ed25519PrivateKey.generate()
    issuer = TokenIssuer(key)
    verifier = TokenVerifier(key.public_key(), cache_size=3)
    tokens = [issuer.issue(f"account-{i}", "device", "TV") for i in range(5)]
    for token in tokens:
        verifier.verify(token)
    assert list(verifier._verified) == tokens[2:]
