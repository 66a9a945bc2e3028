"""Optuna's own storage contract (`optuna.testing.pytest_storages.StorageTestCase`, shipped with the
installed optuna) run against the storage class every worker uses, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.testing.pytest_storages import StorageTestCase

from kmnist_tune.service.retry import RetryingRDBStorage, open_worker_storage


def _worker_storage(url: str) -> RetryingRDBStorage:
    optuna.storages.RDBStorage(url).engine.dispose()  # Optuna's tables, as `study create` leaves them
    storage = open_worker_storage(url, log=lambda m: print(m))
    assert isinstance(storage, RetryingRDBStorage)
    storage.use_heartbeat(30, 120, 3)  # as a worker sets them once it has read its study's spec
    assert storage.get_heartbeat_interval() == 30 and storage.get_heartbeat_stale_trial_callback() is not None
    return storage


class TestWorkerStorageOnSQLite(StorageTestCase):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[RetryingRDBStorage]:
        st = _worker_storage(f"sqlite:///{tmp_path / 'contract.db'}")
        yield st
        st.engine.dispose()


@pytest.mark.postgres
class TestWorkerStorageOnPostgreSQL(StorageTestCase):
    @pytest.fixture
    def storage(self, pg_url: str) -> Iterator[RetryingRDBStorage]:
        st = _worker_storage(pg_url)
        yield st
        st.engine.dispose()
