"""A stand-in upstream in the test process: records what the gateway forwards and echoes it back.

Only for what a real service cannot show: the exact headers, query and body the gateway passes on,
and an upstream that never answers (for the 504).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import free_port


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StubUpstream:
    url: str
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def stub_upstream() -> AsyncIterator[StubUpstream]:
    port = free_port()
    stub = StubUpstream(f"http://127.0.0.1:{port}")

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        stub.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        if request.path.endswith("/hang"):
            await stub.release.wait()  # never answers within the gateway's timeout
        if request.path.endswith("/teapot"):
            return web.json_response({"error": "teapot", "message": "short and stout"}, status=418)
        doc: dict[str, Any] = {
            "method": request.method,
            "path_qs": request.raw_path,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
        }
        return web.json_response(doc, headers={"Set-Cookie": "session=leak", "X-Internal": "secret"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield stub
    finally:
        stub.release.set()
        await runner.cleanup()
