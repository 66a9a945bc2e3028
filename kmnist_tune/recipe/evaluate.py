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

from ..contract.events import Listener, TrialStart
from ..contract.records import EpochRecord, TestEvaluation, TrialRecord
from ..contract.spec import SweepSpec
from ..service.studies import require_best
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
    rec = TrialRecord.of(best)
    params = dict(rec.config or {**spec.fixed_params(), **best.params})
    params["batch_size"] = rec.batch_size_used or params["batch_size"]
    data_spec = spec.data.model_copy(update={"train_size": train_size})
    splits = load_splits(data_spec, data_dir, mirror=mirror, with_test=True, full_train=True)
    assert splits.x_test is not None and splits.y_test is not None
    learn, metric_name = build_learner(
        splits,
        params,
        device,
        spec.metric,
        seed=spec.seed,
        valid=(splits.x_test, splits.y_test),
        augment=spec.augment,
        performance=spec.performance,
    )
    metric = f"test {spec.metric}"
    events.trial_started(TrialStart(study.study_name, best.number, params, [], int(params["epochs"]), str(device), metric))

    def on_epoch(r: EpochRecord) -> bool:
        events.epoch(best.number, r)
        return True

    log = EpochLog(metric_name, on_epoch, lambda i, n: events.batch(best.number, len(log.result.epochs), i, n))
    t0 = time.perf_counter()
    result = fit(learn, params, log)
    seconds = time.perf_counter() - t0
    evaluation = TestEvaluation(
        trial=best.number,
        metric=spec.metric,
        test_value=result.final_metric,
        valid_value=best.value,
        n_train=int(len(splits.y_train)),
        n_test=int(len(splits.y_test)),
        params=params,
        device=str(device),
        at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    evaluation.store(study)
    return Retrained(best, params, learn, splits, evaluation, seconds, result.epochs)
