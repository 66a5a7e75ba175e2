"""Requests to the upstream services: one shared session, trace context passed on, failures named."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from services.bus.http import traced_request


class UpstreamFailed(Exception):
    """The upstream could not answer: 502 (unreachable, broken), 503 (not configured), 504 (timeout)."""

    def __init__(self, status: int, upstream: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.upstream = upstream
        self.message = message


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]


def new_session(max_connections: int, timeout: float, connect_timeout: float) -> aiohttp.ClientSession:
    """One session for all upstreams. No cookie jar: a cookie one client's request brought back must
    never ride along on another client's request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections),
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
    )


class Upstreams:
    def __init__(self, session: aiohttp.ClientSession, base_urls: Mapping[str, str | None]) -> None:
        self.session = session
        self.base_urls = dict(base_urls)

    async def send(
        self, upstream: str, method: str, path_qs: str, headers: Mapping[str, str], body: bytes | None
    ) -> Answer:
        base = self.base_urls.get(upstream)
        if base is None:
            raise UpstreamFailed(503, upstream, f"the {upstream} service is not configured")
        try:
            status, data, answer_headers = await traced_request(
                self.session, method, base + path_qs, headers=headers, data=body
            )
        except TimeoutError:
            raise UpstreamFailed(504, upstream, f"the {upstream} service did not answer in time") from None
        except aiohttp.ClientConnectorError:
            raise UpstreamFailed(502, upstream, f"the {upstream} service is unreachable") from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(
                502, upstream, f"the {upstream} service failed to answer ({type(exc).__name__})"
            ) from None
        return Answer(status, data, answer_headers)
