"""The objective's Attempt without a fit: which checkpoint and seed an attempt starts from, what a
checkpoint that loads (or does not) leaves on the trial, and that every step reaches Optuna once.

Real parts throughout: an Optuna trial of a SQLite study in tmp_path, the fixture's KMNIST images,
fastai Learners built as a trial builds them, and checkpoints written by the training layer. Nothing
here trains: the epochs an attempt would see are handed to it as fastai's Recorder would."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from conftest import FIXTURE, tiny_spec
from fastai.learner import Learner

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.records import EpochRecord, TrialRecord
from kmnist_tune.contract.spec import SweepSpec
from kmnist_tune.observe.progress import Reporter
from kmnist_tune.recipe.checkpoints import Resume, TrialCheckpoints
from kmnist_tune.recipe.objective import Attempt
from kmnist_tune.training.checkpoint import read_meta, save_checkpoint
from kmnist_tune.training.splits import Splits, load_splits
from kmnist_tune.training.train import build_learner

pytestmark = pytest.mark.filterwarnings("ignore")

CPU = torch.device("cpu")
SEED = 7


@pytest.fixture(scope="module")
def spec() -> SweepSpec:
    return parse_spec(tiny_spec("attempt", seed=SEED, parameters={"epochs": {"value": 3}, "lr": {"value": 3e-3}}))


@pytest.fixture(scope="module")
def splits(spec: SweepSpec) -> Splits:
    return load_splits(spec.data, FIXTURE, download=False)


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    # Pruned below 0.5: a real pruner whose answer the test can predict.
    return optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'attempt.db'}",
        study_name="attempt",
        direction="maximize",
        pruner=optuna.pruners.ThresholdPruner(lower=0.5),
    )


@pytest.fixture
def trial(study: optuna.Study) -> optuna.Trial:
    study.ask()  # trial 0: the attempt's trial is number 1, so its fresh seed is SEED + 1
    return study.ask()


@pytest.fixture
def checkpoints(trial: optuna.Trial, spec: SweepSpec) -> Iterator[TrialCheckpoints]:
    ckpts = TrialCheckpoints(trial, spec, print)
    yield ckpts
    ckpts.close()


def make_attempt(
    trial: optuna.Trial, spec: SweepSpec, splits: Splits, checkpoints: TrialCheckpoints, resume: Resume | None = None
) -> tuple[Attempt, io.StringIO]:
    lines = io.StringIO()
    params = {**spec.fixed_params(), "batch_size": 64}
    attempt = Attempt(
        trial, params, resume, spec=spec, splits=splits, device=CPU, events=Reporter(lines), checkpoints=checkpoints
    )
    return attempt, lines


def epoch(i: int, metric: float) -> EpochRecord:
    return EpochRecord(epoch=i, train_loss=1.0, valid_loss=1.0, metric=metric, seconds=0.1, images_per_s=1000.0)


def stored(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The trial as the storage has it (not the live object's view)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)


def weights(learn: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_step_is_reported_once_and_the_last_one_is_never_pruned(
    study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, splits: Splits, checkpoints: TrialCheckpoints
) -> None:
    attempt, lines = make_attempt(trial, spec, splits, checkpoints)
    assert attempt.on_epoch(epoch(0, 0.9)) is True  # above the threshold: go on
    # A restarted attempt (halved batch size) trains epoch 0 again: its step keeps its first value,
    # and neither Optuna (which would warn of a step reported twice) nor the pruner is asked about it.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert attempt.on_epoch(epoch(0, 0.1)) is True
    assert not [w for w in seen if "already reported" in str(w.message)]
    assert attempt.on_epoch(epoch(1, 0.2)) is False  # a new step below the threshold: pruned
    # The last epoch finishes the trial whatever the pruner would say: nothing is left to save.
    assert attempt.on_epoch(epoch(2, 0.1)) is True
    assert stored(study, trial).intermediate_values == {1: 0.9, 2: 0.2, 3: 0.1}
    assert attempt.reported == {1, 2, 3}
    # Every epoch is shown, the repeated one too: the display tells what training did.
    assert lines.getvalue().count(f"trial {trial.number} epoch ") == 4


def test_only_the_first_attempt_at_the_checkpoints_batch_size_resumes_with_its_seed(
    trial: optuna.Trial, spec: SweepSpec, splits: Splits, checkpoints: TrialCheckpoints, tmp_path: Path
) -> None:
    resume = Resume(from_trial=0, epoch=1, batch_size=64, weights=tmp_path / "x.pth", info={"seed": 1234})
    attempt, _ = make_attempt(trial, spec, splits, checkpoints, resume)
    assert attempt.fresh_seed == SEED + trial.number == SEED + 1
    assert attempt.start(32) == (None, SEED + 1)  # not the batch size the checkpoint was saved at
    assert attempt.start(64) == (resume, 1234)  # the original's seed: its shuffles go on
    resume.used = True
    assert attempt.start(64) == (None, SEED + 1)  # a later attempt at that size starts afresh
    fresh, _ = make_attempt(trial, spec, splits, checkpoints)
    assert fresh.start(64) == (None, SEED + 1)


def test_a_checkpoint_that_loads_is_continued_and_recorded(
    study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, splits: Splits, checkpoints: TrialCheckpoints, tmp_path: Path
) -> None:
    params = {**spec.fixed_params(), "batch_size": 64}
    saved, _ = build_learner(splits, params, CPU, spec.metric, seed=5)
    saved.create_opt()
    saved.n_epoch = 3  # what fit() sets; the checkpoint records it
    saved.dls.train._epoch = 2  # two passes over the training loader, as after epochs 0 and 1
    weights_file, meta = save_checkpoint(saved, tmp_path, 1, {"trial": 0, "arch": "resnet18", "stem": "imagenet", "seed": 99})
    info = read_meta(meta)
    resume = Resume(from_trial=0, epoch=1, batch_size=64, weights=weights_file, info=info)
    attempt, lines = make_attempt(trial, spec, splits, checkpoints, resume)

    learn, metric_name, seed, start = attempt.learner(params, *attempt.start(64))
    assert (metric_name, seed, start) == ("accuracy", 99, 2)  # epoch 1 done: epoch 2 is next
    assert resume.used
    # The weights are the checkpoint's, not those of the fresh Learner built with the seed 99.
    assert same_weights(weights(learn), weights(saved))
    assert learn.dls.train._epoch == info["loader_epoch"] == 2  # the shuffle order goes on (a fresh loader is at 0)
    assert TrialRecord.of(stored(study, trial)).resumed_from == {"trial": 0, "epoch": 2}
    assert f"trial {trial.number}: resumed from trial 0 at epoch 3/3" in lines.getvalue()


def test_a_checkpoint_that_does_not_load_leaves_a_fresh_learner_and_seed(
    study: optuna.Study, trial: optuna.Trial, spec: SweepSpec, splits: Splits, checkpoints: TrialCheckpoints, tmp_path: Path
) -> None:
    params = {**spec.fixed_params(), "batch_size": 64}
    broken = tmp_path / "epoch-1.pth"
    broken.write_bytes(b"not a torch file")
    resume = Resume(from_trial=0, epoch=1, batch_size=64, weights=broken, info={"seed": 99, "epoch": 1})
    attempt, lines = make_attempt(trial, spec, splits, checkpoints, resume)

    learn, _, seed, start = attempt.learner(params, *attempt.start(64))
    assert (seed, start) == (SEED + 1, 0)  # from scratch, with the trial's own seed
    assert resume.used  # the next attempt does not try it again
    # Nothing of the half-loaded Learner is kept: it is the one a fresh attempt builds.
    fresh, _ = build_learner(splits, params, CPU, spec.metric, seed=SEED + 1)
    assert same_weights(weights(learn), weights(fresh))
    assert TrialRecord.of(stored(study, trial)).resumed_from is None
    text = lines.getvalue()
    assert f"trial {trial.number}: the checkpoint of trial 0 does not load (" in text
    assert "; starting from scratch" in text and text.count("\n") == 1  # one line, nothing more
