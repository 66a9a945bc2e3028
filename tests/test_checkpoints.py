"""No lost work: a trial killed or handed back is retried from its newest epoch checkpoint, kept in the
study's artifact store (PostgreSQL's table, or the folder beside a SQLite file)."""

from __future__ import annotations

import io
import signal
import tempfile
import time
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import run_cli, spawn_cli, tiny_spec, write_spec
from optuna.trial import TrialState
from optuna_dashboard import get_note
from sqlalchemy.engine import make_url

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.contract.spec import parse_spec
from kmnist_tune.recipe.checkpoints import TrialCheckpoints
from kmnist_tune.service.artifacts import TABLE, artifact_store, checkpoint_base
from kmnist_tune.service.storage import open_storage

LR = 8e-3  # fixed, so that an uninterrupted run of the same configuration is the yardstick


def four_epochs(name: str) -> dict:
    spec = tiny_spec(name, budget={"n_trials": 1})
    spec["parameters"]["epochs"] = {"value": 4}
    spec["parameters"]["lr"] = {"value": LR}
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    spec["checkpoints"] = {"min_interval_s": 0}  # the fixture's epochs last seconds: save after each one
    return spec


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).trials


def wait_for_checkpoint(url: str, name: str, epoch: int, timeout: float = 180) -> None:
    """Until the running trial's record names a checkpoint of `epoch` (0-based) or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in trials(url, name):
            ckpt = TrialRecord.of(t).checkpoint
            if t.state == TrialState.RUNNING and ckpt and ckpt["epoch"] >= epoch:
                return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of epoch {epoch + 1} within {timeout:.0f} s")


def artifact_rows(pg_url: str) -> dict[str, int]:
    """Rows of the artifact table per artifact."""
    url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        return dict(conn.execute(f"SELECT artifact_id, count(*) FROM {TABLE} GROUP BY 1").fetchall())  # type: ignore[arg-type]


@pytest.mark.postgres
def test_a_killed_trial_is_resumed_from_its_checkpoint_by_another_worker(tmp_path: Path, pg_url: str) -> None:
    run_cli("run", str(write_spec(tmp_path / "ref.yaml", four_epochs("uninterrupted"))), "--storage", pg_url)
    (reference,) = trials(pg_url, "uninterrupted")
    run_cli("study", "create", str(write_spec(tmp_path / "k.yaml", four_epochs("killed"))), "--storage", pg_url)
    victim = spawn_cli("worker", "--study", "killed", "--storage", pg_url, "--gpus", "none")
    wait_for_checkpoint(pg_url, "killed", epoch=1)  # epochs 1 and 2 done and saved: it is in epoch 3
    killed_at = time.monotonic()
    victim.kill()
    victim.wait(10)
    (original,) = trials(pg_url, "killed")
    survivor = spawn_cli("worker", "--study", "killed", "--storage", pg_url, "--gpus", "none")
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err
    done = trials(pg_url, "killed")
    finished = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(finished) == 1 and sum(t.state == TrialState.FAIL for t in done) == 1  # exactly the budget
    (retry,) = finished
    resumed = TrialRecord.of(retry).resumed_from
    assert resumed == {"trial": original.number, "epoch": 2}, resumed  # epoch 3 of 4, 0-based 2
    assert f"trial {retry.number}: resumed from trial {original.number} at epoch 3/4" in err
    assert sorted(retry.intermediate_values) == [3, 4]  # epochs 1 and 2 are not reported again
    # The same configuration and seed, uninterrupted: the resumed run lands where it would have.
    assert retry.value == pytest.approx(reference.value, abs=0.02), (retry.value, reference.value)
    saved = sum(TrialRecord.of(reference).epoch_seconds[:2])
    print(
        f"\nkilled during epoch 3 of 4 ({time.monotonic() - killed_at:.1f} s to finish after the kill); the retry "
        f"started at epoch 3, saving the {saved:.1f} s of epochs 1-2; final {retry.value:.4f} vs "
        f"uninterrupted {reference.value:.4f}"
    )
    # Finished for good: the checkpoints of the trial and of the one it resumed are gone from the table.
    assert artifact_rows(pg_url) == {}


def test_sigterm_hands_the_trial_back_and_the_retry_resumes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", four_epochs("term"))), "--storage", url)
    worker = spawn_cli("worker", "--study", "term", "--storage", url, "--gpus", "none")
    wait_for_checkpoint(url, "term", epoch=1)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    out = run_cli("worker", "--study", "term", "--storage", url, "--gpus", "none")
    assert "resumed from trial 0 at epoch 3/4" in out.stderr
    (retry,) = [t for t in trials(url, "term") if t.state == TrialState.COMPLETE]
    assert TrialRecord.of(retry).resumed_from["epoch"] == 2  # type: ignore[index]
    study = optuna.load_study(study_name="term", storage=open_storage(url))
    note = get_note(optuna.Trial(study, retry._trial_id))  # the trial's note in optuna-dashboard
    assert "resumed from trial 0's checkpoint at epoch 3" in note, note
    # Finished for good: no checkpoint of either trial is left in the folder beside the database.
    assert list((tmp_path / "kmnist-tune-artifacts").iterdir()) == []


def test_a_corrupt_checkpoint_falls_back_to_a_fresh_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", four_epochs("damaged"))), "--storage", url)
    worker = spawn_cli("worker", "--study", "damaged", "--storage", url, "--gpus", "none")
    wait_for_checkpoint(url, "damaged", epoch=1)
    worker.kill()
    worker.wait(10)
    for weights in (tmp_path / "kmnist-tune-artifacts").glob("*.pth"):
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\x00" * 64
        weights.write_bytes(bytes(blob))
    out = run_cli("worker", "--study", "damaged", "--storage", url, "--gpus", "none")
    assert "does not load" in out.stderr and "starting from scratch" in out.stderr and "Traceback" not in out.stderr
    (retry,) = [t for t in trials(url, "damaged") if t.state == TrialState.COMPLETE]
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4] and TrialRecord.of(retry).resumed_from is None


def _orphans(url: str, name: str, tmp_path: Path) -> None:
    """A study with a failed trial whose checkpoints were uploaded but never recorded (its worker
    was killed in between), the way only a name-based clean-up finds them."""
    run_cli("study", "create", str(write_spec(tmp_path / f"{name}.yaml", four_epochs(name))), "--storage", url)
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    trial = study.ask()
    store = artifact_store(storage)
    for epoch in (0, 2):
        for ext in ("pth", "json"):
            store.write(f"{checkpoint_base(trial._trial_id, epoch)}.{ext}", io.BytesIO(b"weights" * 100))
    study.tell(trial, state=TrialState.FAIL)
    assert TrialRecord.of(study.trials[0]).checkpoint is None


@pytest.mark.postgres
def test_study_delete_removes_unrecorded_checkpoints_from_the_table(tmp_path: Path, pg_url: str) -> None:
    _orphans(pg_url, "orphans", tmp_path)
    assert len(artifact_rows(pg_url)) == 4
    run_cli("study", "delete", "orphans", "--yes", "--storage", pg_url)
    assert artifact_rows(pg_url) == {}


def test_study_delete_removes_unrecorded_checkpoints_from_the_folder(tmp_path: Path) -> None:
    _orphans(f"sqlite:///{tmp_path / 'o.db'}", "orphans", tmp_path)
    folder = tmp_path / "kmnist-tune-artifacts"
    assert len(list(folder.iterdir())) == 4
    run_cli("study", "delete", "orphans", "--yes", "--storage", f"sqlite:///{tmp_path / 'o.db'}")
    assert list(folder.iterdir()) == []


def test_a_restart_at_a_halved_batch_size_keeps_its_own_checkpoint(tmp_path: Path) -> None:
    """The halving rule restarts a trial from epoch 0, so its new checkpoints take the names of the
    old ones; keep: 1 must drop the old record without deleting the new files under those names."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    run_cli("study", "create", str(write_spec(tmp_path / "h.yaml", four_epochs("halved"))), "--storage", url)
    study = optuna.load_study(study_name="halved", storage=open_storage(url))
    trial = study.ask()
    lines: list[str] = []
    ckpts = TrialCheckpoints(trial, parse_spec(four_epochs("halved")), lines.append)
    try:
        for bs, payload in ((64, b"weights at batch 64"), (32, b"weights at batch 32")):
            staging = tempfile.TemporaryDirectory()
            weights, info = Path(staging.name) / "w.pth", Path(staging.name) / "m.json"
            weights.write_bytes(payload)
            info.write_text('{"epoch": 0}')
            ckpts._upload(staging, weights, info, 0, bs)  # epoch 1 of each start
    finally:
        ckpts.close()
    record = TrialRecord.of(study.trials[0]).checkpoint
    assert record is not None and record["batch_size"] == 32
    with artifact_store(open_storage(url)).open_reader(record["model"]) as fh:
        assert fh.read() == b"weights at batch 32"
    assert not lines
