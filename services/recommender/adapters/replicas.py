"""The folds of the recommender's replicas: plain in-memory state, filled by ``streams.Replica``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from services.bus.events import AvroEvent, ChangeType, ProfileCreated, ProfileRecommendations, TitleChanged
from services.bus.streams import ReplicaRecord


@dataclass
class Catalog:
    """Title id -> display name, from ``catalog.changes`` (a deleted title is unknown again)."""

    names: dict[str, str] = field(default_factory=dict)

    def fold(self, event: AvroEvent, record: ReplicaRecord) -> None:
        if not isinstance(event, TitleChanged):
            return
        if event.change is ChangeType.DELETED:
            self.names.pop(event.title_id, None)
        else:
            self.names[event.title_id] = event.title.name if event.title is not None else event.title_id


@dataclass
class Owners:
    """Profile id -> the account that owns it, from ``accounts.profiles``."""

    accounts: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)

    def fold(self, event: AvroEvent, record: ReplicaRecord) -> None:
        if isinstance(event, ProfileCreated):
            self.accounts[event.profile_id] = event.account_id


@dataclass
class Lists:
    """Profile id -> its latest published list, from the compacted ``recommendations.profiles``."""

    latest: dict[uuid.UUID, ProfileRecommendations] = field(default_factory=dict)

    def fold(self, event: AvroEvent, record: ReplicaRecord) -> None:
        if isinstance(event, ProfileRecommendations):
            self.latest[event.profile_id] = event
