"""Unit tests of the dashboard's pure logic: rates from watermark samples, lag from committed offsets,
the recent-events views and the trace summaries. No infrastructure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.bus.consumer import Record
from services.bus.contracts import Contracts
from services.bus.events import (
    AnomalyDetected,
    AnomalyKind,
    MountStallSample,
    ScalingAction,
    ScalingDecision,
    Severity,
)
from services.dashboard import handlers
from services.dashboard.handlers import LiveView, RateTracker, Watermarks

RECORD = Record("t", 0, 0, None, [], 0)
T0 = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)


def test_rate_is_the_watermark_growth_over_the_elapsed_time() -> None:
    base = Watermarks(10.0, {("a", 0): 100, ("a", 1): 50, ("b", 0): 7})
    latest = Watermarks(12.0, {("a", 0): 130, ("a", 1): 60, ("b", 0): 7})
    assert handlers.rates_between(base, latest) == {"a": 20.0, "b": 0.0}


def test_rate_ignores_new_partitions_and_never_goes_negative() -> None:
    base = Watermarks(0.0, {("a", 0): 100, ("b", 0): 500})
    # a grew a partition (no base for it); b was deleted and made again (its watermark went down)
    latest = Watermarks(4.0, {("a", 0): 120, ("a", 1): 999, ("b", 0): 3})
    assert handlers.rates_between(base, latest) == {"a": 5.0, "b": 0.0}
    assert handlers.rates_between(latest, latest) == {}  # no time elapsed: no rate


def test_tracker_takes_the_newest_sample_at_least_a_window_old_as_its_base() -> None:
    tracker = RateTracker(window=5.0)
    assert tracker.rates() == {}
    for second in range(11):  # 10 messages per second, sampled each second
        tracker.add(Watermarks(float(second), {("a", 0): 10 * second}))
    assert tracker.samples[0].at == 5.0 and tracker.samples[-1].at == 10.0
    assert tracker.rates() == {"a": pytest.approx(10.0)}
    # a burst: 100 messages in the last second is averaged over the window
    tracker.add(Watermarks(11.0, {("a", 0): 200}))
    assert tracker.rates() == {"a": pytest.approx((200 - 60) / 5.0)}


def test_tracker_with_an_irregular_sampling() -> None:
    tracker = RateTracker(window=5.0)
    tracker.add(Watermarks(0.0, {("a", 0): 0}))
    tracker.add(Watermarks(7.5, {("a", 0): 75}))  # a late sample: the base stays until a newer is old enough
    assert tracker.rates() == {"a": pytest.approx(10.0)}
    tracker.add(Watermarks(8.0, {("a", 0): 80}))
    assert tracker.samples[0].at == 0.0  # 7.5 is only 0.5 s old
    tracker.add(Watermarks(13.0, {("a", 0): 80}))
    assert tracker.samples[0].at == 8.0
    assert tracker.rates() == {"a": 0.0}


def test_lag_is_watermark_minus_committed_per_topic() -> None:
    high = {("a", 0): 100, ("a", 1): 40, ("b", 0): 10}
    committed = {("a", 0): 90, ("a", 1): 40, ("b", 0): 12, ("private", 0): 5}
    lag = handlers.group_lag("g", "STABLE", committed, high)
    assert lag is not None
    # b's committed offset past the sampled watermark (sampled a moment earlier): 0, not -2
    assert lag.by_topic == {"a": 10, "b": 0}
    assert (lag.total, lag.partitions, lag.uncommitted) == (10, 3, 0)
    assert lag.as_json()["lag"] == 10


def test_lag_leaves_out_uncommitted_partitions_and_unshown_topics() -> None:
    high = {("a", 0): 100, ("a", 1): 40}
    lag = handlers.group_lag("g", "EMPTY", {("a", 0): -1001, ("a", 1): 30}, high)
    assert lag is not None and (lag.total, lag.partitions, lag.uncommitted) == (10, 1, 1)
    assert handlers.group_lag("g", "EMPTY", {("elsewhere", 0): 3}, high) is None
    assert handlers.group_lag("g", "EMPTY", {("a", 0): -1001}, high) is None


def test_groups_are_ranked_by_lag_then_name_and_limited() -> None:
    high = {("a", 0): 100}
    lags = [handlers.group_lag(name, "STABLE", {("a", 0): off}, high) for name, off in
            [("x", 100), ("y", 50), ("w", 100), ("z", 0)]]  # fmt: skip
    ranked = handlers.rank_groups([g for g in lags if g is not None], 3)
    assert [g.group for g in ranked] == ["z", "y", "w"]


def test_totals_sum_partitions() -> None:
    assert handlers.topic_totals({("a", 0): 3, ("a", 1): 4, ("b", 0): 0}) == {"a": 7, "b": 0}


def decision(at: datetime, service: str = "playback", event_id: uuid.UUID | None = None) -> ScalingDecision:
    return ScalingDecision(
        event_id=event_id or uuid.uuid4(),
        event_time=at,
        service=service,
        from_replicas=2,
        to_replicas=3,
        action=ScalingAction.SCALE_OUT,
        reason="cpu 0.91 > target 0.70",
        signals={"cpu_utilization": 0.91234},
    )


async def test_decisions_are_deduplicated_newest_first_and_bounded() -> None:
    view = LiveView(recent_items=3)
    first = decision(T0, event_id=uuid.uuid4())
    await handlers.on_scaling_decision(first, RECORD, view)
    await handlers.on_scaling_decision(first, RECORD, view)  # redelivered
    for minutes in (3, 1, 2, 4):
        await handlers.on_scaling_decision(decision(T0 + timedelta(minutes=minutes)), RECORD, view)
    shown = view.as_json()["scaling_decisions"]
    assert [d["at"] for d in shown] == ["2026-11-26T06:04:00.000Z", "2026-11-26T06:03:00.000Z",
                                        "2026-11-26T06:02:00.000Z"]  # fmt: skip
    assert shown[0]["action"] == "SCALE_OUT" and shown[0]["signals"] == {"cpu_utilization": 0.912}
    assert (view.records, view.duplicates) == (5, 1)


async def test_anomalies_keep_a_few_evidence_items() -> None:
    view = LiveView()
    event = AnomalyDetected(
        kind=AnomalyKind.LATENCY,
        severity=Severity.CRITICAL,
        subject="service:playback",
        score=7.25,
        threshold=3.0,
        evidence={f"k{i}": str(i) for i in range(9)},
        window_start=T0,
        window_end=T0 + timedelta(minutes=1),
        detector="ewma-v1",
    )
    await handlers.on_anomaly(event, RECORD, view)
    (shown,) = view.as_json()["anomalies"]
    assert (shown["severity"], shown["kind"], shown["subject"]) == ("CRITICAL", "LATENCY", "service:playback")
    assert len(shown["evidence"]) == 4


def stall(node: str, at: datetime, latency: float, stalled: bool = False) -> MountStallSample:
    return MountStallSample(
        event_time=at,
        node=node,
        probe_id="probe-1",
        mount_op_latency_ms=latency / 2,
        mount_table_size=120,
        mount_table_read_ms=0.4,
        probe_latency_ms=latency,
        stalled=stalled,
        concurrent_mounts=0,
    )


async def test_mount_stall_series_are_ordered_windowed_and_bounded() -> None:
    view = LiveView(stall_window_ms=60_000, stall_max_points=3)
    await handlers.on_mount_stall(stall("old", T0, 5.0), RECORD, view)
    for seconds in (70, 90, 80, 100, 110):  # 80 arrives out of order
        await handlers.on_mount_stall(
            stall("n1", T0 + timedelta(seconds=seconds), seconds, seconds == 110), RECORD, view
        )
    nodes = view.as_json()["mount_stall"]["nodes"]
    assert list(nodes) == ["n1"], "a node silent for longer than the window is dropped"
    assert [p[1] for p in nodes["n1"]] == [90.0, 100.0, 110.0]
    assert nodes["n1"][-1][3] is True and nodes["n1"][0][2] == 120


def span(trace: str, name: str, ts: int, parent: str | None = None, **tags: str) -> dict[str, object]:
    doc: dict[str, object] = {
        "traceId": trace,
        "id": f"{trace}-{name}",
        "name": name,
        "timestamp": ts,
        "duration": 2500,
        "kind": "SERVER" if parent is None else "CLIENT",
        "localEndpoint": {"serviceName": "gateway" if parent is None else "catalog"},
        "tags": tags,
    }
    if parent:
        doc["parentId"] = parent
    return doc


def test_traces_are_summarised_newest_first_without_the_pages_own_requests() -> None:
    traces = [
        [span("t1", "get /v1/catalog/{rest}", 1_000, **{"url.path": "/v1/catalog/titles",
                                                          "http.response.status_code": "200"}),
         span("t1", "get http://catalog", 1_100, parent="t1-get", error="boom")],
        [span("t2", "get /v1/dashboard/{rest}", 3_000, **{"url.path": "/v1/dashboard/state"})],
        [span("t3", "post /v1/accounts", 2_000, **{"url.path": "/v1/accounts"})],
        [{**span("t4", "send scaling.load", 4_000), "kind": "PRODUCER"}],
        [],
    ]  # fmt: skip
    out = handlers.summarize_traces(traces, "http://zipkin.example/zipkin", limit=10)
    assert [t["trace_id"] for t in out] == ["t3", "t1"]
    t1 = out[1]
    assert t1["url"] == "http://zipkin.example/zipkin/traces/t1"
    assert (t1["spans"], t1["status"], t1["error"], t1["duration_ms"]) == (2, 200, True, 2.5)
    assert t1["services"] == ["catalog", "gateway"]
    assert len(handlers.summarize_traces(traces, "u", limit=1)) == 1


def test_topology_has_every_declared_edge() -> None:
    contracts = Contracts.load()
    topo = handlers.topology(contracts)
    produced = {(e["from"], e["to"]) for e in topo["edges"] if e["kind"] == "produces"}
    consumed = {(e["from"], e["to"]) for e in topo["edges"] if e["kind"] == "consumes"}
    for topic in contracts.topics.values():
        assert (topic.producer, topic.name) in produced
        assert {(topic.name, c) for c in topic.consumers} <= consumed
        assert topic.producer in topo["services"]
    assert ("scaling.decisions", "dashboard") in consumed
    assert ("playback.events", "history") in consumed
    pattern = handlers.default_group_pattern(contracts)
    import re

    assert re.search(pattern, "history") and not re.search(pattern, "history-test-1234")
