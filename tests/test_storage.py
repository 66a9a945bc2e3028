"""Storage: password masking, URL resolution, one-line errors, and studies that carry their spec,
on real SQLite files and a real PostgreSQL database."""

from __future__ import annotations

import io
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
from conftest import tiny_spec
from sqlalchemy.engine import make_url

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.records import SPEC_ATTR, Budget
from kmnist_tune.contract.spec import spec_to_dict
from kmnist_tune.errors import UserError
from kmnist_tune.masking import MaskSecrets, mask
from kmnist_tune.service.schema import create_storage
from kmnist_tune.service.storage import (
    DEFAULT_STORAGE,
    ENV_STORAGE,
    NoStudies,
    finished_and_best,
    open_storage,
    require_study,
    resolve_url,
)
from kmnist_tune.service.studies import check_study, create_study, open_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert "\n" not in msg, f"message spans lines: {msg!r}"
    assert msg.strip()
    return msg


# -- mask ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql+psycopg://user:secret@host/db", "postgresql+psycopg://user:***@host/db"),
        ("postgresql://user:secret@host:5432/db?sslmode=require", "postgresql://user:***@host:5432/db?sslmode=require"),
        (
            "error: cannot reach storage postgresql+psycopg://kt:secret@db.internal:5432/sweeps: timeout",
            "error: cannot reach storage postgresql+psycopg://kt:***@db.internal:5432/sweeps: timeout",
        ),
        (
            "two: postgresql://a:secret@h1/d and postgresql://b:secret@h2/d",
            "two: postgresql://a:***@h1/d and postgresql://b:***@h2/d",
        ),
        ("(url='postgresql+psycopg://u:secret@h/d')", "(url='postgresql+psycopg://u:***@h/d')"),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("postgresql://u@h/d?password=secret&sslmode=require", "postgresql://u@h/d?password=***&sslmode=require"),
        ("PASSWORD=secret", "PASSWORD=***"),
    ],
)
def test_mask_hides_passwords(text: str, expected: str) -> None:
    masked = mask(text)
    assert "secret" not in masked
    assert masked == expected


@pytest.mark.parametrize(
    "text",
    [
        "postgresql+psycopg://user@host/db",
        "postgresql://host:5432/db",
        "sqlite:///kmnist-tune.db",
        "sqlite:////abs/path/x.db",
        "see https://example.org/a:b for details",
        "no url here at all",
    ],
)
def test_mask_leaves_passwordless_text_alone(text: str) -> None:
    assert mask(text) == text


def test_mask_secrets_filter_on_a_real_logger() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("kmnist_tune.test_storage.mask")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    filt = MaskSecrets()
    logger.addFilter(filt)
    try:
        logger.info("connecting to %s (try %d)", "postgresql+psycopg://kt:hunter2@db:5432/sweeps", 1)
        logger.warning("plain message, nothing to hide: %s", "sqlite:///x.db")
    finally:
        logger.removeFilter(filt)
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "hunter2" not in out
    assert "INFO connecting to postgresql+psycopg://kt:***@db:5432/sweeps (try 1)" in out
    assert "WARNING plain message, nothing to hide: sqlite:///x.db" in out


# -- resolve_url ----------------------------------------------------------------------------------


def test_resolve_url_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_STORAGE, raising=False)
    assert resolve_url(None) == DEFAULT_STORAGE == "sqlite:///kmnist-tune.db"


def test_resolve_url_env_and_explicit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_url = f"sqlite:///{tmp_path}/from-env.db"
    monkeypatch.setenv(ENV_STORAGE, env_url)
    assert resolve_url(None) == env_url
    explicit = f"sqlite:///{tmp_path}/explicit.db"
    assert resolve_url(explicit) == explicit  # --storage wins over the environment


def test_resolve_url_plain_postgresql_gets_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_STORAGE, raising=False)
    url = resolve_url("postgresql://kt:s3cret@db.example:5433/sweeps")
    assert url == "postgresql+psycopg://kt:s3cret@db.example:5433/sweeps"  # password kept, not ***
    assert resolve_url("postgresql+psycopg://kt@db/sweeps") == "postgresql+psycopg://kt@db/sweeps"
    monkeypatch.setenv(ENV_STORAGE, "postgresql://u@h/d")
    assert resolve_url(None) == "postgresql+psycopg://u@h/d"


def test_port_that_is_not_a_number_is_rejected_by_sqlalchemy() -> None:
    # The premise of the next test's case: SQLAlchemy itself refuses a non-numeric port.
    with pytest.raises(ValueError):
        make_url("postgresql+psycopg://host:notaport/db")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", ["malformed storage URL", "'not a url'", "sqlite:///"]),
        ("postgresql+psycopg://host:notaport/db", ["malformed storage URL", "notaport"]),
        ("mysql://u:topsecret@h/db", ["unsupported storage", "mysql://u:***@h/db"]),
        ("mssql+pyodbc://u:topsecret@h/db", ["unsupported storage", "mssql"]),
        ("oracle://h/db", ["unsupported storage"]),
    ],
)
def test_resolve_url_rejects(url: str, expected: list[str]) -> None:
    with pytest.raises(UserError) as info:
        resolve_url(url)
    msg = one_line(info)
    assert "topsecret" not in msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_resolve_url_rejects_bad_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_STORAGE, "mysql://u@h/db")
    with pytest.raises(UserError, match="unsupported storage"):
        resolve_url(None)


# -- open_storage ---------------------------------------------------------------------------------


def test_open_missing_sqlite_without_create(tmp_path: Path) -> None:
    db = tmp_path / "nothing-here.db"
    with pytest.raises(NoStudies) as info:
        open_storage(f"sqlite:///{db}")
    msg = one_line(info)
    assert "no studies in" in msg and "create one" in msg
    assert str(db) in msg
    assert not db.exists(), "opening for reading must not create the file"
    assert list(tmp_path.iterdir()) == []


def test_reading_never_writes_optuna_tables_into_a_foreign_database(tmp_path: Path) -> None:
    """A database that holds something else (or nothing) is left exactly as it was."""
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = foreign.read_bytes()
    with pytest.raises(NoStudies):
        open_storage(f"sqlite:///{foreign}")
    assert foreign.read_bytes() == before
    with sqlite3.connect(foreign) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"notes"}


@pytest.mark.postgres
def test_reading_an_empty_postgresql_database_creates_nothing(pg_url: str) -> None:
    with pytest.raises(NoStudies) as info:
        open_storage(pg_url)
    assert "no studies in" in one_line(info)
    admin_url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url) as conn:
        n = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone()
    assert n == (0,)


def test_open_sqlite_with_create_makes_it(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    storage = create_storage(f"sqlite:///{db}")
    try:
        assert db.is_file() and db.stat().st_size > 0
        assert storage.get_all_studies() == []
    finally:
        storage.engine.dispose()
    # and now it opens without create
    again = open_storage(f"sqlite:///{db}")
    again.engine.dispose()


def test_open_file_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "notes.db"
    junk.write_text("these are not the tables you are looking for\n" * 50)
    with pytest.raises(UserError) as info:
        open_storage(f"sqlite:///{junk}")
    msg = one_line(info)
    assert "not a usable Optuna database" in msg


def test_open_with_a_driver_that_is_not_installed(tmp_path: Path) -> None:
    # A dialect SQLAlchemy knows but whose DB-API module this environment lacks.
    with pytest.raises(UserError) as info:
        create_storage(f"sqlite+pysqlcipher:///{tmp_path}/x.db")
    msg = one_line(info)
    assert "not installed" in msg and "sqlite+pysqlcipher" in msg
    assert not (tmp_path / "x.db").exists()


def test_unreachable_postgres_is_one_line_without_the_password() -> None:
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        create_storage("postgresql+psycopg://u:topsecret@127.0.0.1:1/db")
    elapsed = time.monotonic() - t0
    msg = one_line(info)
    assert elapsed < 15, f"took {elapsed:.1f}s to give up"
    assert "cannot reach storage" in msg
    assert "127.0.0.1" in msg
    assert "topsecret" not in msg
    assert "u:***@" in msg


# -- studies that carry their spec, on SQLite and PostgreSQL ----------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/studies.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def storage(storage_url: str) -> Iterator[optuna.storages.RDBStorage]:
    st = create_storage(storage_url)
    try:
        yield st
    finally:
        st.engine.dispose()


def rich_spec(name: str = "carry", **over: Any) -> dict[str, Any]:
    """tiny_spec plus shorthands whose meaning must survive storage (int vs float ranges)."""
    spec = tiny_spec(name, **over)
    spec["parameters"] = {
        **spec["parameters"],
        "batch_size": {"min": 16, "max": 64},
        "weight_decay": {"min": 0.0, "max": 1.0},
        "stem": {"values": ["imagenet", "small"]},
    }
    return spec


def test_require_study_lists_existing(storage: optuna.storages.RDBStorage) -> None:
    with pytest.raises(UserError) as info:
        require_study(storage, "ghost")
    assert "there are no studies there yet" in one_line(info)
    optuna.create_study(storage=storage, study_name="alpha")
    optuna.create_study(storage=storage, study_name="beta")
    assert require_study(storage, "beta") == storage.get_study_id_from_name("beta")
    with pytest.raises(UserError) as info:
        require_study(storage, "gamma")
    msg = one_line(info)
    assert "'gamma'" in msg and "alpha" in msg and "beta" in msg


@pytest.mark.postgres
def test_unknown_study_error_masks_the_storage_password(pg_url: str) -> None:
    # Trust authentication ignores the password, so the URL with one still connects.
    url = pg_url.replace("://postgres@", "://postgres:topsecret@")
    storage = create_storage(url)
    try:
        with pytest.raises(UserError) as info:
            require_study(storage, "gamma")
        msg = one_line(info)
        assert "'gamma'" in msg and "postgres:***@" in msg and "topsecret" not in msg
    finally:
        storage.engine.dispose()


def test_create_and_open_study_round_trip(storage: optuna.storages.RDBStorage) -> None:
    spec = parse_spec(rich_spec())
    study, created = create_study(spec, storage, resume=False, seed=0)
    assert created
    assert study.study_name == "carry"
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.user_attrs[SPEC_ATTR] == spec_to_dict(spec)

    opened, stored = open_study(storage, "carry")
    assert stored == spec
    assert spec_to_dict(stored) == spec_to_dict(spec)
    assert stored.parameters["batch_size"].kind() == "int_uniform"
    assert stored.parameters["weight_decay"].kind() == "uniform"
    assert opened._study_id == study._study_id

    # resume with the same spec: the same study, not a new one
    resumed, created = create_study(parse_spec(rich_spec()), storage, resume=True, seed=0)
    assert not created
    assert resumed._study_id == study._study_id
    assert len(storage.get_all_studies()) == 1

    # the budget is study state, not the spec's identity: a larger one grows the study, a smaller
    # one (an old spec file run again) never shrinks it
    grown, created = create_study(parse_spec(rich_spec(budget={"n_trials": 5})), storage, resume=True)
    assert not created and Budget.read(grown.user_attrs).n_trials == 5
    create_study(parse_spec(rich_spec(budget={"n_trials": 3})), storage, resume=True)
    assert Budget.read(grown.user_attrs).n_trials == 5

    # a different search space under the same name
    changed = parse_spec(rich_spec())
    changed.parameters["lr"].max = 0.5
    with pytest.raises(UserError) as info:
        create_study(changed, storage, resume=True)
    msg = one_line(info)
    assert "'carry'" in msg and "different spec" in msg
    assert "parameters.lr.max: " in msg and "0.5 in yours" in msg  # issue 24: which field differs

    # create (no resume) over an existing study
    with pytest.raises(UserError) as info:
        create_study(spec, storage, resume=False)
    msg = one_line(info)
    assert "'carry'" in msg and "already exists" in msg
    assert len(storage.get_all_studies()) == 1

    # opening a name that is not there
    with pytest.raises(UserError) as info:
        open_study(storage, "carry-typo")
    assert "carry" in one_line(info)


def test_open_study_made_without_kmnist_tune(storage: optuna.storages.RDBStorage) -> None:
    optuna.create_study(storage=storage, study_name="foreign")
    with pytest.raises(UserError) as info:
        open_study(storage, "foreign")
    assert "no stored spec" in one_line(info)


@pytest.mark.postgres
def test_postgres_pool_is_bounded(pg_url: str) -> None:
    dbname = make_url(pg_url).database
    storage = create_storage(pg_url)
    try:
        spec = parse_spec(rich_spec("pool"))
        study, created = create_study(spec, storage, resume=False, seed=0)
        assert created
        for i in range(3):
            trial = study.ask()
            trial.suggest_float("lr", 1e-3, 1e-2, log=True)
            trial.report(0.5, step=0)
            study.tell(trial, 0.1 * i)
        open_study(storage, "pool")
        create_study(spec, storage, resume=True)

        # Threads share the engine (as a worker's heartbeat thread does): an unbounded pool would
        # open one connection per thread; this one must make them take turns.
        def objective(trial: optuna.Trial) -> float:
            lr = trial.suggest_float("lr", 1e-3, 1e-2, log=True)
            trial.set_user_attr("note", "x")
            trial.report(lr, step=0)
            return lr

        study.optimize(objective, n_trials=16, n_jobs=6)
        assert len(study.trials) == 19

        admin_url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchall()
        assert 1 <= len(rows) <= 2, f"{len(rows)} connections held to {dbname}: {rows}"
        assert all(r[0].startswith("kmnist-tune ") for r in rows), rows  # "kmnist-tune <pid>"
    finally:
        storage.engine.dispose()


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_finished_and_best_agrees_with_optuna(storage: optuna.storages.RDBStorage, direction: str) -> None:
    study = optuna.create_study(study_name="progress", storage=storage, direction=direction)
    sid = storage.get_study_id_from_name("progress")
    maximize = direction == "maximize"
    assert finished_and_best(storage, sid, maximize) == (0, None)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.ask()  # left running
    assert finished_and_best(storage, sid, maximize) == (1, None)  # pruned counts; no value yet
    for value in (0.25, 0.75, 0.5):
        study.tell(study.ask(), value)
    assert finished_and_best(storage, sid, maximize) == (4, study.best_value)
    study.tell(study.ask(), float("-inf"))  # the worst for maximize, the best for minimize
    assert finished_and_best(storage, sid, maximize) == (5, study.best_value)
    assert study.best_value == (0.75 if maximize else float("-inf"))


def test_check_study_reads_the_spec_without_a_storage_and_says_what_is_wrong(storage_url: str, tmp_path: Path) -> None:
    storage = create_storage(storage_url)
    create_study(parse_spec(tiny_spec("checked")), storage, resume=False)
    optuna.create_study(storage=storage, study_name="foreign")  # made without kmnist-tune: no spec
    storage.engine.dispose()
    assert check_study(storage_url, "checked") == parse_spec(tiny_spec("checked"))
    with pytest.raises(UserError) as info:
        check_study(storage_url, "ghost")
    assert "no study named 'ghost'" in one_line(info) and "checked, foreign" in one_line(info)
    with pytest.raises(UserError, match="not created by kmnist-tune"):
        check_study(storage_url, "foreign")
    with pytest.raises(NoStudies):
        check_study(f"sqlite:///{tmp_path / 'none.db'}", "checked")
    assert not (tmp_path / "none.db").exists()
