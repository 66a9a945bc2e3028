"""Storage access: URL resolution, password masking, and opening Optuna's RDB storage.

Every place that talks to the study database goes through here, so connection
limits, time-outs and the error lines a user sees are decided once.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from .errors import UserError

DEFAULT_STORAGE = "sqlite:///kmnist-tune.db"
ENV_STORAGE = "KMNIST_TUNE_STORAGE"
URL_HELP = "use sqlite:///path/to/file.db or postgresql+psycopg://user:password@host:5432/dbname"

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


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    db = make_url(url).database
    return Path(db) if db and db != ":memory:" else None


def engine_kwargs(url: str) -> dict[str, Any]:
    if is_sqlite(url):
        # Several local processes share one file: wait for the write lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    # A worker needs one connection; the overflow one covers heartbeat + main thread overlap.
    return {
        "pool_size": 1,
        "max_overflow": 1,
        "pool_pre_ping": True,
        "pool_recycle": 300,
        "connect_args": {"connect_timeout": 10, "application_name": "kmnist-tune"},
    }


def open_storage(url: str, *, create: bool = False, **rdb_kwargs: Any) -> optuna.storages.RDBStorage:
    """Open (and with create=True, initialise) the storage; failures become one-line UserErrors."""
    if is_sqlite(url) and not create:
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise UserError(
                f"no study storage at {path.resolve()}; create a study first (`kmnist-tune run SPEC` or "
                f"`kmnist-tune study create SPEC`) or pass --storage / set {ENV_STORAGE}"
            )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs(url), **rdb_kwargs)
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
