"""Storage access: URL resolution, opening Optuna's storages, what backend a storage is, and the
queries every command shares (does the study exist, how many trials are in each state).

Every place that talks to the study database goes through here (retries: retry.py, the shared lock:
lock.py), so connection limits, time-outs and the error lines a user sees are decided once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage
from sqlalchemy.engine import make_url

from .. import optuna_internals as internals
from ..contract.records import FINISHED_STATES
from ..errors import UserError
from ..masking import mask
from ..optuna_internals import schema_made

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


def quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created ...") and its notes that heartbeats and retries are
    experimental are not for our users: our own lines say what happened. Set when this process first
    opens a storage (every command does), not when the package is imported."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class NoStudies(UserError):
    """The storage holds no Optuna studies at all (a missing SQLite file, an empty database)."""


def backend(storage: BaseStorage) -> str:
    """ "sqlite", "postgresql", or "grpc" (the storage proxy) for an opened storage, however wrapped."""
    inner = internals.rdb(storage)
    return inner.engine.url.get_backend_name() if inner is not None else "grpc"


def engine(storage: BaseStorage) -> sqlalchemy.Engine:
    """The SQLAlchemy engine of an RDB storage (not the proxy's: callers ask `backend` first)."""
    inner = internals.rdb(storage)
    if inner is None:
        raise TypeError("the storage proxy has no database engine")
    return inner.engine


def release(storage: BaseStorage) -> None:
    """Close the idle pooled connections of an RDB storage (it reconnects if it is used again): a
    command that has done its storage work before a long wait holds no database connection through it."""
    inner = internals.rdb(storage)
    if inner is not None:
        inner.engine.dispose()


def sqlite_file(storage: BaseStorage) -> Path | None:
    """The database file of a SQLite storage, else None."""
    inner = internals.rdb(storage)
    return sqlite_path(inner.url) if inner is not None and backend(inner) == "sqlite" else None


def describe(storage: BaseStorage) -> str:
    """The storage's URL with its password masked, for messages."""
    inner = internals.rdb(storage)
    return mask(inner.url) if inner is not None else f"grpc://{internals.grpc_address(storage)}"


# -- bounded waits ---------------------------------------------------------------------------------
# Everyone who shares a study database can take a lock on its tables (`LOCK TABLE` needs only
# UPDATE), and without a bound every other client would wait for it forever. Each of our PostgreSQL
# sessions bounds its waits: a lock is waited for at most lock_timeout, a statement runs at most
# statement_timeout. Ours take milliseconds, the longest legitimate ones seconds (a study's DELETE
# with its trials; a 1 MiB artifact chunk; `study delete` waiting for an upload in flight), so the
# bounds are far above them. A worker's storage retries a statement cut short (retry.py: both are
# OperationalErrors), so workers carry on once the lock is gone; a command ends in one line.
ENV_LOCK_TIMEOUT = "KMNIST_TUNE_DB_LOCK_TIMEOUT"
ENV_STATEMENT_TIMEOUT = "KMNIST_TUNE_DB_STATEMENT_TIMEOUT"
LOCK_TIMEOUT_S = 30.0
STATEMENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Timeouts:
    """PostgreSQL's per-session bounds (seconds; None: the server's default). idle_in_transaction is for
    clients that never hold a transaction open on purpose (the dashboard): a worker does, holding the
    LR finder's advisory lock (lock.py)."""

    lock_s: float | None = LOCK_TIMEOUT_S
    statement_s: float | None = STATEMENT_TIMEOUT_S
    idle_in_transaction_s: float | None = None

    @classmethod
    def from_env(cls, **over: float | None) -> Timeouts:
        """The defaults, or $KMNIST_TUNE_DB_LOCK_TIMEOUT / $KMNIST_TUNE_DB_STATEMENT_TIMEOUT (seconds)."""
        found: dict[str, float | None] = {}
        for var, name in ((ENV_LOCK_TIMEOUT, "lock_s"), (ENV_STATEMENT_TIMEOUT, "statement_s")):
            text = os.environ.get(var, "").strip()
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not 0 < value <= 86_400:
                raise UserError(f"{var}={text!r} is not a number of seconds between 0 and 86400; fix or unset it")
            found[name] = value
        return cls(**{**found, **over})

    def options(self) -> str:
        """libpq's `options`: the bounds set as the session starts, in milliseconds."""
        settings = {
            "lock_timeout": self.lock_s,
            "statement_timeout": self.statement_s,
            "idle_in_transaction_session_timeout": self.idle_in_transaction_s,
        }
        return " ".join(f"-c {k}={round(v * 1000)}" for k, v in settings.items() if v is not None)


# PgBouncer (1.18) refuses a startup packet with `options` unless its ignore_startup_parameters lists it
# (ours does: storage/pgbouncer/pool.ini); then it drops it, and the database's own defaults hold, which
# storage/initdb sets to the same bounds. Refused: connect again without it, once per server address.
_NO_OPTIONS: set[tuple[str, str]] = set()


def _connect_with_fallback(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    where = (str(cparams.get("host")), str(cparams.get("port")))
    if "options" not in cparams or dialect.name != "postgresql":
        return None  # SQLAlchemy connects as usual
    if where in _NO_OPTIONS:
        return dialect.connect(*cargs, **{k: v for k, v in cparams.items() if k != "options"})
    try:
        return dialect.connect(*cargs, **cparams)
    except Exception as e:
        if "unsupported startup parameter" not in str(e):
            raise
        _NO_OPTIONS.add(where)
        return dialect.connect(*cargs, **{k: v for k, v in cparams.items() if k != "options"})


# On every engine of this process (Optuna's RDBStorage makes and connects its own in its constructor).
sqlalchemy.event.listen(sqlalchemy.Engine, "do_connect", _connect_with_fallback)


def engine_kwargs(url: str, timeouts: Timeouts | None = None) -> dict[str, Any]:
    if is_sqlite(url):
        # Several local processes share one file: wait for the write lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    timeouts = timeouts or Timeouts.from_env()
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
            "options": timeouts.options(),
        },
    }


def open_storage(
    url: str,
    *,
    storage_cls: type[RDBStorage] = RDBStorage,
    tables_checked: bool = False,
    timeouts: Timeouts | None = None,
    **rdb_kwargs: Any,
) -> BaseStorage:
    """Open an existing study database (or the storage proxy); failures become one-line UserErrors.
    Nothing is created: a database without Optuna's tables is refused (service/schema.py creates them).

    `tables_checked`: the caller has just looked (schema.py, which made them if missing). `timeouts`:
    the session's bounds on PostgreSQL (Timeouts.from_env() when None).
    Returns an RDBStorage (or `storage_cls`), or for grpc:// a GrpcStorageProxy."""
    quiet_optuna()
    if is_grpc(url):
        return open_grpc(url)
    with user_errors(url):
        if not tables_checked:
            require_schema(url)
        # The tables are there (require_schema): Optuna's create_all would only look for each
        # one again, a reflection query per table, for every worker that starts.
        rdb_kwargs.setdefault("skip_table_creation", True)
        check = not rdb_kwargs.pop("skip_compatibility_check", False)
        kwargs = engine_kwargs(url, timeouts)
        storage = storage_cls(url, engine_kwargs=kwargs, skip_compatibility_check=True, **rdb_kwargs)
        if check:
            require_current_schema(storage)
        return storage


def require_current_schema(storage: RDBStorage) -> None:
    """The check RDBStorage makes when it opens (skipped there), through its public version calls and
    with one connection at a time (Optuna's holds two at once), ending in one line, not a traceback."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current != head:
        raise UserError(
            f"storage {mask(storage.url)} has Optuna schema {current} and this Optuna needs {head}; "
            "run `kmnist-tune schema --storage URL` once as the database owner (it migrates the tables)"
        )


@contextmanager
def user_errors(url: str) -> Iterator[None]:
    """What opening a database raises, as the one line a user gets."""
    try:
        yield
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


def no_studies(url: str) -> NoStudies:
    return NoStudies(
        f"no studies in {mask(url)} yet; create one (`kmnist-tune run SPEC` or `kmnist-tune study create SPEC`) "
        f"or pass --storage / set {ENV_STORAGE}"
    )


def require_schema(url: str) -> None:
    """Raise NoStudies unless Optuna has made the database. Opening an RDBStorage creates its tables
    and stamps their version, and a command that only reads must never write into a foreign, empty
    or half-made database."""
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise no_studies(url)  # and sqlite3 must not create the file either
    with short_engine(url) as engine, engine.connect() as conn:
        made = schema_made(conn)
    if not made:
        raise no_studies(url)


@contextmanager
def short_engine(url: str, timeouts: Timeouts | None = None) -> Iterator[sqlalchemy.Engine]:
    """An engine whose one connection closes on return (NullPool): the bound on a process's
    connections holds while it checks, locks or looks something up before its storage is open."""
    connect_args = engine_kwargs(url, timeouts)["connect_args"]
    engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def first_line(e: BaseException) -> str:
    text = mask(str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def study_names(storage: BaseStorage) -> list[str]:
    """The studies' names (one small query: Optuna's get_all_studies reads every study's attributes)."""
    run = _runner(storage)
    return internals.study_names(run) if run is not None else [s.study_name for s in storage.get_all_studies()]


def require_study(storage: BaseStorage, name: str) -> int:
    """The study's id, or a UserError naming the studies that do exist."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        raise unknown_study(describe(storage), name, study_names(storage)) from None


def unknown_study(where: str, name: str, known: list[str]) -> UserError:
    """No study `name` in the storage `where` (masked); the line names the studies that do exist."""
    hint = f"studies there: {', '.join(known)}" if known else "there are no studies there yet"
    return UserError(f"no study named {name!r} in {where}; {hint}")


def open_grpc(url: str) -> optuna.storages.GrpcStorageProxy:
    quiet_optuna()
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


def retried(storage: BaseStorage, fn: Callable[[], Any]) -> Any:
    """fn(), retried through a database restart when `storage` is a worker's (retry.py); else once."""
    retrying = getattr(storage, "retrying", None)
    return retrying(fn) if retrying is not None else fn()


def autocommitted(storage: BaseStorage, statement: Any, params: dict[str, Any]) -> list[Any]:
    """One statement on an RDB storage, autocommitted, and its rows ([] when it returns none): one
    round trip, and no transaction keeps a server connection from PgBouncer's pool while this
    process waits for the CPU. A worker's storage retries it through a database restart."""
    eng = engine(storage)

    def run() -> list[Any]:
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            result = conn.execute(statement, params)
            return list(result) if result.returns_rows else []

    return retried(storage, run)


def _runner(storage: BaseStorage) -> internals.Run | None:
    """How to run one of optuna_internals' queries on this storage; None for the proxy (public API)."""
    if internals.rdb(storage) is None:
        return None
    return lambda statement, params: autocommitted(storage, statement, params)


def count_states(storage: BaseStorage, study_id: int) -> StateCounts:
    """Trials per state, counted by the database (one small query) rather than by loading every
    trial: workers ask before each claim, and a study may hold thousands of trials."""
    out = {st.name: 0 for st in optuna.trial.TrialState}
    run = _runner(storage)
    if run is not None:
        out.update(internals.state_counts(run, study_id))
    else:
        for t in storage.get_all_trials(study_id, deepcopy=False):
            out[t.state.name] += 1
    return StateCounts(out)


def finished_and_best(storage: BaseStorage, study_id: int, maximize: bool) -> tuple[int, float | None]:
    """How many trials finished (complete or pruned), and the best value so far (None before the
    first complete one): the worker's progress line after every trial. One small query where
    Optuna's `best_trial` would find the best trial and then read it whole."""
    run = _runner(storage)
    if run is not None:
        return internals.finished_and_best(run, study_id, maximize)
    try:
        best: float | None = storage.get_best_trial(study_id).value
    except ValueError:  # no complete trial yet
        best = None
    return count_states(storage, study_id).finished, best


def study_attrs(storage: BaseStorage, study_id: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """Some of a study's user attributes. Workers read the budget and the stop before every claim;
    Optuna's get_study_user_attrs decodes them all, the stored spec and LR prior included, so an
    RDB storage is asked for just these keys."""
    run = _runner(storage)
    if run is not None:
        return internals.study_user_attrs(run, study_id, keys)
    attrs = storage.get_study_user_attrs(study_id)
    return {k: attrs[k] for k in keys if k in attrs}


def running_without_heartbeat(storage: BaseStorage, study_id: int) -> list[int]:
    """Ids of the study's RUNNING trials that never recorded a heartbeat (made by `optuna ask`, by a
    plain Optuna script, or by a worker that died before its first beat). Optuna's stale-trial check
    skips them, so alone they would block the budget forever. The proxy has no heartbeats: none."""
    run = _runner(storage)
    return internals.running_without_heartbeat(run, study_id) if run is not None else []
