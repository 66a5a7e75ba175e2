"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol with aiohttp: started by
pid, one websocket per page, commands answered in order. No browser download, no playwright."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import free_port, wait_for

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1400,1000",
)


class CdpError(RuntimeError):
    pass


@dataclass
class Page:
    """One tab: ``send`` a command and get its result; events are read past and dropped."""

    ws: aiohttp.ClientWebSocketResponse
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def send(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise CdpError(f"{method}: the DevTools socket closed ({msg.type!r})")
                doc = json.loads(msg.data)
                if doc.get("id") != ident:
                    continue  # an event, or the answer to nothing we wait for
                if "error" in doc:
                    raise CdpError(f"{method}: {doc['error']}")
                result: dict[str, Any] = doc.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values only)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")

    async def screenshot(self, path: Path, width: int = 1400) -> int:
        """A PNG of the whole page; returns its size in bytes."""
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=max(600, min(height, 6000)),
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        data = base64.b64decode(shot["data"])
        await asyncio.to_thread(save, path, data)
        return len(data)


def save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def launch(port: int, profile: Path, log: Path) -> subprocess.Popen[bytes]:
    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@dataclass
class Chromium:
    proc: subprocess.Popen[bytes]
    port: int
    profile: Path
    log: Path
    http: aiohttp.ClientSession
    sockets: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)

    @classmethod
    async def start(cls, workdir: Path) -> Chromium:
        port = free_port()
        profile = workdir / "chromium-profile"
        log = workdir / "chromium.log"
        proc = await asyncio.to_thread(launch, port, profile, log)
        browser = cls(proc, port, profile, log, aiohttp.ClientSession())

        async def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                async with browser.http.get(f"http://127.0.0.1:{port}/json/version") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await wait_for(answers, "chromium's DevTools endpoint", 30, 0.2)
        except BaseException:
            await browser.stop()
            raise
        return browser

    async def new_page(self) -> Page:
        async with self.http.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as resp:
            target = await resp.json()
        ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        self.sockets.append(ws)
        return Page(ws)

    async def stop(self) -> None:
        """Close the sockets, then end the browser by its pid (TERM, then KILL)."""
        for ws in self.sockets:
            await ws.close()
        await self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        shutil.rmtree(self.profile, ignore_errors=True)
