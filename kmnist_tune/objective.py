"""The Optuna objective: sample a configuration, train it, report every epoch, return the metric."""

from __future__ import annotations

import math
from typing import Any

import optuna
import torch

from .progress import Reporter
from .space import sample_params
from .spec import SweepSpec
from .train import EpochLog, EpochRecord, Splits, build_learner, fit


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


class Objective:
    """Trains one fastai Learner per trial on data loaded once per process."""

    def __init__(self, spec: SweepSpec, splits: Splits, device: torch.device, reporter: Reporter):
        self.spec, self.splits, self.device, self.reporter = spec, splits, device, reporter

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        params = sample_params(trial, spec)
        n_epochs = int(params["epochs"])
        trial.set_user_attr("config", params)
        trial.set_user_attr("device", device_name(self.device))
        self.reporter.trial_started(trial.number, {k: params[k] for k in spec.searched_params()} or params, n_epochs)

        def on_epoch(rec: EpochRecord) -> bool:
            # Step = epoch index; the pruner compares trials at equal steps.
            trial.report(rec.metric, rec.epoch)
            self.reporter.epoch(
                trial.number, rec.epoch, n_epochs, spec.metric or "metric", rec.metric, rec.seconds, rec.images_per_s
            )
            # After the last epoch there is nothing left to save: finish, so the trial counts as complete.
            return rec.epoch + 1 >= n_epochs or not trial.should_prune()

        def on_batch(i: int, n: int) -> None:
            self.reporter.batch(trial.number, len(log.result.epochs), i, n)

        learn, metric_name = build_learner(
            self.splits, params, self.device, spec.metric or "accuracy", seed=spec.seed + trial.number
        )
        log = EpochLog(metric_name, on_epoch, on_batch)
        result = fit(learn, params, log)
        _record(trial, result.epochs, int(params["batch_size"]))
        if result.cancelled:
            raise optuna.TrialPruned(f"pruned after epoch {len(result.epochs)}")
        value = result.final_metric
        if not math.isfinite(value):
            raise RuntimeError(f"training produced a non-finite {spec.metric}")
        return value


def _record(trial: optuna.Trial, epochs: list[EpochRecord], batch_size: int) -> None:
    attrs: dict[str, Any] = {
        "batch_size_used": batch_size,
        "epoch_seconds": [round(e.seconds, 3) for e in epochs],
        "train_images_per_s": [round(e.images_per_s, 1) for e in epochs],
        "train_loss": [round(e.train_loss, 5) for e in epochs],
        "valid_loss": [round(e.valid_loss, 5) for e in epochs],
    }
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
