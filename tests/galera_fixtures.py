"""Fixtures for the tests that need the billing database (``tests/galera``, ``tests/billing``): its
five components of ``services/cli/galera.py``, started once per module through ``infra.up`` like
``make up`` does, and a database of each test's own. Those packages' conftests import them.

Components that were already running are reused and left running; the ones started here are
stopped (by pid) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator

import pytest

from services.cli import galera, infra


@pytest.fixture(scope="module")
def billing_db(layout: infra.Layout) -> Iterator[infra.Layout]:
    """The billing database's components, started like ``make up`` does, for this module."""
    say = lambda m: print(f"[galera] {m}", flush=True)  # noqa: E731
    result = asyncio.run(infra.up(layout, list(galera.NAMES), progress=say))
    try:
        yield layout
    finally:
        if result.started:
            infra.down(layout, result.started, progress=say)


@pytest.fixture
def database(billing_db: infra.Layout) -> Iterator[str]:
    """A database of this test's own, made and dropped through HAProxy's write endpoint."""
    name = f"billing_test_{uuid.uuid4().hex[:10]}"
    write = galera.Ports.from_env().write
    galera.endpoint_sql(write, f"CREATE DATABASE {name}")
    yield name
    with contextlib.suppress(galera.SqlError):
        galera.endpoint_sql(write, f"DROP DATABASE IF EXISTS {name}", timeout=30)
