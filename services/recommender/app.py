"""The recommender for the stream runtime: its faust app, table, agent, replicas and routes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.bus.contracts import Contracts
from services.bus.events import ProfileHistory, ViewRecorded
from services.bus.registry import RegistryClient
from services.bus.serde import Serde
from services.bus.streams import (
    Replica,
    StreamBus,
    StreamSpec,
    changelog_name,
    in_recovery,
    make_app,
    prefixed_contracts,
)
from services.recommender import handlers, scoring
from services.recommender.adapters.replicas import Catalog, Lists, Owners
from services.recommender.api import ReadModel, routes
from services.recommender.handlers import COWATCH, LISTS, PROFILES, TITLES, VIEWS, Dependencies
from services.recommender.settings import Settings

log = logging.getLogger("reelbus.recommender")

NAME = "recommender"
TABLE = "profiles"
PRODUCES = (COWATCH, LISTS)


def build_spec(settings: Settings, contracts: Contracts | None = None) -> StreamSpec:
    declared = contracts or Contracts.load()
    changelog = changelog_name(NAME, TABLE)
    contracts = prefixed_contracts(
        declared, settings.topic_prefix, [VIEWS, COWATCH, LISTS, PROFILES, TITLES, changelog]
    )
    serde = Serde(contracts, RegistryClient(settings.registry_url))
    views_topic = contracts.topic(settings.topic_prefix + VIEWS)
    app = make_app(NAME, settings, partitions=views_topic.partitions)
    bus = StreamBus(app, NAME, contracts, serde, prefix=settings.topic_prefix)
    table = bus.table(TABLE, value=ProfileHistory.SCHEMA_NAME, like=VIEWS)

    model = scoring.Model(settings.params())
    catalog, owners, lists = Catalog(), Owners(), Lists()

    def fold_cowatch(event: Any, record: Any) -> None:
        model.apply(event)

    brokers = settings.kafka_bootstrap_servers
    cowatch_replica = Replica(brokers, serde, bus.declared(COWATCH), fold_cowatch)
    catalog_replica = Replica(brokers, serde, bus.declared(TITLES), catalog.fold)
    owners_replica = Replica(brokers, serde, bus.declared(PROFILES), owners.fold)
    lists_replica = Replica(brokers, serde, bus.declared(LISTS), lists.fold)
    deps = Dependencies(
        bus=bus,
        table=table,
        model=model,
        catalog=catalog,
        owners=owners,
        catalog_replica=catalog_replica,
        owners_replica=owners_replica,
        sync_seconds=settings.lookup_sync_seconds,
    )

    async def recovered() -> None:
        """After faust rebuilt the table (from RocksDB, or from the changelog on an empty disk)."""
        deps.recovered_rows = sum(1 for _ in table)
        log.info("table %s recovered: %d profile(s) on this worker", TABLE, deps.recovered_rows)

    table.on_recover(recovered)

    @app.agent(bus.topic(VIEWS), name="views")
    async def views(stream: Any) -> None:
        async for event in stream.events():
            decoded = await bus.decode(event)
            if decoded is None:
                continue
            _key, value = decoded
            with bus.consuming(event, value):
                if isinstance(value, ViewRecorded):
                    try:
                        await handlers.on_view(value, deps, event.message.offset, bus.committed(event))
                    except Exception as exc:  # a bug: crash loudly, the offset is not committed
                        log.exception("the views agent failed on %s", value.event_id)
                        await app.crash(exc)
                        raise

    started = asyncio.Event()

    async def refresh_loop() -> None:
        """Re-rank this worker's profiles while the model moves (not while partitions move)."""
        while True:
            await asyncio.sleep(min(1.0, settings.refresh_interval_seconds))
            if app.rebalancing or in_recovery(app) or not app.consumer.assignment():
                continue
            if not handlers.refresh_due(
                deps, settings.refresh_interval_seconds, settings.refresh_max_seconds
            ):
                continue
            try:
                sent = await handlers.refresh(deps)
            except (KeyError, RuntimeError, OSError) as exc:  # a partition closed under the iteration
                log.warning("refresh pass interrupted (%r); again at the next one", exc)
                continue
            if sent:
                log.info("refresh: %d list(s) changed with the model (version %d)", sent, model.version)
            started.set()

    async def status() -> dict[str, Any]:
        caught_up = await cowatch_replica.caught_up()
        return {
            "app_id": app.conf.id,
            "model_version": model.version,
            "refreshed_version": deps.refreshed_version,
            "model_caught_up": caught_up,
            "idle": caught_up and deps.refreshed_version == model.version and not app.rebalancing,
            "assigned": sorted(tp.partition for tp in app.consumer.assignment()) if app.started else [],
            "pairs": sum(len(row) for row in model.pairs.values()),
            "recovered_rows": deps.recovered_rows,
            "counts": dict(bus.stats.counts),
        }

    read_model = ReadModel(deps=deps, lists=lists, catalog=catalog, owners=owners, status=status)
    return StreamSpec(
        name=NAME,
        app=app,
        bus=bus,
        produces=PRODUCES,
        replicas=[catalog_replica, owners_replica, cowatch_replica, lists_replica],
        routes=routes(read_model),
        root_tasks={"refresh": refresh_loop},
    )
