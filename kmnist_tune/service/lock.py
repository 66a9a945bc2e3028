"""A lock shared by every process that uses one study storage, held by the storage backend itself."""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy

from ..errors import UserError
from .retry import is_transient
from .storage import backend, engine_kwargs, is_sqlite, sqlite_file, sqlite_path, unwrap


def lock_path(db: Path | None, name: str) -> Path:
    """Where the SQLite flock for `name` lives: `<db>.locks/<name>.lock` beside the database file."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    return Path(f"{db if db is not None else 'kmnist-tune'}.locks") / f"{slug}.lock"


@contextmanager
def storage_lock(storage: Any, name: str) -> Iterator[None]:
    """A lock held in the storage backend itself: a PostgreSQL advisory lock taken on one of the
    storage's own pooled connections (so a worker never opens more), released by the server if the
    holder dies; for SQLite an flock on a file beside the database (SQLite is one machine's store,
    and the kernel releases the lock with the process). Through the gRPC proxy there is no shared
    lock: callers fall back to best effort."""
    kind = backend(storage)
    if kind == "grpc":
        yield
    elif kind == "sqlite":
        with _file_lock(lock_path(sqlite_file(storage), name)):
            yield
    else:
        # A worker's storage retries through a database restart: so does taking its lock.
        with _advisory_lock(unwrap(storage).engine, name, getattr(storage, "retrying", None)):
            yield


@contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Held while a storage is opened with `create`, before there is a storage object to lock with."""
    name = "kmnist-tune/schema"
    if is_sqlite(url):
        with _file_lock(lock_path(sqlite_path(url), name)):
            yield
        return
    # A short-lived connection of its own (NullPool): it is closed when the tables are there.
    engine = sqlalchemy.create_engine(url, connect_args=engine_kwargs(url)["connect_args"], poolclass=sqlalchemy.pool.NullPool)
    try:
        with _advisory_lock(engine, name):
            yield
    finally:
        engine.dispose()


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


@contextmanager
def _advisory_lock(engine: Any, name: str, retrying: Callable[..., Any] | None = None) -> Iterator[None]:
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)

    def acquire() -> Any:
        # AUTOCOMMIT: a session-level lock needs no open transaction, and the connection must not sit
        # "idle in transaction" while the holder works (the LR finder runs for minutes).
        conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except BaseException:
            conn.close()
            raise
        return conn

    conn = retrying(acquire) if retrying is not None else acquire()
    try:
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        except Exception as e:
            if not is_transient(e):
                raise
            # The connection died while the lock was held: the server released the lock with it.
        finally:
            conn.close()
