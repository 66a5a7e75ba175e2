"""The recommender's business logic: one function per input, of (event, dependencies).

``on_view`` folds a viewing into the profile's row of the ``profiles`` table (a RocksDB table with a
declared changelog), sends the co-watch record of a first viewing to ``recommender.cowatch`` and
publishes the profile's list when it changed. The row keeps that co-watch record until the viewing's
offset is committed, and a redelivered viewing sends it again (``scoring.hold``): a crash between the
changelog record and the output record loses nothing. Every worker folds all of ``recommender.cowatch`` into
the same model (a replica); while it moves, ``refresh`` re-ranks this worker's profiles and publishes
the lists that changed. A published list's id depends only on its content, so a repeat is the same
record on a compacted topic (idempotent). The algorithm itself is in ``scoring`` (pure).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from services.bus.events import ProfileHistory, ViewRecorded
from services.bus.streams import Replica, StreamBus
from services.bus.tracing import ATTR_PROFILE_ID, ATTR_TITLE_ID
from services.recommender import scoring
from services.recommender.adapters.replicas import Catalog, Owners

log = logging.getLogger("reelbus.recommender")

VIEWS = "history.views"
COWATCH = "recommender.cowatch"
LISTS = "recommendations.profiles"
PROFILES = "accounts.profiles"
TITLES = "catalog.changes"


@dataclass
class Dependencies:
    bus: StreamBus
    table: Any  # the faust table: profile id (str) -> ProfileHistory
    model: scoring.Model
    catalog: Catalog
    owners: Owners
    catalog_replica: Replica | None = None
    owners_replica: Replica | None = None
    sync_seconds: float = 5.0
    published: dict[str, str] = field(default_factory=dict)  # profile -> digest of its last list sent
    refreshed_version: int = -1
    recovered_rows: int = 0  # profiles in this worker's table when its last recovery completed
    last_view: float = 0.0  # monotonic time of the latest viewing handled
    last_refresh: float = 0.0


async def _known(present: bool, replica: Replica | None, sync_seconds: float, check: Any) -> bool:
    """Whether a title or profile is known, after letting its replica catch up with its topic."""
    if present:
        return True
    if replica is not None and sync_seconds > 0:
        await replica.sync(sync_seconds)
    return bool(check())


async def on_view(
    event: ViewRecorded, deps: Dependencies, offset: int | None = None, committed: int | None = None
) -> None:
    """Fold a viewing (at ``offset`` of its partition, whose committed offset is ``committed``)."""
    span = trace.get_current_span()
    span.set_attribute(ATTR_PROFILE_ID, str(event.profile_id))
    span.set_attribute(ATTR_TITLE_ID, event.title_id)
    topic = deps.bus.declared(VIEWS).name
    owners, catalog = deps.owners.accounts, deps.catalog.names
    if not await _known(
        event.profile_id in owners,
        deps.owners_replica,
        deps.sync_seconds,
        lambda: event.profile_id in owners,
    ):
        deps.bus.skip(topic, "unknown_profile", f"profile {event.profile_id} (event {event.event_id})")
        return
    if not await _known(
        event.title_id in catalog, deps.catalog_replica, deps.sync_seconds, lambda: event.title_id in catalog
    ):
        deps.bus.skip(topic, "unknown_title", f"title {event.title_id!r} (event {event.event_id})")
        return
    deps.last_view = time.monotonic()
    key = str(event.profile_id)
    view = scoring.View(
        event_id=str(event.event_id),
        profile_id=event.profile_id,
        title_id=event.title_id,
        event_time_ms=scoring.ms(event.event_time),
        completed=event.completed,
    )
    before = deps.table.get(key)
    state, cowatched = scoring.apply_view(before, view, deps.model.params)
    if state is None:
        again = scoring.unconfirmed(before, view.event_id)
        if again is not None:  # counted, but its offset was not committed: its output may be lost
            await deps.bus.send(COWATCH, key, again)
            deps.bus.stats.add("cowatch_resent")
        deps.bus.skip(topic, "duplicate", f"event {event.event_id} was already counted")
        return
    if offset is not None:
        state = scoring.confirm(state, committed)
        if cowatched is not None:
            state = scoring.hold(state, offset, cowatched, deps.model.params)
    deps.table[key] = state
    if cowatched is not None:
        await deps.bus.send(COWATCH, key, cowatched)
    await publish(state, deps)


async def publish(state: ProfileHistory, deps: Dependencies) -> bool:
    """Send the profile's list if it differs from the last one this worker sent."""
    items = scoring.recommend(state, deps.model)
    digest = scoring.digest(items)
    key = str(state.profile_id)
    if deps.published.get(key) == digest:
        return False
    await deps.bus.send(LISTS, key, scoring.as_event(state, deps.model, items))
    deps.published[key] = digest
    deps.bus.stats.add("lists_published")
    return True


def refresh_due(deps: Dependencies, quiet: float, at_least: float) -> bool:
    """A re-rank pass costs one scoring per profile of this worker: it runs once the viewings have
    been quiet for ``quiet`` seconds (a backlog is worked off first), or every ``at_least`` seconds
    under a steady stream, and only if the model moved."""
    if deps.model.version == deps.refreshed_version:
        return False
    now = time.monotonic()
    return now - deps.last_view >= quiet or now - deps.last_refresh >= at_least


async def refresh(deps: Dependencies) -> int:
    """Re-rank this worker's profiles if the model moved since the last time; the lists published."""
    version = deps.model.version
    if version == deps.refreshed_version:
        return 0
    deps.last_refresh = time.monotonic()
    sent = 0
    for _key, state in list(deps.table.items()):
        if await publish(state, deps):
            sent += 1
    deps.refreshed_version = version
    return sent
