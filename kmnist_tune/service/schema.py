"""Making a study database: Optuna's tables (created or migrated) and kmnist-tune's own (tables.py),
under a lock, so that processes opening one new database at once take turns; and the least
privilege on Optuna's version tables (`kmnist-tune schema`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage

from ..errors import UserError
from ..masking import mask
from ..optuna_internals import VERSION_TABLES, schema_made
from .lock import schema_lock
from .storage import (
    Timeouts,
    backend,
    engine_kwargs,
    first_line,
    is_grpc,
    is_sqlite,
    open_grpc,
    open_storage,
    quiet_optuna,
    short_engine,
    sqlite_path,
    user_errors,
)
from .tables import ARTIFACTS, CLAIMS

MIGRATION_S = 3600.0  # statement_timeout of `kmnist-tune schema`: Optuna's migrations alter whole tables


def create_storage(url: str, *, storage_cls: type[RDBStorage] = RDBStorage, **rdb_kwargs: Any) -> BaseStorage:
    """Open a storage, creating Optuna's tables (and, on PostgreSQL, the artifact and claim tables)
    where they are missing: `run`, `study create`, `schema`, the storage proxy. Through the proxy
    (grpc://) the tables are the proxy's database's: it is opened as it is."""
    if is_grpc(url):
        return open_grpc(url)
    return _create_rdb(url, storage_cls, **rdb_kwargs)


def _create_rdb(url: str, storage_cls: type[RDBStorage] = RDBStorage, **rdb_kwargs: Any) -> RDBStorage:
    quiet_optuna()
    with user_errors(url):
        folder = sqlite_path(url).parent if is_sqlite(url) and sqlite_path(url) else None  # type: ignore[union-attr]
        if folder is not None and not folder.is_dir():
            raise UserError(f"cannot open SQLite storage {mask(url)}: its folder {folder} does not exist; create it first")
        if not _has_all_tables(url):
            _make_tables(url)
    storage = open_storage(url, storage_cls=storage_cls, tables_checked=True, **rdb_kwargs)
    assert isinstance(storage, RDBStorage)
    return storage


def _has_all_tables(url: str) -> bool:
    ours = (ARTIFACTS.name, CLAIMS.name) if not is_sqlite(url) else ()
    with short_engine(url) as eng, eng.connect() as conn:
        return schema_made(conn, *ours)


def _make_tables(url: str) -> None:
    """Optuna creates its tables when an RDBStorage opens; processes that open one new database at
    once would race to create them (PostgreSQL: a duplicate key in pg_type), so they take turns under
    a lock. The storage made here only makes the tables. Optuna's making of a new database holds two
    connections at once, so while the PostgreSQL lock holds a third, this process has 3: only here,
    once per database (`kmnist-tune schema`, which compose and Kubernetes run first, or the first
    `run`); a database that has its tables is opened without the lock."""
    with schema_lock(url):
        maker = RDBStorage(url, engine_kwargs=engine_kwargs(url), skip_compatibility_check=True)
        try:
            ensure_tables(maker.engine, ARTIFACTS, CLAIMS)
        finally:
            maker.engine.dispose()


def ensure_tables(engine: sqlalchemy.Engine, *tables: sqlalchemy.Table) -> None:
    """Create kmnist-tune's own tables where a PostgreSQL database lacks them (the owner's job:
    `kmnist-tune schema`, `study create`); a worker role may not create tables, so look first."""
    if engine.url.get_backend_name() != "postgresql":
        return
    with engine.connect() as conn:
        missing = [t for t in tables if not sqlalchemy.inspect(conn).has_table(t.name)]
    for table in missing:
        table.metadata.create_all(engine, tables=[table])


def init_schema(url: str) -> str:
    """`kmnist-tune schema`: Optuna's tables at the head version and the artifact table; what is there."""
    if is_grpc(url):
        raise UserError("schema needs a database URL, not the storage proxy's grpc://")
    # A migration of a large database may run long: bounded, but by an hour (lock waits as everywhere).
    storage = _create_rdb(url, skip_compatibility_check=True, timeouts=Timeouts.from_env(statement_s=MIGRATION_S))
    try:
        if storage.get_current_version() != storage.get_head_version():
            storage.upgrade()
        what = f"Optuna schema {storage.get_current_version()}"
        if backend(storage) != "postgresql":
            return what
        _owner_only_version_tables(storage.engine, url)
        return what + " and the kmnist_tune_artifacts and kmnist_tune_claims tables; only the owner writes the version tables"
    finally:
        storage.engine.dispose()


def _owner_only_version_tables(engine: sqlalchemy.Engine, url: str) -> None:
    """Optuna's version tables: one UPDATE there makes every worker and the dashboard refuse to start
    ("upgrade Optuna"), and the default privileges of storage/initdb give the worker role write on
    every table the owner makes, these included. Only their owner and the role running this (the
    one that migrates them) keep write; every other grantee, PUBLIC too, SELECT at most. Optuna
    writes them only when they are empty or unstamped, which init_schema has just made sure they are not."""
    names = ", ".join(f"'{t}'" for t in VERSION_TABLES)
    grants = sqlalchemy.text(
        "SELECT DISTINCT c.oid::regclass::text AS tbl, a.grantee = 0 AS public, pg_get_userbyid(a.grantee) AS who"
        " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
        f" WHERE c.relkind = 'r' AND c.relname IN ({names}) AND pg_table_is_visible(c.oid)"
        " AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')"
        " AND a.grantee <> c.relowner AND a.grantee <> (SELECT oid FROM pg_roles WHERE rolname = current_user)"
        " ORDER BY 1, 3"
    )
    quote = engine.dialect.identifier_preparer.quote
    try:
        with engine.begin() as conn:
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
