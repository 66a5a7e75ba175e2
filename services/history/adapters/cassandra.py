"""The Cassandra driver on asyncio: ``execute_async``'s ResponseFuture callbacks (which run on the
driver's I/O thread) settle an asyncio future through ``loop.call_soon_threadsafe``, so a query never
blocks the event loop. The blocking parts of the driver (connecting, preparing) run in a thread.

Each request runs in a CLIENT span ``cassandra <operation> <table>``, a child of whatever span is
current (the CONSUMER span of an event, the SERVER span of a request).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from cassandra import ConsistencyLevel, OperationTimedOut, RequestExecutionException
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, dict_factory
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.bus.consumer import Retryable

log = logging.getLogger("reelbus.history.cassandra")

Row = dict[str, Any]
_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|TABLE(?: IF NOT EXISTS)?)\s+([\w.]+)", re.IGNORECASE)


class CassandraUnavailable(Retryable):
    """Cassandra did not answer (no host, timeout, unavailable replicas): worth retrying."""


def describe(cql: str) -> str:
    """``SELECT live_vh`` for a statement: its operation and its table."""
    verb = cql.split(None, 1)[0].upper() if cql.strip() else "QUERY"
    found = _TABLE.search(cql)
    return f"{verb} {found.group(1).split('.')[-1]}" if found else verb


@dataclass(frozen=True)
class Statement:
    """A prepared statement with the name its spans carry."""

    name: str
    prepared: PreparedStatement
    cql: str


class CassandraClient:
    def __init__(self, cluster: Cluster, session: Session, keyspace: str) -> None:
        self.cluster = cluster
        self.session = session
        self.keyspace = keyspace
        self._tracer = trace.get_tracer("reelbus.history.cassandra")

    @classmethod
    async def connect(
        cls,
        hosts: Sequence[str],
        port: int,
        *,
        protocol_version: int,
        request_timeout: float,
        connect_timeout: float,
    ) -> CassandraClient:
        """Connect (in a thread), retrying with backoff for up to ``connect_timeout`` seconds."""
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
            request_timeout=request_timeout,
            row_factory=dict_factory,
            consistency_level=ConsistencyLevel.LOCAL_QUORUM,
            serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL,
        )
        deadline = time.monotonic() + connect_timeout
        delay = 0.5
        while True:
            cluster = Cluster(
                list(hosts),
                port=port,
                protocol_version=protocol_version,
                execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                connect_timeout=min(5.0, request_timeout),
            )
            try:
                session = await asyncio.to_thread(cluster.connect)
                return cls(cluster, session, "")
            except (NoHostAvailable, OperationTimedOut, OSError) as exc:
                await asyncio.to_thread(cluster.shutdown)
                if time.monotonic() + delay > deadline:
                    raise CassandraUnavailable(
                        f"cannot connect to Cassandra at {hosts}:{port}: {exc}"
                    ) from exc
                log.warning("waiting for Cassandra at %s:%s (%s); retry in %.1fs", hosts, port, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def use(self, keyspace: str) -> None:
        await asyncio.to_thread(self.session.set_keyspace, keyspace)
        self.keyspace = keyspace

    async def prepare(self, cql: str, name: str | None = None) -> Statement:
        prepared = await asyncio.to_thread(self.session.prepare, cql)
        return Statement(name or describe(cql), prepared, cql)

    async def execute(
        self, statement: Statement | str, params: Sequence[Any] = (), *, traced: bool = True
    ) -> list[Row]:
        """One request; every page of its result (queries here are bounded by their LIMITs).
        ``traced=False`` for probes, which would otherwise start a trace each."""
        if isinstance(statement, str):
            return await self._run(describe(statement), statement, statement, params, traced)
        return await self._run(statement.name, statement.prepared, statement.cql, params, traced)

    async def batch(
        self, parts: Sequence[tuple[Statement, Sequence[Any]]], *, logged: bool = True
    ) -> list[Row]:
        """A batch: logged (atomic across partitions) or unlogged (one partition)."""
        batch = BatchStatement(batch_type=BatchType.LOGGED if logged else BatchType.UNLOGGED)
        for statement, params in parts:
            batch.add(statement.prepared, params)
        tables = sorted({s.name.split()[-1] for s, _ in parts})
        name = f"BATCH {','.join(tables)}"
        return await self._run(name, batch, "; ".join(s.cql for s, _ in parts), (), True)

    def _span(self, name: str, cql: str, traced: bool) -> AbstractContextManager[trace.Span]:
        if not traced:
            return nullcontext(trace.INVALID_SPAN)
        return self._tracer.start_as_current_span(
            f"cassandra {name}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "cassandra",
                "db.namespace": self.keyspace,
                "db.operation.name": name.split(maxsplit=1)[0],
                "db.collection.name": name.rsplit(maxsplit=1)[-1],
                "db.query.text": cql,
            },
        )

    async def _run(self, name: str, request: Any, cql: str, params: Sequence[Any], traced: bool) -> list[Row]:
        loop = asyncio.get_running_loop()
        with self._span(name, cql, traced) as span:
            done: asyncio.Future[list[Row]] = loop.create_future()
            rows: list[Row] = []
            try:
                response = self.session.execute_async(request, list(params) or None)
            except Exception as exc:
                failure = _classify(exc, span)
                if failure is exc:
                    raise
                raise failure from exc

            def on_page(page: Any) -> None:  # the driver's I/O thread
                rows.extend(page or ())
                if response.has_more_pages:
                    response.start_fetching_next_page()
                else:
                    loop.call_soon_threadsafe(_settle, done, rows, None)

            def on_error(exc: BaseException) -> None:  # the driver's I/O thread
                loop.call_soon_threadsafe(_settle, done, None, exc)

            response.add_callbacks(on_page, on_error)
            try:
                return await done
            except Exception as exc:
                failure = _classify(exc, span)
                if failure is exc:
                    raise
                raise failure from exc

    async def close(self) -> None:
        await asyncio.to_thread(self.cluster.shutdown)


def _classify(exc: Exception, span: trace.Span) -> Exception:
    """What to raise for a failed request: transient failures become ``CassandraUnavailable``
    (retried by the consumer, a 503 over HTTP); anything else (bad CQL, a bug) as it is."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    if isinstance(exc, NoHostAvailable | OperationTimedOut | RequestExecutionException | OSError):
        return CassandraUnavailable(f"{type(exc).__name__}: {exc}")
    return exc


def _settle(future: asyncio.Future[list[Row]], rows: list[Row] | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(rows or [])
