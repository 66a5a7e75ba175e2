"""The live ABR service against the real bus and Redis: its decisions are the simulator's for the same
observations, duplicates and late samples change nothing, bad samples are counted and dropped, the
gateway refuses bad telemetry with a 4xx naming the field, and heartbeat answers carry the decision."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from redis.asyncio import Redis

from services.abr.algorithms import make_algorithm
from services.abr.simulator import PENSIEVE_LADDER_KBPS, SYNTHETIC_TRACES, ChunkRecord, load_trace, simulate
from services.bus.auth import TokenIssuer
from services.bus.events import BitrateSample, DeviceType, SessionStarted, SessionStopped, StopReason
from services.bus.producer import Producer
from services.cli.infra import Layout
from tests.abr.conftest import PLAYBACK_EVENTS, TELEMETRY, Abr, StartAbr, TopicReader, read_model
from tests.conftest import SpawnService, unique, wait_for

DURATION_MS = 48 * 4000  # the simulator's video: 48 chunks of 4 s


def now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def started(
    session_id: uuid.UUID,
    account_id: uuid.UUID,
    profile_id: uuid.UUID,
    ladder: tuple[int, ...] = PENSIEVE_LADDER_KBPS,
) -> SessionStarted:
    return SessionStarted(
        event_time=now(),
        session_id=session_id,
        account_id=account_id,
        profile_id=profile_id,
        title_id="tt-abr",
        device_type=DeviceType.TV,
        client_ip="192.0.2.10",
        appliance_id="oca-test-1",
        cdn_url="https://oca-test-1.example/manifest.mpd",
        initial_bitrate_kbps=ladder[0],
        position_ms=0,
        title_duration_ms=DURATION_MS,
        ladder_kbps=list(ladder),
    )


def chunk_sample(session_id: uuid.UUID, profile_id: uuid.UUID, record: ChunkRecord) -> BitrateSample:
    """What a player that saw ``record`` reports (sequence = chunk index + 1)."""
    return BitrateSample(
        event_time=now(),
        session_id=session_id,
        profile_id=profile_id,
        title_id="tt-abr",
        interval_start=now() - timedelta(seconds=record.download_s),
        interval_ms=max(1, round(record.download_s * 1000)),
        throughput_kbps=round(record.throughput_kbps),
        buffer_ms=round(record.buffer_s * 1000),
        selected_bitrate_kbps=record.bitrate_kbps,
        rebuffer_ms=round(record.rebuffer_s * 1000),
        sequence=record.index + 1,
        source="player",
        chunk_index=record.index,
        download_s=record.download_s,
        throughput_exact_kbps=record.throughput_kbps,
        buffer_s=record.buffer_s,
    )


async def decision_for(redis: Redis, abr: Abr, session_id: uuid.UUID, chunk: int) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        decision = (await read_model(redis, abr, str(session_id))).get("decision")
        return decision if decision is not None and decision["chunk_index"] == chunk else None

    found: dict[str, Any] = await wait_for(probe, f"the decision for chunk {chunk}", 30.0, interval=0.0)
    return found


async def counted(abr: Abr, name: str, value: float, **labels: str) -> None:
    """The service-wide counter reached ``value``. At least: the topics are the declared, shared ones,
    so other tests' sessions may be counted too; exact counts are per session, in the read model."""

    async def probe() -> bool:
        return await asyncio.to_thread(abr.metric, name, **labels) >= value

    await wait_for(probe, f"{name}{labels} to reach {value}", 30.0, interval=0.05)


async def dropped(redis: Redis, abr: Abr, session_id: uuid.UUID, reason: str, value: int) -> None:
    """Exactly ``value`` of the session's samples were dropped for ``reason`` (and counted)."""

    async def probe() -> bool:
        model = await read_model(redis, abr, str(session_id))
        return int(model.get(f"dropped:{reason}", 0)) >= value

    await wait_for(probe, f"{value} {reason} samples of {session_id}", 30.0, interval=0.05)
    assert (await read_model(redis, abr, str(session_id)))[f"dropped:{reason}"] == value
    await counted(abr, "abr_dropped_samples", value, reason=reason)


async def session_known(redis: Redis, abr: Abr, session_id: uuid.UUID) -> None:
    """SessionStarted (on playback.events) reached the read model. Samples sent straight to
    telemetry.bitrate, another topic, could otherwise be consumed first and dropped as
    unknown_session (the telemetry route itself refuses a session it does not know)."""

    async def known() -> bool:
        return "info" in await read_model(redis, abr, str(session_id))

    await wait_for(known, "the session to reach the read model", 30.0, interval=0.05)


async def test_live_decisions_equal_the_simulators_and_replays_change_nothing(
    start_abr: StartAbr, bus: Producer, redis: Redis
) -> None:
    trace = load_trace(SYNTHETIC_TRACES / "drop-8-to-0.6mbps-at-60s")
    for name in ("bba", "bola", "robustmpc"):  # one service at a time: each reads the shared topics
        abr = await start_abr(ABR_ALGORITHM=name)
        result = simulate(trace, make_algorithm(name))
        session, account, profile = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await bus.send(PLAYBACK_EVENTS, str(session), started(session, account, profile))
        await session_known(redis, abr, session)
        samples = [chunk_sample(session, profile, record) for record in result.records]
        live: list[int] = []
        for k in range(len(samples) - 1):
            await bus.send(TELEMETRY, str(session), samples[k])
            if k >= 1:  # a late sample and a replayed one (new event id, same sequence): no effect
                await bus.send(TELEMETRY, str(session), samples[k - 1])
                await bus.send(TELEMETRY, str(session), replace(samples[k], event_id=uuid.uuid4()))
            decision = await decision_for(redis, abr, session, k + 1)
            assert decision["algorithm"] == name
            assert decision["bitrate_kbps"] == PENSIEVE_LADDER_KBPS[decision["rung"]]
            live.append(decision["rung"])
        assert live == list(result.rungs[1:]), name
        assert len(set(live)) > 1, "the trace's drop makes every algorithm switch"
        await counted(abr, "abr_decisions", 47, algorithm=name)
        await dropped(redis, abr, session, "out_of_order", 46)
        await dropped(redis, abr, session, "duplicate", 46)
        # the very same record delivered twice (a redelivery): ignored as well
        await bus.send(TELEMETRY, str(session), samples[46])
        await dropped(redis, abr, session, "duplicate", 47)
        assert (await read_model(redis, abr, str(session)))["decision"]["chunk_index"] == 47
        abr.process.proc.terminate()
        assert await asyncio.to_thread(abr.process.proc.wait, 20) == 0


async def test_bad_unknown_and_stopped_samples_are_counted_and_dropped(
    start_abr: StartAbr, bus: Producer, redis: Redis
) -> None:
    abr = await start_abr(ABR_ALGORITHM="bba")
    result = simulate(load_trace(SYNTHETIC_TRACES / "constant-high-10mbps"), make_algorithm("bba"))
    record = result.records[3]
    stranger = uuid.uuid4()
    await bus.send(TELEMETRY, str(stranger), chunk_sample(stranger, uuid.uuid4(), record))
    await counted(abr, "abr_dropped_samples", 1, reason="unknown_session")
    assert await read_model(redis, abr, str(stranger)) == {}

    session, profile = uuid.uuid4(), uuid.uuid4()
    await bus.send(PLAYBACK_EVENTS, str(session), started(session, uuid.uuid4(), profile))
    await session_known(redis, abr, session)
    good = chunk_sample(session, profile, record)
    bad = [
        ("invalid", replace(good, throughput_kbps=-5, throughput_exact_kbps=None)),
        ("invalid", replace(good, buffer_s=1e9)),
        ("invalid", replace(good, download_s=-1.0)),
        ("future", replace(good, interval_start=now() + timedelta(hours=2))),
    ]
    for _, sample in bad:
        await bus.send(TELEMETRY, str(session), sample)
    await dropped(redis, abr, session, "invalid", 3)
    await dropped(redis, abr, session, "future", 1)
    assert "decision" not in await read_model(redis, abr, str(session))
    await bus.send(TELEMETRY, str(session), good)
    decision = await decision_for(redis, abr, session, 4)
    # BBA reads only the buffer and the last rung, which one sample gives: the simulator's next rung
    assert decision["rung"] == result.rungs[4]

    await bus.send(
        PLAYBACK_EVENTS,
        str(session),
        SessionStopped(
            session_id=session,
            profile_id=profile,
            title_id="tt-abr",
            position_ms=16_000,
            reason=StopReason.USER_STOPPED,
            watched_ms=16_000,
        ),
    )

    async def stopped() -> bool:
        return "stopped" in await read_model(redis, abr, str(session))

    await wait_for(stopped, "the stop to reach the read model", 30.0, interval=0.05)
    await bus.send(TELEMETRY, str(session), replace(good, event_id=uuid.uuid4(), sequence=9, chunk_index=8))
    await dropped(redis, abr, session, "session_stopped", 1)
    assert (await read_model(redis, abr, str(session)))["decision"]["chunk_index"] == 4


def telemetry_body(**changes: Any) -> dict[str, Any]:
    start = now() - timedelta(seconds=2)
    body: dict[str, Any] = {
        "sequence": 1,
        "interval_start": start.isoformat().replace("+00:00", "Z"),
        "interval_ms": 1500,
        "throughput_kbps": 6400.5,
        "buffer_s": 18.25,
        "bitrate_kbps": 1200,
        "rebuffer_ms": 0,
        "chunk_index": 0,
        "download_s": 1.5,
    }
    body.update(changes)
    return body


async def test_the_gateway_refuses_bad_telemetry_naming_the_field_and_publishes_nothing(
    start_abr: StartAbr,
    spawn_service: SpawnService,
    bus_infra: Layout,
    bus: Producer,
    redis: Redis,
    token_issuer: TokenIssuer,
    http: aiohttp.ClientSession,
    telemetry: TopicReader,
) -> None:
    abr = await start_abr(ABR_ALGORITHM="bba")
    nowhere = "http://127.0.0.1:9"
    gateway = spawn_service(
        "services.gateway",
        "GATEWAY_",
        GATEWAY_ACCOUNTS_URL=nowhere,
        GATEWAY_CATALOG_URL=nowhere,
        GATEWAY_PLAYBACK_URL=nowhere,
        GATEWAY_HISTORY_URL=nowhere,
        GATEWAY_ABR_URL=abr.url,
        GATEWAY_REDIS_URL=f"redis://127.0.0.1:{bus_infra.redis_port}/0",
        GATEWAY_REDIS_KEY_PREFIX=unique("test-ratelimit"),
    )
    await gateway.wait_ready()
    account, profile, session = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    headers = {"Authorization": f"Bearer {token_issuer.issue(str(account), 'dev-1', 'tv')}"}
    other = {"Authorization": f"Bearer {token_issuer.issue(str(uuid.uuid4()), 'dev-2', 'tv')}"}
    url = f"{gateway.url}/v1/sessions/{session}/telemetry"

    async def post(body: dict[str, Any], who: dict[str, str] = headers, to: str = url) -> tuple[int, Any]:
        async with http.post(to, json=body, headers=who) as resp:
            return resp.status, await resp.json(content_type=None)

    status, body = await post(telemetry_body())
    assert (status, body["field"]) == (404, "session_id"), "a session the service never heard of"
    await bus.send(PLAYBACK_EVENTS, str(session), started(session, account, profile))

    async def known() -> bool:
        return "info" in await read_model(redis, abr, str(session))

    await wait_for(known, "the session to reach the read model", 30.0, interval=0.05)
    cases = [
        (telemetry_body(throughput_kbps=-1), 422, "throughput_kbps"),
        (telemetry_body(throughput_kbps=5e12), 422, "throughput_kbps"),
        (telemetry_body(throughput_kbps="fast"), 422, "throughput_kbps"),
        (telemetry_body(buffer_s=-0.5), 422, "buffer_s"),
        (telemetry_body(buffer_s=86_400), 422, "buffer_s"),
        (telemetry_body(sequence=0), 422, "sequence"),
        (telemetry_body(interval_ms=-10), 422, "interval_ms"),
        (telemetry_body(rebuffer_ms=-1), 422, "rebuffer_ms"),
        (telemetry_body(rebuffer_ms=2000), 422, "rebuffer_ms"),  # more stall than the interval
        (telemetry_body(download_s=0), 422, "download_s"),
        (telemetry_body(bitrate_kbps=1234), 422, "bitrate_kbps"),  # not a rung of the ladder
        (telemetry_body(chunk_index=48), 422, "chunk_index"),  # the title has 48
        (telemetry_body(interval_start=(now() + timedelta(hours=1)).isoformat()), 422, "interval_start"),
        (telemetry_body(interval_start="2026-13-45T00:00:00Z"), 422, "interval_start"),
        (telemetry_body(interval_start=(now() - timedelta(days=3)).isoformat()), 422, "interval_start"),
    ]
    for request, want_status, want_field in cases:
        status, body = await post(request)
        assert (status, body.get("field")) == (want_status, want_field), (request, body)
    status, body = await post(telemetry_body(), who=other)
    assert (status, body["field"]) == (404, "session_id"), "another account's session"
    bad_id = f"{gateway.url}/v1/sessions/not-a-uuid/telemetry"
    status, body = await post(telemetry_body(), to=bad_id)
    assert (status, body["field"]) == (400, "session_id")

    await telemetry.drain()
    assert telemetry.keyed(str(session)) == [], "nothing refused was published"
    assert "track" not in await read_model(redis, abr, str(session))

    status, body = await post(telemetry_body())
    assert status == 202 and body["sequence"] == 1
    decision_url = f"{gateway.url}/v1/sessions/{session}/abr-decision"

    async def decided() -> dict[str, Any] | None:
        async with http.get(decision_url, headers=headers) as resp:
            assert resp.status == 200
            doc: dict[str, Any] = await resp.json()
        return doc["abr"] if doc["abr"] is not None else None

    decision = await wait_for(decided, "a decision", 30.0, interval=0.05)
    assert decision["bitrate_kbps"] == 4300 and decision["algorithm"] == "bba"  # 18.25 s of buffer: top rung
    async with http.get(decision_url, headers=other) as resp:
        assert resp.status == 404
    await telemetry.drain()
    published = telemetry.keyed(str(session))
    assert len(published) == 1
    sample = published[0]
    assert isinstance(sample, BitrateSample)
    assert (sample.source, sample.sequence, sample.chunk_index) == ("player", 1, 0)
    assert (sample.throughput_exact_kbps, sample.throughput_kbps) == (6400.5, 6400)
    assert (sample.buffer_s, sample.buffer_ms, sample.profile_id) == (18.25, 18250, profile)
