"""Every failure path ends clean: one line and a distinct exit status, nothing half-written, no trial
left RUNNING, and commands that only read never write."""

from __future__ import annotations

import io
import re
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, cli_here, error_line, run_cli, spawn_cli, tiny_spec, write_spec
from helpers import wait_until
from optuna.trial import TrialState
from sim_worker import Simulated, create

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.observe.progress import Reporter
from kmnist_tune.service.lock import schema_lock
from kmnist_tune.service.retry import open_worker_storage
from kmnist_tune.service.schema import create_storage
from kmnist_tune.service.studies import create_study, open_study
from kmnist_tune.service.worker import TrialsKeepFailing, Worker


def last_error(proc_or_err: subprocess.CompletedProcess[str] | str) -> str:
    """For commands that print progress first: no traceback, and the last line is the one error line."""
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.strip()][-1]


def states(url: str, name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in optuna.load_study(study_name=name, storage=url).trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# -- whatever a trial raises fails that trial, not the worker -----------------------------------


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), KeyError("lr"), ZeroDivisionError("division by zero")])
def test_an_objective_that_raises_anything_fails_its_trial_not_the_worker(error: Exception, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    spec = parse_spec(tiny_spec("raises", budget={"n_trials": 5}))
    create_study(spec, create_storage(url), resume=False)
    storage = open_worker_storage(url)
    storage.use_heartbeat(30, 120, 0)
    study, spec = open_study(storage, "raises")

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("lr", 1e-3, 1e-2, log=True)
        raise error

    with pytest.raises(TrialsKeepFailing, match=f"3 trials in a row failed \\(last: {type(error).__name__}"):
        Worker(study, storage, spec, objective, Reporter(io.StringIO())).run()
    trials = optuna.load_study(study_name="raises", storage=url).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3  # none left RUNNING
    assert all(TrialRecord.of(t).error.startswith(type(error).__name__) for t in trials)
    assert TrialsKeepFailing.exit_code == 3


def test_consecutive_failures_follow_the_spec_and_wandbs_flag(tmp_path: Path) -> None:
    """workers.max_consecutive_failures (3 by default, as W&B's agent) is the study's; a worker's
    --max-consecutive-failed-runs (W&B's flag) overrides it for that worker."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    spec = parse_spec(tiny_spec("fails", budget={"n_trials": 9}, workers={"max_consecutive_failures": 2}))
    create_study(spec, create_storage(url), resume=False)
    storage = open_worker_storage(url)
    storage.use_heartbeat(30, 120, 0)
    study, spec = open_study(storage, "fails")

    def objective(trial: optuna.Trial) -> float:
        raise RuntimeError("boom")

    with pytest.raises(TrialsKeepFailing, match="2 trials in a row failed"):
        Worker(study, storage, spec, objective, Reporter(io.StringIO())).run()
    with pytest.raises(TrialsKeepFailing, match="4 trials in a row failed"):
        Worker(study, storage, spec, objective, Reporter(io.StringIO()), max_consecutive_failures=4).run()
    assert states(url, "fails") == {"FAIL": 6}
    # The CLI takes W&B's name for it (and refuses a nonsense value in one line).
    line = error_line(cli_here("worker", "fails", "--storage", url, "--max-consecutive-failed-runs", "0", check=False))
    assert "--max-consecutive-failed-runs" in line


def test_a_sampler_option_that_would_fail_when_sampling_is_refused_at_create(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    create(url, tiny_spec("other"))  # the storage holds a study already
    spec = tiny_spec("gamma", sampler={"name": "tpe", "options": {"gamma": 5}})
    line = error_line(cli_here("study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", url, check=False))
    assert "sampler.options.gamma" in line and "callable" in line
    assert optuna.get_all_study_names(url) == ["other"]  # nothing of 'gamma' was written


# -- one new study, created by several processes at once ----------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_concurrent_creates_of_one_new_study(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    if backend == "sqlite":
        cli_here("study", "list", "--storage", url)  # nothing there yet, and nothing made
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("race"))
    procs = [spawn_cli("study", "create", str(spec), "--storage", url) for _ in range(4)]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    created = [out for rc, out, _ in results if rc == 0]
    refused = [err for rc, _, err in results if rc != 0]
    assert len(created) == 1 and "created study race" in created[0], results
    for err in refused:
        assert "Traceback" not in err and err.strip().startswith("error:") and "already exists" in err, err
    assert optuna.get_all_study_names(url) == ["race"]


def test_a_database_another_process_is_still_making_is_waited_for_not_stamped_twice(tmp_path: Path) -> None:
    """The moment the race above can hit: Optuna's tables and version row are there, its alembic stamp
    not yet. A reader sees no studies and writes nothing; a creator waits for the schema lock and then
    finishes the database once, instead of stamping it beside the first creator."""
    db = tmp_path / "half.db"
    url = f"sqlite:///{db}"
    storage = create_storage(url)
    head = storage.get_current_version()  # type: ignore[attr-defined]
    storage.engine.dispose()  # type: ignore[attr-defined]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM alembic_version")  # the first creator has not stamped it yet
    assert cli_here("study", "list", "--storage", url).stdout.startswith("no studies in")
    assert stamps(db) == 0  # the reader wrote nothing

    spec = write_spec(tmp_path / "s.yaml", tiny_spec("half"))
    with schema_lock(url):  # held by the first creator
        proc = spawn_cli("study", "create", str(spec), "--storage", url)
        # It waits for the lock (the kernel lists it as a blocked flock) instead of opening the database.
        wait_until(
            lambda: f"-> FLOCK  ADVISORY  WRITE {proc.pid} " in Path("/proc/locks").read_text(),
            120,
            "create waits for the schema lock",
            [proc],
        )
        assert stamps(db) == 0
        with sqlite3.connect(db) as conn:  # the first creator stamps it and lets go
            conn.execute("INSERT INTO alembic_version VALUES (?)", (head,))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "created study half" in out, err
    assert stamps(db) == 1


def stamps(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0])


def test_concurrent_runs_of_one_new_study_share_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("race-run", budget={"n_trials": 1}))
    env = cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [spawn_cli("run", str(spec), "--storage", url, env=env) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    said = sorted(e.split(" study race-run")[0].rsplit("\n", 1)[-1] for e in errs)
    assert said == ["created", "resuming"], errs
    assert states(url, "race-run") == {"COMPLETE": 1}


# -- commands that read never write ----------------------------------------------------------------


def test_read_only_commands_leave_an_empty_file_and_a_foreign_database_alone(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = foreign.read_bytes()
    for db in (empty, foreign):
        url = f"sqlite:///{db}"
        assert cli_here("study", "list", "--storage", url).stdout.startswith("no studies in")
        for args in (["study", "show", "x"], ["best", "--study", "x"], ["report", "--study", "x", "--out", str(tmp_path / "r")]):
            assert "no studies in" in error_line(cli_here(*args, "--storage", url, check=False))
    assert empty.stat().st_size == 0
    assert foreign.read_bytes() == before


# -- one line, not a traceback -------------------------------------------------------------------------


def made_study(tmp_path: Path) -> str:
    """A study named ok (no trial yet) in tmp_path/ok.db, made as `study create` makes it; its URL."""
    url = f"sqlite:///{tmp_path / 'ok.db'}"
    create(url, tiny_spec("ok"))
    return url


def test_storages_that_cannot_be_written(tmp_path: Path) -> None:
    url = made_study(tmp_path)
    read_only = f"sqlite:///file:{tmp_path / 'ok.db'}?mode=ro&uri=true"
    assert "ok" in cli_here("study", "list", "--storage", read_only).stdout  # reading works
    spec = write_spec(tmp_path / "t.yaml", tiny_spec("another"))
    line = error_line(cli_here("study", "create", str(spec), "--storage", read_only, check=False))
    assert "readonly" in line.replace("-", "") and "may be written" in line
    line = error_line(cli_here("study", "create", str(spec), "--storage", "sqlite:////proc/kmnist-tune/x.db", check=False))
    assert "cannot open SQLite storage" in line and "folder /proc/kmnist-tune does not exist" in line
    line = error_line(cli_here("study", "list", "--storage", "sqlite://", check=False))
    assert "in-memory" in line and "sqlite:///path" in line
    assert optuna.get_all_study_names(url) == ["ok"]


def test_outputs_that_cannot_be_written(tmp_path: Path) -> None:
    url = made_study(tmp_path)
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    line = error_line(cli_here("report", "--study", "ok", "--out", str(a_file), "--storage", url, check=False))
    assert "a file is there" in line and a_file.read_text() == "mine"
    line = error_line(cli_here("report", "--study", "ok", "--out", "/proc/kmnist-report", "--storage", url, check=False))
    assert "cannot write there" in line
    for out, expected in ((tmp_path / "curve.xyz", "end the name in .png"), (tmp_path, "a folder")):
        line = error_line(cli_here("lr-find", "--study", "ok", "--stored", "--out", str(out), "--storage", url, check=False))
        assert expected in line


def test_the_dashboard_on_a_port_in_use(tmp_path: Path) -> None:
    url = made_study(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("dashboard", "--storage", url, "--port", str(port), check=False, timeout=120)
    assert f"port {port} on 127.0.0.1 is in use" in last_error(proc) and proc.returncode == 2
    assert "optuna-dashboard for" not in proc.stderr  # issue 24: no "serving on ..." line before it


def test_a_foreign_multi_objective_study_is_listed(tmp_path: Path) -> None:
    url = made_study(tmp_path)
    other = optuna.create_study(storage=url, study_name="pareto", directions=["minimize", "maximize"])
    other.tell(other.ask(), [1.0, 2.0])
    listed = cli_here("study", "list", "--storage", url).stdout
    # finished against the budget; another tool's study has none to show
    assert "pareto\t1 finished\tbest -" in listed and re.search(r"ok\t0/\d+ finished", listed), listed
    assert "was not created by kmnist-tune" in error_line(cli_here("study", "show", "pareto", "--storage", url, check=False))


# -- workers that meet a deleted study, a signal, a trial nobody works on -----------------------------


def slow_spec(name: str, n_trials: int = 3, epochs: int = 3) -> dict:
    spec = tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["epochs"] = {"value": epochs}
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    return spec


def test_a_study_deleted_under_a_running_worker(tmp_path: Path, watch) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    create(url, slow_spec("doomed"))
    worker = spawn_cli("worker", "--study", "doomed", "--storage", url, "--gpus", "none")
    w = watch(url, "doomed")
    wait_until(lambda: w.count(TrialState.RUNNING), 120, "a running trial of doomed", procs=[worker])
    w.close()  # nothing of this test holds the study while it is deleted
    cli_here("study", "delete", "doomed", "--yes", "--storage", url)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 3, err
    assert "study 'doomed' was deleted while this worker ran" in last_error(err)


def test_run_stopped_before_its_budget_exits_non_zero(tmp_path: Path, watch) -> None:
    url = f"sqlite:///{tmp_path / 'i.db'}"
    run = spawn_cli("run", str(write_spec(tmp_path / "s.yaml", slow_spec("stopped"))), "--storage", url)
    w = watch(url, "stopped")  # the run makes the database and the study: until then, no trials
    wait_until(lambda: w.count(TrialState.RUNNING), 120, "a running trial of stopped", procs=[run])
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT before the study's budget was used" in last_error(err)
    assert w.states() == {"FAIL": 1, "WAITING": 1}  # handed back, queued for the next run


def test_a_running_trial_that_never_beat_is_failed_and_retried(tmp_path: Path, watch) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    create(url, slow_spec("silent", n_trials=2, epochs=1))
    # A plain Optuna script claims a trial and dies: RUNNING, no heartbeat ever.
    orphan = optuna.load_study(study_name="silent", storage=url).ask(
        {"lr": optuna.distributions.FloatDistribution(2e-3, 1e-2, log=True)}
    )
    worker = Simulated(url, "silent")  # the real worker loop; its trials do not train
    assert worker.run() == 2
    assert f"trial {orphan.number} ran 3 s without a heartbeat; failed and queued again" in worker.said.lines
    trials = watch(url, "silent").trials()
    assert trials[orphan.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if TrialRecord.of(t).retry_of == orphan.number]
    assert retry.state == TrialState.COMPLETE and retry.params["lr"] == orphan.params["lr"]
    assert worker.params[retry.number]["lr"] == orphan.params["lr"]  # what its objective was given
    assert states(url, "silent") == {"FAIL": 1, "COMPLETE": 2}


def test_a_failed_trials_note_says_no_attempt_finished() -> None:
    """Not "batch size: 32 → None used": a trial that failed before an attempt ended says so."""
    from kmnist_tune.observe.notes import trial_note

    failed = trial_note(3, "FAIL", None, "accuracy", TrialRecord(batch_size_initial=32, error="RuntimeError: boom"))
    assert "- batch size: 32 at the start; no attempt finished" in failed and "None" not in failed
    done = trial_note(4, "COMPLETE", 0.5, "accuracy", TrialRecord(batch_size_initial=32, batch_size_used=16, attempts=2))
    assert "- batch size: 32 → 16 used (2 attempt(s))" in done
