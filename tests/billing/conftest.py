"""Fixtures for the billing tests: the Galera cluster (started like ``make up`` if it is not
running; what is started here is stopped by pid at the end), a database per test made through
HAProxy's write endpoint, and an HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.galera_fixtures import billing_db, database

__all__ = ["billing_db", "database", "http"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
