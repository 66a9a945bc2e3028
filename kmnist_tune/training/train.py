"""One fastai run: a Learner over device-resident loaders, fit_one_cycle with per-epoch records,
and fastai's LR finder."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle and lr_find)
import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler, minimum, steep, valley
from fastai.learner import Learner
from fastai.metrics import BalancedAccuracy, accuracy

from ..contract.records import EpochRecord
from ..contract.spec import LR_FIND_ITERATIONS
from ..errors import Interrupted
from .augment import RandomAffine
from .loader import TensorSplit, make_dls, make_split
from .loop import DeviceAccuracy, TrialCallback, TrialLearner, balanced_accuracy, loop_in_use, use_trial_callbacks
from .model import build_model
from .optim import knob, loss_func, mixing_callbacks, moms, one_cycle_scheduler, opt_func
from .precision import Bf16Autocast, CompiledModels, close_leaked_autocast, prepare_model, resolve_performance
from .splits import Splits


@dataclass
class FitResult:
    epochs: list[EpochRecord] = field(default_factory=list)
    cancelled: bool = False

    @property
    def final_metric(self) -> float:
        return self.epochs[-1].metric if self.epochs else float("nan")


class EpochLog(TrialCallback):
    """Collects per-epoch metrics and timing after fastai's Recorder has filled its log,
    and hands each epoch to `on_epoch` (progress display, Optuna reports, pruning)."""

    order = 60  # after Recorder (50)

    def __init__(
        self,
        metric_name: str,
        on_epoch: Callable[[EpochRecord], bool] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.metric_name, self.on_epoch, self.on_batch = metric_name, on_epoch, on_batch
        self.result = FitResult()

    def before_epoch(self) -> None:
        self._t0 = time.perf_counter()
        self._seen = 0

    def after_batch(self) -> None:
        learn = self.learn
        if learn.training:
            self._seen += int(learn.xb[0].shape[0])
            if self.on_batch is not None:
                self.on_batch(learn.iter + 1, learn.n_iter)

    def before_validate(self) -> None:
        self._train_s = time.perf_counter() - self._t0

    def after_epoch(self) -> None:
        if self.epoch < getattr(self.learn, "kt_start_epoch", 0):
            return  # fit(start_epoch=k) ends the epochs it skips too: they were trained before a checkpoint
        names = self.recorder.metric_names
        row = dict(zip(names, self.recorder.log, strict=False))
        metric = float(row.get(self.metric_name, row.get("valid_loss", math.nan)))
        opt = self.learn.opt
        rec = EpochRecord(
            epoch=self.epoch,
            train_loss=float(row.get("train_loss", math.nan)),
            valid_loss=float(row.get("valid_loss", math.nan)),
            metric=metric,
            seconds=time.perf_counter() - self._t0,
            images_per_s=self._seen / max(getattr(self, "_train_s", 0.0), 1e-9),
            lr=float(opt.hypers[-1]["lr"]) if opt is not None else None,
        )
        self.result.epochs.append(rec)
        if self.on_epoch is not None and self.on_epoch(rec) is False:
            self.result.cancelled = True
            raise CancelFitException()


def metric_for(metric: str, fast: bool = True) -> tuple[Any | None, str]:
    """The fastai metric object and the name fastai's Recorder logs it under: with the fast loop, fastai's
    metrics with their sums kept on the device (training/loop.py); else fastai's own."""
    if metric == "balanced_accuracy":
        return (balanced_accuracy() if fast else BalancedAccuracy()), "balanced_accuracy_score"
    if metric == "accuracy":
        return (DeviceAccuracy() if fast else accuracy), "accuracy"
    return None, "valid_loss"


def build_learner(
    splits: Splits,
    params: dict[str, Any],
    device: torch.device,
    metric: str,
    seed: int = 0,
    valid: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    augment: Any = None,
    performance: Any = None,
    compiled: CompiledModels | None = None,
) -> tuple[Learner, str]:
    """A fastai Learner over device-resident loaders.

    augment: an AugmentSpec (or a dict with its keys, or a RandomAffine); None or `enabled: false` = no
    augmentation. Only the training loader is augmented, with draws keyed by (seed, epoch).
    performance: a PerformanceSpec (or a dict with its keys); None = its defaults (`auto`: bf16 autocast,
    channels-last and cuDNN benchmark on CUDA; plain fp32 on a CPU). The resolved settings are left on
    the Learner as `learn.kt_performance`, with the loop in use (`loop: fast` where the fast loop fell back
    to fastai's: `fastai`).
    compiled: a worker's CompiledModels, when the model is compiled: the compiled module of its earlier
    trials of the same architecture, with this attempt's fresh weights, or the decision to train this
    architecture uncompiled after its compiled step failed (compiling.py); left on the Learner as
    `learn.kt_compile` (a CompileOutcome, or None when not compiling).
    """
    close_leaked_autocast()  # an earlier attempt that died mid-batch (out of memory) may have left one open
    perf = resolve_performance(performance, device)
    perf = replace(perf, loop=loop_in_use(perf.loop))
    fast = perf.loop == "fast"
    aug = augment if isinstance(augment, RandomAffine) else RandomAffine.from_spec(augment)
    mean, std = splits.mean_std
    train = make_split(splits.x_train, splits.y_train, device, mean, std, seed)
    vx, vy = valid if valid is not None else (splits.x_valid, splits.y_valid)
    val: TensorSplit = make_split(vx, vy, device, mean, std)
    dls = make_dls(train, val, int(params["batch_size"]), device, augment=aug, channels_last=perf.channels_last)
    torch.manual_seed(seed)
    model = build_model(params["arch"], splits.n_classes, params["stem"], float(params["dropout"]))
    key = (params["arch"], splits.n_classes, params["stem"], float(params["dropout"]))
    bs = int(params["batch_size"])
    model, compile_outcome = prepare_model(model, device, perf, compiled, key, (bs, 1, *train.x.shape[1:]))
    m, name = metric_for(metric, fast)
    # fastai writes temporary weights (lr_find) under path/model_dir: keep them out of the user's cwd.
    learn = (TrialLearner if fast else Learner)(
        dls,
        model,
        loss_func=loss_func(params),
        opt_func=opt_func(params, perf.optimizer),
        metrics=[m] if m is not None else [],
        path=Path(tempfile.gettempdir()) / "kmnist-tune",
        model_dir="models",
    )
    learn.logger = _quiet  # without fastprogress, Recorder would print raw metric lists
    if fast:
        use_trial_callbacks(learn)
    if any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)  # our own progress display replaces fastprogress's
    if perf.precision == "bf16":
        learn.add_cb(Bf16Autocast(device.type))
    learn.kt_performance = perf
    learn.kt_compile = compile_outcome  # None: not compiled; else compiled or fell back (compiling.py)
    return learn, name


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def fit(
    learn: Learner, params: dict[str, Any], log: EpochLog, extra_cbs: Sequence[Callback] = (), start_epoch: int = 0
) -> FitResult:
    """fastai's fit_one_cycle (or, with `one_cycle: false`, its flat fit at lr), with MixUp/CutMix
    when the trial asks; from `start_epoch` when a checkpoint was loaded (training/checkpoint.py)."""
    learn.kt_start_epoch = start_epoch
    n, lr, wd = int(params["epochs"]), float(params["lr"]), float(params["weight_decay"])
    cbs = [log, *mixing_callbacks(params), *extra_cbs]
    if knob(params, "one_cycle"):
        # fastai's fit_one_cycle, with its scheduler on optim.Phases (same curves, fewer host ops)
        sched = one_cycle_scheduler(lr, float(params["pct_start"]), moms(params))
        if not isinstance(learn, TrialLearner):  # `loop: fastai`: fastai's own scheduler on the same curves
            sched = ParamScheduler(sched.scheds)
        learn.fit(n, lr, wd=wd, cbs=[sched, *cbs], start_epoch=start_epoch)
    else:
        learn.fit(n, lr, wd=wd, cbs=cbs, start_epoch=start_epoch)
    return log.result


def use_threads(n: int) -> None:
    """torch's CPU threads for this process's math (its share of the cores, recipe/cpu_threads.py)."""
    if n != torch.get_num_threads():
        torch.set_num_threads(n)


class ShareThreads(TrialCallback):
    """Before every epoch, sets torch's CPU threads to `threads()`: this process's share of the cores
    (service/cpu_share.py), which changes as other training processes on the host come and go."""

    order = 2

    def __init__(self, threads: Callable[[], int]):
        self.threads = threads

    def before_epoch(self) -> None:
        use_threads(self.threads())


class StopOnRequest(TrialCallback):
    """Ends training at the next batch once `requested()` says so (the worker got SIGINT/SIGTERM)."""

    order = 1

    def __init__(self, requested: Callable[[], bool]):
        self.requested = requested

    def before_batch(self) -> None:
        if self.requested():
            raise Interrupted("stop requested")


class IterationCount(TrialCallback):
    """Calls `on_iter(done, total)` after every training batch of an LR-finder run."""

    def __init__(self, total: int, on_iter: Callable[[int, int], None]):
        self.total, self.on_iter, self.done = total, on_iter, 0

    def after_batch(self) -> None:
        if self.learn.training:
            self.done += 1
            self.on_iter(min(self.done, self.total), self.total)

    def after_fit(self) -> None:
        # fastai stops the finder early once the loss diverges: report it finished where it stopped.
        if self.done < self.total:
            self.on_iter(self.done, self.done)


@dataclass
class LRCurve:
    """fastai's LR-finder result: the smoothed loss at each learning rate, and its suggestions."""

    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float]
    seconds: float


def find_lr(learn: Learner, num_it: int = LR_FIND_ITERATIONS, on_iter: Callable[[int, int], None] | None = None) -> LRCurve:
    """fastai's `lr_find` with its three suggestions (minimum, steep, valley)."""
    t0 = time.perf_counter()
    cbs = [IterationCount(num_it, on_iter)] if on_iter is not None else []
    with learn.added_cbs(cbs):
        found = learn.lr_find(num_it=num_it, show_plot=False, suggest_funcs=(minimum, steep, valley))
    return LRCurve(
        lrs=[float(x) for x in learn.recorder.lrs],
        losses=[float(x) for x in learn.recorder.losses],
        suggestions={name: float(getattr(found, name)) for name in ("minimum", "steep", "valley")},
        seconds=round(time.perf_counter() - t0, 2),
    )
