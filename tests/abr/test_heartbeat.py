"""Through the gateway, with the real playback and ABR services: a heartbeat's answer carries the
session's current ABR decision, from the ABR read model (null before there is one)."""

from __future__ import annotations

from typing import Any

import aiohttp

from services.bus.auth import TokenIssuer
from services.cli.infra import Layout
from tests.abr.conftest import StartAbr
from tests.conftest import SpawnService, unique, wait_for
from tests.playback.conftest import (
    StartPlayback,
    World,
    appliance,
    contents,
    health,
    new_viewer,
    running,
    status_is,
    title_created,
)


async def test_heartbeat_answers_carry_the_abr_decision(
    start_abr: StartAbr,
    start_playback: StartPlayback,
    world: World,
    spawn_service: SpawnService,
    bus_infra: Layout,
    token_issuer: TokenIssuer,
    http: aiohttp.ClientSession,
) -> None:
    abr = await start_abr(ABR_ALGORITHM="bba")
    ixp = appliance("ixp")
    playback = start_playback([ixp])
    await running(playback, http)
    nowhere = "http://127.0.0.1:9"
    gateway = spawn_service(
        "services.gateway",
        "GATEWAY_",
        GATEWAY_ACCOUNTS_URL=nowhere,
        GATEWAY_CATALOG_URL=nowhere,
        GATEWAY_PLAYBACK_URL=playback.url,
        GATEWAY_HISTORY_URL=nowhere,
        GATEWAY_ABR_URL=abr.url,
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{bus_infra.redis_port}/0",
        GATEWAY_REDIS_KEY_PREFIX=unique("test-ratelimit"),
    )
    api = await running(gateway, http)
    viewer = await world.viewer(new_viewer(token_issuer))
    title = unique("tt")
    await world.title(title_created(title))  # ladder 235, 750, 1750, 3000, 5800
    await world.appliance(health(ixp), contents(ixp, [title]))
    session = await api.start_when(viewer, title, status_is(201), "a session", "192.0.2.10")
    session_id = session.body["session_id"]

    first = await api.heartbeat(viewer, session_id, position_ms=4_000, buffer_ms=2_000, bitrate_kbps=750)
    assert first.status == 202 and first.body["sequence"] == 1
    assert "abr" in first.body  # null until the ABR service decided; the heartbeat itself steers it next

    async def answer_with(bitrate: int) -> dict[str, Any] | None:
        beat = await api.heartbeat(viewer, session_id, position_ms=4_000, buffer_ms=2_000, bitrate_kbps=750)
        assert beat.status == 202
        abr_part = beat.body["abr"]
        return beat.body if abr_part is not None and abr_part["bitrate_kbps"] == bitrate else None

    # the heartbeats alone: 2 s of buffer is below BBA's reservoir, so the lowest rung
    low = await wait_for(lambda: answer_with(235), "a heartbeat-driven decision", 30.0, interval=0.1)
    assert low["abr"]["algorithm"] == "bba" and low["abr"]["decided_at"].endswith("Z")

    # the player's own chunk telemetry: 20 s of buffer, BBA's top rung; heartbeats no longer steer
    sample = {
        "sequence": 1,
        "interval_start": low["abr"]["decided_at"],
        "interval_ms": 1200,
        "throughput_kbps": 9000.0,
        "buffer_s": 20.0,
        "bitrate_kbps": 750,
        "chunk_index": 1,
        "download_s": 1.2,
    }
    posted = await api.call(f"/v1/sessions/{session_id}/telemetry", sample, viewer.headers)
    assert posted.status == 202, posted.body
    high = await wait_for(lambda: answer_with(5800), "the player-driven decision", 30.0, interval=0.1)
    assert high["abr"]["algorithm"] == "bba"
    again = await api.heartbeat(viewer, session_id, position_ms=8_000, buffer_ms=1_000, bitrate_kbps=750)
    assert again.body["abr"]["bitrate_kbps"] == 5800
