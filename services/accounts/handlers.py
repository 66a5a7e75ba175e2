"""The accounts business logic: one plain async function per command, given its dependencies.

The HTTP layer (``app.py``) parses and authenticates; these functions decide. Errors the caller
must see are :class:`ApiError` (a 4xx naming the field) or :class:`Throttled`.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from opentelemetry import trace
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from services.accounts.adapters.db import (
    AccountsStore,
    NoSuchAccount,
    OutboxEvent,
    Profile,
    ProfileLimitReached,
)
from services.accounts.adapters.outbox import current_trace_context, to_payload
from services.accounts.passwords import Passwords
from services.bus.auth import Claims, TokenIssuer
from services.bus.events import ProfileCreated
from services.bus.http import ApiError
from services.bus.tracing import ATTR_ACCOUNT_ID, ATTR_PROFILE_ID

log = logging.getLogger("reelbus.accounts")

PROFILES_TOPIC = "accounts.profiles"
MAX_PASSWORD_LENGTH = 1024  # bounds the hashing work a request can ask for
BAD_CREDENTIALS = "email or password is incorrect"

_LOCAL = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
EMAIL = re.compile(rf"^{_LOCAL}@(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{1,59}})$")


def normalise_email(value: str) -> str:
    """Trimmed and lower-cased; a ``ValueError`` unless it looks like ``name@domain.tld``."""
    email = value.strip().lower()
    local, _, _ = email.partition("@")
    if len(email) > 254 or len(local) > 64 or not EMAIL.fullmatch(email):
        raise ValueError("not a valid email address")
    return email


Email = Annotated[str, StringConstraints(max_length=320), AfterValidator(normalise_email)]
Password = Annotated[str, StringConstraints(max_length=MAX_PASSWORD_LENGTH)]


class SignUp(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)

    email: Email
    password: Password


class LogIn(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)

    email: Email
    password: Password
    device_id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
    device_type: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$"),
    ]


class CreateProfile(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]
    kids: bool = False


@dataclass(frozen=True)
class Session:
    access_token: str
    expires_in: int
    account_id: uuid.UUID


class Throttled(Exception):
    """Too many recent failed logins for this email."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed logins")
        self.retry_after_seconds = max(1, math.ceil(retry_after))


@dataclass(frozen=True)
class LoginPolicy:
    max_failures: int
    window_seconds: float


# -- commands ----------------------------------------------------------------------------------


async def sign_up(
    cmd: SignUp, *, store: AccountsStore, passwords: Passwords, min_password_length: int
) -> uuid.UUID:
    if len(cmd.password) < min_password_length:
        raise ApiError(422, f"password: must be at least {min_password_length} characters", field="password")
    account_id = uuid.uuid4()
    password_hash = await passwords.hash(cmd.password)
    if not await store.insert_account(account_id, cmd.email, password_hash):
        raise ApiError(409, "an account with this email already exists", field="email")
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, str(account_id))
    return account_id


async def log_in(
    cmd: LogIn,
    *,
    store: AccountsStore,
    passwords: Passwords,
    issuer: TokenIssuer,
    policy: LoginPolicy,
    client: str,
) -> Session:
    wait = await store.throttled_for(cmd.email, policy.max_failures, policy.window_seconds)
    if wait is not None:
        log.warning("login throttled from %s", client)
        raise Throttled(wait)
    found = await store.credentials(cmd.email)
    if found is None:
        await passwords.verify_decoy(cmd.password)
        ok = False
    else:
        ok = await passwords.verify(found.password_hash, cmd.password)
    if not ok or found is None:
        await store.record_failure(cmd.email, policy.window_seconds)
        log.warning("failed login from %s", client)
        raise ApiError(401, BAD_CREDENTIALS, code="invalid_credentials")
    await store.clear_failures(cmd.email)
    if passwords.needs_rehash(found.password_hash):
        await store.replace_password_hash(found.account_id, await passwords.hash(cmd.password))
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, str(found.account_id))
    token = issuer.issue(str(found.account_id), cmd.device_id, cmd.device_type)
    return Session(token, issuer.ttl_seconds, found.account_id)


def owned_account(raw_account_id: str, claims: Claims) -> uuid.UUID:
    """The path's account id, if the token's account is that account (403 otherwise)."""
    try:
        account_id = uuid.UUID(raw_account_id)
    except ValueError:
        raise ApiError(400, "account_id must be a UUID", field="account_id") from None
    if str(account_id) != claims.account_id:
        raise ApiError(403, "the access token's account does not own this account", field="account_id")
    trace.get_current_span().set_attribute(ATTR_ACCOUNT_ID, str(account_id))
    return account_id


async def create_profile(
    account_id: uuid.UUID,
    cmd: CreateProfile,
    *,
    idempotency_key: str | None,
    store: AccountsStore,
    max_profiles: int,
    wake_relay: Callable[[], None],
) -> tuple[Profile, bool]:
    """Create a profile and, in the same transaction, its ``ProfileCreated`` event in the outbox.
    Returns the profile and whether an earlier request with the same idempotency key made it."""
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise ApiError(400, "Idempotency-Key must be 1 to 255 characters", field="Idempotency-Key")
    now = dt.datetime.now(dt.UTC)
    profile = Profile(uuid.uuid4(), account_id, cmd.name, cmd.kids, now)
    event = ProfileCreated(
        account_id=account_id,
        profile_id=profile.profile_id,
        name=profile.name,
        kids=profile.kids,
        event_time=now.replace(microsecond=now.microsecond // 1000 * 1000),
    )
    try:
        result = await store.create_profile(
            profile,
            limit=max_profiles,
            idempotency_key=idempotency_key,
            event=OutboxEvent(
                topic=PROFILES_TOPIC,
                key=str(account_id),
                event_type=ProfileCreated.SCHEMA_NAME,
                event_id=event.event_id,
                payload=to_payload(event),
                trace_context=current_trace_context(),
            ),
        )
    except ProfileLimitReached as exc:
        raise ApiError(
            409, f"an account has at most {exc.limit} profiles", code="profile_limit_reached"
        ) from None
    except NoSuchAccount:
        raise ApiError(404, "no such account", field="account_id") from None
    if not result.replayed:
        wake_relay()
    trace.get_current_span().set_attribute(ATTR_PROFILE_ID, str(result.profile.profile_id))
    return result.profile, result.replayed


async def list_profiles(account_id: uuid.UUID, *, store: AccountsStore) -> list[Profile]:
    return await store.profiles(account_id)
