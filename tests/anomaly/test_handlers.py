"""The handler table with in-memory fakes for the tables and topics (the service tests use the real
broker): routing, re-keying, unknown sessions skipped, one output per anomaly."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from services.anomaly_detector import handlers
from services.anomaly_detector.rules import Finding
from tests.anomaly import planted
from tests.anomaly.planted import T0


class FakeStore(dict[str, Any]):
    """A dict standing in for a changelog-backed table."""

    def put(self, key: str, state: Any, cause: Any) -> None:
        self[key] = state


class FakeTopics:
    """Stands in for the internal topics and the output topic: forwards run the next handler inline."""

    def __init__(self) -> None:
        self.published: list[Finding] = []
        self.deps = handlers.Deps(
            rules=handlers.Rules(),
            sessions=FakeStore(),
            accounts=FakeStore(),
            declines=FakeStore(),
            services=FakeStore(),
            nodes=FakeStore(),
            forward=self.forward,
            publish=self.publish,
        )

    async def forward(self, route: str, key: str, event: Any) -> None:
        if route == handlers.ACCOUNTS_ROUTE:
            await handlers.on_account_event(event, key, self.deps)
        else:
            assert route == handlers.DECLINES_ROUTE
            await handlers.on_decline(event, key, self.deps)

    async def publish(self, finding: Finding) -> None:
        self.published.append(finding)

    async def feed(self, events: list[planted.Published]) -> list[Finding]:
        for topic, _, event in events:
            if topic == "playback.events":
                await handlers.on_playback(event, self.deps)
            elif topic == "billing.events":
                await handlers.on_billing(event, self.deps)
            elif topic == "scaling.load":
                await handlers.on_load_sample(event, self.deps)
            else:
                await handlers.on_mount_sample(event, self.deps)
        return self.published


async def test_every_kind_fires_through_the_handlers() -> None:
    events = (
        planted.sharing(True)
        + planted.travel(True)
        + planted.declines(True)
        + planted.service_load("playback", True)
        + planted.mount_stall("node-1", True)
    )
    kinds = sorted({f.kind for f in await FakeTopics().feed(events)})
    assert kinds == [
        "ACCOUNT_SHARING",
        "ERROR_RATE",
        "IMPOSSIBLE_TRAVEL",
        "LATENCY",
        "MOUNT_STALL",
        "PAYMENT_FRAUD",
    ]


async def test_clean_streams_stay_quiet_through_the_handlers() -> None:
    events = (
        planted.sharing(False)
        + planted.travel(False)
        + planted.declines(False)
        + planted.service_load("playback", False)
        + planted.mount_stall("node-1", False)
    )
    assert await FakeTopics().feed(events) == []


async def test_stop_of_an_unknown_session_is_skipped() -> None:
    topics = FakeTopics()
    started = planted.session_started(uuid.uuid4(), T0)
    stop = planted.session_stopped(started, T0 + timedelta(minutes=1))
    before = handlers.INPUTS.labels("accounts", "unknown")._value.get()
    assert await topics.feed([("playback.events", "k", stop)]) == []
    assert handlers.INPUTS.labels("accounts", "unknown")._value.get() == before + 1


async def test_redelivered_inputs_publish_the_same_ids() -> None:
    events = planted.sharing(True) + planted.declines(True) + planted.mount_stall("n", True)
    topics = FakeTopics()
    first = {f.event_id() for f in await topics.feed(events)}
    again = {f.event_id() for f in await topics.feed(events)}
    assert first and again == first
