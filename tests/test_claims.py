"""The budget claim and the storage locks through PgBouncer's transaction pooling (and directly):
many workers, exactly the budget, no lock left behind, few server connections. The workers are
threads running the real worker loop with a sleep objective (sim_worker.py)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
import psycopg
import pytest
import sqlalchemy
from conftest import pg_admin
from pg_sampler import ConnectionSampler
from sim_worker import make_study, work

from kmnist_tune.errors import UserError
from kmnist_tune.optuna_internals import trial_id
from kmnist_tune.service.claims import TABLE, TICKET_TTL_S, budget_slot, make_trial
from kmnist_tune.service.lock import storage_lock
from kmnist_tune.service.storage import engine, open_storage

# Forty workers, and more lock waiters than the server has connections: nothing else beside them.
pytestmark = pytest.mark.alone


def advisory_locks(database: str) -> int:
    with pg_admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = %s",
            (database,),
        ).fetchone()
    return int(row[0])  # type: ignore[index]


def run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001  (reported below, with the others)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    return results


def test_forty_workers_through_pgbouncer_finish_exactly_the_budget(pooled_pg_url: str) -> None:
    n_workers, n_trials = 40, 90
    database = pooled_pg_url.rsplit("/", 1)[1]
    make_study(pooled_pg_url, "many", n_trials)
    peak = ConnectionSampler(database)
    peak.start()
    rng = random.Random(0)
    ran = run_threads(n_workers, lambda i: work(pooled_pg_url, "many", lambda: rng.uniform(0.05, 0.3)))
    peak.stop()
    study = optuna.load_study(study_name="many", storage=open_storage(pooled_pg_url))
    states = [t.state for t in study.trials]
    # Exactly the budget, each trial once, none left running or lost.
    assert states.count(optuna.trial.TrialState.COMPLETE) == n_trials == len(states), states
    assert sum(ran) == n_trials
    assert len({t.number for t in study.trials}) == n_trials
    # 80 client connections, served by PgBouncer's pool: at most 25 on the server.
    assert peak.samples > 10 and 0 < peak.max_total <= 25, peak.max_total
    # Nothing outlives a transaction: no advisory lock held, no ticket left.
    assert advisory_locks(database) == 0
    with psycopg.connect(pooled_pg_url.replace("+psycopg", "")) as conn:
        assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (0,)
    print(f"\n{n_workers} workers, {n_trials} trials through PgBouncer: peak {peak.max_total} server connections")


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
def test_storage_lock_excludes_with_more_waiters_than_server_connections(through: str, pg_url: str, pooled_pg_url: str) -> None:
    # 30 waiters > PgBouncer's 25 server connections, and the holder needs a connection of its own
    # inside the lock (as creating a study does): waiting in the server would leave it none.
    url = pooled_pg_url if through == "pgbouncer" else pg_url
    make_study(url, "locked", 1)
    inside: list[int] = []
    overlaps = 0
    guard = threading.Lock()

    def contend(i: int) -> int:
        nonlocal overlaps
        storage = open_storage(url)
        try:
            for _ in range(2):
                with storage_lock(storage, "kmnist-tune/test/one-at-a-time"):
                    with guard:
                        overlaps += bool(inside)
                        inside.append(i)
                    storage.get_all_studies()  # uses the storage's second pooled connection
                    time.sleep(0.01)
                    with guard:
                        inside.remove(i)
            return 2
        finally:
            engine(storage).dispose()

    assert sum(run_threads(30, contend)) == 60
    assert overlaps == 0
    assert advisory_locks(url.rsplit("/", 1)[1]) == 0


def test_a_ticket_holds_its_slot_until_it_expires(pooled_pg_url: str) -> None:
    make_study(pooled_pg_url, "tickets", 1)
    storage = open_storage(pooled_pg_url)
    study_id = storage.get_study_id_from_name("tickets")
    eng = engine(storage)
    with budget_slot(storage, study_id, "tickets", 1) as granted:
        assert granted
        # While this claim is in progress (its trial not made yet), the one slot is taken.
        with budget_slot(storage, study_id, "tickets", 1) as other:
            assert not other
    with eng.begin() as conn:
        assert conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {TABLE}")).scalar_one() == 0
        # A worker that died between its claim and Optuna's ask leaves its ticket behind ...
        conn.execute(sqlalchemy.text(f"INSERT INTO {TABLE} (study_id) VALUES (:sid)"), {"sid": study_id})
    with budget_slot(storage, study_id, "tickets", 1) as granted:
        assert not granted
    # ... which stops counting once it is older than the time a claim can take.
    with eng.begin() as conn:
        conn.execute(
            sqlalchemy.text(f"UPDATE {TABLE} SET claimed_at = now() - make_interval(secs => :s)"), {"s": TICKET_TTL_S + 1}
        )
    with budget_slot(storage, study_id, "tickets", 1) as granted:
        assert granted
    with eng.begin() as conn:
        assert conn.execute(sqlalchemy.text(f"SELECT count(*) FROM {TABLE}")).scalar_one() == 0
    eng.dispose()


def test_a_database_without_the_claim_table_is_one_line(pg_url: str) -> None:
    make_study(pg_url, "old", 2)
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"DROP TABLE {TABLE}")  # as a database set up by an older kmnist-tune
    with pytest.raises(UserError, match=r"no kmnist_tune_claims table .* run `kmnist-tune schema` once"):
        work(pg_url, "old", lambda: 0.0)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_make_trial_pops_a_waiting_trial_first_and_otherwise_makes_one_the_cache_knows(
    kind: str, pg_url: str, tmp_path: Any
) -> None:
    url = pg_url if kind == "postgresql" else f"sqlite:///{tmp_path / 'make.db'}"
    make_study(url, "make", 10)
    storage = open_storage(url)
    study = optuna.load_study(study_name="make", storage=storage)
    study_id = storage.get_study_id_from_name("make")
    study.enqueue_trial({"lr": 0.01})
    numbers: list[int] = []  # what the worker seeds each trial's sampler with (studies.seed_sampler)
    try:
        popped, new = make_trial(study, storage, study_id, numbers.append)
        assert popped.number == 0 and not new and numbers == [0]
        assert popped.suggest_float("lr", 1e-4, 1e-1, log=True) == 0.01  # the enqueued parameters
        assert storage.get_trial(trial_id(popped)).state == optuna.trial.TrialState.RUNNING
        made, new = make_trial(study, storage, study_id, numbers.append)  # nothing waits now: a new trial
        assert made.number == 1 and new and numbers == [0, 1]
        assert storage.get_trial_system_attrs(trial_id(made)) == {}
        lr = made.suggest_float("lr", 1e-4, 1e-1, log=True)  # the study's cache knows the new trial
        study.tell(made, lr)
        study.tell(popped, 0.01)
        assert sorted((t.number, t.state.name) for t in study.get_trials()) == [(0, "COMPLETE"), (1, "COMPLETE")]
    finally:
        engine(storage).dispose()
