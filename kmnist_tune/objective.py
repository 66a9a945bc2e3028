"""The Optuna objective: sample a configuration, train it under the batch-halving guard,
report every epoch, return the metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import torch
from fastai.callback.core import Callback

from .errors import Interrupted
from .halving import DivergenceGuard, HalvingEvent, train_with_halving
from .progress import Reporter
from .space import sample_params
from .spec import SweepSpec
from .tracking import WandbRun, save_trial_note, trial_note
from .train import EpochLog, EpochRecord, FitResult, Splits, build_learner, fit


class StopOnRequest(Callback):
    """Ends training at the next batch once the worker has been asked to stop (SIGINT/SIGTERM)."""

    order = 1

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested

    def before_batch(self) -> None:
        if self.requested():
            raise Interrupted("stop requested")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


class Objective:
    """Trains one fastai Learner per attempt on data loaded once per process.

    `extra_cbs` builds additional fastai callbacks for every attempt (tests use it to inject faults).
    """

    def __init__(
        self,
        spec: SweepSpec,
        splits: Splits,
        device: torch.device,
        reporter: Reporter,
        *,
        lr_range: tuple[float, float] | None = None,
        extra_cbs: Callable[[], Sequence[Callback]] | None = None,
        stop_requested: Callable[[], bool] | None = None,
    ):
        self.spec, self.splits, self.device, self.reporter = spec, splits, device, reporter
        self.lr_range, self.extra_cbs, self.stop_requested = lr_range, extra_cbs, stop_requested

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        params = sample_params(trial, spec, self.lr_range)
        trial.set_user_attr("config", params)
        trial.set_user_attr("device", device_name(self.device))
        trial.set_user_attr("batch_size_initial", int(params["batch_size"]))
        self.reporter.trial_started(trial.number, {k: params[k] for k in spec.searched_params()} or params, int(params["epochs"]))
        wb = WandbRun(
            spec.tracking.wandb,
            trial.study.study_name,
            trial.number,
            params,
            {"trial": trial.number, "device": device_name(self.device)},
            say=self.reporter.line,
        )
        state, value = "FAIL", None
        try:
            value = self._train(trial, params, wb)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        finally:
            # The evidence goes out whatever the outcome: a dashboard note and the W&B summary.
            attrs = trial.storage.get_trial_user_attrs(trial._trial_id)
            save_trial_note(trial, trial_note(trial.number, state, value, spec.metric or "metric", attrs), say=self.reporter.line)
            wb.finish(
                state,
                value,
                {
                    k: attrs.get(k)
                    for k in ("halving_events", "batch_size_used", "attempts", "stopped")
                    if attrs.get(k) is not None
                },
            )

    def _train(self, trial: optuna.Trial, params: dict[str, Any], wb: WandbRun) -> float:
        spec = self.spec
        n_epochs = int(params["epochs"])
        reported: set[int] = set()  # steps this trial has reported, across its attempts
        current: dict[str, Any] = {}

        def on_epoch(rec: EpochRecord) -> bool:
            # A step is reported once. A restarted attempt trains from scratch, so its early epochs
            # would repeat steps an earlier attempt already reported: those keep their first value
            # (Optuna would ignore a second report anyway) and the pruner is asked only at new steps.
            self.reporter.epoch(
                trial.number, rec.epoch, n_epochs, spec.metric or "metric", rec.metric, rec.seconds, rec.images_per_s
            )
            opt = getattr(current.get("learn"), "opt", None)
            wb.epoch(rec, spec.metric or "metric", float(opt.hypers[-1]["lr"]) if opt is not None else None)
            if rec.epoch in reported:
                return True
            trial.report(rec.metric, rec.epoch)
            reported.add(rec.epoch)
            # After the last epoch there is nothing left to save: finish, so the trial counts as complete.
            return rec.epoch + 1 >= n_epochs or not trial.should_prune()

        def attempt(batch_size: int) -> FitResult:
            p = {**params, "batch_size": batch_size}
            learn, metric_name = build_learner(
                self.splits,
                p,
                self.device,
                spec.metric or "accuracy",
                seed=spec.seed + trial.number,
                augment=spec.augment,
                performance=spec.performance,
            )
            current["learn"] = learn
            log = EpochLog(metric_name, on_epoch, lambda i, n: self.reporter.batch(trial.number, len(log.result.epochs), i, n))
            extra = list(self.extra_cbs()) if self.extra_cbs is not None else []
            if self.stop_requested is not None:
                extra.append(StopOnRequest(self.stop_requested))
            try:
                return fit(learn, p, log, [DivergenceGuard(spec.halving), *extra])
            finally:
                current.clear()  # a failed attempt's Learner must not outlive it (memory)

        def on_halving(e: HalvingEvent) -> None:
            to = f"halving to {e.to_bs}" if e.to_bs else "at the minimum batch size, giving up"
            self.reporter.line(f"trial {trial.number}: {e.reason} at batch size {e.from_bs} ({e.detail}); {to}")
            wb.halving(e)

        outcome = train_with_halving(attempt, int(params["batch_size"]), spec.halving, on_halving)
        trial.set_user_attr("halving_events", [e.as_dict() for e in outcome.events])
        trial.set_user_attr("attempts", outcome.attempts)
        trial.set_user_attr("batch_size_used", outcome.batch_size)
        if outcome.floor_reached:
            # Pruned, not failed: samplers learn from pruned trials (as bad ones) but ignore failures.
            trial.set_user_attr("stopped", outcome.stop_reason)
            raise optuna.TrialPruned(outcome.stop_reason)
        result: FitResult = outcome.result
        _record(trial, result.epochs)
        if result.cancelled:
            raise optuna.TrialPruned(f"pruned after epoch {len(result.epochs)}")
        value = result.final_metric
        if not math.isfinite(value):
            raise RuntimeError(f"training produced a non-finite {spec.metric}")
        return value


def _record(trial: optuna.Trial, epochs: list[EpochRecord]) -> None:
    attrs: dict[str, Any] = {
        "epoch_seconds": [round(e.seconds, 3) for e in epochs],
        "train_images_per_s": [round(e.images_per_s, 1) for e in epochs],
        "train_loss": [round(e.train_loss, 5) for e in epochs],
        "valid_loss": [round(e.valid_loss, 5) for e in epochs],
    }
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
