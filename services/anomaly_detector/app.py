"""The anomaly detector as a faust stream service: agents, tables and topics (``handlers.py`` has the
flow, ``rules.py`` the rules, ``services/bus/streams.py`` the runtime)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace

from services.anomaly_detector import handlers
from services.anomaly_detector.adapters.tables import RuleTable, SessionTable
from services.anomaly_detector.detector import DetectorConfig
from services.anomaly_detector.rules import (
    AccountConfig,
    AccountRule,
    DeclineBurstRule,
    DeclineConfig,
    Finding,
    SeriesConfig,
    SeriesRule,
    StallConfig,
    StallFlagRule,
)
from services.anomaly_detector.settings import Settings
from services.bus.contracts import Contracts
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.streams import StreamBus, StreamSpec, changelog_name, make_app, prefixed_contracts

NAME = "anomaly-detector"
INPUTS = ("playback.events", "billing.events", "scaling.load", "nodes.mount-stall")
ACCOUNTS_TOPIC = "anomaly-detector.accounts"
DECLINES_TOPIC = "anomaly-detector.declines"
ANOMALIES_TOPIC = "anomalies.detected"
ROUTES = {handlers.ACCOUNTS_ROUTE: ACCOUNTS_TOPIC, handlers.DECLINES_ROUTE: DECLINES_TOPIC}
PRODUCES = (ACCOUNTS_TOPIC, DECLINES_TOPIC, ANOMALIES_TOPIC)
TABLES: dict[str, tuple[str, str]] = {
    # table: (row type, the topic whose partitions it mirrors)
    "sessions": ("reelbus.anomalies.SessionOwner", "playback.events"),
    "accounts": ("reelbus.anomalies.RuleState", ACCOUNTS_TOPIC),
    "declines": ("reelbus.anomalies.RuleState", DECLINES_TOPIC),
    "services": ("reelbus.anomalies.RuleState", "scaling.load"),
    "nodes": ("reelbus.anomalies.RuleState", "nodes.mount-stall"),
}
ATTR_SUBJECT = "reelbus.anomaly.subject"


def topic_names() -> list[str]:
    """Every declared topic the service uses, its tables' changelogs included."""
    changelogs = [changelog_name(NAME, t) for t in TABLES]
    return [*INPUTS, *PRODUCES, *changelogs]


def rules_from(settings: Settings) -> handlers.Rules:
    series = SeriesConfig(threshold=settings.series_threshold, detector=DetectorConfig())
    return handlers.Rules(
        accounts=AccountRule(
            AccountConfig(
                default_stream_limit=settings.default_stream_limit,
                max_speed_kmh=settings.max_speed_kmh,
                session_slack_ms=int(settings.session_slack_s * 1000),
            )
        ),
        declines=DeclineBurstRule(
            DeclineConfig(
                window_ms=int(settings.decline_window_s * 1000),
                prior_per_day=settings.decline_prior_per_day,
                max_p_value=settings.decline_max_p_value,
            )
        ),
        latency=SeriesRule("LATENCY", "latency_p99_ms", series),
        error_rate=SeriesRule(
            "ERROR_RATE",
            "error_rate",
            SeriesConfig(threshold=settings.series_threshold, floor=settings.error_rate_floor),
        ),
        mount_latency=SeriesRule("MOUNT_STALL", "mount_op_latency_ms", series),
        health_latency=SeriesRule("MOUNT_STALL", "health_probe_p99_ms", series),
        stall_flag=StallFlagRule(StallConfig(sustained=settings.stall_sustained)),
    )


Handle = Callable[[Any, Any], Awaitable[None]]


def build_spec(settings: Settings, contracts: Contracts | None = None) -> StreamSpec:
    contracts = prefixed_contracts(contracts or Contracts.load(), settings.topic_prefix, topic_names())
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # faust makes only the last level of its datadir
    app = make_app(NAME, settings, partitions=3)
    serde = Serde(contracts, RegistryClient(settings.registry_url))
    bus = StreamBus(app, NAME, contracts, serde, settings.topic_prefix)
    tables = {name: bus.table(name, value=row, like=like) for name, (row, like) in TABLES.items()}
    for table in tables.values():
        # faust 0.15 makes the changelog topic when the table is registered, with the serializers the
        # table had then (json for an untyped table): make it again with the table's Avro codecs.
        if table.changelog_topic.value_serializer is not table.value_serializer:
            table.changelog_topic = table._new_changelog_topic()

    async def forward(route: str, key: str, event: Any) -> None:
        await bus.send(ROUTES[route], key, event)

    async def publish(finding: Finding) -> None:
        trace.get_current_span().set_attribute(ATTR_SUBJECT, finding.subject)
        await bus.send(ANOMALIES_TOPIC, finding.subject, finding.to_event())

    deps = handlers.Deps(
        rules=rules_from(settings),
        sessions=SessionTable(tables["sessions"]),
        accounts=RuleTable(tables["accounts"], "accounts/1"),
        declines=RuleTable(tables["declines"], "declines/1"),
        services=RuleTable(tables["services"], "series/1"),
        nodes=RuleTable(tables["nodes"], "nodes/1"),
        forward=forward,
        publish=publish,
    )

    def agent(topic: str, handle: Handle) -> None:
        async def process(stream: Any) -> None:
            async for event in stream.events():
                decoded = await bus.decode(event)
                if decoded is None:
                    continue  # dead-lettered
                key, value = decoded
                with bus.consuming(event, value):
                    await handle(value, key)

        app.agent(bus.topic(topic), name=f"{NAME}.{topic}")(process)

    agent("playback.events", lambda e, _k: handlers.on_playback(e, deps))
    agent("billing.events", lambda e, _k: handlers.on_billing(e, deps))
    agent(ACCOUNTS_TOPIC, lambda e, k: handlers.on_account_event(e, str(k or ""), deps))
    agent(DECLINES_TOPIC, lambda e, k: handlers.on_decline(e, str(k or ""), deps))
    agent("scaling.load", lambda e, _k: handlers.on_load_sample(e, deps))
    agent("nodes.mount-stall", lambda e, _k: handlers.on_mount_sample(e, deps))
    return StreamSpec(name=NAME, app=app, bus=bus, produces=PRODUCES)
