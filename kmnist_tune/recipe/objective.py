"""The Optuna objective: sample a configuration, train it under the batch-halving guard,
report every epoch, return the metric. What it does is told to listeners as trial events."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner

from ..contract.events import Listener, TrialStart
from ..contract.records import EpochRecord, HalvingEvent, TrialRecord
from ..contract.space import sample_params
from ..contract.spec import SweepSpec
from ..service.cpu_share import CpuShare
from ..training.checkpoint import load_checkpoint
from ..training.devices import device_name
from ..training.splits import Splits
from ..training.train import EpochLog, FitResult, ShareThreads, StopOnRequest, build_learner, fit
from .checkpoints import TrialCheckpoints
from .halving import DivergenceGuard, train_with_halving


class Objective:
    """Trains one fastai Learner per attempt on data loaded once per process.

    `spec` is resolved (its lr range concrete, see lr_prior.resolve_spec). `extra_cbs` builds
    additional fastai callbacks for every attempt (tests use it to inject faults).
    """

    def __init__(
        self,
        spec: SweepSpec,
        splits: Splits,
        device: torch.device,
        events: Listener,
        *,
        extra_cbs: Callable[[], Sequence[Callback]] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        cpu_share: CpuShare | None = None,
    ):
        self.spec, self.splits, self.device, self.events = spec, splits, device, events
        self.extra_cbs, self.stop_requested = extra_cbs, stop_requested
        self.cpu_share = cpu_share
        self._said_share = ""

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        params = sample_params(trial, spec)
        device = device_name(self.device)
        TrialRecord.write(trial, config=params, device=device, batch_size_initial=int(params["batch_size"]))
        if self.cpu_share is not None:
            share = self.cpu_share.share()
            torch.set_num_threads(share.threads)
            TrialRecord.write(trial, threads=share.threads)
            if share.line() != self._said_share:  # said when it changes, not for every trial
                self._said_share = share.line()
                self.events.line(f"trial {trial.number}: {share.line()}")
        self.events.trial_started(
            TrialStart(
                study=trial.study.study_name,
                number=trial.number,
                params=params,
                searched=list(spec.searched_params()),
                n_epochs=int(params["epochs"]),
                device=device,
                metric=spec.metric,
            )
        )
        checkpoints = TrialCheckpoints(trial, spec, self.events.line)
        try:
            return self._train(trial, params, checkpoints)
        finally:
            checkpoints.close()

    def _train(self, trial: optuna.Trial, params: dict[str, Any], checkpoints: TrialCheckpoints) -> float:
        spec = self.spec
        n_epochs = int(params["epochs"])
        reported: set[int] = set()  # steps this trial has reported, across its attempts
        resume = checkpoints.resume_point(params)

        def on_epoch(rec: EpochRecord) -> bool:
            # A step is reported once. A restarted attempt trains from scratch, so its early epochs
            # would repeat steps an earlier attempt already reported: those keep their first value
            # (Optuna would ignore a second report anyway) and the pruner is asked only at new steps.
            self.events.epoch(trial.number, rec)
            # Optuna's step is the number of epochs completed (1, 2, ...): a pruner's min_resource or
            # n_warmup_steps counts epochs as W&B's hyperband min_iter does, and plots read "epoch N".
            step = rec.epoch + 1
            if step in reported:
                return True
            trial.report(rec.metric, step)
            reported.add(step)
            # After the last epoch there is nothing left to save: finish, so the trial counts as complete.
            return step >= n_epochs or not trial.should_prune()

        def attempt(batch_size: int) -> FitResult:
            p = {**params, "batch_size": batch_size}
            # The first attempt of a retry continues its original's newest checkpoint, with the
            # original's seed: the same shuffles and augmentations go on.
            r = resume if resume is not None and not resume.used and batch_size == resume.batch_size else None
            seed = int(r.info["seed"]) if r is not None else spec.seed + trial.number

            def learner(seed: int) -> tuple[Learner, str]:
                return build_learner(
                    self.splits, p, self.device, spec.metric, seed=seed, augment=spec.augment, performance=spec.performance
                )

            learn, metric_name = learner(seed)
            start = 0
            if r is not None:
                r.used = True
                try:
                    start = load_checkpoint(learn, r.weights, r.info)
                except Exception as e:  # corrupt, or of another model or library version
                    why = " ".join(str(e).split())[:160] or type(e).__name__
                    what = f"the checkpoint of trial {r.from_trial} does not load ({why})"
                    self.events.line(f"trial {trial.number}: {what}; starting from scratch")
                    seed = spec.seed + trial.number
                    learn, metric_name = learner(seed)  # nothing of a half-loaded model is kept
                else:
                    TrialRecord.write(trial, resumed_from={"trial": r.from_trial, "epoch": start})
                    self.events.line(f"trial {trial.number}: resumed from trial {r.from_trial} at epoch {start + 1}/{n_epochs}")
            log = EpochLog(
                metric_name, on_epoch, lambda i, n: self.events.batch(trial.number, start + len(log.result.epochs), i, n)
            )
            extra = list(self.extra_cbs()) if self.extra_cbs is not None else []
            if self.stop_requested is not None:
                extra.append(StopOnRequest(self.stop_requested))
            if self.cpu_share is not None:
                share = self.cpu_share
                extra.append(ShareThreads(lambda: share.share().threads))
            saver = checkpoints.callback(learn, p, seed)
            return fit(learn, p, log, [DivergenceGuard(spec.halving), *extra, *([saver] if saver else [])], start_epoch=start)

        def on_halving(e: HalvingEvent) -> None:
            self.events.halving(trial.number, e)

        first_bs = resume.batch_size if resume is not None else int(params["batch_size"])  # as halved before
        outcome = train_with_halving(attempt, first_bs, spec.halving, on_halving)
        TrialRecord.write(trial, halving_events=outcome.events, attempts=outcome.attempts, batch_size_used=outcome.batch_size)
        if outcome.floor_reached:
            # Pruned, not failed: samplers learn from pruned trials (as bad ones) but ignore failures.
            TrialRecord.write(trial, stopped=outcome.stop_reason)
            raise optuna.TrialPruned(outcome.stop_reason)
        result: FitResult = outcome.result
        TrialRecord.write(trial, **TrialRecord.timings(result.epochs))
        if result.cancelled:
            raise optuna.TrialPruned(f"pruned after epoch {len(result.epochs)}")
        value = result.final_metric
        if not math.isfinite(value):
            raise RuntimeError(f"training produced a non-finite {spec.metric}")
        return value
