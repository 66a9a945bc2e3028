"""The one place the official test split is used: retrain the chosen trial, score it on test."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import optuna
import torch

from .errors import UserError
from .progress import Reporter
from .spec import SweepSpec
from .train import EpochLog, EpochRecord, build_learner, fit, load_splits

TEST_ATTR = "kmnist_tune.test_evaluation"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise UserError(
            f"study {study.study_name!r} has no completed trial yet; run `kmnist-tune worker --study {study.study_name}` first"
        ) from None


def evaluate_on_test(
    study: optuna.Study,
    spec: SweepSpec,
    data_dir: Path,
    device: torch.device,
    reporter: Reporter,
    *,
    mirror: str | None = None,
    train_size: int | None = None,
) -> dict[str, Any]:
    """Retrain the best trial's configuration on the official train split (all of it, or `train_size`
    images) and score the official test split; the result is stored on the study."""
    best = best_trial(study)
    params = dict(best.user_attrs.get("config") or {**spec.fixed_params(), **best.params})
    params["batch_size"] = best.user_attrs.get("batch_size_used", params["batch_size"])
    data_spec = spec.data.model_copy(update={"train_size": train_size})
    splits = load_splits(data_spec, data_dir, mirror=mirror, with_test=True, full_train=True)
    assert splits.x_test is not None and splits.y_test is not None
    learn, metric_name = build_learner(
        splits,
        params,
        device,
        spec.metric or "accuracy",
        seed=spec.seed,
        valid=(splits.x_test, splits.y_test),
        augment=spec.augment,
        performance=spec.performance,
    )
    n_epochs = int(params["epochs"])

    def on_epoch(rec: EpochRecord) -> bool:
        reporter.epoch(best.number, rec.epoch, n_epochs, f"test {spec.metric}", rec.metric, rec.seconds, rec.images_per_s)
        return True

    result = fit(learn, params, EpochLog(metric_name, on_epoch))
    out = {
        "trial": best.number,
        "metric": spec.metric,
        "test_value": result.final_metric,
        "valid_value": best.value,
        "n_train": int(len(splits.y_train)),
        "n_test": int(len(splits.y_test)),
        "params": params,
        "device": str(device),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    study.set_user_attr(TEST_ATTR, out)
    return out
