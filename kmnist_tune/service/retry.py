"""Storage calls that ride out a database restart or a network blip, and the storage a worker uses
(heartbeats on, stale trials failed and retried)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy.exc

from ..optuna_internals import CACHE_BACKEND_METHODS, STALE_TRIALS_METHOD
from .storage import first_line, is_grpc, open_grpc, open_storage


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


# A wait on a lock or a statement cut short by its bound (storage.Timeouts): another session holds a
# lock, not a database that is down; retried all the same.
BOUNDED_WAITS = ("55P03", "57014")


def root_cause(e: BaseException) -> BaseException:
    """The database driver's own error inside what Optuna and SQLAlchemy wrapped it in (their messages
    say "an exception is raised during the commit"), else `e`."""
    seen: set[int] = set()
    cur: BaseException | None = e
    found = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__module__.split(".")[0] == "psycopg":
            return cur
        if isinstance(cur, sqlalchemy.exc.DBAPIError) and cur.orig is not None:
            found = cur.orig
        cur = cur.__cause__ or cur.__context__
    return found


class _Retrying:
    """Retries a call that failed on a lost connection, with backoff (0.5 s doubling to 10 s, for up
    to `patience` seconds), instead of letting a database restart kill the worker.

    A retried write whose first try reached the database before the connection broke could apply
    twice; Optuna's writes are state updates (idempotent) except trial creation, and a duplicate
    trial created that way is left RUNNING without a heartbeat and failed as stale.
    """

    def _init_retry(self, patience: float, log: Callable[[str], None] | None) -> None:
        self.patience = patience
        self.log = log or _log_warning
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
                    cause = root_cause(e)
                    state = "busy" if getattr(cause, "sqlstate", None) in BOUNDED_WAITS else "unreachable"
                    self.log(f"storage {state} ({first_line(cause)[:120]}); retrying for up to {self.patience:.0f} s")
                time.sleep(delay)
                waited += delay
                delay = min(delay * 2, 10.0)


def _log_warning(message: str) -> None:
    logging.getLogger("kmnist_tune").warning(message)


# Storage methods Optuna calls during ask/tell/report and heartbeats: the ones worth retrying. The
# heartbeat methods are named here, not taken from Optuna's private heartbeat base class.
HEARTBEAT_METHODS = {"record_heartbeat", STALE_TRIALS_METHOD, "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
_RETRIED = sorted(
    optuna.storages.BaseStorage.__abstractmethods__
    | HEARTBEAT_METHODS
    | CACHE_BACKEND_METHODS
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

    def use_heartbeat(self, interval: int | None, grace_period: int | None, max_retry: int | None) -> None:
        """The study's heartbeat settings, which live in its spec: the worker opens this one storage,
        reads the spec through it, then sets them (the attributes RDBStorage's constructor sets from
        the same arguments, and which its heartbeat methods read)."""
        if interval is not None and interval <= 0 or grace_period is not None and grace_period <= 0:
            raise ValueError("heartbeat_interval and grace_period must be positive or None")
        self.heartbeat_interval, self.grace_period = interval, grace_period
        self.heartbeat_stale_trial_callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.failed_trial_callback = self.heartbeat_stale_trial_callback  # its old name, as __init__ keeps both

    def __getstate__(self) -> dict[str, Any]:
        # Optuna's storage contract: a storage pickles (RDBStorage drops its engine and re-creates it).
        # The logger is this process's (often a closure): the copy logs as the default does.
        state = dict(super().__getstate__())
        state["log"] = _log_warning
        return state


class RetryingStorage(_Retrying, optuna.storages.BaseStorage):
    """The same retries around any other storage (the gRPC proxy), by delegation. The proxy has no
    heartbeat API, so this storage reports heartbeats as off (get_heartbeat_interval is None)."""

    def __init__(self, inner: optuna.storages.BaseStorage, patience: float = 600.0, log: Callable[[str], None] | None = None):
        self.inner = inner
        self._init_retry(patience, log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_heartbeat_interval(self) -> int | None:
        return None

    def use_heartbeat(self, interval: int | None, grace_period: int | None, max_retry: int | None) -> None:
        """The proxy has no heartbeat API: a killed worker's trials stay RUNNING (README)."""


def _retried_method(name: str, base: type) -> Callable[..., Any]:
    if base is optuna.storages.RDBStorage:
        inherited = getattr(base, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.retrying(inherited, self, *args, **kwargs)
    else:

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.retrying(getattr(self.inner, name), *args, **kwargs)

    method.__name__ = name
    return method


for _name in _RETRIED:
    if hasattr(optuna.storages.RDBStorage, _name):
        setattr(RetryingRDBStorage, _name, _retried_method(_name, optuna.storages.RDBStorage))
    if _name not in HEARTBEAT_METHODS | CACHE_BACKEND_METHODS:  # the proxy has neither
        setattr(RetryingStorage, _name, _retried_method(_name, object))
RetryingStorage.__abstractmethods__ = frozenset()


def open_worker_storage(
    url: str, *, patience: float = 600.0, log: Callable[[str], None] | None = None
) -> RetryingRDBStorage | RetryingStorage:
    """The one storage a worker uses: every call retried through a database restart. Heartbeats
    (and with them a killed worker's trials failed after the grace period and retried with the same
    parameters) are switched on with `use_heartbeat` once the study's spec has been read through it."""
    if is_grpc(url):
        return RetryingStorage(open_grpc(url), patience, log)
    storage = open_storage(url, storage_cls=RetryingRDBStorage, patience=patience, log=log)
    assert isinstance(storage, RetryingRDBStorage)
    return storage
