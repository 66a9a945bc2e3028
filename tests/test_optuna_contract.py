"""Optuna's own storage contract (`optuna.testing.pytest_storages.StorageTestCase`, shipped with the
installed optuna) run against the storage class every worker uses, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from optuna.testing.pytest_storages import StorageTestCase

from kmnist_tune.service.retry import RetryingRDBStorage, open_worker_storage


def _worker_storage(url: str) -> RetryingRDBStorage:
    """On a copy of the database `kmnist-tune schema` made once for the run (conftest's templates):
    the tables as `study create` leaves them, without making Optuna's schema for each of the tests."""
    storage = open_worker_storage(url, log=lambda m: print(m))
    assert isinstance(storage, RetryingRDBStorage)
    storage.use_heartbeat(30, 120, 3)  # as a worker sets them once it has read its study's spec
    assert storage.get_heartbeat_interval() == 30 and storage.get_heartbeat_stale_trial_callback() is not None
    return storage


class TestWorkerStorageOnSQLite(StorageTestCase):
    @pytest.fixture
    def storage(self, sqlite_schema_url: str) -> Iterator[RetryingRDBStorage]:
        st = _worker_storage(sqlite_schema_url)
        yield st
        st.engine.dispose()


@pytest.mark.postgres
class TestWorkerStorageOnPostgreSQL(StorageTestCase):
    @pytest.fixture
    def storage(self, pg_schema_url: str) -> Iterator[RetryingRDBStorage]:
        st = _worker_storage(pg_schema_url)
        yield st
        st.engine.dispose()
