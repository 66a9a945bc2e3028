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
from ..contract.records import EpochRecord, TrialRecord
from ..contract.space import sample_params
from ..contract.spec import SweepSpec
from ..errors import one_line
from ..masking import printable
from ..service.cpu_share import CpuShare
from ..training.checkpoint import load_checkpoint
from ..training.compiling import CompiledModels, compiled_graphs
from ..training.devices import device_name
from ..training.splits import Splits
from ..training.train import EpochLog, FitResult, ShareThreads, StopOnRequest, build_learner, fit, use_threads
from .checkpoints import Resume, TrialCheckpoints
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
        compiled: CompiledModels | None = None,
    ):
        self.spec, self.splits, self.device, self.events = spec, splits, device, events
        self.extra_cbs, self.stop_requested = extra_cbs, stop_requested
        self.cpu_share = cpu_share
        self._said_share = ""
        # Compiled once per worker, not per trial; with the decisions of its preflight, when it made one.
        self.compiled = compiled if compiled is not None else CompiledModels()
        self.compiled.say = events.line

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.spec
        params = sample_params(trial, spec)
        device = device_name(self.device)
        TrialRecord.write(trial, config=params, device=device, batch_size_initial=int(params["batch_size"]))
        if self.cpu_share is not None:
            share = self.cpu_share.share()
            use_threads(share.threads)
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
        resume = checkpoints.resume_point(params)
        attempt = Attempt(
            trial,
            params,
            resume,
            spec=spec,
            splits=self.splits,
            device=self.device,
            events=self.events,
            checkpoints=checkpoints,
            callbacks=self._callbacks,
            compiled=self.compiled,
        )
        first_bs = resume.batch_size if resume is not None else int(params["batch_size"])  # as halved before
        outcome = train_with_halving(attempt, first_bs, spec.halving, lambda e: self.events.halving(trial.number, e))
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

    def _callbacks(self) -> list[Callback]:
        """The fastai callbacks every attempt adds besides the guard and the checkpoints."""
        extra = list(self.extra_cbs()) if self.extra_cbs is not None else []
        if self.stop_requested is not None:
            extra.append(StopOnRequest(self.stop_requested))
        if self.cpu_share is not None:
            share = self.cpu_share
            extra.append(ShareThreads(lambda: share.share().threads))
        return extra


class Attempt:
    """A trial's attempts: calling it with a batch size trains one (train_with_halving calls it again
    at half the size after a divergence). What the attempts share lives here: the steps already
    reported to Optuna, and the checkpoint a retry resumes from, which only the first attempt at its
    batch size may use."""

    def __init__(
        self,
        trial: optuna.Trial,
        params: dict[str, Any],
        resume: Resume | None,
        *,
        spec: SweepSpec,
        splits: Splits,
        device: torch.device,
        events: Listener,
        checkpoints: TrialCheckpoints,
        callbacks: Callable[[], list[Callback]] = list,
        compiled: CompiledModels | None = None,
    ):
        self.trial, self.params, self.resume = trial, params, resume
        self.compiled = compiled
        self.spec, self.splits, self.device, self.events = spec, splits, device, events
        self.checkpoints, self.callbacks = checkpoints, callbacks
        self.n_epochs = int(params["epochs"])
        self.reported: set[int] = set()  # steps this trial has reported, across its attempts
        self.recompiles = 0  # graphs dynamo compiled in this trial's fits, across its attempts

    def __call__(self, batch_size: int) -> FitResult:
        p = {**self.params, "batch_size": batch_size}
        learn, metric_name, seed, start = self.learner(p, *self.start(batch_size))
        log = EpochLog(
            metric_name, self.on_epoch, lambda i, n: self.events.batch(self.trial.number, start + len(log.result.epochs), i, n)
        )
        saver = self.checkpoints.callback(learn, p, seed)
        cbs = [DivergenceGuard(self.spec.halving), *self.callbacks(), *([saver] if saver else [])]
        outcome = learn.kt_compile
        if outcome is None:
            TrialRecord.write(self.trial, loop=learn.kt_performance.loop)
            return fit(learn, p, log, cbs, start_epoch=start)
        TrialRecord.write(self.trial, loop=learn.kt_performance.loop, compile=outcome.record)
        before = compiled_graphs()
        try:
            return fit(learn, p, log, cbs, start_epoch=start)
        finally:
            # Every attempt's: a halving's new batch size is where a recompile would show.
            self.recompiles += compiled_graphs() - before
            TrialRecord.write(self.trial, recompiles=self.recompiles)

    def start(self, batch_size: int) -> tuple[Resume | None, int]:
        """(the checkpoint this attempt continues, or None; its seed). The first attempt of a retry at
        the batch size its original reached continues the original's newest checkpoint, with the
        original's seed: the same shuffles and augmentations go on."""
        r = self.resume
        if r is not None and not r.used and batch_size == r.batch_size:
            return r, int(r.info["seed"])
        return None, self.fresh_seed

    @property
    def fresh_seed(self) -> int:
        return self.spec.seed + self.trial.number

    def learner(self, p: dict[str, Any], r: Resume | None, seed: int) -> tuple[Learner, str, int, int]:
        """(a Learner for this attempt, its metric's name, its seed, the epoch it starts at): loaded from
        `r` when given; one that does not load is said in one line and replaced by a fresh Learner."""
        learn, metric_name = self._build(p, seed)
        if r is None:
            return learn, metric_name, seed, 0
        r.used = True
        try:
            start = load_checkpoint(learn, r.weights, r.info)
        except Exception as e:  # corrupt, or of another model or library version
            # printable: the reason may quote what another worker stored (the checkpoint's description)
            what = f"the checkpoint of trial {r.from_trial} does not load ({printable(one_line(e, 160))})"
            self.events.line(f"trial {self.trial.number}: {what}; starting from scratch")
            seed = self.fresh_seed
            learn, metric_name = self._build(p, seed)  # nothing of a half-loaded model is kept
            return learn, metric_name, seed, 0
        TrialRecord.write(self.trial, resumed_from={"trial": r.from_trial, "epoch": start})
        self.events.line(f"trial {self.trial.number}: resumed from trial {r.from_trial} at epoch {start + 1}/{self.n_epochs}")
        return learn, metric_name, seed, start

    def _build(self, p: dict[str, Any], seed: int) -> tuple[Learner, str]:
        spec = self.spec
        return build_learner(
            self.splits,
            p,
            self.device,
            spec.metric,
            seed=seed,
            augment=spec.augment,
            performance=spec.performance,
            compiled=self.compiled,
        )

    def on_epoch(self, rec: EpochRecord) -> bool:
        """Report the epoch to Optuna; False when the trial is to be pruned (fastai then stops).

        A step is reported once. A restarted attempt trains from scratch, so its early epochs would
        repeat steps an earlier attempt already reported: those keep their first value (Optuna would
        ignore a second report anyway) and the pruner is asked only at new steps."""
        self.events.epoch(self.trial.number, rec)
        # Optuna's step is the number of epochs completed (1, 2, ...): a pruner's min_resource or
        # n_warmup_steps counts epochs as W&B's hyperband min_iter does, and plots read "epoch N".
        step = rec.epoch + 1
        if step in self.reported:
            return True
        self.trial.report(rec.metric, step)
        self.reported.add(step)
        # After the last epoch there is nothing left to save: finish, so the trial counts as complete.
        return step >= self.n_epochs or not self.trial.should_prune()
