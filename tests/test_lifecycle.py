"""A study's life: its budget grows while workers run, it stops and resumes on every worker."""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, error_line, run_cli, spawn_cli, tiny_spec, write_spec
from optuna.trial import TrialState

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.service.storage import open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def spec_file(tmp_path: Path, name: str, n_trials: int, epochs: int = 1) -> Path:
    spec = tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["epochs"] = {"value": epochs}
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    return write_spec(tmp_path / f"{name}.yaml", spec)


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).trials


def count(url: str, name: str, *states: TrialState) -> int:
    return sum(t.state in states for t in trials(url, name))


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ran(out: str) -> int:
    return int(re.search(r"worker ran (\d+) trial", out).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_running_worker_takes_up_an_extended_budget(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    run_cli("study", "create", str(spec_file(tmp_path, "grow", 2)), "--storage", url)
    worker = spawn_cli("worker", "--study", "grow", "--storage", url, "--gpus", "none")
    wait_until(lambda: count(url, "grow", TrialState.RUNNING) == 1, 120, "the first trial")
    out = run_cli("study", "extend", "grow", "--n-trials", "4", "--storage", url).stdout
    assert "budget 4 trials" in out
    stdout, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    assert ran(stdout) == 4 and count(url, "grow", *FINISHED) == 4
    shown = run_cli("study", "show", "grow", "--storage", url).stdout
    assert re.search(r"budget: 4 trials \(set at .+ by .+@.+\)", shown), shown


def test_run_and_worker_raise_the_budget_and_never_shrink_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    spec = spec_file(tmp_path, "raise", 1)
    run_cli("run", str(spec), "--storage", url)
    assert count(url, "raise", *FINISHED) == 1
    # The same spec with a larger --n-trials is the same study, grown (it was "a different spec").
    run_cli("run", str(spec), "--storage", url, "--n-trials", "2")
    assert count(url, "raise", *FINISHED) == 2
    # Extended past the spec file's 1: running the file again works the new trials, no fewer.
    run_cli("study", "extend", "raise", "--n-trials", "3", "--storage", url)
    again = run_cli("run", str(spec), "--storage", url)
    assert count(url, "raise", *FINISHED) == 3 and "3 complete" in again.stdout
    out = run_cli("worker", "--study", "raise", "--n-trials", "4", "--storage", url, "--gpus", "none").stdout
    assert ran(out) == 1 and count(url, "raise", *FINISHED) == 4
    line = error_line(run_cli("study", "extend", "raise", "--n-trials", "2", "--storage", url, check=False))
    assert "4 finished trials already" in line and "at least 4" in line
    assert "--n-trials" in error_line(run_cli("study", "extend", "raise", "--storage", url, check=False))


@pytest.mark.postgres
def test_stop_and_resume_with_two_workers(tmp_path: Path, pg_url: str) -> None:
    run_cli("study", "create", str(spec_file(tmp_path, "pause", 6, epochs=2)), "--storage", pg_url)
    env = cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    workers = [spawn_cli("worker", "--study", "pause", "--storage", pg_url, "--gpus", "none", env=env) for _ in range(2)]
    wait_until(lambda: count(pg_url, "pause", TrialState.RUNNING) == 2, 180, "two running trials")
    stopped = run_cli("study", "stop", "pause", "--storage", pg_url).stdout
    assert "stopped at" in stopped and "workers claim no more trials" in stopped
    running_at_stop = {t.number for t in trials(pg_url, "pause") if t.state == TrialState.RUNNING}
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err
        assert "study pause was stopped at" in err and "claims no more trials" in err
    after = trials(pg_url, "pause")
    # The trials that ran at the stop finished and count; nothing new was claimed; nothing is RUNNING.
    assert all(after[n].state in FINISHED for n in running_at_stop)
    assert {t.number for t in after} <= running_at_stop | {t.number for t in after if t.number < min(running_at_stop)}
    assert count(pg_url, "pause", TrialState.RUNNING) == 0
    assert "stopped at" in run_cli("study", "show", "pause", "--storage", pg_url).stdout
    assert "resumed" in run_cli("study", "resume", "pause", "--storage", pg_url).stdout
    out, err = spawn_cli("worker", "--study", "pause", "--storage", pg_url, "--gpus", "none", env=env).communicate(timeout=900)
    assert count(pg_url, "pause", *FINISHED) == 6, err
    assert "stopped" not in run_cli("study", "show", "pause", "--storage", pg_url).stdout.split("spec:")[0]


def test_stop_now_hands_the_running_trial_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    run_cli("study", "create", str(spec_file(tmp_path, "halt", 3, epochs=5)), "--storage", url)
    worker = spawn_cli("worker", "--study", "halt", "--storage", url, "--gpus", "none")
    wait_until(lambda: count(url, "halt", TrialState.RUNNING) == 1, 120, "a running trial")
    time.sleep(1)
    run_cli("study", "stop", "halt", "--now", "--storage", url)
    t0 = time.monotonic()
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    print(f"\nstop --now to worker exit: {time.monotonic() - t0:.1f} s")
    (handed,) = [t for t in trials(url, "halt") if t.state == TrialState.FAIL]
    assert TrialRecord.of(handed).interrupted == "study stop --now"
    (queued,) = [t for t in trials(url, "halt") if t.state == TrialState.WAITING]
    assert queued.params == handed.params
    assert count(url, "halt", TrialState.RUNNING) == 0


def test_warm_start_queues_the_best_configurations_of_an_earlier_study(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    old = tiny_spec("old", budget={"n_trials": 3})
    old["parameters"]["weight_decay"] = {"values": [0.0, 0.01]}
    run_cli("run", str(write_spec(tmp_path / "old.yaml", old)), "--storage", url)
    done = sorted((t for t in trials(url, "old") if t.state == TrialState.COMPLETE), key=lambda t: t.value, reverse=True)
    new = tiny_spec("new", budget={"n_trials": 4})
    new["parameters"]["lr"] = {"distribution": "log_uniform_values", "min": 3e-3, "max": 5e-3}  # narrower: clipped
    new["parameters"]["weight_decay"] = {"values": [0.01, 0.1]}  # 0.0 is not among them: left to the sampler
    new["parameters"]["stem"] = {"values": ["imagenet", "small"]}  # not in the old study: sampled
    out = run_cli(
        "study", "create", str(write_spec(tmp_path / "new.yaml", new)), "--warm-start", "old", "--top", "2", "--storage", url
    ).stdout
    # Clipping may make old configurations one: the next best is taken instead, or fewer are queued
    # when the old study has no more distinct ones (tested on purpose below).
    by_number = {t.number: t for t in done}
    sources = [by_number[int(n)] for n in re.findall(r"^queued trial (\d+) of old", out, re.M)]
    assert len(sources) == 2 or (sources and "once fitted; skipped" in out), out
    assert [t.number for t in sources] == [t.number for t in done if t in sources]
    for t in sources:
        assert f"queued trial {t.number} of old ({t.value:.4f})" in out
        if not 3e-3 <= t.params["lr"] <= 5e-3:
            assert f"trial {t.number}, lr: {t.params['lr']:g} clipped to" in out
        if t.params["weight_decay"] == 0.0:
            assert f"trial {t.number}, weight_decay: 0.0 is not among [0.01, 0.1]; left to the sampler" in out
    run_cli("worker", "--study", "new", "--max-trials", "2", "--storage", url, "--gpus", "none")
    first = sorted(trials(url, "new"), key=lambda t: t.number)[: len(sources)]
    for t, source in zip(first, sources, strict=True):
        assert TrialRecord.of(t).enqueued == f"warm start: trial {source.number} of old ({source.value:.4f})"
        assert t.params["lr"] == pytest.approx(min(max(source.params["lr"], 3e-3), 5e-3))
        if source.params["weight_decay"] == 0.01:
            assert t.params["weight_decay"] == 0.01


def test_warm_start_skips_configurations_that_clipping_makes_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    old = tiny_spec("old", budget={"n_trials": 3})
    old["parameters"]["weight_decay"] = {"values": [0.0, 0.01]}
    run_cli("study", "create", str(write_spec(tmp_path / "old.yaml", old)), "--storage", url)
    study = optuna.load_study(study_name="old", storage=url)
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "weight_decay": optuna.distributions.CategoricalDistribution([0.0, 0.01]),
    }
    for lr, value in [(1e-2, 0.9), (2e-2, 0.8), (4e-3, 0.7)]:  # the second clips onto the first
        study.add_trial(optuna.trial.create_trial(params={"lr": lr, "weight_decay": 0.01}, distributions=dists, value=value))
    new = tiny_spec("new", budget={"n_trials": 4})
    new["parameters"]["lr"] = {"distribution": "log_uniform_values", "min": 3e-3, "max": 5e-3}
    new["parameters"]["weight_decay"] = {"values": [0.01, 0.1]}
    out = run_cli(
        "study", "create", str(write_spec(tmp_path / "new.yaml", new)), "--warm-start", "old", "--top", "2", "--storage", url
    ).stdout
    assert "trial 1: the same configuration as trial 0 once fitted; skipped" in out
    assert re.findall(r"^queued trial (\d+) of old", out, re.M) == ["0", "2"]
    waiting = sorted(trials(url, "new"), key=lambda t: t.number)
    assert [TrialRecord.of(t).enqueued for t in waiting] == [
        "warm start: trial 0 of old (0.9000)",
        "warm start: trial 2 of old (0.7000)",
    ]
    assert [t.state for t in waiting] == [TrialState.WAITING] * 2


def test_warm_start_refusals_leave_no_study_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    old = tiny_spec("fixed", budget={"n_trials": 1})
    old["parameters"]["lr"] = {"value": 5e-3}  # searches nothing
    run_cli("run", str(write_spec(tmp_path / "old.yaml", old)), "--storage", url)
    new = write_spec(tmp_path / "new.yaml", tiny_spec("fresh"))
    line = error_line(run_cli("study", "create", str(new), "--warm-start", "fixed", "--storage", url, check=False))
    assert "no parameter to carry over" in line
    line = error_line(run_cli("study", "create", str(new), "--warm-start", "ghost", "--storage", url, check=False))
    assert "no study named 'ghost'" in line
    assert optuna.get_all_study_names(url) == ["fixed"]
