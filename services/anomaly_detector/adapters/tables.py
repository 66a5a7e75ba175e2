"""The rules' state in faust tables (RocksDB through rocksdict, changelog topics declared in
``topics/topics.yaml``), as the :class:`~services.anomaly_detector.handlers.StateStore` the handlers use.

A row is a typed Avro record: ``reelbus.anomalies.SessionOwner`` for the session -> account table,
``reelbus.anomalies.RuleState`` for a rule's state, whose ``state_json`` is the rule's own JSON-able
state (``rules.py``), written with sorted keys so that the same state gives the same bytes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from services.bus.events import AvroEvent, RuleState, SessionOwner, SessionStarted


class RuleTable:
    """One rule's state per key, in a faust table of ``RuleState`` rows.

    The table is the truth; the states this worker wrote are also kept decoded (up to ``cache_size``
    keys), and a read uses the decoded copy only while the row still holds the very text written with
    it (after a rebalance or a recovery the row decides). The rules never change a state they are
    given, so the copy can be shared.
    """

    def __init__(self, table: Any, rule: str, cache_size: int = 10_000) -> None:
        self.table = table
        self.rule = rule
        self.cache_size = cache_size
        self._decoded: dict[str, tuple[str, Mapping[str, Any]]] = {}

    def get(self, key: str) -> Mapping[str, Any] | None:
        row = self.table.get(key)
        if row is None:
            return None
        cached = self._decoded.get(key)
        if cached is not None and cached[0] == row.state_json:
            return cached[1]
        state: dict[str, Any] = json.loads(row.state_json)
        return state

    def put(self, key: str, state: Mapping[str, Any], cause: AvroEvent) -> None:
        text = json.dumps(state, sort_keys=True, separators=(",", ":"))
        self.table[key] = RuleState(
            event_id=cause.event_id,
            event_time=cause.event_time,
            rule=self.rule,
            key=key,
            state_json=text,
        )
        if len(self._decoded) >= self.cache_size and key not in self._decoded:
            self._decoded.pop(next(iter(self._decoded)))
        self._decoded[key] = (text, state)


class SessionTable:
    """Session id -> account id, in a faust table of ``SessionOwner`` rows."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, session: str) -> str | None:
        row = self.table.get(session)
        return None if row is None else str(row.account_id)

    def put(self, session: str, account: str, cause: SessionStarted) -> None:
        self.table[session] = SessionOwner(
            event_id=cause.event_id,
            event_time=cause.event_time,
            session_id=uuid.UUID(session),
            account_id=uuid.UUID(account),
        )
