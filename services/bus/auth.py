"""Zero-trust request verification: short-lived Ed25519-signed access tokens (JWT, ``EdDSA``).

The accounts service holds the private key and issues tokens; every service, the gateway included,
holds the public key and verifies each request itself (signature, expiry, audience, issuer), so a
request that bypasses the gateway is still checked. ``reelbus up`` creates the key pair under
``.reelbus/keys/``.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ISSUER = "reelbus-accounts"
AUDIENCE = "reelbus"
ALGORITHM = "EdDSA"


class TokenError(Exception):
    """The token is missing or not acceptable; ``reason`` says why, for the 401 body."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Claims:
    account_id: str
    device_id: str
    device_type: str
    expires_at: int
    token_id: str
    scopes: tuple[str, ...] = ()


def generate_key_pair(directory: Path) -> tuple[Path, Path]:
    """Write ``token-signing.pem`` (private, 0600) and ``token-signing.pub.pem`` unless they exist."""
    private_path = directory / "token-signing.pem"
    public_path = directory / "token-signing.pub.pem"
    if private_path.exists() and public_path.exists():
        return private_path, public_path
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


class TokenIssuer:
    def __init__(self, key: Ed25519PrivateKey, ttl_seconds: int = 900, audience: str = AUDIENCE) -> None:
        self.key = key
        self.ttl_seconds = ttl_seconds
        self.audience = audience

    def issue(self, account_id: str, device_id: str, device_type: str, scopes: Iterable[str] = ()) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": self.audience,
            "sub": account_id,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_seconds,
            "jti": str(uuid.uuid4()),
            "device_id": device_id,
            "device_type": device_type,
            "scope": " ".join(scopes),
        }
        return jwt.encode(claims, self.key, algorithm=ALGORITHM)


class TokenVerifier:
    """Verifies access tokens. A token that verified is remembered (the exact token string, signature
    included, in a bounded LRU) until its expiry plus the leeway, so a client's next requests with the
    same token skip the signature check and claim parsing; any other string, a tampered one included,
    is verified in full, and an expired token is refused as before. Failures are not remembered."""

    def __init__(
        self,
        key: Ed25519PublicKey,
        audience: str = AUDIENCE,
        leeway_seconds: int = 5,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.cache_size = cache_size
        self.clock = clock
        self._verified: OrderedDict[str, tuple[float, Claims]] = OrderedDict()

    def verify(self, token: str) -> Claims:
        cached = self._verified.get(token)
        if cached is not None:
            valid_until, claims = cached
            if self.clock() < valid_until:  # what jwt accepts: now < exp + leeway
                self._verified.move_to_end(token)
                return claims
            del self._verified[token]
        claims = self._verify(token)
        if self.cache_size > 0:
            self._verified[token] = (claims.expires_at + self.leeway_seconds, claims)
            if len(self._verified) > self.cache_size:
                self._verified.popitem(last=False)
        return claims

    def _verify(self, token: str) -> Claims:
        try:
            raw: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=ISSUER,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iat", "sub", "aud", "iss", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("access token expired") from None
        except jwt.InvalidAudienceError:
            raise TokenError("access token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("access token has an unknown issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenError("access token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"access token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"access token is malformed: {exc}") from None
        return Claims(
            account_id=str(raw["sub"]),
            device_id=str(raw.get("device_id", "")),
            device_type=str(raw.get("device_type", "")),
            expires_at=int(raw["exp"]),
            token_id=str(raw["jti"]),
            scopes=tuple(str(raw.get("scope", "")).split()),
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALWAYS_PUBLIC = frozenset({"/livez", "/readyz", "/metrics"})


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise TokenError("missing Authorization header (expected 'Bearer <access token>')")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("Authorization header must be 'Bearer <access token>'")
    return token.strip()


def auth_middleware(verifier: TokenVerifier, public: Iterable[tuple[str, str]] = ()) -> Any:
    """Verify the bearer token on every request except the probes and the ``(method, path)`` pairs
    listed in ``public`` (sign-up and login, say). Claims land in ``request["claims"]``."""
    open_routes = set(public)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ALWAYS_PUBLIC or (request.method, request.path) in open_routes:
            return await handler(request)
        try:
            request["claims"] = verifier.verify(bearer_token(request))
        except TokenError as exc:
            return web.json_response(
                {"error": "unauthorized", "message": exc.reason, "field": "Authorization"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="reelbus"'},
            )
        return await handler(request)

    return middleware


def claims_of(request: web.Request) -> Claims:
    claims = request.get("claims")
    if not isinstance(claims, Claims):
        raise web.HTTPUnauthorized(text="no verified claims on this request")
    return claims
