"""A study's life: its budget grows while workers run, it stops and resumes on every worker, and it
starts warm from an earlier study.

Where what is tested is the budget or a stop, the workers are simulated (sim_worker.py: the real
worker loop on a thread, with an objective that samples the spec's parameters and waits at a gate
instead of training). The commands that change the study (`study extend`, `study stop`, `study
resume`, `study create --warm-start`) run through the CLI's own main in this process (cli_here): what
they change reaches the workers through the storage only. `run` and `worker --n-trials` run the real
CLI, trials and all, in this process; the open-ended W&B sweep runs real processes."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import optuna
import pytest
from conftest import cli_here, error_line, tiny_spec, write_spec
from helpers import wait_until
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from shared_studies import in_process_cli
from sim_worker import Gate, Simulated, create

from kmnist_tune.contract.records import TrialRecord

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def lifecycle_spec(name: str, n_trials: int, **over) -> dict:  # type: ignore[no-untyped-def]
    spec = tiny_spec(name, budget={"n_trials": n_trials}, **over)
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    return spec


def ran(out: str) -> int:
    return int(re.search(r"worker ran (\d+) trial", out).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_running_worker_takes_up_an_extended_budget(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, watch
) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    create(url, lifecycle_spec("grow", 2))
    gate = Gate()  # the first trial runs until the budget has been extended
    worker = Simulated(url, "grow", gate).start()
    w = watch(url, "grow")
    wait_until(lambda: w.count(TrialState.RUNNING) == 1, 60, "the first trial")
    out = cli_here("study", "extend", "grow", "--n-trials", "4", "--storage", url).stdout
    assert "budget 4 trials" in out
    gate.open()
    # Its first claim read a budget of 2: it took up the new one before its next claim.
    assert worker.join() == 4 and w.count(*FINISHED) == 4
    shown = cli_here("study", "show", "grow", "--storage", url).stdout
    assert re.search(r"budget: 4 trials \(set at .+ by .+@.+\)", shown), shown
    assert "n_trials: 4" in shown.split("spec:")[1] and "n_trials: 2" not in shown  # the spec shows today's budget


def test_run_and_worker_raise_the_budget_and_never_shrink_it(tmp_path: Path, capsys: pytest.CaptureFixture[str], watch) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    spec = write_spec(tmp_path / "raise.yaml", lifecycle_spec("raise", 1))
    w = watch(url, "raise")
    in_process_cli(capsys, "run", str(spec), "--storage", url)
    assert w.count(*FINISHED) == 1
    # The same spec with a larger --n-trials is the same study, grown (it was "a different spec").
    in_process_cli(capsys, "run", str(spec), "--storage", url, "--n-trials", "2")
    assert w.count(*FINISHED) == 2
    # Extended past the spec file's 1: running the file again works the new trials, no fewer.
    cli_here("study", "extend", "raise", "--n-trials", "3", "--storage", url)
    again, _ = in_process_cli(capsys, "run", str(spec), "--storage", url)
    assert w.count(*FINISHED) == 3 and "3 complete" in again
    out, _ = in_process_cli(capsys, "worker", "--study", "raise", "--n-trials", "4", "--storage", url)
    assert ran(out) == 1 and w.count(*FINISHED) == 4
    _, err = in_process_cli(capsys, "run", str(spec), "--storage", url)  # a finished study says why nothing ran
    assert "study raise: its budget of 4 trials is used; raise it with --n-trials N" in err and w.count(*FINISHED) == 4
    line = error_line(cli_here("study", "extend", "raise", "--n-trials", "2", "--storage", url, check=False))
    assert "4 finished trials already" in line and "at least 4" in line
    assert "--n-trials" in error_line(cli_here("study", "extend", "raise", "--storage", url, check=False))


@pytest.mark.postgres
def test_stop_and_resume_with_two_workers(pg_url: str, watch) -> None:
    create(pg_url, lifecycle_spec("pause", 6))
    gate = Gate()  # both first trials run until the study has been stopped
    workers = [Simulated(pg_url, "pause", gate).start() for _ in range(2)]
    w = watch(pg_url, "pause")
    wait_until(lambda: w.count(TrialState.RUNNING) == 2, 60, "two running trials")
    stopped = cli_here("study", "stop", "pause", "--storage", pg_url).stdout
    assert "stopped at" in stopped and "workers claim no more trials" in stopped
    running_at_stop = {t.number for t in w.trials(TrialState.RUNNING)}
    gate.open()
    for sim in workers:
        assert sim.join() == 1
        assert "study pause was stopped at" in sim.said.text and "claims no more trials" in sim.said.text
    after = w.trials()
    # The trials that ran at the stop finished and count; nothing new was claimed; nothing is RUNNING.
    assert len(running_at_stop) == 2 and {t.number for t in after} == running_at_stop
    assert all(t.state in FINISHED for t in after)
    assert "stopped at" in cli_here("study", "show", "pause", "--storage", pg_url).stdout
    assert "resumed" in cli_here("study", "resume", "pause", "--storage", pg_url).stdout
    assert Simulated(pg_url, "pause").run() == 4
    assert w.count(*FINISHED) == 6 and w.count(TrialState.RUNNING) == 0
    assert "stopped" not in cli_here("study", "show", "pause", "--storage", pg_url).stdout.split("spec:")[0]


def test_stop_now_hands_the_running_trial_back(tmp_path: Path, watch) -> None:
    url = f"sqlite:///{tmp_path / 'n.db'}"
    create(url, lifecycle_spec("halt", 3))
    worker = Simulated(url, "halt", Gate()).start()  # its trial runs until the worker is asked to stop
    w = watch(url, "halt")
    wait_until(lambda: w.count(TrialState.RUNNING) == 1, 60, "a running trial")
    cli_here("study", "stop", "halt", "--now", "--storage", url)
    t0 = time.monotonic()
    assert worker.join() == 1  # the heartbeat saw the stop, the trial stopped, the worker ended
    print(f"\nstop --now to worker exit: {time.monotonic() - t0:.1f} s")
    assert "study stop --now: stopping after the current batch; the trial is handed back" in worker.said.lines
    (handed,) = w.trials(TrialState.FAIL)
    assert TrialRecord.of(handed).interrupted == "study stop --now"
    (queued,) = w.trials(TrialState.WAITING)
    assert queued.params == handed.params and "lr" in handed.params
    assert w.count(TrialState.RUNNING) == 0


# -- warm starts: old studies made of finished trials (add_trial), no training ---------------------


OLD_DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "weight_decay": CategoricalDistribution([0.0, 0.01])}


def old_study(url: str, trials: list[tuple[float, float, float]], name: str = "old") -> None:
    """A kmnist-tune study searching lr and weight_decay, with finished trials (lr, weight_decay, value)."""
    old = tiny_spec(name, budget={"n_trials": len(trials)})
    old["parameters"]["weight_decay"] = {"values": [0.0, 0.01]}
    create(url, old)
    study = optuna.load_study(study_name=name, storage=url)
    for lr, wd, value in trials:
        study.add_trial(create_trial(params={"lr": lr, "weight_decay": wd}, distributions=OLD_DISTRIBUTIONS, value=value))


def new_spec(tmp_path: Path, **extra: dict) -> Path:
    new = tiny_spec("new", budget={"n_trials": 4})
    new["parameters"]["lr"] = {"distribution": "log_uniform_values", "min": 3e-3, "max": 5e-3}  # narrower: clipped
    new["parameters"]["weight_decay"] = {"values": [0.01, 0.1]}  # 0.0 is not among them: left to the sampler
    new["parameters"].update(extra)
    return write_spec(tmp_path / "new.yaml", new)


def test_warm_start_queues_the_best_configurations_of_an_earlier_study(tmp_path: Path, watch) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    # Built so that each rule meets a case: trial 0's lr is outside the new range (clipped) and its
    # weight_decay is not among the new values (left to the sampler); trial 1's both fit as they
    # are; trial 2 is the third best, and --top 2 leaves it.
    old_study(url, [(8e-3, 0.0, 0.9), (4e-3, 0.01, 0.8), (2.5e-3, 0.01, 0.7)])
    stem = {"values": ["imagenet", "small"]}  # not in the old study: sampled
    out = cli_here(
        "study", "create", str(new_spec(tmp_path, stem=stem)), "--warm-start", "old", "--top", "2", "--storage", url
    ).stdout
    assert re.findall(r"^queued trial (\d+) of old", out, re.M) == ["0", "1"], out  # best first, two of them
    assert "queued trial 0 of old (0.9000)" in out and "queued trial 1 of old (0.8000)" in out
    assert "trial 0, lr: 0.008 clipped to" in out and "trial 1, lr:" not in out
    assert "trial 0, weight_decay: 0.0 is not among [0.01, 0.1]; left to the sampler" in out
    assert "trial 1, weight_decay" not in out and "skipped" not in out
    assert Simulated(url, "new", max_trials=2).run() == 2
    first = watch(url, "new").trials()[:2]
    assert [TrialRecord.of(t).enqueued for t in first] == [
        "warm start: trial 0 of old (0.9000)",
        "warm start: trial 1 of old (0.8000)",
    ]
    assert [t.params["lr"] for t in first] == [pytest.approx(5e-3), pytest.approx(4e-3)]  # clipped; kept
    assert first[1].params["weight_decay"] == 0.01  # carried over
    assert first[0].params["weight_decay"] in (0.01, 0.1)  # the sampler's choice
    assert all(t.params["stem"] in ("imagenet", "small") for t in first)


def test_warm_start_skips_configurations_that_clipping_makes_one(tmp_path: Path, watch) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    old_study(url, [(1e-2, 0.01, 0.9), (2e-2, 0.01, 0.8), (4e-3, 0.01, 0.7)])  # the second clips onto the first
    out = cli_here("study", "create", str(new_spec(tmp_path)), "--warm-start", "old", "--top", "2", "--storage", url).stdout
    assert "trial 1: the same configuration as trial 0 once fitted; skipped" in out
    assert re.findall(r"^queued trial (\d+) of old", out, re.M) == ["0", "2"]
    waiting = watch(url, "new").trials()
    assert [TrialRecord.of(t).enqueued for t in waiting] == [
        "warm start: trial 0 of old (0.9000)",
        "warm start: trial 2 of old (0.7000)",
    ]
    assert [t.state for t in waiting] == [TrialState.WAITING] * 2


def test_warm_start_refusals_leave_no_study_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    old = tiny_spec("fixed", budget={"n_trials": 1})
    old["parameters"]["lr"] = {"value": 5e-3}  # searches nothing: its trials have no parameters
    create(url, old)
    optuna.load_study(study_name="fixed", storage=url).add_trial(create_trial(params={}, distributions={}, value=0.5))
    new = write_spec(tmp_path / "new.yaml", tiny_spec("fresh"))
    line = error_line(cli_here("study", "create", str(new), "--warm-start", "fixed", "--storage", url, check=False))
    assert "no parameter to carry over" in line
    line = error_line(cli_here("study", "create", str(new), "--warm-start", "ghost", "--storage", url, check=False))
    assert "no study named 'ghost'" in line
    assert optuna.get_all_study_names(url) == ["fixed"]


# -- W&B semantics: a sweep without run_cap runs until stopped; metric.target stops it ------------------
OPEN_ENDED = """\
# A W&B sweep file as its user wrote it, without run_cap (W&B runs it until stopped), with this
# project's own data key so that a trial takes seconds here.
program: train.py
method: random
metric:
  name: Validation/Accuracy
  goal: maximize
parameters:
  learning_rate:
    distribution: log_uniform_values
    min: 0.002
    max: 0.01
  epochs:
    value: 1
  batch_size:
    value: 32
  arch:
    value: resnet18
data:
  train_size: 288
  valid_size: 120
  valid_fraction: 0.2
"""


def test_a_sweep_without_run_cap_runs_with_two_workers_until_study_stop(tmp_path: Path, watch) -> None:
    from conftest import cli_env, spawn_cli

    path = tmp_path / "open.yaml"
    path.write_text(OPEN_ENDED)
    url = f"sqlite:///{tmp_path / 'open.db'}"
    env = cli_env(XDG_RUNTIME_DIR=str(tmp_path / "run"))
    cli_here("study", "create", str(path), "--storage", url)  # so that the worker can attach from the start
    # `run` resumes the study the file names; the two processes take one core each.
    first = spawn_cli("run", str(path), "--storage", url, "--threads", "1", env=env)
    second = spawn_cli("worker", "open", "--storage", url, "--threads", "1", env=env)
    w = watch(url, "open")
    try:
        # Both work it, with no budget, until the user stops it.
        wait_until(lambda: w.count(*FINISHED) >= 2 and len(workers_seen(w)) == 2, 300, "trials by both processes")
        listed = cli_here("study", "list", "--storage", url).stdout
        assert re.search(r"open\t\d+ finished \(until stopped\)", listed), listed
        stopped = cli_here("study", "stop", "open", "--storage", url).stdout
        assert "workers claim no more trials" in stopped
        # Once the worker has said what it ran, its work is stored: a SIGTERM in the teardown that
        # follows (W&B, connections, the interpreter) is no failure to a Kubernetes Job or compose's
        # on-failure (it exited 143 in the 1.7 s after its summary).
        said = ""
        while not said.startswith("worker ran") and (line := second.stdout.readline()):  # type: ignore[union-attr]
            said = line
        assert said.startswith("worker ran"), said
        second.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180) for p in (first, second)]
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
    assert (first.returncode, second.returncode) == (0, 0), outs  # the worker's 0 after its SIGTERM too
    assert all("was stopped at" in err for _, err in outs), [err[-400:] for _, err in outs]
    assert w.count(TrialState.RUNNING) == 0 and w.count(TrialState.FAIL) == 0  # the running trials finished
    shown = cli_here("study", "show", "open", "--storage", url).stdout
    assert "budget: until stopped" in shown and re.search(r"stopped at .+ by .+@.+: workers claim no more", shown)
    # `study extend` bounds it (as `run FILE --n-trials N` does: test_run_and_worker_raise_the_budget...).
    done = w.count(*FINISHED)
    cli_here("study", "extend", "open", "--n-trials", str(done + 1), "--storage", url)
    assert f"open\t{done}/{done + 1} finished" in cli_here("study", "list", "--storage", url).stdout


def workers_seen(w) -> set[int]:  # type: ignore[no-untyped-def]
    """The worker processes (pids) that have run a trial of the watched study."""
    return {TrialRecord.of(t).worker.pid for t in w.trials() if TrialRecord.of(t).worker is not None}


def test_metric_target_stops_the_study_as_study_stop_does(tmp_path: Path, capsys: pytest.CaptureFixture[str], watch) -> None:
    path = tmp_path / "target.yaml"
    # A target any trial reaches (chance is 0.1): the first to finish stops the open-ended study.
    path.write_text(OPEN_ENDED.replace("  goal: maximize\n", "  goal: maximize\n  target: 0.01\n"))
    url = f"sqlite:///{tmp_path / 't.db'}"
    w = watch(url, "target")
    _, err = in_process_cli(capsys, "run", str(path), "--storage", url, "--threads", "1")
    assert w.count(*FINISHED) == 1, err
    first = w.trials()[0]
    reason = f"trial 0 reached the target: accuracy {first.value:.6g}, target 0.01"
    assert f"study target: {reason}; workers claim no more trials" in err
    shown = cli_here("study", "show", "target", "--storage", url).stdout
    assert f"({reason}): workers claim no more trials" in shown, shown
    # The dashboard's study note says so too (read as optuna-dashboard reads it; it serves nothing else here).
    from optuna_dashboard._note import get_note_from_system_attrs

    storage = optuna.storages.RDBStorage(url)
    note = get_note_from_system_attrs(storage.get_study_system_attrs(storage.get_study_id_from_name("target")), None)["body"]
    assert "stopped" in note and reason in note, note


def test_the_live_bar_starts_at_what_is_done_and_follows_extend() -> None:
    """A resumed study's bar starts at its finished trials (not 0/4, then 4/4), and its total and the
    "left" count follow `study extend` (the worker reads the budget again after each trial)."""
    import io

    from kmnist_tune.contract.events import TrialEnd
    from kmnist_tune.observe.progress import LiveReporter, Reporter

    live = LiveReporter(io.StringIO(), total_trials=4, done=4)
    assert live.bars.tasks[live.trials_task].completed == 4 and live.bars.tasks[live.trials_task].total == 4
    end = TrialEnd(
        study="s", number=4, state="COMPLETE", value=0.5, metric="accuracy", record=TrialRecord(), finished=5, budget=6
    )
    live.trial_finished(end)
    assert (live.bars.tasks[live.trials_task].completed, live.bars.tasks[live.trials_task].total) == (5, 6)
    plain = io.StringIO()
    Reporter(plain, total_trials=4).trial_finished(end)
    assert "(5 finished, 1 left)" in plain.getvalue()
