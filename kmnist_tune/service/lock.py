"""A lock shared by every process that uses one study storage, held by the storage backend itself."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from optuna.storages import BaseStorage

from ..errors import UserError
from .retry import is_transient
from .storage import backend, engine, is_sqlite, retried, short_engine, sqlite_file, sqlite_path

# Waiting for a lock another process holds: first look again after 20 ms, then doubling up to 1 s
# (held locks guard work of seconds to minutes: creating a study, the LR finder).
POLL_FIRST_S = 0.02
POLL_MAX_S = 1.0


def lock_path(db: Path | None, name: str) -> Path:
    """Where the SQLite flock for `name` lives: `<db>.locks/<name>.lock` beside the database file."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    return Path(f"{db if db is not None else 'kmnist-tune'}.locks") / f"{slug}.lock"


@contextmanager
def storage_lock(storage: BaseStorage, name: str) -> Iterator[None]:
    """A lock held in the storage backend itself: a PostgreSQL transaction-scoped advisory lock taken
    on one of the storage's own pooled connections (so a worker never opens more), released by the
    server if the holder dies; for SQLite an flock on a file beside the database (SQLite is one
    machine's store, and the kernel releases the lock with the process). Through the gRPC proxy
    there is no shared lock: callers fall back to best effort. (The budget claim has its own,
    shorter path: claims.py.)"""
    kind = backend(storage)
    if kind == "grpc":
        yield
    elif kind == "sqlite":
        with _file_lock(lock_path(sqlite_file(storage), name)):
            yield
    else:
        # A worker's storage retries through a database restart: so does taking its lock.
        with _advisory_lock(engine(storage), name, functools.partial(retried, storage)):
            yield


@contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Held while a storage is opened with `create`, before there is a storage object to lock with."""
    name = "kmnist-tune/schema"
    if is_sqlite(url):
        with _file_lock(lock_path(sqlite_path(url), name)):
            yield
        return
    # A short-lived connection of its own: it is closed when the tables are there.
    with short_engine(url) as eng, _advisory_lock(eng, name):
        yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115  (held across the yield)
    except OSError as e:
        raise UserError(f"cannot make the lock file {path} beside the SQLite file ({e.strerror}); it must be writable") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_key(name: str) -> int:
    """The 64-bit key of PostgreSQL's advisory lock named `name`."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


@contextmanager
def _advisory_lock(eng: sqlalchemy.Engine, name: str, retrying: Callable[..., Any] | None = None) -> Iterator[None]:
    """A transaction-scoped advisory lock, held by an open transaction until the block ends.

    Transaction-scoped, not session-level: behind PgBouncer's transaction pooling a session lock
    stays on whichever server connection took it, and the unlock may reach another. Polled with
    pg_try_advisory_xact_lock rather than waited for in the server: a waiting transaction holds a
    pooled server connection, and enough waiters would leave none for the holder, whose work inside
    the block (creating a study, storing the LR prior) needs one. The server releases the lock if
    the holder's connection dies (PgBouncer closes a server connection whose client left mid-transaction).
    """
    key = lock_key(name)
    query = sqlalchemy.text("SELECT pg_try_advisory_xact_lock(:k)")

    def try_once() -> Any:
        conn = eng.connect()
        try:
            if conn.execute(query, {"k": key}).scalar_one():
                return conn
            conn.rollback()
        except BaseException:
            conn.close()
            raise
        conn.close()  # hands the connection (and PgBouncer's server connection) back while waiting
        return None

    delay = POLL_FIRST_S
    while True:
        conn = retrying(try_once) if retrying is not None else try_once()
        if conn is not None:
            break
        time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: waiters do not poll in step
        delay = min(delay * 2, POLL_MAX_S)
    try:
        yield
    finally:
        try:
            conn.commit()  # ends the transaction, and the lock with it
        except Exception as e:
            if not is_transient(e):
                raise
            # The connection died while the lock was held: the server released the lock with it.
        finally:
            conn.close()
