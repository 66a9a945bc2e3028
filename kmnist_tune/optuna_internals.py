"""The one door to Optuna's private parts: attributes and methods it does not document, and the
tables of its RDB schema. Nothing else in the package names them.

Optuna's public API lacks what a shared, budgeted study needs: a trial's id (every storage call
takes it, no public attribute gives it), the study's cached storage (what `Study.ask` writes
through), and small queries where the public calls read whole studies or every attribute. Each
function here is checked against Optuna's public API on SQLite and PostgreSQL
(tests/test_optuna_internals.py), and the schema version these queries were written for is pinned
there (SCHEMA_VERSION), so an upgrade that moves any of them fails a test instead of a study.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage

from .contract.records import FINISHED_STATES

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy

# RDBStorage's schema head (`get_head_version()`) these queries were written against.
SCHEMA_VERSION = "v3.2.0.a"
# Tables an Optuna database has once RDBStorage made it: without them, a database is not one.
REQUIRED_TABLES = frozenset({"studies", "version_info", "alembic_version"})
# Optuna's schema version tables: nobody but the database owner may write them (service/schema.py).
VERSION_TABLES = ("alembic_version", "version_info")

# A query's runner: (statement, parameters) -> rows, autocommitted (service/storage.autocommitted).
Run = Callable[[Any, dict[str, Any]], list[Any]]


def _states(states: tuple[str, ...]) -> str:
    return ", ".join(f"'{s}'" for s in states)


def schema_made(conn: sqlalchemy.Connection, *also: str) -> bool:
    """Whether RDBStorage has finished making this database (and it holds the tables `also`).

    A new RDBStorage makes its tables, then the version_info row, then stamps alembic_version, each
    in its own transaction. Until the stamp is there another process is still making the database
    (or never finished): opening an RDBStorage on it then would stamp it a second time and fail on
    alembic_version's unique key, so such a database counts as not made."""
    tables = set(sqlalchemy.inspect(conn).get_table_names())
    if not REQUIRED_TABLES | set(also) <= tables:
        return False
    return conn.execute(sqlalchemy.text("SELECT 1 FROM alembic_version")).first() is not None


# -- the objects ---------------------------------------------------------------------------------


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of a trial (live or frozen): every BaseStorage call takes it."""
    return int(trial._trial_id)


def study_id(study: optuna.Study | optuna.study.FrozenStudy) -> int:
    """The storage's id of a study (live, or as `get_all_studies` lists it), without a lookup by name."""
    return int(study._study_id)


def study_storage(study: optuna.Study) -> BaseStorage:
    """The storage a study writes through (for an RDB storage, Optuna's per-process cache in front of it)."""
    return study._storage


def new_trial(study: optuna.Study, before_sampling: Callable[[int], None] | None = None) -> optuna.Trial:
    """A new RUNNING trial, made the way `Study.ask` makes one when no trial waits: through the study's
    own cached storage (so its cache knows the trial), without ask's look for a WAITING trial.
    `before_sampling(number)` runs once the trial's number is known, before the sampler's first call
    (its relative sampling, in the Trial's constructor)."""
    tid = study._storage.create_new_trial(study._study_id)
    if before_sampling is not None:
        before_sampling(study._storage.get_trial_number_from_id(tid))
    return optuna.Trial(study, tid)


def rdb(storage: BaseStorage) -> RDBStorage | None:
    """The RDBStorage under Optuna's cache and our retrying wrapper (its `inner`), None for the proxy."""
    while not isinstance(storage, RDBStorage):
        inner = getattr(storage, "inner", None) or getattr(storage, "_backend", None)
        if inner is None:
            return None
        storage = inner
    return storage


def grpc_address(storage: BaseStorage) -> str:
    """host:port of a gRPC storage proxy client (it keeps no public record of where it connects)."""
    while not isinstance(storage, optuna.storages.GrpcStorageProxy):
        storage = getattr(storage, "inner", None)
        if storage is None:
            return "?"
    return f"{storage._host}:{storage._port}"


# The private storage method Optuna's `fail_stale_trials` calls.
STALE_TRIALS_METHOD = "_get_stale_trial_ids"
# The private RDBStorage methods Optuna's per-process cache calls (creating trials, every suggest,
# the sampler's and pruner's reads of the study): a worker's storage retries them as it retries the
# public ones, or a database restart during a suggest would end the worker.
CACHE_BACKEND_METHODS = frozenset(
    {"_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials", STALE_TRIALS_METHOD}
)


def stale_trial_ids(storage: BaseStorage, study_id: int) -> list[int]:
    """The RUNNING trials whose heartbeat stopped: what `fail_stale_trials` fails (RDB storages)."""
    return list(getattr(storage, STALE_TRIALS_METHOD)(study_id))


# -- small queries on Optuna's RDB schema ----------------------------------------------------------


def state_counts(run: Run, study_id: int) -> dict[str, int]:
    """Trials per state name (no zero rows), counted by the database."""
    rows = run(sqlalchemy.text("SELECT state, count(*) FROM trials WHERE study_id = :sid GROUP BY state"), {"sid": study_id})
    out: dict[str, int] = {}
    for state, n in rows:
        name = state if isinstance(state, str) else optuna.trial.TrialState(state).name
        out[str(name).split(".")[-1]] = int(n)
    return out


def finished_and_best(run: Run, study_id: int, maximize: bool) -> tuple[int, float | None]:
    """How many trials finished, and the best value (None before the first complete one)."""
    # Optuna stores an infinite value as a value type without a number; grouping by it keeps them apart.
    query = sqlalchemy.text(
        f"SELECT 'finished', count(*), NULL, NULL FROM trials WHERE study_id = :sid AND state IN ({_states(FINISHED_STATES)}) "
        "UNION ALL "
        "SELECT CAST(v.value_type AS VARCHAR(16)), count(*), min(v.value), max(v.value) FROM trial_values v "
        "JOIN trials t ON t.trial_id = v.trial_id WHERE t.study_id = :sid AND t.state = 'COMPLETE' AND v.objective = 0 "
        "GROUP BY v.value_type"
    )
    rows = {str(kind).split(".")[-1]: (n, low, high) for kind, n, low, high in run(query, {"sid": study_id})}
    top, bottom = ("INF_POS", "INF_NEG") if maximize else ("INF_NEG", "INF_POS")
    best: float | None
    if top in rows:
        best = float("inf") if maximize else float("-inf")
    elif "FINITE" in rows:
        best = float(rows["FINITE"][2] if maximize else rows["FINITE"][1])
    elif bottom in rows:
        best = float("-inf") if maximize else float("inf")
    else:
        best = None
    return int(rows["finished"][0]), best


def study_user_attrs(run: Run, study_id: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """Some of a study's user attributes (each is JSON text in Optuna's schema), not all of them."""
    query = sqlalchemy.text(
        "SELECT key, value_json FROM study_user_attributes WHERE study_id = :sid AND key IN :keys"
    ).bindparams(sqlalchemy.bindparam("keys", expanding=True))
    return {k: json.loads(v) for k, v in run(query, {"sid": study_id, "keys": list(keys)})}


# A value's size, as each backend measures it without handing the value over: PostgreSQL's
# octet_length reads a TOASTed value's stored size (nothing is decompressed); SQLite (3.40 has no
# octet_length) loads each value once, in its own memory, to count its characters.
_SIZE_OF = {"postgresql": "octet_length({})", "sqlite": "length({})"}
# The two tables of study attributes, and their id columns.
STUDY_ATTR_TABLES = {
    "user": ("study_user_attributes", "study_user_attribute_id"),
    "system": ("study_system_attributes", "study_system_attribute_id"),
}
_IDS_PER_QUERY = 500


def bounded_study_attrs(
    run: Run, backend: str, which: str, most_bytes: int, keys: tuple[str, ...] | None = None, most_per_study: int | None = None
) -> list[tuple[int, str, str | None, int]]:
    """(study id, key, value's JSON text, its size) of the studies' user or system attributes
    (`which`): only `keys` (None: all), at most `most_per_study` per study (the first by key), and the
    text only where the size is at most `most_bytes` (None where larger: the database never sends it).

    Two queries: the sizes (computed before anything sorts the rows, so no sort ever holds a value),
    then the values small enough."""
    table, id_column = STUDY_ATTR_TABLES[which]
    where = "WHERE key IN :keys" if keys is not None else ""
    sizes = sqlalchemy.text(
        f"WITH s AS MATERIALIZED (SELECT {id_column} AS id, study_id, key, {_SIZE_OF[backend].format('value_json')} AS size "
        f"FROM {table} {where}) SELECT id, study_id, key, size FROM "
        "(SELECT id, study_id, key, size, row_number() OVER (PARTITION BY study_id ORDER BY key) AS n FROM s) AS a "
        "WHERE n <= :rows ORDER BY study_id, key"
    )
    params: dict[str, Any] = {"rows": most_per_study if most_per_study is not None else 2**62}
    if keys is not None:
        sizes = sizes.bindparams(sqlalchemy.bindparam("keys", expanding=True))
        params["keys"] = list(keys)
    rows = [
        (int(i), int(sid), str(key), int(n or 0)) for i, sid, key, n in run(sizes, params) if sid is not None and key is not None
    ]
    wanted = [i for i, _, _, n in rows if n <= most_bytes]
    values = sqlalchemy.text(f"SELECT {id_column}, value_json FROM {table} WHERE {id_column} IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True)
    )
    texts: dict[int, str] = {}
    for start in range(0, len(wanted), _IDS_PER_QUERY):
        texts.update((int(i), v) for i, v in run(values, {"ids": wanted[start : start + _IDS_PER_QUERY]}))
    return [(sid, key, texts.get(i) if n <= most_bytes else None, n) for i, sid, key, n in rows]


def study_directions(run: Run) -> dict[int, list[optuna.study.StudyDirection]]:
    """Every study's objectives' directions, in objective order."""
    query = sqlalchemy.text("SELECT study_id, objective, direction FROM study_directions ORDER BY study_id, objective")
    out: dict[int, list[optuna.study.StudyDirection]] = {}
    for sid, _, direction in run(query, {}):
        name = direction if isinstance(direction, str) else direction.name
        out.setdefault(int(sid), []).append(optuna.study.StudyDirection[str(name).split(".")[-1]])
    return out


def study_ids_and_names(run: Run) -> list[tuple[int, str]]:
    return [(int(i), str(n)) for i, n in run(sqlalchemy.text("SELECT study_id, study_name FROM studies ORDER BY study_id"), {})]


def frozen_study(
    study_id: int,
    name: str,
    directions: list[optuna.study.StudyDirection],
    user_attrs: dict[str, Any],
    system_attrs: dict[str, Any],
) -> FrozenStudy:
    """A study as `get_all_studies` lists it (Optuna's FrozenStudy, which it does not export)."""
    from optuna.study._frozen import FrozenStudy

    return FrozenStudy(name, None, user_attrs, system_attrs, study_id, directions=directions)


def study_id_by_name(run: Run, name: str) -> int | None:
    rows = run(sqlalchemy.text("SELECT study_id FROM studies WHERE study_name = :name"), {"name": name})
    return int(rows[0][0]) if rows else None


def study_names(run: Run) -> list[str]:
    return [str(r[0]) for r in run(sqlalchemy.text("SELECT study_name FROM studies ORDER BY study_id"), {})]


def running_without_heartbeat(run: Run, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat."""
    query = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :sid AND t.state = 'RUNNING' AND h.trial_id IS NULL"
    )
    return [int(r[0]) for r in run(query, {"sid": study_id})]


def counted_trials_sql(study_id: int, states: tuple[str, ...]) -> str:
    """A scalar subquery: the study's trials in `states` (the budget claim's count, claims.py, which
    must be one query string with the claim's lock and insert)."""
    return f"(SELECT count(*) FROM trials WHERE study_id = {int(study_id)} AND state IN ({_states(states)}))"


# Locks the study row of a trial against DELETE (a study delete) until the transaction ends; no row
# when the trial (or its study) is gone. PostgreSQL.
LOCK_STUDY_OF_TRIAL = sqlalchemy.text(
    "SELECT s.study_id FROM studies s JOIN trials t ON t.study_id = s.study_id WHERE t.trial_id = :tid FOR KEY SHARE OF s"
)
# The artifact ids Optuna's upload_artifact recorded on any study or trial, as `artifacts:ID` keys.
RECORDED_ARTIFACT_KEYS = sqlalchemy.text(
    "SELECT key FROM study_system_attributes WHERE key LIKE 'artifacts:%' "
    "UNION SELECT key FROM trial_system_attributes WHERE key LIKE 'artifacts:%'"
)
ALL_TRIAL_IDS = sqlalchemy.text("SELECT trial_id FROM trials")
# Every study's id, as a subquery (claims.py drops the claim tickets of studies that are gone).
ALL_STUDY_IDS_SQL = "SELECT study_id FROM studies"


def dashboard_api_view(callback: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """(the view inside it, optuna-dashboard's own JSON-API wrapper) when `callback` is one of
    optuna-dashboard's API views (its private `_bottle_util.json_api_view`, which answers every error
    itself, as a 500, except bottle.HTTPError); None for its other routes."""
    from optuna_dashboard._bottle_util import json_api_view

    view = getattr(callback, "__wrapped__", None)
    if view is not None and callback.__code__ is json_api_view(lambda: {}).__code__:
        return view, json_api_view
    return None
