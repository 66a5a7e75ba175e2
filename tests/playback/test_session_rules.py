"""Unit tests of the small pure rules of sessions and of the outbox codec."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from services.bus.events import DeviceType, Heartbeat, SessionStarted
from services.playback.adapters.db import Session, decode_outbox_event, encode_outbox_event
from services.playback.handlers import device_type, watched_since

T0 = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)


def session(position_ms: int = 60_000) -> Session:
    return Session(
        session_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        profile_id=uuid.uuid4(),
        title_id="tt1",
        runtime_ms=5_400_000,
        appliance_id="oca",
        cdn_url="https://oca/titles/tt1/",
        client_ip="198.51.100.7",
        started_at=T0,
        heartbeats=0,
        last_position_ms=position_ms,
        last_report_at=T0,
        watched_ms=0,
    )


def test_watched_time_is_the_forward_progress_bounded_by_the_wall_clock() -> None:
    s = session()
    assert watched_since(s, 90_000, T0 + timedelta(seconds=30)) == 30_000
    assert watched_since(s, 90_000, T0 + timedelta(seconds=30), stalled_ms=5_000) == 25_000
    assert watched_since(s, 600_000, T0 + timedelta(seconds=30)) == 30_000, "a seek forward is not watching"
    assert watched_since(s, 10_000, T0 + timedelta(seconds=30)) == 0, "a seek back adds nothing"


def test_device_types_from_the_token() -> None:
    assert device_type("tv") is DeviceType.TV
    assert device_type("browser") is DeviceType.DESKTOP_BROWSER
    assert device_type("game-console") is DeviceType.GAME_CONSOLE
    assert device_type("toaster") is DeviceType.UNKNOWN
    assert device_type("") is DeviceType.UNKNOWN


def test_outbox_events_round_trip() -> None:
    started = SessionStarted(
        session_id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        profile_id=uuid.uuid4(),
        title_id="tt1",
        device_type=DeviceType.TV,
        client_ip="2001:db8::1",
        appliance_id="oca",
        cdn_url="https://oca/titles/tt1/",
        initial_bitrate_kbps=235,
        position_ms=0,
        title_duration_ms=5_400_000,
    )
    beat = Heartbeat(
        session_id=uuid.uuid4(),
        profile_id=uuid.uuid4(),
        title_id="tt1",
        sequence=3,
        position_ms=1,
        bitrate_kbps=2,
        buffer_ms=3,
        throughput_kbps=4,
        rebuffer_ms=5,
    )
    for event in (started, beat):
        payload, _trace = encode_outbox_event(event)
        assert decode_outbox_event(event.SCHEMA_NAME, payload) == event
