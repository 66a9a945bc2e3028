"""Training processes on one host take their share of its cores instead of each assuming it owns
them all: a host-local registry of live trainers (real processes, real locks), the share a worker
records on its trials, and `--threads N`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, cli_here, error_line, run_cli, spawn_cli, tiny_spec, write_spec
from helpers import wait_until
from optuna.trial import TrialState
from shared_studies import in_process_cli

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.service.cpu_share import CpuShare, machine_cores
from kmnist_tune.service.storage import open_storage, release

# Thread shares among this test's own trainers: no other test's training beside them.
pytestmark = pytest.mark.alone

HOLD = """
import sys, time
from pathlib import Path
from kmnist_tune.service.cpu_share import CpuShare
with CpuShare(Path(sys.argv[1])):
    print("registered", flush=True)
    time.sleep(600)
"""


def trainer(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "registered"
    return proc


def test_the_registry_counts_live_trainers_and_forgets_killed_ones(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("KMNIST_TUNE_THREADS", raising=False)
    folder = tmp_path / "trainers"
    a, b = trainer(folder), trainer(folder)
    try:
        with CpuShare(folder) as me:
            assert me.trainers() == 3
            assert me.share().threads == max(1, machine_cores() // 3)
            b.send_signal(signal.SIGKILL)  # no clean exit: the kernel drops its lock, its file stays behind
            b.wait(10)
            assert (folder / str(b.pid)).exists()
            assert me.trainers() == 2
            assert not (folder / str(b.pid)).exists()  # a dead trainer's file is removed by whoever counts
        assert not (folder / str(os.getpid())).exists()  # a clean exit removes its own
        with CpuShare(folder) as again:
            assert again.trainers() == 2
    finally:
        for p in (a, b):
            p.kill()
            p.wait(10)


def test_a_fixed_thread_count_skips_the_registry(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KMNIST_TUNE_THREADS", "3")
    with CpuShare(tmp_path / "t") as share:
        assert share.share().threads == 3 and share.share().why == "--threads 3"
    assert not (tmp_path / "t").exists()


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).trials
    finally:
        release(storage)


def test_a_worker_that_joins_takes_its_share_and_records_it(
    tmp_path: Path, sqlite_schema_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process trains; a second worker (the CLI's main in this process, so that it starts
    its trial within a second) joins while it does."""
    url = sqlite_schema_url  # the tables made once per run (conftest)
    spec = tiny_spec("shared", budget={"n_trials": 2})
    spec["parameters"]["epochs"] = {"value": 3}  # the first worker trains for several seconds
    cli_here("study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", url)
    registry = str(tmp_path / "run")  # this test's own registry of trainers
    env = cli_env(XDG_RUNTIME_DIR=registry)
    first = spawn_cli("worker", "--study", "shared", "--storage", url, "--gpus", "none", "--max-trials", "1", env=env)
    storage = open_storage(url)  # one storage for the whole wait
    try:
        study = optuna.load_study(study_name="shared", storage=storage)

        def training() -> bool:
            return any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))

        wait_until(training, 120, "the first worker to start its trial", [first])
    finally:
        release(storage)
    monkeypatch.setenv("XDG_RUNTIME_DIR", registry)
    monkeypatch.delenv("KMNIST_TUNE_THREADS", raising=False)
    _, second_err = in_process_cli(capsys, "worker", "--study", "shared", "--storage", url, "--max-trials", "1")
    _, err_first = first.communicate(timeout=300)
    assert first.returncode == 0, err_first
    cores = machine_cores()
    alone, joined = sorted(trials(url, "shared"), key=lambda t: t.number)
    assert TrialRecord.of(alone).threads == cores  # the only trainer when its trial started
    assert TrialRecord.of(joined).threads == max(1, cores // 2)  # the first worker was still training
    assert f"{max(1, cores // 2)} CPU thread" in second_err and "shared by 2 training processes" in second_err
    assert [t.state for t in (alone, joined)] == [TrialState.COMPLETE] * 2


def test_threads_option_fixes_the_count_and_bad_values_are_one_line(tmp_path: Path, sqlite_schema_url: str) -> None:
    url = sqlite_schema_url
    spec = write_spec(tmp_path / "t.yaml", tiny_spec("fixed", budget={"n_trials": 1}))
    cli_here("study", "create", str(spec), "--storage", url)
    out = run_cli("worker", "--study", "fixed", "--storage", url, "--gpus", "none", "--threads", "1")
    assert "trial 0: 1 CPU thread (--threads 1)" in out.stderr
    assert TrialRecord.of(trials(url, "fixed")[0]).threads == 1
    bad = cli_here("worker", "--study", "fixed", "--storage", url, "--threads", "0", check=False)  # refused before any work
    assert bad.returncode == 2 and error_line(bad) == "error: --threads '0': give a whole number of CPU threads >= 1, or auto"
    env = cli_env(KMNIST_TUNE_THREADS="many")  # a real process: the entry point's one line and exit status
    bad_env = run_cli("worker", "--study", "fixed", "--storage", url, env=env, check=False)
    assert bad_env.returncode == 2 and "KMNIST_TUNE_THREADS='many': give a whole number" in error_line(bad_env)
