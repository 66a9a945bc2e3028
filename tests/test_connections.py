"""One storage per process and command: a whole `run` on PostgreSQL holds at most the 2 connections
a worker process is promised (engine_kwargs), counted by the server in pg_stat_activity. The database
is prepared by `kmnist-tune schema` first, as compose and Kubernetes do (making a new database's
tables takes a third connection for its lock, once: service/schema.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import cli_env, run_cli, tiny_spec, write_spec
from pg_sampler import ConnectionSampler

from kmnist_tune.service.storage import open_storage


@pytest.mark.postgres
def test_a_run_holds_at_most_two_connections_for_the_whole_sweep(pg_url: str, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "conn.yaml", tiny_spec("conn", budget={"n_trials": 2}, data={"train_size": 300}))
    run_cli("schema", "--storage", pg_url)
    sampler = ConnectionSampler(pg_url.rsplit("/", 1)[1])
    sampler.start()
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kmnist_tune", "run", str(spec), "--storage", pg_url, "--gpus", "none"],
            cwd=tmp_path,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        code = proc.wait(timeout=600)
    sampler.stop()
    assert code == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="conn", storage=open_storage(pg_url))
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2  # it really swept
    mine = sampler.per_process.get(f"kmnist-tune {proc.pid}", 0)
    assert sampler.samples > 20
    # Creating the study, claims, trials, heartbeats and the summary: never a third connection.
    assert 1 <= mine <= 2, sampler.per_process
    assert set(sampler.per_process) == {f"kmnist-tune {proc.pid}"}  # no other process of ours was there
