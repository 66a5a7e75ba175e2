"""HTTP conventions every service follows: JSON errors naming the field, bounded bodies, no 5xx for
bad input, and W3C trace context continued from the caller (SERVER spans) and passed on (CLIENT)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import ClientSession, web
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from pydantic import BaseModel, ValidationError

log = logging.getLogger("reelbus.http")

MAX_BODY_BYTES = 64 * 1024
M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error the client caused or must know about: rendered as JSON with its status."""

    def __init__(self, status: int, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.code = code or {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                             409: "conflict", 413: "too_large", 415: "unsupported_media_type",
                             422: "invalid", 429: "rate_limited"}.get(status, "error")  # fmt: skip


def error_body(status: int, message: str, field: str | None = None, code: str = "error") -> dict[str, Any]:
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    return body


async def parse_body(request: web.Request, model: type[M]) -> M:
    """The request's JSON body as ``model``, or an ``ApiError`` naming the offending field."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"body is larger than {MAX_BODY_BYTES} bytes")
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, f"expected application/json, got {request.content_type}", field="Content-Type")
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{field}: {first['msg']}" if field else first["msg"], field=field) from None


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}", field=name)
    return value


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError and aiohttp's HTTP errors as JSON; an unexpected exception is a 500 with no details."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(error_body(exc.status, exc.message, exc.field, exc.code), status=exc.status)
    except web.HTTPRequestEntityTooLarge:
        message = f"body is larger than {MAX_BODY_BYTES} bytes"
        return web.json_response(error_body(413, message, code="too_large"), status=413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return web.json_response(error_body(exc.status, exc.reason, code=code), status=exc.status)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(error_body(500, "internal error", code="internal"), status=500)


UNTRACED = frozenset({"/livez", "/readyz", "/metrics"})

_tracers: dict[str, trace.Tracer] = {}


def _tracer(name: str) -> trace.Tracer:
    """The provider's tracer, looked up once (the SDK's ``get_tracer`` builds a new one, with a
    deprecation check, on every call); a proxy, before a provider is installed, is not kept."""
    found = _tracers.get(name)
    if found is None:
        found = trace.get_tracer(name)
        if not isinstance(found, trace.ProxyTracer):
            _tracers[name] = found
    return found


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span per request, child of the caller's ``traceparent``."""
    if request.path in UNTRACED:
        return await handler(request)
    tracer = _tracer("reelbus.http")
    parent = propagate.extract(dict(request.headers))
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else request.path
    with tracer.start_as_current_span(
        f"{request.method} {route}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path, "http.route": route},
    ) as span:
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        return response


def trace_headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers for an outgoing request that continue the current trace."""
    headers = dict(extra or {})
    propagate.inject(headers)
    return headers


async def traced_request(
    session: ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """One outgoing request in a CLIENT span, trace context injected."""
    tracer = _tracer("reelbus.http.client")
    with tracer.start_as_current_span(
        f"{method} {url.split('?', maxsplit=1)[0]}", kind=SpanKind.CLIENT
    ) as span:
        async with session.request(method, url, headers=trace_headers(headers), data=data) as resp:
            body = await resp.read()
            span.set_attribute("http.response.status_code", resp.status)
            return resp.status, body, dict(resp.headers)
