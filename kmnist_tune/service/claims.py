"""The budget claim: with n_trials N, however many workers attach, the study never finishes more
than N trials and never runs one twice.

Counting the trials and creating one must be one atomic step. Optuna creates trials in its own
transactions (`study.ask()`), so the step cannot be one transaction; how it is made atomic depends
on the backend:

- PostgreSQL: a *claim ticket*. One short transaction, sent as one query, takes a
  transaction-scoped advisory lock on the study, counts its finished and running trials plus the
  tickets of claims still in progress, and inserts a ticket if the budget allows; the worker then
  asks Optuna for the trial and deletes its ticket. Nothing outlives a transaction, so this holds
  through PgBouncer's transaction pooling (a session-level lock would stay on whichever server
  connection took it), and the lock is held only for the claim's few statements, never while
  Optuna samples. A ticket whose worker died between claim and ask expires after TICKET_TTL_S.
- SQLite (one machine): an flock beside the database file, held around the count and the ask.
- The gRPC proxy: no shared lock exists; the count and the ask are best effort.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import optuna
import psycopg
import sqlalchemy
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from ..contract.records import FINISHED_STATES
from ..errors import UserError
from ..optuna_internals import ALL_STUDY_IDS_SQL, counted_trials_sql, new_trial
from .lock import lock_key, storage_lock
from .storage import autocommitted, backend, count_states, engine, retried
from .tables import CLAIMS_TABLE as TABLE

# A ticket lives from the claim until Optuna has made the trial (milliseconds; seconds for a
# sampler over thousands of trials). Older ones belong to workers that died in between.
TICKET_TTL_S = 120
# Trial states the budget counts: what finished for good, and what is running now.
COUNTED = (*FINISHED_STATES, "RUNNING")
# A live ticket was stamped by this server (claimed_at defaults to now()) within the last TICKET_TTL_S.
# Anyone sharing the database can insert one dated a century ahead, which would count against the
# budget forever: one dated after the server's clock (clock_timestamp(), not the transaction's start,
# which a ticket committed while this claim waited for the lock may follow) is no ticket of ours, and
# is dropped with the expired ones. The 5 s let the server's clock step back a little (NTP).
LIVE = "claimed_at >= now() - make_interval(secs => {ttl}) AND claimed_at <= clock_timestamp() + interval '5 seconds'"
DEAD = "(claimed_at < now() - make_interval(secs => {ttl}) OR claimed_at > clock_timestamp() + interval '5 seconds')"


def _claim_sql(study_id: int, study_name: str, n_trials: int) -> str:
    """The whole claim as one simple-protocol query string: the server runs it in one go, so the
    transaction (and PgBouncer's server connection) never waits for this client between statements.
    The lock is a statement of its own so that the count, a later statement, sees every ticket
    committed while this one waited. The expired tickets of workers that died between claim and
    ask are dropped in the same statement as the count (a data-modifying CTE shares its snapshot,
    so the count also skips them by age), and so are tickets dated in the future (LIVE). Only
    integers are formatted in, each through int()."""
    sid, budget, ttl = int(study_id), int(n_trials), int(TICKET_TTL_S)
    return f"""
    BEGIN;
    SELECT pg_advisory_xact_lock({int(lock_key(f"kmnist-tune/budget/{study_name}"))});
    WITH expired AS (
        DELETE FROM {TABLE} WHERE study_id = {sid} AND {DEAD.format(ttl=ttl)}
    ), counted AS (
        SELECT {counted_trials_sql(sid, COUNTED)}
             + (SELECT count(*) FROM {TABLE} WHERE study_id = {sid} AND {LIVE.format(ttl=ttl)}) AS n
    )
    INSERT INTO {TABLE} (study_id) SELECT {sid} FROM counted WHERE counted.n < {budget}
    RETURNING claim_id;
    COMMIT;
    """


def _take_ticket(eng: sqlalchemy.Engine, study_id: int, study_name: str, n_trials: int) -> int | None:
    """Lock the study's budget, drop expired tickets, insert one if there is room: one transaction
    in one round trip. The lock waits in the server while another worker's claim finishes (well
    under a millisecond of server time), and is released by the COMMIT or when the connection dies."""
    raw = eng.raw_connection()  # pooled, like every other connection of this storage
    conn = raw.driver_connection  # psycopg's: several statements in one query need its simple protocol
    claim_id: int | None = None
    try:
        conn.autocommit = True  # the string holds its own BEGIN and COMMIT
        with conn.cursor() as cur:
            cur.execute(_claim_sql(study_id, study_name, n_trials))
            while True:  # one result per statement; the INSERT's holds the ticket, if one was taken
                if cur.description is not None and cur.description[0].name == "claim_id":
                    row = cur.fetchone()
                    claim_id = None if row is None else int(row[0])
                if not cur.nextset():
                    break
    except psycopg.errors.UndefinedTable:
        conn.execute("ROLLBACK")
        raise UserError(
            f"the study database has no {TABLE} table (it was set up by an older kmnist-tune); "
            "run `kmnist-tune schema` once as the database owner"
        ) from None
    finally:
        if not conn.closed:
            conn.autocommit = False
        raw.close()
    return claim_id


def _drop_ticket(storage: BaseStorage, claim_id: int) -> None:
    autocommitted(storage, sqlalchemy.text(f"DELETE FROM {TABLE} WHERE claim_id = :id"), {"id": claim_id})


def pending_claims(storage: BaseStorage, study_id: int) -> int:
    """Claims granted whose trial Optuna is still making (PostgreSQL; 0 elsewhere)."""
    if backend(storage) != "postgresql":
        return 0
    query = sqlalchemy.text(f"SELECT count(*) FROM {TABLE} WHERE study_id = :sid AND {LIVE.format(ttl=int(TICKET_TTL_S))}")
    return int(autocommitted(storage, query, {"sid": study_id})[0][0])


def prune_tickets(storage: BaseStorage) -> int:
    """`kmnist-tune schema --prune`: drop the tickets no claim holds (expired, or dated in the future),
    of every study and of studies that are gone. Returns how many went."""
    query = sqlalchemy.text(
        f"WITH gone AS (DELETE FROM {TABLE} WHERE {DEAD.format(ttl=int(TICKET_TTL_S))}"
        f" OR study_id NOT IN ({ALL_STUDY_IDS_SQL}) RETURNING 1) SELECT count(*) FROM gone"
    )
    return int(autocommitted(storage, query, {})[0][0])


def make_trial(
    study: optuna.Study, storage: BaseStorage, study_id: int, before_sampling: Callable[[int], None]
) -> tuple[optuna.Trial, bool]:
    """What `study.ask()` does, without its read of the whole study when no trial waits.

    Optuna's ask first brings its per-process cache of the study up to date, to look for a WAITING
    trial (a retry, an enqueued warm start) to pop: it re-reads every trial that is running or
    changed since this worker last asked, O(workers) rows (30-70 ms of one core at 200 workers,
    bench_scale). Here one filtered query looks for WAITING trials instead; only when one is there
    does Optuna's ask pop it. Otherwise the trial is made the way ask makes it, through the study's
    own cached storage so the cache knows it. A sampler that reads the other trials still brings
    the cache up to date, in the trial's first suggest, as it did inside ask. A trial that turns
    WAITING between the query and the create is popped by the next claim, as with ask itself.

    `before_sampling(number)` seeds the sampler for the trial (studies.seed_sampler). A popped trial has
    its parameters already (a retry's, an enqueued one's): only those it lacks are sampled, after.

    Returns the trial, and whether it was made just now (so it has no attributes yet: it is no retry)."""
    if storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()
        before_sampling(trial.number)
        return trial, False
    return new_trial(study, before_sampling), True


@contextmanager
def budget_slot(storage: BaseStorage, study_id: int, study_name: str, n_trials: int | None) -> Iterator[bool]:
    """Yields whether the budget has room for one more trial; when it does, the caller makes the
    trial (make_trial) inside the block, and the slot is its own until the block ends."""
    if n_trials is None:
        yield True
        return
    kind = backend(storage)
    if kind != "postgresql":
        # SQLite: the flock is held around the count and the ask. gRPC: no lock (best effort).
        with storage_lock(storage, f"kmnist-tune/budget/{study_name}"):
            c = count_states(storage, study_id)
            yield c.finished + c.running < n_trials
        return
    eng = engine(storage)
    # A worker's storage rides out a database restart; so do its claims.
    claim_id = retried(storage, lambda: _take_ticket(eng, study_id, study_name, n_trials))
    if claim_id is None:
        yield False
        return
    try:
        yield True
    finally:
        # The trial now counts itself (RUNNING); until this delete it counts twice, which only makes
        # another worker's claim wait. If the delete is lost, the ticket expires.
        _drop_ticket(storage, claim_id)
