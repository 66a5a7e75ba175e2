"""Zipkin's query API: the recent traces of one service."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp


class ZipkinUnavailable(Exception):
    pass


class Zipkin:
    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def recent_traces(
        self, service: str, limit: int, lookback_seconds: float
    ) -> list[Sequence[Mapping[str, Any]]]:
        """``GET /api/v2/traces``: a list of traces, each a list of spans (Zipkin v2 JSON)."""
        params = {
            "serviceName": service.lower(),  # Zipkin stores service names lower-cased
            "limit": str(limit),
            "lookback": str(int(lookback_seconds * 1000)),
        }
        try:
            async with self.session.get(f"{self.base_url}/api/v2/traces", params=params) as resp:
                if resp.status != 200:
                    raise ZipkinUnavailable(f"Zipkin answered {resp.status}")
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
            raise ZipkinUnavailable(f"Zipkin at {self.base_url} is unreachable ({reason})") from exc
        if not isinstance(body, list):
            raise ZipkinUnavailable("Zipkin's answer is not a list of traces")
        return [t for t in body if isinstance(t, list)]
