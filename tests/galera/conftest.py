"""The billing database for the tests of this folder (see ``tests/galera_fixtures.py``)."""

from tests.galera_fixtures import billing_db, database

__all__ = ["billing_db", "database"]
