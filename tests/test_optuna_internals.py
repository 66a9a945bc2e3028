"""kmnist_tune/optuna_internals.py, the one door to Optuna's private parts, checked against Optuna's
public API on SQLite and PostgreSQL; and nothing else in the package touching them."""

from __future__ import annotations

import ast
import collections
import json
import math
import re
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import REPO
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.trial import TrialState, create_trial

from kmnist_tune import optuna_internals as internals
from kmnist_tune.service.retry import RetryingRDBStorage, RetryingStorage
from kmnist_tune.service.schema import create_storage
from kmnist_tune.service.storage import autocommitted, engine, open_storage

PACKAGE = REPO / "kmnist_tune"
DOOR = PACKAGE / "optuna_internals.py"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'door.db'}"
    return request.getfixturevalue("pg_url")


def run_on(storage: optuna.storages.BaseStorage) -> internals.Run:
    return lambda statement, params: autocommitted(storage, statement, params)


def mixed_study(url: str, name: str = "door", direction: str = "maximize") -> optuna.Study:
    """A study with a trial in every state, through the public API."""
    storage = create_storage(url)
    study = optuna.create_study(study_name=name, storage=storage, direction=direction)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for v in (0.25, 0.75, 0.5):
        study.add_trial(create_trial(params={"x": v}, distributions=dist, value=v))
    study.add_trial(create_trial(params={"x": 0.1}, distributions=dist, state=TrialState.PRUNED, intermediate_values={0: 0.1}))
    study.add_trial(create_trial(params={"x": 0.2}, distributions=dist, state=TrialState.FAIL))
    study.enqueue_trial({"x": 0.3})
    study.ask()  # the enqueued one, now RUNNING
    study.enqueue_trial({"x": 0.4})  # WAITING
    study.set_user_attr("a", {"nested": [1, 2]})
    study.set_user_attr("b", "text")
    study.set_user_attr("big", list(range(1000)))
    return study


def test_the_schema_head_is_the_one_the_queries_were_written_for(url: str) -> None:
    storage = create_storage(url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    # An Optuna upgrade that moves the schema fails here: re-check every query in optuna_internals.py.
    assert storage.get_head_version() == internals.SCHEMA_VERSION
    assert storage.get_current_version() == internals.SCHEMA_VERSION
    tables = set(sqlalchemy.inspect(storage.engine).get_table_names())
    assert tables >= internals.REQUIRED_TABLES
    assert set(internals.VERSION_TABLES) <= tables


def test_ids_and_the_study_storage_match_the_public_lookups(url: str) -> None:
    study = mixed_study(url)
    storage = internals.study_storage(study)
    sid = internals.study_id(study)
    assert sid == storage.get_study_id_from_name("door") == internals.study_id(storage.get_all_studies()[0])
    assert storage.get_study_name_from_id(sid) == "door"
    for t in study.get_trials():
        assert internals.trial_id(t) == storage.get_trial_id_from_study_id_trial_number(sid, t.number)
    live = study.ask()
    assert internals.trial_id(live) == storage.get_trial_id_from_study_id_trial_number(sid, live.number)
    assert storage.get_trial(internals.trial_id(live)).number == live.number
    # Under Optuna's cache, the storage we opened; under our retrying wrapper too.
    assert isinstance(internals.rdb(storage), optuna.storages.RDBStorage)
    assert internals.rdb(storage).url == url
    wrapped = open_storage(url, storage_cls=RetryingRDBStorage)
    assert internals.rdb(optuna.load_study(study_name="door", storage=wrapped)._storage) is wrapped  # noqa: SLF001


def test_new_trial_is_what_ask_makes_and_the_cache_knows_it(url: str) -> None:
    study = mixed_study(url)
    before = len(study.get_trials())
    made = internals.new_trial(study)
    frozen = internals.study_storage(study).get_trial(internals.trial_id(made))
    assert frozen.state == TrialState.RUNNING and frozen.number == before
    # Not the WAITING one: new_trial never pops Optuna's queue (the claim pops it with ask).
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"x": 0.4}]
    assert made.number in {t.number for t in study.get_trials(deepcopy=False)}
    assert made.suggest_float("x", 0, 1) == study.get_trials()[made.number].params["x"]


def test_state_counts_and_the_best_match_optuna_on_both_directions(url: str) -> None:
    for direction, best in (("maximize", 0.75), ("minimize", 0.25)):
        study = mixed_study(url, f"door-{direction}", direction)
        run = run_on(internals.study_storage(study))
        public = collections.Counter(t.state.name for t in study.get_trials())
        assert internals.state_counts(run, internals.study_id(study)) == dict(public)
        finished = public["COMPLETE"] + public["PRUNED"]
        assert internals.finished_and_best(run, internals.study_id(study), direction == "maximize") == (finished, best)
        assert study.best_value == best


def test_the_best_of_infinite_values_and_of_no_value(url: str) -> None:
    storage = create_storage(url)
    empty = optuna.create_study(study_name="empty", storage=storage)
    assert internals.finished_and_best(run_on(storage), internals.study_id(empty), True) == (0, None)
    study = optuna.create_study(study_name="inf", storage=storage, direction="maximize")
    for v in (-math.inf, 1.0):
        study.add_trial(create_trial(value=v))
    assert internals.finished_and_best(run_on(storage), internals.study_id(study), True) == (2, study.best_value)
    study.add_trial(create_trial(value=math.inf))
    assert internals.finished_and_best(run_on(storage), internals.study_id(study), True) == (3, math.inf) == (3, study.best_value)
    assert internals.finished_and_best(run_on(storage), internals.study_id(study), False) == (3, -math.inf)


def test_some_study_attrs_are_the_public_ones(url: str) -> None:
    study = mixed_study(url)
    run = run_on(internals.study_storage(study))
    got = internals.study_user_attrs(run, internals.study_id(study), ("a", "b", "absent"))
    assert got == {k: study.user_attrs[k] for k in ("a", "b")}


def test_study_lookups_by_name_match_the_public_ones(url: str) -> None:
    study = mixed_study(url)
    other = optuna.create_study(study_name="second", storage=internals.study_storage(study))
    run = run_on(internals.study_storage(study))
    assert internals.study_id_by_name(run, "second") == internals.study_id(other)
    assert internals.study_id_by_name(run, "ghost") is None
    assert internals.study_names(run) == optuna.get_all_study_names(url) == ["door", "second"]


def test_bounded_listing_queries_are_optunas_listing_within_their_bounds(url: str) -> None:
    """bounded_study_attrs, study_directions, study_ids_and_names and frozen_study give what
    get_all_studies gives, where nothing is over the bounds; over them, sizes instead of values."""
    study = mixed_study(url)
    storage = internals.study_storage(study)
    other = optuna.create_study(study_name="second", storage=storage, directions=["minimize", "maximize"])
    other.set_user_attr("a", "second's")
    storage.set_study_system_attr(internals.study_id(other), "sys", {"k": [1, 2]})
    run, backend = run_on(storage), engine(storage).url.get_backend_name()
    public = storage.get_all_studies()
    assert internals.study_ids_and_names(run) == [(internals.study_id(s), s.study_name) for s in public]
    assert internals.study_directions(run) == {internals.study_id(s): list(s.directions) for s in public}
    attrs: dict[str, dict[int, dict[str, object]]] = {"user": {}, "system": {}}
    for which, found in attrs.items():
        for sid, key, text, size in internals.bounded_study_attrs(run, backend, which, 1 << 20):
            assert text is not None and size == len(text.encode())
            found.setdefault(sid, {})[key] = json.loads(text)
    for s in public:
        sid = internals.study_id(s)
        rebuilt = internals.frozen_study(sid, s.study_name, list(s.directions), attrs["user"][sid], attrs["system"].get(sid, {}))
        assert rebuilt == s
    # Over the size bound: the size, not the text; only the keys asked for; at most so many per study, by key.
    big = json.dumps(study.user_attrs["big"])
    small = internals.bounded_study_attrs(run, backend, "user", len(big) - 1, ("big", "b"))
    assert small == [(internals.study_id(study), "b", json.dumps("text"), 6), (internals.study_id(study), "big", None, len(big))]
    first = internals.bounded_study_attrs(run, backend, "user", 1 << 20, None, 1)
    assert [(sid, key) for sid, key, _, _ in first] == [(internals.study_id(study), "a"), (internals.study_id(other), "a")]


def test_the_claims_count_is_the_public_count(url: str) -> None:
    study = mixed_study(url)
    states = ("COMPLETE", "PRUNED", "RUNNING")
    sql = f"SELECT {internals.counted_trials_sql(internals.study_id(study), states)}"
    got = autocommitted(internals.study_storage(study), sqlalchemy.text(sql), {})[0][0]
    assert got == len(study.get_trials(states=tuple(TrialState[s] for s in states))) == 5


def test_heartbeats_running_without_one_and_stale_ones_as_optuna_sees_them(url: str) -> None:
    create_storage(url).engine.dispose()
    storage = open_storage(url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="beats", storage=storage)
    beating, silent = study.ask(), study.ask()
    storage.record_heartbeat(internals.trial_id(beating))
    sid = internals.study_id(study)
    assert internals.running_without_heartbeat(run_on(storage), sid) == [internals.trial_id(silent)]
    deadline = time.monotonic() + 30
    while not internals.stale_trial_ids(storage, sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    stale = internals.stale_trial_ids(storage, sid)
    assert stale == [internals.trial_id(beating)]
    optuna.storages.fail_stale_trials(study)  # the public call fails exactly those
    failed = [internals.trial_id(t) for t in study.get_trials(states=(TrialState.FAIL,))]
    assert failed == stale


def test_artifact_and_trial_queries_see_what_optuna_recorded(url: str, tmp_path: Path) -> None:
    study = mixed_study(url)
    storage = internals.study_storage(study)
    store = FileSystemArtifactStore(str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    (tmp_path / "f.txt").write_text("x")
    trial = study.get_trials(states=(TrialState.RUNNING,))[0]  # a finished trial takes no more attributes
    upload_artifact(artifact_store=store, file_path=str(tmp_path / "f.txt"), study_or_trial=study)
    upload_artifact(artifact_store=store, file_path=str(tmp_path / "f.txt"), study_or_trial=trial, storage=storage)
    public = {m.artifact_id for m in get_all_artifact_meta(study)} | {
        m.artifact_id for m in get_all_artifact_meta(trial, storage=storage)
    }
    with engine(storage).connect() as conn:
        recorded = {r[0].removeprefix("artifacts:") for r in conn.execute(internals.RECORDED_ARTIFACT_KEYS)}
        ids = {r[0] for r in conn.execute(internals.ALL_TRIAL_IDS)}
    assert recorded == public and len(public) == 2
    assert ids == {internals.trial_id(t) for t in study.get_trials()}


@pytest.mark.postgres
def test_the_lock_on_a_trials_study_holds_off_its_delete(pg_url: str) -> None:
    study = mixed_study(pg_url)
    storage = internals.study_storage(study)
    tid = internals.trial_id(study.get_trials()[0])
    eng = engine(storage)
    with eng.begin() as conn:
        assert conn.execute(internals.LOCK_STUDY_OF_TRIAL, {"tid": tid}).scalar_one() == internals.study_id(study)
        other = eng.connect()
        other.execute(sqlalchemy.text("SET lock_timeout = '300ms'"))
        with pytest.raises(sqlalchemy.exc.OperationalError, match="lock timeout"):
            other.execute(sqlalchemy.text("DELETE FROM studies WHERE study_id = :s"), {"s": internals.study_id(study)})
        other.close()
    with eng.begin() as conn:
        assert conn.execute(internals.LOCK_STUDY_OF_TRIAL, {"tid": 10**9}).first() is None


def test_the_proxy_address_is_where_the_client_connects() -> None:
    proxy = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=1)
    assert internals.grpc_address(proxy) == "127.0.0.1:1"
    assert internals.grpc_address(RetryingStorage(proxy)) == "127.0.0.1:1"
    assert internals.rdb(RetryingStorage(proxy)) is None


# -- nothing else touches them -------------------------------------------------------------------

# Optuna's tables, as SQL outside the door would name them.
TABLE_SQL = re.compile(
    r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:trials|trial_values|trial_heartbeats|trial_params|trial_intermediate_values"
    r"|trial_user_attributes|trial_system_attributes|studies|study_directions|study_user_attributes"
    r"|study_system_attributes|version_info|alembic_version)\b",
    re.IGNORECASE,
)


def optuna_private_names() -> set[str]:
    """The private attribute and method names of the Optuna objects the package handles."""
    storage = optuna.storages.RDBStorage("sqlite:///:memory:")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    objects = [study, trial, study.trials[0], storage, study._storage, storage.get_all_studies()[0]]  # noqa: SLF001
    objects += [optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=1), optuna.storages.BaseStorage]
    names = set()
    for obj in objects:
        names |= set(dir(obj)) | set(getattr(obj, "__dict__", {}))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_optunas_private_names_and_tables_appear_only_in_the_door() -> None:
    private = optuna_private_names()
    assert {"_trial_id", "_study_id", "_storage", "_backend", "_get_stale_trial_ids"} <= private
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == DOOR:
            continue
        text = path.read_text()
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = node.value.id if isinstance(node.value, ast.Name) else ""
                if owner not in ("self", "cls", "os", "sys"):
                    problems.append(f"{where}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("optuna.Trial", "Trial", "optuna.trial.Trial"):
                problems.append(f"{where}:{node.lineno} makes an optuna.Trial")
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and re.search(r"(^|\.)_", node.module)
                and "optuna" in node.module
            ):
                problems.append(f"{where}:{node.lineno} imports {node.module}")
        for m in TABLE_SQL.finditer(text):
            problems.append(f"{where}:{text[: m.start()].count(chr(10)) + 1} SQL on Optuna's table: {m.group(0)}")
    assert not problems, "outside kmnist_tune/optuna_internals.py:\n" + "\n".join(problems)


def test_the_private_calls_of_optunas_cache_are_the_ones_a_worker_retries() -> None:
    import inspect

    from optuna.storages import _cached_storage

    from kmnist_tune.service.retry import RetryingRDBStorage

    called = set(re.findall(r"self\._backend\.(_[a-z]\w*)\(", inspect.getsource(_cached_storage)))
    assert called == internals.CACHE_BACKEND_METHODS
    for name in called:  # each wrapped, not RDBStorage's own
        assert getattr(RetryingRDBStorage, name) is not getattr(optuna.storages.RDBStorage, name)
