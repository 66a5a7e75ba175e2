"""The dashboard's logic, pure: the topology from the contract, rates from high-watermark samples, lag
from committed offsets, the recent-events views folded from records, and trace summaries.

Rates: a topic's rate is the growth of the sum of its partitions' high watermarks between the oldest
sample inside the rate window and the newest one, divided by the time between them. A partition seen
in only one of the two samples does not count (it was just created or deleted); a watermark that went
down (the topic was deleted and made again) counts as zero, never negative. Transaction markers take an
offset each, so a transactional producer's rate reads slightly high.

Lag: per partition, high watermark minus the group's committed offset (never below zero); partitions
the group never committed are left out and counted as such, as ``kafka-consumer-groups`` shows "-".
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from services.bus.consumer import Record
from services.bus.contracts import Contracts
from services.bus.events import AnomalyDetected, MountStallSample, ScalingDecision

log = logging.getLogger("reelbus.dashboard")

Partition = tuple[str, int]

DECISIONS_TOPIC = "scaling.decisions"
ANOMALIES_TOPIC = "anomalies.detected"
MOUNT_STALL_TOPIC = "nodes.mount-stall"
VIEWED_TOPICS = (DECISIONS_TOPIC, ANOMALIES_TOPIC, MOUNT_STALL_TOPIC)
# The page's own requests are traced too; they are left out of "recent requests".
OWN_PATHS = ("/dashboard", "/v1/dashboard")
SEEN_IDS = 20_000  # event ids remembered for de-duplication (a re-read after a reconnect)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# -- topology --------------------------------------------------------------------------------


def topology(contracts: Contracts) -> dict[str, Any]:
    """Services and topics of the topics file, with producing (service -> topic) and consuming
    (topic -> service) edges."""
    topics = sorted(contracts.topics.values(), key=lambda t: t.name)
    services = sorted({t.producer for t in topics} | {c for t in topics for c in t.consumers})
    return {
        "services": services,
        "topics": [
            {
                "name": t.name,
                "partitions": t.partitions,
                "producer": t.producer,
                "consumers": list(t.consumers),
                "values": [v.rsplit(".", 1)[-1] for v in t.values],
                "description": t.description,
            }
            for t in topics
        ],
        "edges": [{"from": t.producer, "to": t.name, "kind": "produces"} for t in topics]
        + [{"from": t.name, "to": c, "kind": "consumes"} for t in topics for c in t.consumers],
    }


def default_group_pattern(contracts: Contracts) -> str:
    """Groups named exactly after a consumer service (the services' default group id)."""
    import re

    names = sorted({c for t in contracts.topics.values() for c in t.consumers})
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


# -- rates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Watermarks:
    """High watermarks of every sampled partition at one moment (``at``: monotonic seconds)."""

    at: float
    high: Mapping[Partition, int]


def topic_totals(high: Mapping[Partition, int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for (topic, _), offset in high.items():
        totals[topic] = totals.get(topic, 0) + max(0, offset)
    return totals


def rates_between(base: Watermarks, latest: Watermarks) -> dict[str, float]:
    """Messages per second per topic from ``base`` to ``latest`` (module doc)."""
    elapsed = latest.at - base.at
    if elapsed <= 0:
        return {}
    grown: dict[str, int] = {}
    for (topic, partition), high in latest.high.items():
        before = base.high.get((topic, partition))
        grown.setdefault(topic, 0)
        if before is not None and high > before:
            grown[topic] += high - before
    return {topic: n / elapsed for topic, n in grown.items()}


class RateTracker:
    """Keeps the samples of the last ``window`` seconds; rates over them."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.samples: deque[Watermarks] = deque()

    def add(self, sample: Watermarks) -> None:
        self.samples.append(sample)
        # Keep the newest sample at least ``window`` old as the base, drop what is older than it.
        while len(self.samples) > 2 and sample.at - self.samples[1].at >= self.window:
            self.samples.popleft()

    def rates(self) -> dict[str, float]:
        """Per topic; empty until two samples exist."""
        if len(self.samples) < 2:
            return {}
        return rates_between(self.samples[0], self.samples[-1])


# -- lag -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupLag:
    group: str
    state: str
    total: int
    by_topic: dict[str, int]
    partitions: int  # partitions with a committed offset on a sampled topic
    uncommitted: int  # partitions listed without a committed offset

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "state": self.state,
            "lag": self.total,
            "by_topic": dict(sorted(self.by_topic.items())),
            "partitions": self.partitions,
            "uncommitted": self.uncommitted,
        }


def group_lag(
    group: str, state: str, committed: Mapping[Partition, int], high: Mapping[Partition, int]
) -> GroupLag | None:
    """Lag of one group over the sampled partitions; ``None`` when it committed none of them."""
    by_topic: dict[str, int] = {}
    partitions = uncommitted = 0
    for tp, offset in committed.items():
        hw = high.get(tp)
        if hw is None:
            continue  # a topic the dashboard does not show (a test's private topic, say)
        if offset < 0:
            uncommitted += 1
            continue
        partitions += 1
        by_topic[tp[0]] = by_topic.get(tp[0], 0) + max(0, hw - offset)
    if not partitions:
        return None
    return GroupLag(group, state, sum(by_topic.values()), by_topic, partitions, uncommitted)


def rank_groups(lags: Iterable[GroupLag], limit: int) -> list[GroupLag]:
    """The most lagging first, then by name; at most ``limit``."""
    return sorted(lags, key=lambda g: (-g.total, g.group))[:limit]


# -- the recent-events views -----------------------------------------------------------------


@dataclass(frozen=True)
class StallPoint:
    at_ms: int
    probe_latency_ms: float
    mount_op_latency_ms: float
    mount_table_size: int
    stalled: bool


@dataclass
class LiveView:
    """What the page shows from the three viewed topics: bounded, de-duplicated by event id."""

    recent_items: int = 25
    stall_window_ms: int = 600_000
    stall_max_points: int = 600
    decisions: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    anomalies: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    stalls: dict[str, deque[StallPoint]] = field(default_factory=dict)
    records: int = 0
    duplicates: int = 0
    bad_records: int = 0
    _seen: OrderedDict[UUID, None] = field(default_factory=OrderedDict)

    def first_time(self, event_id: UUID) -> bool:
        """True the first time an event id is seen (at-least-once delivery, re-reads)."""
        if event_id in self._seen:
            self.duplicates += 1
            return False
        self._seen[event_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        self.records += 1
        return True

    def keep_recent(self, items: list[tuple[int, dict[str, Any]]], at_ms: int, item: dict[str, Any]) -> None:
        items.append((at_ms, item))
        items.sort(key=lambda pair: pair[0], reverse=True)
        del items[self.recent_items :]

    def add_stall(self, node: str, point: StallPoint) -> None:
        series = self.stalls.setdefault(node, deque(maxlen=self.stall_max_points))
        if series and point.at_ms < series[-1].at_ms:  # out of order (another partition, a re-read)
            ordered = sorted([*series, point], key=lambda p: p.at_ms)
            series.clear()
            series.extend(ordered[-self.stall_max_points :])
        else:
            series.append(point)
        newest = max(s[-1].at_ms for s in self.stalls.values() if s)
        horizon = newest - self.stall_window_ms
        for name in list(self.stalls):
            points = self.stalls[name]
            while points and points[0].at_ms < horizon:
                points.popleft()
            if not points:
                del self.stalls[name]

    def as_json(self) -> dict[str, Any]:
        return {
            "scaling_decisions": [item for _, item in self.decisions],
            "anomalies": [item for _, item in self.anomalies],
            "mount_stall": {
                "window_ms": self.stall_window_ms,
                "nodes": {
                    node: [
                        [p.at_ms, p.probe_latency_ms, p.mount_table_size, p.stalled, p.mount_op_latency_ms]
                        for p in points
                    ]
                    for node, points in sorted(self.stalls.items())
                },
            },
            "reader": {
                "records": self.records,
                "duplicates": self.duplicates,
                "bad_records": self.bad_records,
            },
        }


async def on_scaling_decision(event: ScalingDecision, record: Record, view: LiveView) -> None:
    if not view.first_time(event.event_id):
        return
    view.keep_recent(
        view.decisions,
        millis(event.event_time),
        {
            "event_id": str(event.event_id),
            "at": iso(event.event_time),
            "service": event.service,
            "action": str(event.action),
            "from": event.from_replicas,
            "to": event.to_replicas,
            "reason": event.reason,
            "signals": {k: round(v, 3) for k, v in sorted(event.signals.items())},
        },
    )


async def on_anomaly(event: AnomalyDetected, record: Record, view: LiveView) -> None:
    if not view.first_time(event.event_id):
        return
    view.keep_recent(
        view.anomalies,
        millis(event.event_time),
        {
            "event_id": str(event.event_id),
            "at": iso(event.event_time),
            "kind": str(event.kind),
            "severity": str(event.severity),
            "subject": event.subject,
            "score": round(event.score, 3),
            "threshold": round(event.threshold, 3),
            "detector": event.detector,
            "evidence": dict(sorted(event.evidence.items())[:4]),
        },
    )


async def on_mount_stall(event: MountStallSample, record: Record, view: LiveView) -> None:
    if not view.first_time(event.event_id):
        return
    view.add_stall(
        event.node,
        StallPoint(
            at_ms=millis(event.event_time),
            probe_latency_ms=round(event.probe_latency_ms, 3),
            mount_op_latency_ms=round(event.mount_op_latency_ms, 3),
            mount_table_size=event.mount_table_size,
            stalled=event.stalled,
        ),
    )


ViewHandler = Callable[[Any, Record, LiveView], Awaitable[None]]

# The handler table: Avro full name -> function of (event, record, view).
HANDLERS: Mapping[str, ViewHandler] = {
    ScalingDecision.SCHEMA_NAME: on_scaling_decision,
    AnomalyDetected.SCHEMA_NAME: on_anomaly,
    MountStallSample.SCHEMA_NAME: on_mount_stall,
}


# -- traces ----------------------------------------------------------------------------------


def _root(spans: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    roots = [s for s in spans if not s.get("parentId")]
    return min(roots or spans, key=lambda s: int(s.get("timestamp") or 0))


def summarize_traces(
    traces: Iterable[Sequence[Mapping[str, Any]]], ui_url: str, limit: int
) -> list[dict[str, Any]]:
    """One line per request (a trace whose root is a SERVER span) of Zipkin's ``/api/v2/traces``
    answer, newest first, without the page's own requests; ``url`` opens the trace in the Zipkin UI."""
    out: list[dict[str, Any]] = []
    for spans in traces:
        if not spans:
            continue
        root = _root(spans)
        if root.get("kind") != "SERVER":
            continue  # not a request: a producer's own send (load samples, say)
        tags: Mapping[str, str] = root.get("tags") or {}
        path = str(tags.get("url.path", ""))
        if path.startswith(OWN_PATHS):
            continue
        trace_id = str(root.get("traceId", ""))
        if not trace_id:
            continue
        services = sorted({str((s.get("localEndpoint") or {}).get("serviceName", "")) for s in spans} - {""})
        status = tags.get("http.response.status_code")
        out.append(
            {
                "trace_id": trace_id,
                "name": str(root.get("name", "")),
                "started_us": int(root.get("timestamp") or 0),
                "duration_ms": round(int(root.get("duration") or 0) / 1000, 2),
                "spans": len(spans),
                "services": services,
                "status": int(status) if status and str(status).isdigit() else None,
                "error": any("error" in (s.get("tags") or {}) for s in spans),
                "url": f"{ui_url}/traces/{trace_id}",
            }
        )
    out.sort(key=lambda t: t["started_us"], reverse=True)
    return out[:limit]
