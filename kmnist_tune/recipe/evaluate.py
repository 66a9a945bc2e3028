"""The one place the official test split is used: retrain the chosen trial and score it on test.
What is done with the retrained model (`best --evaluate [--export]`) is recipe/export.py's."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from fastai.learner import Learner
from optuna.trial import TrialState

from ..contract.events import Listener, TrialStart
from ..contract.records import EpochRecord, TestEvaluation, TrialRecord
from ..contract.spec import SweepSpec
from ..errors import UserError
from ..service.studies import no_completed_trial, require_best
from ..signing import store_signed
from ..training.compiling import CompiledModels
from ..training.splits import Splits, load_splits
from ..training.train import EpochLog, build_learner, fit


@dataclass
class Retrained:
    """The best trial's configuration retrained on the whole official train split, and its test score."""

    trial: optuna.trial.FrozenTrial
    params: dict[str, Any]
    learn: Learner
    splits: Splits
    evaluation: TestEvaluation
    seconds: float
    epochs: list[EpochRecord]


def top_trials(study: optuna.Study, spec: SweepSpec, k: int) -> list[optuna.trial.FrozenTrial]:
    """The k best completed trials, best first (ties: the earlier trial). Fewer than k is a UserError."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        raise no_completed_trial(study.study_name)
    if len(done) < k:
        raise UserError(
            f"--ensemble {k}: study {study.study_name!r} has {len(done)} completed trial(s); "
            f"give --ensemble {len(done)} or fewer, or run more trials first"
        )
    sign = -1.0 if spec.direction == "maximize" else 1.0
    return sorted(done, key=lambda t: (sign * float(t.value), t.number))[:k]  # type: ignore[arg-type]


def official_splits(spec: SweepSpec, data_dir: Path, mirror: str | None, train_size: int | None) -> Splits:
    """The whole official train split (or `train_size` images of it) and the official test split."""
    data_spec = spec.data.model_copy(update={"train_size": train_size})
    splits = load_splits(data_spec, data_dir, mirror=mirror, with_test=True, full_train=True)
    assert splits.x_test is not None and splits.y_test is not None
    return splits


def retrain(
    study: optuna.Study, spec: SweepSpec, trial: optuna.trial.FrozenTrial, splits: Splits, device: torch.device, events: Listener
) -> Retrained:
    """Retrain one trial's configuration (the batch size it ended with) on the splits' train part and
    score it on their test part."""
    assert splits.x_test is not None and splits.y_test is not None
    rec = TrialRecord.of(trial)
    params = dict(rec.config or {**spec.fixed_params(), **trial.params})
    params["batch_size"] = rec.batch_size_used or params["batch_size"]
    learn, metric_name = build_learner(
        splits,
        params,
        device,
        spec.metric,
        seed=spec.seed,
        valid=(splits.x_test, splits.y_test),
        augment=spec.augment,
        performance=spec.performance,
        # Its own per retraining (an ensemble's members each keep their module): a compile that fails
        # falls back to training uncompiled with one line, as in a worker.
        compiled=CompiledModels(say=events.line),
    )
    metric = f"test {spec.metric}"
    events.trial_started(TrialStart(study.study_name, trial.number, params, [], int(params["epochs"]), str(device), metric))

    def on_epoch(r: EpochRecord) -> bool:
        events.epoch(trial.number, r)
        return True

    log = EpochLog(metric_name, on_epoch, lambda i, n: events.batch(trial.number, len(log.result.epochs), i, n))
    t0 = time.perf_counter()
    result = fit(learn, params, log)
    seconds = time.perf_counter() - t0
    evaluation = TestEvaluation(
        trial=trial.number,
        metric=spec.metric,
        test_value=result.final_metric,
        valid_value=trial.value,
        n_train=int(len(splits.y_train)),
        n_test=int(len(splits.y_test)),
        params=params,
        device=str(device),
        at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    return Retrained(trial, params, learn, splits, evaluation, seconds, result.epochs)


def evaluate_on_test(
    study: optuna.Study,
    spec: SweepSpec,
    data_dir: Path,
    device: torch.device,
    events: Listener,
    *,
    mirror: str | None = None,
    train_size: int | None = None,
) -> Retrained:
    """Retrain the best trial's configuration on the official train split (all of it, or `train_size`
    images) and score the official test split; the score is stored on the study."""
    best = require_best(study)
    retrained = retrain(study, spec, best, official_splits(spec, data_dir, mirror, train_size), device, events)
    store_signed(retrained.evaluation, study)  # with the key, signed for this study
    return retrained
