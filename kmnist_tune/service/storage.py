"""Storage access: URL resolution, opening Optuna's storages, what backend a storage is, and the
queries every command shares (does the study exist, how many trials are in each state).

Every place that talks to the study database goes through here (retries: retry.py, the shared lock:
lock.py), so connection limits, time-outs and the error lines a user sees are decided once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from ..errors import UserError
from ..masking import mask

# Optuna's INFO lines ("A new study created ...") and its notes that heartbeats and retries are
# experimental are not for our users; our own lines say what happened.
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

DEFAULT_STORAGE = "sqlite:///kmnist-tune.db"
ENV_STORAGE = "KMNIST_TUNE_STORAGE"
URL_HELP = (
    "use sqlite:///path/to/file.db, postgresql+psycopg://user:password@host:5432/dbname, "
    "or grpc://host:port (a `kmnist-tune storage-proxy`)"
)


def resolve_url(url: str | None) -> str:
    """--storage, else $KMNIST_TUNE_STORAGE, else a SQLite file in the working directory."""
    url = url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE
    if url.startswith("grpc://"):
        if "@" in url.removeprefix("grpc://").split("/")[0]:
            raise UserError(f"storage URL {mask(url)!r}: the storage proxy takes no credentials; use grpc://host:port")
        _grpc_host_port(url)
        return url
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise UserError(f"malformed storage URL {mask(url)!r}; {URL_HELP}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        # psycopg (3) is the driver we ship; SQLAlchemy's default would be psycopg2.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    elif backend not in ("sqlite", "postgresql"):
        raise UserError(f"unsupported storage {mask(url)!r}; {URL_HELP}")
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UserError(
            f"storage {url!r} is an in-memory SQLite database, gone when the command ends; give a file: sqlite:///path/to/file.db"
        )
    return url


def _grpc_host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"malformed storage URL {mask(url)!r}: a proxy URL is grpc://host:port")
    return host, int(port)


def is_grpc(url: str) -> bool:
    return url.startswith("grpc://")


def is_sqlite(url: str) -> bool:
    return not is_grpc(url) and make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (a `file:...?mode=ro&uri=true` one too), None in memory."""
    db = make_url(url).database
    if db and db.startswith("file:"):
        db = db.removeprefix("file:").split("?")[0]
    return Path(db) if db and db != ":memory:" else None


# Trial states that finished for good: what the budget counts, with the running ones (claims.py).
FINISHED_STATES = ("COMPLETE", "PRUNED")
_FINISHED_SQL = ", ".join(f"'{s}'" for s in FINISHED_STATES)


class NoStudies(UserError):
    """The storage holds no Optuna studies at all (a missing SQLite file, an empty database)."""


def backend(storage: Any) -> str:
    """ "sqlite", "postgresql", or "grpc" (the storage proxy) for an opened storage, however wrapped."""
    inner = unwrap(storage)
    if isinstance(inner, optuna.storages.RDBStorage):
        return inner.engine.url.get_backend_name()
    return "grpc"


def sqlite_file(storage: Any) -> Path | None:
    """The database file of a SQLite storage, else None."""
    inner = unwrap(storage)
    if isinstance(inner, optuna.storages.RDBStorage) and backend(inner) == "sqlite":
        return sqlite_path(inner.url)
    return None


def describe(storage: Any) -> str:
    """The storage's URL with its password masked, for messages."""
    inner = unwrap(storage)
    if isinstance(inner, optuna.storages.RDBStorage):
        return mask(inner.url)
    return f"grpc://{getattr(inner, '_host', '?')}:{getattr(inner, '_port', '?')}"


def engine_kwargs(url: str) -> dict[str, Any]:
    if is_sqlite(url):
        # Several local processes share one file: wait for the write lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    # At most 2 per process: the main thread's and one for the heartbeat thread or a held lock.
    # Both stay pooled (an overflow connection would be re-opened, with its TCP and auth
    # round-trips, on every claim).
    return {
        "pool_size": 2,
        "max_overflow": 0,
        "pool_pre_ping": True,
        "pool_recycle": 300,
        "connect_args": {
            "connect_timeout": 10,
            # The pid in the name lets pg_stat_activity count connections per worker process.
            "application_name": f"kmnist-tune {os.getpid()}",
            # No server-side prepared statements: through PgBouncer's transaction pooling (1.18 in
            # Debian 12 cannot carry them) the next statement may reach a server that lacks them.
            "prepare_threshold": None,
        },
    }


def open_storage(url: str, *, create: bool = False, **rdb_kwargs: Any) -> Any:
    """Open (and with create=True, initialise) the storage; failures become one-line UserErrors.

    Returns an RDBStorage, or for grpc:// a GrpcStorageProxy."""
    if is_grpc(url):
        return open_grpc(url)
    try:
        if not create:
            _require_schema(url)
        cls = rdb_kwargs.pop("storage_cls", optuna.storages.RDBStorage)
        if not create:
            # The tables are there (_require_schema): Optuna's create_all would only look for each
            # one again, a reflection query per table, for every worker that starts.
            rdb_kwargs.setdefault("skip_table_creation", True)
            return cls(url, engine_kwargs=engine_kwargs(url), **rdb_kwargs)
        folder = sqlite_path(url).parent if is_sqlite(url) and sqlite_path(url) else None  # type: ignore[union-attr]
        if folder is not None and not folder.is_dir():
            raise UserError(f"cannot open SQLite storage {mask(url)}: its folder {folder} does not exist; create it first")
        # Optuna creates its tables on open; processes that open one new database at once would
        # race to create them (PostgreSQL: a duplicate key in pg_type), so they take turns.
        from .artifacts import ARTIFACTS
        from .claims import CLAIMS
        from .lock import schema_lock

        with schema_lock(url):
            storage = cls(url, engine_kwargs=engine_kwargs(url), **rdb_kwargs)
            # PostgreSQL keeps the study's artifacts beside it, and the tickets of budget claims in progress.
            ensure_tables(storage.engine, ARTIFACTS, CLAIMS)
            return storage
    except sqlalchemy.exc.ArgumentError as e:
        raise UserError(f"malformed storage URL {mask(url)!r} ({first_line(e)}); {URL_HELP}") from None
    except ImportError:
        # A driver that is not installed (postgresql+psycopg2://, sqlite+pysqlcipher://): Optuna
        # re-raises SQLAlchemy's ModuleNotFoundError as a bare ImportError.
        raise UserError(
            f"the database driver of {mask(url)!r} ({make_url(url).drivername}) is not installed; {URL_HELP}"
        ) from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as e:
        if is_sqlite(url):
            raise UserError(
                f"cannot open SQLite storage {mask(url)}: {first_line(e.orig or e)}; check that its folder exists and "
                "that you may write there"
            ) from None
        raise UserError(
            f"cannot reach storage {mask(url)}: {first_line(e.orig or e)}; check that the server runs "
            "and the host, port, database and credentials are right"
        ) from None
    except sqlalchemy.exc.DatabaseError as e:
        raise UserError(f"storage {mask(url)} is not a usable Optuna database: {first_line(e.orig or e)}") from None


def ensure_tables(engine: Any, *tables: sqlalchemy.Table) -> None:
    """Create kmnist-tune's own tables where a PostgreSQL database lacks them (the owner's job:
    `kmnist-tune schema`, `study create`); a worker role may not create tables, so look first."""
    if engine.url.get_backend_name() != "postgresql":
        return
    with engine.connect() as conn:
        missing = [t for t in tables if not sqlalchemy.inspect(conn).has_table(t.name)]
    for table in missing:
        table.metadata.create_all(engine, tables=[table])


def _require_schema(url: str) -> None:
    """Raise NoStudies unless the database already holds Optuna's tables. Opening an RDBStorage
    creates them, and a command that only reads must never write into a foreign or empty database."""
    no_studies = NoStudies(
        f"no studies in {mask(url)} yet; create one (`kmnist-tune run SPEC` or `kmnist-tune study create SPEC`) "
        f"or pass --storage / set {ENV_STORAGE}"
    )
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise no_studies  # and sqlite3 must not create the file either
    # One short-lived connection, closed on return (NullPool): the bound on a worker's connections holds.
    engine = sqlalchemy.create_engine(url, connect_args=engine_kwargs(url)["connect_args"], poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            tables = set(sqlalchemy.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    if not {"studies", "version_info"} <= tables:
        raise no_studies


def first_line(e: BaseException) -> str:
    text = mask(str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def require_study(storage: optuna.storages.BaseStorage, name: str) -> int:
    """The study's id, or a UserError naming the studies that do exist."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        known = study_names(storage)
        hint = f"studies there: {', '.join(known)}" if known else "there are no studies there yet"
        raise UserError(f"no study named {name!r} in {describe(storage)}; {hint}") from None


def open_grpc(url: str) -> optuna.storages.GrpcStorageProxy:
    host, port = _grpc_host_port(url)
    proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=10)
    except Exception as e:  # grpc raises its own FutureTimeoutError / ConnectionError
        raise UserError(
            f"cannot reach the storage proxy at {host}:{port} ({type(e).__name__}); start it with "
            "`kmnist-tune storage-proxy --storage URL --port PORT`"
        ) from None
    return proxy


def init_schema(url: str) -> str:
    """`kmnist-tune schema`: Optuna's tables at the head version and the artifact table; what is there."""
    if is_grpc(url):
        raise UserError("schema needs a database URL, not the storage proxy's grpc://")
    storage = open_storage(url, create=True, skip_compatibility_check=True)
    if storage.get_current_version() != storage.get_head_version():
        storage.upgrade()
    what = f"Optuna schema {storage.get_current_version()}"
    if backend(storage) != "postgresql":
        return what
    # Optuna's version tables: one UPDATE there makes every worker and the dashboard refuse to start
    # ("upgrade Optuna"), and the default privileges of storage/initdb give the worker role write on
    # every table the owner makes, these included. Only their owner and the role running this (the
    # one that migrates them) keep write; every other grantee, PUBLIC too, SELECT at most. Optuna
    # writes them only when they are empty or unstamped, which this has just made sure they are not.
    grants = sqlalchemy.text(
        "SELECT DISTINCT c.oid::regclass::text AS tbl, a.grantee = 0 AS public, pg_get_userbyid(a.grantee) AS who"
        " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
        " WHERE c.relkind = 'r' AND c.relname IN ('alembic_version', 'version_info') AND pg_table_is_visible(c.oid)"
        " AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')"
        " AND a.grantee <> c.relowner AND a.grantee <> (SELECT oid FROM pg_roles WHERE rolname = current_user)"
        " ORDER BY 1, 3"
    )
    quote = storage.engine.dialect.identifier_preparer.quote
    try:
        with storage.engine.begin() as conn:
            for tbl, public, who in conn.execute(grants).all():
                grantee = "PUBLIC" if public else quote(who)
                conn.execute(sqlalchemy.text(f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {tbl} FROM {grantee} CASCADE"))
            # A REVOKE that this role may not make is only a warning in PostgreSQL: look again.
            left = [f"{'PUBLIC' if public else who} on {tbl}" for tbl, public, who in conn.execute(grants).all()]
    except sqlalchemy.exc.DBAPIError as e:
        raise UserError(
            f"cannot take write on Optuna's version tables from the other roles of {mask(url)}: {first_line(e.orig or e)}; "
            "run `kmnist-tune schema` as the database owner"
        ) from None
    if left:
        raise UserError(
            f"{', '.join(left)} may still write Optuna's version tables and this role cannot revoke it; "
            "run `kmnist-tune schema` as the database owner"
        )
    return what + " and the kmnist_tune_artifacts and kmnist_tune_claims tables; only the owner writes the version tables"


def serve_proxy(url: str, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Optuna's gRPC storage proxy in front of a database, until interrupted."""
    if is_grpc(url):
        raise UserError("--storage for the proxy must be a database URL, not grpc://")
    storage = open_storage(url, create=True)
    announce(f"storage proxy for {mask(url)} on grpc://{host}:{port} (Ctrl-C to stop)")
    got: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    # SIGTERM (docker stop, kubectl delete) stops it as Ctrl-C does. A SIGINT that the parent had
    # ignored (a background job) stays ignored, as Python leaves it.
    signal.signal(signal.SIGTERM, stop)
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        # gRPC's handler threads are joined when the interpreter exits, and one still waiting on the
        # database would keep the process alive. The proxy keeps no state of its own, and a
        # worker's storage retries a call cut short, so it leaves at once.
        announce("storage proxy stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + (got[0] if got else signal.SIGINT))


def unwrap(storage: Any) -> Any:
    """The RDBStorage (or proxy) under our retrying wrapper and Optuna's cache."""
    while True:
        inner = getattr(storage, "_inner", None) or getattr(storage, "_backend", None)
        if inner is None:
            return storage
        storage = inner


# -- what every command asks of a study ---------------------------------------------------------


@dataclass(frozen=True)
class StateCounts:
    """How many trials of a study are in each state (Optuna's state names)."""

    by_state: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, state: str) -> int:
        return self.by_state.get(state, 0)

    @property
    def finished(self) -> int:
        """Complete and pruned: what the budget counts."""
        return sum(self[state] for state in FINISHED_STATES)

    @property
    def running(self) -> int:
        return self["RUNNING"]

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    def nonzero(self) -> dict[str, int]:
        return {k: v for k, v in self.by_state.items() if v}

    def describe(self) -> str:
        return ", ".join(f"{v} {k.lower()}" for k, v in self.nonzero().items()) or "none yet"


def retried(storage: Any, fn: Callable[[], Any]) -> Any:
    """fn(), retried through a database restart when `storage` is a worker's (retry.py); else once."""
    retrying = getattr(storage, "retrying", None)
    return retrying(fn) if retrying is not None else fn()


def autocommitted(storage: Any, statement: Any, params: dict[str, Any]) -> list[Any]:
    """One statement on an RDB storage, autocommitted, and its rows ([] when it returns none): one
    round trip, and no transaction keeps a server connection from PgBouncer's pool while this
    process waits for the CPU. A worker's storage retries it through a database restart."""
    engine = unwrap(storage).engine

    def run() -> list[Any]:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            result = conn.execute(statement, params)
            return list(result) if result.returns_rows else []

    return retried(storage, run)


def count_states(storage: Any, study_id: int) -> StateCounts:
    """Trials per state, counted by the database (one small query) rather than by loading every
    trial: workers ask before each claim, and a study may hold thousands of trials."""
    out = {st.name: 0 for st in optuna.trial.TrialState}
    rdb = unwrap(storage)
    if isinstance(rdb, optuna.storages.RDBStorage):
        query = sqlalchemy.text("SELECT state, count(*) FROM trials WHERE study_id = :sid GROUP BY state")
        for state, n in autocommitted(storage, query, {"sid": study_id}):
            name = state if isinstance(state, str) else optuna.trial.TrialState(state).name
            out[str(name).split(".")[-1]] = int(n)
    else:
        for t in storage.get_all_trials(study_id, deepcopy=False):
            out[t.state.name] += 1
    return StateCounts(out)


def finished_and_best(storage: Any, study_id: int, maximize: bool) -> tuple[int, float | None]:
    """How many trials finished (complete or pruned), and the best value so far (None before the
    first complete one): the worker's progress line after every trial. One small query where
    Optuna's `best_trial` would find the best trial and then read it whole."""
    rdb = unwrap(storage)
    if not isinstance(rdb, optuna.storages.RDBStorage):
        try:
            best: float | None = storage.get_best_trial(study_id).value
        except ValueError:  # no complete trial yet
            best = None
        return count_states(storage, study_id).finished, best
    # Optuna stores an infinite value as a value type without a number; grouping by it keeps them apart.
    query = sqlalchemy.text(
        f"SELECT 'finished', count(*), NULL, NULL FROM trials WHERE study_id = :sid AND state IN ({_FINISHED_SQL}) "
        "UNION ALL "
        "SELECT CAST(v.value_type AS VARCHAR(16)), count(*), min(v.value), max(v.value) FROM trial_values v "
        "JOIN trials t ON t.trial_id = v.trial_id WHERE t.study_id = :sid AND t.state = 'COMPLETE' AND v.objective = 0 "
        "GROUP BY v.value_type"
    )
    rows = {str(kind).split(".")[-1]: (n, low, high) for kind, n, low, high in autocommitted(storage, query, {"sid": study_id})}
    top, bottom = ("INF_POS", "INF_NEG") if maximize else ("INF_NEG", "INF_POS")
    if top in rows:
        best = float("inf") if maximize else float("-inf")
    elif "FINITE" in rows:
        best = float(rows["FINITE"][2] if maximize else rows["FINITE"][1])
    elif bottom in rows:
        best = float("-inf") if maximize else float("inf")
    else:
        best = None
    return int(rows["finished"][0]), best


def study_attrs(storage: Any, study_id: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """Some of a study's user attributes. Workers read the budget and the stop before every claim;
    Optuna's get_study_user_attrs decodes them all, the stored spec and LR prior included, so an
    RDB storage is asked for just these keys (Optuna's RDB schema keeps each as JSON text)."""
    rdb = unwrap(storage)
    if not isinstance(rdb, optuna.storages.RDBStorage):
        attrs = storage.get_study_user_attrs(study_id)
        return {k: attrs[k] for k in keys if k in attrs}
    query = sqlalchemy.text(
        "SELECT key, value_json FROM study_user_attributes WHERE study_id = :sid AND key IN :keys"
    ).bindparams(sqlalchemy.bindparam("keys", expanding=True))
    return {k: json.loads(v) for k, v in autocommitted(storage, query, {"sid": study_id, "keys": list(keys)})}


def running_without_heartbeat(storage: Any, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat (made by `optuna ask`, by a
    plain Optuna script, or by a worker that died before its first beat). Optuna's stale-trial check
    skips them, so alone they would block the budget forever. Table names are Optuna's RDB schema."""
    rdb = unwrap(storage)
    if not isinstance(rdb, optuna.storages.RDBStorage):
        return []
    query = sqlalchemy.text(
        "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :sid AND t.state = 'RUNNING' AND h.trial_id IS NULL"
    )
    return [int(r[0]) for r in autocommitted(storage, query, {"sid": study_id})]
