"""Storage access: URL resolution, password masking, and opening Optuna's RDB storage.

Every place that talks to the study database goes through here, so connection
limits, time-outs and the error lines a user sees are decided once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages._heartbeat import BaseHeartbeat
from sqlalchemy.engine import make_url

from .errors import UserError

DEFAULT_STORAGE = "sqlite:///kmnist-tune.db"
ENV_STORAGE = "KMNIST_TUNE_STORAGE"
URL_HELP = (
    "use sqlite:///path/to/file.db, postgresql+psycopg://user:password@host:5432/dbname, "
    "or grpc://host:port (a `kmnist-tune storage-proxy`)"
)

_SECRET_IN_URL = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)@")
_SECRET_PARAM = re.compile(r"(?P<head>\bpassword=)(?P<pw>[^&\s]+)", re.IGNORECASE)


def mask(text: str) -> str:
    """Replace passwords in any URL (or password= parameter) within `text` with ***."""
    text = _SECRET_IN_URL.sub(lambda m: m.group("head") + "***@", text)
    return _SECRET_PARAM.sub(lambda m: m.group("head") + "***", text)


class MaskSecrets(logging.Filter):
    """Masks passwords in every log record, whoever logs it (Optuna, SQLAlchemy, us)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = mask(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return True


def install_log_masking() -> None:
    filt = MaskSecrets()
    for logger in (logging.getLogger(), logging.getLogger("optuna"), logging.getLogger("sqlalchemy")):
        logger.addFilter(filt)
        for h in logger.handlers:
            h.addFilter(filt)


def resolve_url(url: str | None) -> str:
    """--storage, else $KMNIST_TUNE_STORAGE, else a SQLite file in the working directory."""
    url = url or os.environ.get(ENV_STORAGE) or DEFAULT_STORAGE
    if url.startswith("grpc://"):
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
    return url


def _grpc_host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"malformed storage URL {url!r}: a proxy URL is grpc://host:port")
    return host, int(port)


def is_grpc(url: str) -> bool:
    return url.startswith("grpc://")


def is_sqlite(url: str) -> bool:
    return not is_grpc(url) and make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    db = make_url(url).database
    return Path(db) if db and db != ":memory:" else None


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
        # The pid in the name lets pg_stat_activity count connections per worker process.
        "connect_args": {"connect_timeout": 10, "application_name": f"kmnist-tune {os.getpid()}"},
    }


def open_storage(url: str, *, create: bool = False, **rdb_kwargs: Any) -> Any:
    """Open (and with create=True, initialise) the storage; failures become one-line UserErrors.

    Returns an RDBStorage, or for grpc:// a GrpcStorageProxy."""
    if is_grpc(url):
        return _open_grpc(url)
    if is_sqlite(url) and not create:
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise UserError(
                f"no study storage at {path.resolve()}; create a study first (`kmnist-tune run SPEC` or "
                f"`kmnist-tune study create SPEC`) or pass --storage / set {ENV_STORAGE}"
            )
    try:
        cls = rdb_kwargs.pop("storage_cls", optuna.storages.RDBStorage)
        return cls(url, engine_kwargs=engine_kwargs(url), **rdb_kwargs)
    except sqlalchemy.exc.ArgumentError as e:
        raise UserError(f"malformed storage URL {mask(url)!r} ({_first_line(e)}); {URL_HELP}") from None
    except ImportError:
        # A driver that is not installed (postgresql+psycopg2://, sqlite+pysqlcipher://): Optuna
        # re-raises SQLAlchemy's ModuleNotFoundError as a bare ImportError.
        raise UserError(
            f"the database driver of {mask(url)!r} ({make_url(url).drivername}) is not installed; {URL_HELP}"
        ) from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as e:
        raise UserError(
            f"cannot reach storage {mask(url)}: {_first_line(e.orig or e)}; check that the server runs "
            "and the host, port, database and credentials are right"
        ) from None
    except sqlalchemy.exc.DatabaseError as e:
        raise UserError(f"storage {mask(url)} is not a usable Optuna database: {_first_line(e.orig or e)}") from None


def _first_line(e: BaseException) -> str:
    text = mask(str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def require_study(storage: optuna.storages.BaseStorage, name: str, url: str) -> int:
    """The study's id, or a UserError naming the studies that do exist."""
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        known = study_names(storage)
        hint = f"studies there: {', '.join(known)}" if known else "there are no studies there yet"
        raise UserError(f"no study named {name!r} in {mask(url)}; {hint}") from None


def _open_grpc(url: str) -> optuna.storages.GrpcStorageProxy:
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


def unwrap(storage: Any) -> Any:
    """The RDBStorage (or proxy) under our retrying wrapper and Optuna's cache."""
    while True:
        inner = getattr(storage, "_inner", None) or getattr(storage, "_backend", None)
        if inner is None:
            return storage
        storage = inner


# -- transient errors -----------------------------------------------------------


def is_transient(e: BaseException) -> bool:
    """A lost or refused database connection (a restart, a network blip), not a bad request."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, sqlalchemy.exc.DBAPIError) and cur.connection_invalidated:
            return True
        if isinstance(cur, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DisconnectionError)):
            return True
        if type(cur).__module__.startswith("psycopg") and type(cur).__name__ in ("OperationalError", "InterfaceError"):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class _Retrying:
    """Retries a call that failed on a lost connection, with backoff (0.5 s doubling to 10 s, for up
    to `patience` seconds), instead of letting a database restart kill the worker.

    A retried write whose first try reached the database before the connection broke could apply
    twice; Optuna's writes are state updates (idempotent) except trial creation, and a duplicate
    trial created that way is left RUNNING without a heartbeat and failed as stale.
    """

    def _init_retry(self, patience: float, log: Callable[[str], None] | None) -> None:
        self.patience = patience
        self.log = log or (lambda m: logging.getLogger("kmnist_tune").warning(m))
        self.stalled_s = 0.0  # total time spent waiting for the database

    def retrying(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delay, waited = 0.5, 0.0
        while True:
            try:
                result = fn(*args, **kwargs)
                if waited:
                    self.log(f"storage is back after {waited:.1f} s")
                    self.stalled_s += waited
                return result
            except Exception as e:
                if not is_transient(e) or waited >= self.patience:
                    raise
                if not waited:
                    self.log(f"storage unreachable ({_first_line(e)[:120]}); retrying for up to {self.patience:.0f} s")
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 10.0)


# Storage methods Optuna calls during ask/tell/report and heartbeats: the ones worth retrying.
_RETRIED = sorted(
    optuna.storages.BaseStorage.__abstractmethods__
    | BaseHeartbeat.__abstractmethods__
    | {
        "get_n_trials",
        "get_best_trial",
        "get_trial_id_from_study_id_trial_number",
        "check_trial_is_updatable",
        "get_trial_number_from_id",
        "get_trial_params",
        "get_trial_user_attrs",
        "get_trial_system_attrs",
    }
)


class RetryingRDBStorage(_Retrying, optuna.storages.RDBStorage):
    """Optuna's RDBStorage with every storage call retried through a database restart. Still an
    RDBStorage, so Optuna keeps its trial cache in front of it."""

    def __init__(self, url: str, *, patience: float = 600.0, log: Callable[[str], None] | None = None, **kwargs: Any):
        self._init_retry(patience, log)
        super().__init__(url, **kwargs)


class RetryingStorage(_Retrying, optuna.storages.BaseStorage, BaseHeartbeat):
    """The same retries around any other storage (the gRPC proxy), by delegation."""

    def __init__(self, inner: Any, patience: float = 600.0, log: Callable[[str], None] | None = None):
        self._inner = inner
        self._init_retry(patience, log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_heartbeat_interval(self) -> int | None:
        # The gRPC proxy has no heartbeat API: report heartbeats as off rather than fail.
        return self.retrying(self._inner.get_heartbeat_interval) if isinstance(self._inner, BaseHeartbeat) else None


def _retried_method(name: str, base: type) -> Callable[..., Any]:
    if base is optuna.storages.RDBStorage:
        inherited = getattr(base, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.retrying(inherited, self, *args, **kwargs)
    else:

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.retrying(getattr(self._inner, name), *args, **kwargs)

    method.__name__ = name
    return method


for _name in _RETRIED:
    if hasattr(optuna.storages.RDBStorage, _name):
        setattr(RetryingRDBStorage, _name, _retried_method(_name, optuna.storages.RDBStorage))
    if _name != "get_heartbeat_interval":
        setattr(RetryingStorage, _name, _retried_method(_name, object))
RetryingStorage.__abstractmethods__ = frozenset()


def open_worker_storage(
    url: str,
    *,
    heartbeat_interval: int | None,
    grace_period: int | None,
    max_retry: int | None,
    patience: float = 600.0,
    log: Callable[[str], None] | None = None,
) -> Any:
    """The storage a worker uses: heartbeats on (RDB storages), a killed worker's trials failed
    after the grace period and retried with the same parameters, transient errors retried."""
    if is_grpc(url):
        return RetryingStorage(_open_grpc(url), patience, log)  # the proxy has no heartbeat API
    return open_storage(
        url,
        create=False,
        storage_cls=RetryingRDBStorage,
        patience=patience,
        log=log,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=max_retry),
    )


# -- a lock shared by every process using the storage ---------------------------------------


@contextmanager
def storage_lock(storage: Any, url: str, name: str) -> Iterator[None]:
    """A lock held in the storage backend itself: a PostgreSQL advisory lock taken on one of the
    storage's own pooled connections (so a worker never opens more), released by the server if the
    holder dies; for SQLite an flock on a file beside the database (SQLite is one machine's store,
    and the kernel releases the lock with the process). Through the gRPC proxy there is no shared
    lock: callers fall back to best effort."""
    if is_grpc(url):
        yield
        return
    if is_sqlite(url):
        db = sqlite_path(url)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        lock_dir = Path(f"{db if db is not None else 'kmnist-tune'}.locks")
        lock_dir.mkdir(exist_ok=True)
        lock_path = lock_dir / f"{slug}.lock"
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
    engine = unwrap(storage).engine
    # AUTOCOMMIT: a session-level lock needs no open transaction, and the connection must not sit
    # "idle in transaction" while the holder works (the LR finder runs for minutes).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def count_states(storage: Any, study: optuna.Study) -> dict[str, int]:
    """Trials per state, counted by the database (one small query) rather than by loading every
    trial: workers ask before each claim, and a study may hold thousands of trials."""
    out = {st.name: 0 for st in optuna.trial.TrialState}
    rdb = unwrap(storage)
    if isinstance(rdb, optuna.storages.RDBStorage):
        study_id = storage.get_study_id_from_name(study.study_name)
        query = sqlalchemy.text("SELECT state, count(*) FROM trials WHERE study_id = :sid GROUP BY state")

        def run() -> list[Any]:
            with rdb.engine.connect() as conn:
                return list(conn.execute(query, {"sid": study_id}))

        rows = storage.retrying(run) if isinstance(storage, _Retrying) else run()
        for state, n in rows:
            name = state if isinstance(state, str) else optuna.trial.TrialState(state).name
            out[str(name).split(".")[-1]] = int(n)
        return out
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out
