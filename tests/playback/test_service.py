"""Playback as a process against the real Kafka, registry and PostgreSQL: the projections fed by
events published with the bus producer, steering, entitlement, sessions, and zero-trust tokens."""

from __future__ import annotations

import asyncio
import secrets
import signal
import urllib.error
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.bus.auth import TokenIssuer
from services.bus.events import (
    CancelReason,
    ChangeType,
    DeclineReason,
    Heartbeat,
    PaymentFailed,
    Plan,
    SessionStarted,
    SessionStopped,
    StopReason,
    SubscriptionCancelled,
    SubscriptionRenewed,
    TitleChanged,
)
from services.cli.infra import Layout
from tests.conftest import http_json, unique, wait_for
from tests.playback.conftest import (
    DAY,
    LADDER,
    RUNTIME_MS,
    PlaybackEvents,
    StartPlayback,
    Viewer,
    World,
    appliance,
    cdn_is,
    contents,
    health,
    new_viewer,
    now,
    running,
    status_is,
    subscription_started,
    title_created,
    title_url,
)

pytestmark = pytest.mark.infra

ISP_CLIENT = "198.51.100.7"
ISP_WIDE_CLIENT = "198.51.77.7"
ISP_V6_CLIENT = "2001:db8:100::42"
ELSEWHERE = "192.0.2.10"


def cancelled(
    viewer: Viewer, at_period_end: bool, effective_in: timedelta, **kw: Any
) -> SubscriptionCancelled:
    at = kw.pop("at", now())
    return SubscriptionCancelled(
        event_time=at,
        account_id=viewer.account_id,
        subscription_id=kw.pop("subscription_id", viewer.subscription_id),
        plan=Plan.STANDARD,
        at_period_end=at_period_end,
        effective_at=at + effective_in,
        reason=CancelReason.USER_REQUESTED,
    )


async def test_steering_prefers_the_isp_appliance_and_falls_back_to_the_exchange_point(
    start_playback: StartPlayback, world: World, token_issuer: TokenIssuer, http: aiohttp.ClientSession
) -> None:
    isp = appliance("embedded", ["198.51.100.0/24", "2001:db8:100::/48"])
    wide = appliance("embedded", ["198.51.0.0/16"])
    ixp = appliance("ixp", site="lax")
    service = start_playback([isp, wide, ixp])
    api = await running(service, http)

    viewer = await world.viewer(new_viewer(token_issuer))
    title = unique("tt")
    await world.title(title_created(title))
    await world.appliance(
        *(health(a) for a in (isp, wide, ixp)), *(contents(a, [title]) for a in (isp, wide, ixp))
    )
    urls = {a["id"]: title_url(a, title) for a in (isp, wide, ixp)}

    every = [urls[isp["id"]], urls[wide["id"]], urls[ixp["id"]]]
    reply = await api.start_when(viewer, title, cdn_is(every), "the ISP client's manifest", ISP_CLIENT)
    assert reply.body["manifest"]["ladder"] == LADDER
    assert (await api.start(viewer, title, ISP_WIDE_CLIENT)).body["manifest"]["cdn"] == every[1:]
    ipv6 = await api.start(viewer, title, ISP_V6_CLIENT)
    assert ipv6.body["manifest"]["cdn"] == [urls[isp["id"]], urls[ixp["id"]]], "IPv6 prefix, then the IXP"
    elsewhere = await api.start(viewer, title, ELSEWHERE)
    assert elsewhere.status == 201 and elsewhere.body["manifest"]["cdn"] == [urls[ixp["id"]]]

    # the ISP's appliance reports unhealthy: the wider one, then the exchange point
    await world.appliance(health(isp, healthy=False))
    await api.start_when(viewer, title, cdn_is(every[1:]), "steering around the sick appliance", ISP_CLIENT)
    # the wider one loses the title (a delta): the exchange-point site alone
    await world.appliance(contents(wide, [], full=False, removed=[title]))
    await api.start_when(viewer, title, cdn_is([urls[ixp["id"]]]), "the exchange point only", ISP_CLIENT)
    # the ISP's appliance is back
    await world.appliance(health(isp, healthy=True))
    back = [urls[isp["id"]], urls[ixp["id"]]]
    await api.start_when(viewer, title, cdn_is(back), "the ISP appliance again", ISP_CLIENT)

    # nothing can serve the title: 503 with a reason (a server condition, not bad input)
    await world.appliance(health(ixp, healthy=False))
    refused = await api.start_when(viewer, title, status_is(503), "no appliance at all", ELSEWHERE)
    assert refused.body["error"] == "unavailable" and refused.body["reason"] == "no_appliance"
    assert title in refused.body["message"]

    missing = await api.start(viewer, unique("tt-nope"), ISP_CLIENT)
    assert missing.status == 404 and missing.body["field"] == "title_id"

    stranger = appliance("ixp")
    await world.appliance(health(stranger))

    def ignored() -> bool:
        return f"undeclared appliance '{stranger['id']}'" in service.output()

    await wait_for(lambda: asyncio.to_thread(ignored), "the log line about the undeclared appliance")


async def test_ready_means_caught_up_and_entitlement_follows_billing(
    start_playback: StartPlayback, world: World, token_issuer: TokenIssuer, http: aiohttp.ClientSession
) -> None:
    """Everything is published before the service starts: once ready, it all shows at once."""
    loop_isp = appliance("embedded", ["127.0.0.0/8"])  # the test's own address: X-Forwarded-For is ignored
    sick = appliance("embedded", ["127.0.0.0/16"])
    keeps = appliance("embedded", ["127.0.0.0/24"])
    ixp = appliance("ixp")
    title = unique("tt")
    gone = unique("tt-gone")
    await world.title(title_created(title), title_created(gone))
    await world.title(
        TitleChanged(title_id=gone, change=ChangeType.DELETED, fields_changed=[], title_version=2),
        title_created(gone, version=1),  # late and older: does not bring the title back
    )
    await world.appliance(
        *(health(a) for a in (loop_isp, ixp)), *(contents(a, [title]) for a in (loop_isp, ixp))
    )
    t = now()
    # late reports (older event_time, published later) never roll an appliance's state back
    await world.appliance(
        replace(health(sick, healthy=False), event_time=t),
        replace(health(sick, healthy=True), event_time=t - timedelta(minutes=1)),
        contents(sick, [title]),
        replace(health(keeps), event_time=t),
        replace(contents(keeps, [title]), event_time=t),
        replace(contents(keeps, [], full=False, removed=[title]), event_time=t - timedelta(minutes=1)),
        replace(contents(keeps, [unique("tt-other")]), event_time=t - timedelta(minutes=2)),
    )

    unsubscribed = await world.viewer(new_viewer(token_issuer), subscribed=False)
    active = await world.viewer(new_viewer(token_issuer))
    cancelled_now = await world.viewer(new_viewer(token_issuer))
    await world.billing(cancelled_now, cancelled(cancelled_now, False, timedelta(0)))
    cancelled_later = await world.viewer(new_viewer(token_issuer))
    await world.billing(cancelled_later, cancelled(cancelled_later, True, 20 * DAY))
    expired = await world.viewer(new_viewer(token_issuer), subscribed=False)
    await world.billing(expired, subscription_started(expired, start=t - 40 * DAY))
    renewed = await world.viewer(new_viewer(token_issuer), subscribed=False)
    await world.billing(
        renewed,
        subscription_started(renewed, start=t - 40 * DAY),
        SubscriptionRenewed(
            event_time=t - 10 * DAY,
            account_id=renewed.account_id,
            subscription_id=renewed.subscription_id,
            plan=Plan.STANDARD,
            charge_id=uuid.uuid4(),
            amount_cents=1599,
            currency="USD",
            period_start=t - 10 * DAY,
            period_end=t + 20 * DAY,
        ),
        cancelled(renewed, False, timedelta(0), at=t - 20 * DAY),  # late: older than the renewal
    )
    unpaid = await world.viewer(new_viewer(token_issuer), subscribed=False)
    await world.billing(
        unpaid,
        subscription_started(unpaid, start=t - 30 * DAY, end=t),
        PaymentFailed(
            event_time=t,
            account_id=unpaid.account_id,
            subscription_id=unpaid.subscription_id,
            charge_id=uuid.uuid4(),
            idempotency_key="renewal-1",
            amount_cents=1599,
            currency="USD",
            period_start=t,
            period_end=t + 30 * DAY,
            decline_reason=DeclineReason.CARD_EXPIRED,
            attempt=1,
            next_retry_at=t + DAY,
        ),
    )
    returning = await world.viewer(new_viewer(token_issuer))
    await world.billing(returning, cancelled(returning, False, timedelta(0), at=t - DAY))
    returning.subscription_id = uuid.uuid4()
    await world.billing(returning, subscription_started(returning, start=t))

    service = start_playback([loop_isp, sick, keeps, ixp], PLAYBACK_TRUSTED_PROXIES="10.0.0.0/8")
    api = await running(service, http)
    readiness = await asyncio.to_thread(http_json, f"{service.url}/readyz")
    assert readiness["checks"]["projections_caught_up"] is True

    expectations: list[tuple[Viewer, int, str | None]] = [
        (unsubscribed, 403, "no_subscription"),
        (active, 201, None),
        (cancelled_now, 403, "cancelled"),
        (cancelled_later, 201, None),
        (expired, 403, "expired"),
        (renewed, 201, None),
        (unpaid, 403, "payment_failed"),
        (returning, 201, None),
    ]
    for viewer, status, reason in expectations:
        reply = await api.start(viewer, title, ISP_CLIENT)
        assert reply.status == status, (reason, reply.body)
        if reason is not None:
            assert reply.body["error"] == "forbidden" and reply.body["reason"] == reason
            assert reason.replace("_", " ").split()[0] in reply.body["message"]
        else:
            cdn = reply.body["manifest"]["cdn"]
            expected = [title_url(keeps, title), title_url(loop_isp, title), title_url(ixp, title)]
            assert cdn == expected, "the peer's prefixes (not X-Forwarded-For's), nothing rolled back"
    gone_reply = await api.start(active, gone)
    assert gone_reply.status == 404 and gone_reply.body["field"] == "title_id"

    # a cancellation now (not at period end) takes access away
    await world.billing(active, cancelled(active, False, timedelta(0)))
    refused = await api.start_when(active, title, status_is(403), "the cancellation to take effect")
    assert refused.body["reason"] == "cancelled" and "cancelled" in refused.body["message"]


async def test_sessions_publish_started_heartbeats_and_stopped_once(
    bus_infra: Layout,
    start_playback: StartPlayback,
    world: World,
    token_issuer: TokenIssuer,
    http: aiohttp.ClientSession,
    playback_events: PlaybackEvents,
) -> None:
    ixp = appliance("ixp")
    service = start_playback([ixp])
    api = await running(service, http)
    viewer = await world.viewer(new_viewer(token_issuer))
    title = unique("tt")
    await world.title(title_created(title))
    await world.appliance(health(ixp), contents(ixp, [title]))
    started = await api.start_when(viewer, title, status_is(201), "a session", ELSEWHERE)
    session_id = started.body["session_id"]

    trace_id = secrets.token_hex(16)
    traced = {**viewer.headers, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    beat = {"position_ms": 30_000, "bitrate_kbps": 750, "buffer_ms": 12_000, "throughput_kbps": 4_000,
            "rebuffer_ms": 0}  # fmt: skip
    first = await api.call(f"/v1/playback/sessions/{session_id}/heartbeats", beat, traced)
    assert first.status == 202 and first.body["sequence"] == 1
    second = await api.heartbeat(viewer, session_id, position_ms=60_000, bitrate_kbps=1750, rebuffer_ms=250)
    assert second.status == 202 and second.body["sequence"] == 2
    stopped = await api.stop(viewer, session_id, position_ms=61_000)
    assert stopped.status == 202 and stopped.body["already_stopped"] is False
    again = await api.stop(viewer, session_id, position_ms=99_000)
    assert again.status == 202 and again.body["already_stopped"] is True, "idempotent"
    late = await api.heartbeat(viewer, session_id)
    assert late.status == 409 and late.body["field"] == "session_id"
    nobody = str(uuid.uuid4())
    assert (await api.heartbeat(viewer, nobody)).status == 404
    assert (await api.stop(viewer, nobody)).status == 404

    events = await playback_events.wait_keyed(session_id, 4, "the session's four events")
    await playback_events.drain()
    events = playback_events.keyed(session_id)
    assert [type(e) for e in events] == [SessionStarted, Heartbeat, Heartbeat, SessionStopped], events
    start_event, hb1, hb2, stop_event = events
    assert isinstance(start_event, SessionStarted)
    assert start_event.profile_id == viewer.profile_id and start_event.account_id == viewer.account_id
    assert start_event.title_id == title and start_event.client_ip == ELSEWHERE
    assert start_event.appliance_id == ixp["id"] and start_event.cdn_url == title_url(ixp, title)
    assert start_event.title_duration_ms == RUNTIME_MS and start_event.initial_bitrate_kbps == LADDER[0]
    assert isinstance(hb1, Heartbeat) and isinstance(hb2, Heartbeat)
    assert (hb1.sequence, hb1.position_ms, hb1.bitrate_kbps) == (1, 30_000, 750)
    assert (hb2.sequence, hb2.position_ms, hb2.rebuffer_ms) == (2, 60_000, 250)
    assert isinstance(stop_event, SessionStopped)
    assert stop_event.position_ms == 61_000 and stop_event.reason is StopReason.USER_STOPPED
    assert 0 <= stop_event.watched_ms <= 61_000

    # one trace: the heartbeat's SERVER span with the business attributes, and the relay's PRODUCER span
    def spans() -> list[dict[str, Any]] | None:
        try:
            found: list[dict[str, Any]] = http_json(f"{bus_infra.zipkin_url}/api/v2/trace/{trace_id}")
        except urllib.error.HTTPError:
            return None
        return found if {"SERVER", "PRODUCER"} <= {s.get("kind") for s in found} else None

    found = await wait_for(lambda: asyncio.to_thread(spans), "the heartbeat's trace in Zipkin", 30, 0.5)
    server = next(s for s in found if s.get("kind") == "SERVER")
    assert server["tags"]["reelbus.playback.session_id"] == session_id
    assert server["tags"]["reelbus.playback.title_id"] == title
    assert server["tags"]["reelbus.profile_id"] == str(viewer.profile_id)
    producer = next(s for s in found if s.get("kind") == "PRODUCER")
    assert producer["name"] == "send playback.events"

    service.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(service.proc.wait, 20)
    assert code == 0, service.output()[-3000:]


async def test_bad_input_is_refused_naming_the_field_and_nothing_is_published(
    start_playback: StartPlayback,
    world: World,
    token_issuer: TokenIssuer,
    http: aiohttp.ClientSession,
    playback_events: PlaybackEvents,
) -> None:
    ixp = appliance("ixp")
    service = start_playback([ixp])
    api = await running(service, http)
    viewer = await world.viewer(new_viewer(token_issuer))
    title = unique("tt")
    await world.title(title_created(title))
    await world.appliance(health(ixp), contents(ixp, [title]))
    ok = await api.start_when(viewer, title, status_is(201), "a session")
    created = {ok.body["session_id"]}
    session_id = ok.body["session_id"]
    sessions = "/v1/playback/sessions"

    bad_starts: list[tuple[Any, int, str | None]] = [
        ({"profile_id": str(viewer.profile_id)}, 422, "title_id"),
        ({"profile_id": "not-a-uuid", "title_id": title}, 422, "profile_id"),
        ({"title_id": title}, 422, "profile_id"),
        ({"profile_id": str(viewer.profile_id), "title_id": ""}, 422, "title_id"),
        ({"profile_id": str(viewer.profile_id), "title_id": 42}, 422, "title_id"),
        ({"profile_id": str(viewer.profile_id), "title_id": title, "position_ms": -1}, 422, "position_ms"),
        ({"profile_id": str(viewer.profile_id), "title_id": title, "position_ms": RUNTIME_MS + 1}, 422,
         "position_ms"),
        ([1, 2], 400, None),
    ]  # fmt: skip
    for body, status, named in bad_starts:
        reply = await api.call(sessions, body, viewer.headers)
        assert reply.status == status, (body, reply.body)
        assert reply.body.get("field") == named, (body, reply.body)
    not_json = await api.call(sessions, None, {**viewer.headers, "Content-Type": "application/json"}, b"{")
    assert not_json.status == 400 and "JSON" in not_json.body["message"]

    beats = f"{sessions}/{session_id}/heartbeats"
    good = {"position_ms": 1_000, "bitrate_kbps": 235, "buffer_ms": 4_000, "throughput_kbps": 900,
            "rebuffer_ms": 0}  # fmt: skip
    bad_beats: list[tuple[dict[str, Any], str]] = [
        ({**good, "buffer_ms": -5}, "buffer_ms"),
        ({**good, "rebuffer_ms": None}, "rebuffer_ms"),
        ({k: v for k, v in good.items() if k != "throughput_kbps"}, "throughput_kbps"),
        ({**good, "bitrate_kbps": "fast"}, "bitrate_kbps"),
        ({**good, "bitrate_kbps": 2**31}, "bitrate_kbps"),
        ({**good, "position_ms": 1.5}, "position_ms"),
        ({**good, "position_ms": RUNTIME_MS + 60_001}, "position_ms"),  # past runtime + margin
    ]
    for body, named in bad_beats:
        reply = await api.call(beats, body, viewer.headers)
        assert 400 <= reply.status < 500 and reply.body["field"] == named, (body, reply.body)
    malformed = await api.call(f"{sessions}/not-a-uuid/heartbeats", good, viewer.headers)
    assert malformed.status == 400 and malformed.body["field"] == "session_id"
    bad_stop = await api.call(f"{sessions}/{session_id}/stop", {"position_ms": -1}, viewer.headers)
    assert bad_stop.status == 422 and bad_stop.body["field"] == "position_ms"

    accepted = await api.call(beats, {**good, "position_ms": RUNTIME_MS + 60_000}, viewer.headers)
    assert accepted.status == 202 and accepted.body["sequence"] == 1, "no rejected heartbeat took a number"
    after = await api.start(viewer, title)
    assert after.status == 201
    created.add(after.body["session_id"])

    await playback_events.wait_keyed(after.body["session_id"], 1, "the last session's start")
    await playback_events.drain()
    assert [type(e) for e in playback_events.keyed(session_id)] == [SessionStarted, Heartbeat]
    mine = {
        str(e.session_id)
        for _, e in playback_events.seen
        if isinstance(e, SessionStarted) and e.profile_id == viewer.profile_id
    }
    assert mine == created, "a session started only for the accepted requests"


async def test_another_accounts_token_cannot_touch_a_profile_or_a_session(
    start_playback: StartPlayback,
    world: World,
    token_issuer: TokenIssuer,
    http: aiohttp.ClientSession,
    playback_events: PlaybackEvents,
) -> None:
    ixp = appliance("ixp")
    service = start_playback([ixp])
    api = await running(service, http)
    owner = await world.viewer(new_viewer(token_issuer))
    intruder = await world.viewer(new_viewer(token_issuer))
    title = unique("tt")
    await world.title(title_created(title))
    await world.appliance(health(ixp), contents(ixp, [title]))
    session = await api.start_when(owner, title, status_is(201), "the owner's session")
    session_id = session.body["session_id"]
    await api.start_when(intruder, title, status_is(201), "the intruder's own profile to be known")

    borrowed = Viewer(intruder.account_id, owner.profile_id, intruder.subscription_id, intruder.token)
    theft = await api.start(borrowed, title)
    assert theft.status == 403 and theft.body["field"] == "profile_id"
    beat = await api.heartbeat(intruder, session_id)
    assert beat.status == 403 and beat.body["field"] == "session_id"
    stop = await api.stop(intruder, session_id)
    assert stop.status == 403
    odd = Viewer(
        owner.account_id, owner.profile_id, owner.subscription_id, token_issuer.issue("not-a-uuid", "d", "tv")
    )
    assert (await api.start(odd, title)).status == 403

    unknown = Viewer(owner.account_id, uuid.uuid4(), owner.subscription_id, owner.token)
    missing = await api.start(unknown, title)
    assert missing.status == 404 and missing.body["field"] == "profile_id"

    assert (await api.heartbeat(owner, session_id)).status == 202, "the owner still can"
    await playback_events.wait_keyed(session_id, 2, "the owner's heartbeat")
    await playback_events.drain()
    events = playback_events.keyed(session_id)
    assert [type(e) for e in events] == [SessionStarted, Heartbeat]
    assert isinstance(events[1], Heartbeat) and events[1].sequence == 1


async def test_tokens_are_verified_by_playback_itself(
    start_playback: StartPlayback, token_issuer: TokenIssuer, http: aiohttp.ClientSession
) -> None:
    service = start_playback([appliance("ixp")])
    api = await running(service, http)
    account = str(uuid.uuid4())
    forged = TokenIssuer(Ed25519PrivateKey.generate()).issue(account, "d", "tv")
    expired = TokenIssuer(token_issuer.key, ttl_seconds=-60).issue(account, "d", "tv")
    elsewhere = TokenIssuer(token_issuer.key, audience="another-service").issue(account, "d", "tv")
    cases = {
        "missing": {},
        "not bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "forged": {"Authorization": f"Bearer {forged}"},
        "expired": {"Authorization": f"Bearer {expired}"},
        "wrong audience": {"Authorization": f"Bearer {elsewhere}"},
    }
    session = f"/v1/playback/sessions/{uuid.uuid4()}"
    for name, headers in cases.items():
        for path, body in [
            ("/v1/playback/sessions", {"profile_id": str(uuid.uuid4()), "title_id": "tt1"}),
            (f"{session}/heartbeats", {"position_ms": 0}),
            (f"{session}/stop", {"position_ms": 0}),
        ]:
            reply = await api.call(path, body, headers)
            assert reply.status == 401, (name, path, reply.body)
            assert reply.body["error"] == "unauthorized" and reply.body["field"] == "Authorization"
    reasons = [(await api.call("/v1/playback/sessions", {}, h)).body["message"] for h in cases.values()]
    assert any("expired" in r for r in reasons) and any("audience" in r for r in reasons)


async def test_a_bad_appliances_file_exits_2_naming_the_variable(start_playback: StartPlayback) -> None:
    service = start_playback([{"id": "x", "base_url": "https://x", "kind": "embedded", "prefixes": []}])

    def exited() -> list[int] | None:
        code = service.proc.poll()
        return None if code is None else [code]

    (code,) = await wait_for(lambda: asyncio.to_thread(exited), "playback to exit", 30)
    assert code == 2
    assert "PLAYBACK_APPLIANCES_FILE" in service.output() and "prefixes" in service.output()
