"""No lost work: a trial killed or handed back is retried from its newest epoch checkpoint, kept in the
study's artifact store (PostgreSQL's table, or the folder beside a SQLite file)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import run_cli
from optuna.trial import TrialState
from optuna_dashboard import get_note
from shared_studies import KilledScenario, SigtermScenario, four_epochs, in_process_cli
from sim_worker import create
from sqlalchemy.engine import make_url

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.optuna_internals import trial_id
from kmnist_tune.recipe.checkpoints import TrialCheckpoints
from kmnist_tune.service.artifacts import TABLE, artifact_store, checkpoint_base
from kmnist_tune.service.storage import open_storage


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).trials


def artifact_rows(pg_url: str) -> dict[str, int]:
    """Rows of the artifact table per artifact."""
    url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        return dict(conn.execute(f"SELECT artifact_id, count(*) FROM {TABLE} GROUP BY 1").fetchall())  # type: ignore[arg-type]


# -- killed through PgBouncer (shared_studies.killed_scenario) ---------------------------------------


@pytest.mark.postgres
def test_a_killed_trial_is_resumed_from_its_checkpoint_by_another_worker(killed_scenario: KilledScenario) -> None:
    s = killed_scenario
    finished = [t for t in s.after if t.state == TrialState.COMPLETE]
    assert len(finished) == 1 and sum(t.state == TrialState.FAIL for t in s.after) == 1  # exactly the budget
    (retry,) = finished
    resumed = TrialRecord.of(retry).resumed_from
    assert resumed == {"trial": s.doomed.number, "epoch": 2}, resumed  # epoch 3 of 4, 0-based 2
    assert f"trial {retry.number}: resumed from trial {s.doomed.number} at epoch 3/4" in s.survivor_err
    assert sorted(retry.intermediate_values) == [3, 4]  # epochs 1 and 2 are not reported again
    # The same configuration and seed, uninterrupted: the resumed run lands where it would have.
    assert retry.value == pytest.approx(s.reference.value, abs=0.02), (retry.value, s.reference.value)
    saved = sum(TrialRecord.of(s.reference).epoch_seconds[:2])
    print(
        f"\nkilled during epoch 3 of 4; the retry started at epoch 3, saving the {saved:.1f} s of epochs 1-2; "
        f"final {retry.value:.4f} vs uninterrupted {s.reference.value:.4f}"
    )


@pytest.mark.postgres
def test_a_resumed_trial_leaves_no_checkpoint_in_the_table(killed_scenario: KilledScenario) -> None:
    # Finished for good: the checkpoints of the trial and of the one it resumed are gone from the table.
    assert [t.state for t in killed_scenario.after].count(TrialState.COMPLETE) == 1
    assert artifact_rows(killed_scenario.db.direct) == {}


# -- handed back on SIGTERM (shared_studies.sigterm_scenario) -----------------------------------------


def test_sigterm_hands_the_trial_back_and_the_retry_resumes(sigterm_scenario: SigtermScenario) -> None:
    s = sigterm_scenario
    assert "resumed from trial 0 at epoch 3/4" in s.resumed_err
    (retry,) = [t for t in s.after if t.state == TrialState.COMPLETE]
    assert TrialRecord.of(retry).resumed_from["epoch"] == 2  # type: ignore[index]
    assert sorted(retry.intermediate_values) == [3, 4]
    study = optuna.load_study(study_name="term", storage=open_storage(s.url))
    note = get_note(optuna.Trial(study, trial_id(retry)))  # the trial's note in optuna-dashboard
    assert "resumed from trial 0's checkpoint at epoch 3" in note, note


def test_a_resumed_trial_leaves_no_checkpoint_in_the_folder(sigterm_scenario: SigtermScenario) -> None:
    # Finished for good: no checkpoint of either trial is left in the folder beside the database.
    assert [t.state for t in sigterm_scenario.after].count(TrialState.COMPLETE) == 1
    assert list((sigterm_scenario.folder / "kmnist-tune-artifacts").iterdir()) == []


def test_a_corrupt_checkpoint_falls_back_to_a_fresh_start(sigterm_scenario: SigtermScenario, capsys) -> None:
    """The study as it was handed back (a copy): its checkpoint damaged in the store after upload."""
    folder = sigterm_scenario.damaged_copy
    url = f"sqlite:///{folder / 't.db'}"
    damaged = list((folder / "kmnist-tune-artifacts").glob("*.pth"))
    assert damaged
    for weights in damaged:
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2 : len(blob) // 2 + 64] = b"\x00" * 64
        weights.write_bytes(bytes(blob))
    _, err = in_process_cli(capsys, "worker", "--study", "term", "--storage", url)
    assert "does not load" in err and "starting from scratch" in err and "Traceback" not in err
    (retry,) = [t for t in trials(url, "term") if t.state == TrialState.COMPLETE]
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4] and TrialRecord.of(retry).resumed_from is None


# -- checkpoints nobody recorded, and the halving rule's restarts ------------------------------------


def _orphans(url: str, name: str) -> None:
    """A study with a failed trial whose checkpoints were uploaded but never recorded (its worker
    was killed in between), the way only a name-based clean-up finds them."""
    create(url, four_epochs(name))
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    trial = study.ask()
    store = artifact_store(storage)
    for epoch in (0, 2):
        for ext in ("pth", "json"):
            store.write(f"{checkpoint_base(trial_id(trial), epoch)}.{ext}", io.BytesIO(b"weights" * 100))
    study.tell(trial, state=TrialState.FAIL)
    assert TrialRecord.of(study.trials[0]).checkpoint is None


@pytest.mark.postgres
def test_study_delete_removes_unrecorded_checkpoints_from_the_table(pg_url: str) -> None:
    _orphans(pg_url, "orphans")
    assert len(artifact_rows(pg_url)) == 4
    run_cli("study", "delete", "orphans", "--yes", "--storage", pg_url)
    assert artifact_rows(pg_url) == {}


def test_study_delete_removes_unrecorded_checkpoints_from_the_folder(tmp_path: Path) -> None:
    _orphans(f"sqlite:///{tmp_path / 'o.db'}", "orphans")
    folder = tmp_path / "kmnist-tune-artifacts"
    assert len(list(folder.iterdir())) == 4
    run_cli("study", "delete", "orphans", "--yes", "--storage", f"sqlite:///{tmp_path / 'o.db'}")
    assert list(folder.iterdir()) == []


def test_a_restart_at_a_halved_batch_size_keeps_its_own_checkpoint(tmp_path: Path) -> None:
    """The halving rule restarts a trial from epoch 0, so its new checkpoints take the names of the
    old ones; keep: 1 must drop the old record without deleting the new files under those names."""
    url = f"sqlite:///{tmp_path / 'h.db'}"
    create(url, four_epochs("halved"))
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
