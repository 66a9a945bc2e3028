"""One training run: data splits, a fastai Learner, fit_one_cycle, per-epoch metrics."""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle and lr_find)
import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import BalancedAccuracy, accuracy
from fastcore.foundation import L
from torch.amp import GradScaler

from . import data as kdata
from .augment import RandomAffine
from .loader import TensorSplit, make_dls, make_split
from .model import build_model, prepare_model, resolve_performance
from .spec import DataSpec


@dataclass
class Splits:
    """The arrays one study trains on. `valid` is carved from the official train split;
    `test` is the official test split, loaded only for the final evaluation."""

    dataset: str
    n_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def mean_std(self) -> tuple[float, float]:
        x = self.x_train.astype(np.float32) / 255.0
        return float(x.mean()), float(x.std())


def load_splits(
    spec: DataSpec,
    data_dir: Path,
    *,
    mirror: str | None = None,
    download: bool = True,
    with_test: bool = False,
    full_train: bool = False,
) -> Splits:
    """Official train split -> stratified (train, valid) with a fixed seed, then the spec's subsets.

    full_train=True keeps every official train image for training (the final evaluation retrains on it);
    the validation part is then still returned for reference but overlaps nothing it is scored on.
    """
    info = kdata.get_dataset(spec.dataset)
    x, y = kdata.load_split(spec.dataset, "train", data_dir, fmt=spec.format, download=download, mirror=mirror)
    train_idx, valid_idx = kdata.stratified_split(y, spec.valid_fraction, spec.split_seed)
    if full_train:
        train_idx = np.sort(np.concatenate([train_idx, valid_idx]))
    train_idx = kdata.stratified_subset(train_idx, y, spec.train_size, spec.split_seed)
    valid_idx = kdata.stratified_subset(valid_idx, y, spec.valid_size, spec.split_seed)
    out = Splits(spec.dataset, info.n_classes, x[train_idx], y[train_idx], x[valid_idx], y[valid_idx])
    if with_test:
        out.x_test, out.y_test = kdata.load_split(
            spec.dataset, "test", data_dir, fmt=spec.format, download=download, mirror=mirror
        )
    return out


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    valid_loss: float
    metric: float
    seconds: float
    images_per_s: float


@dataclass
class FitResult:
    epochs: list[EpochRecord] = field(default_factory=list)
    cancelled: bool = False

    @property
    def final_metric(self) -> float:
        return self.epochs[-1].metric if self.epochs else float("nan")


class EpochLog(Callback):
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
        if self.training:
            self._seen += int(self.xb[0].shape[0])
            if self.on_batch is not None:
                self.on_batch(self.iter + 1, self.n_iter)

    def before_validate(self) -> None:
        self._train_s = time.perf_counter() - self._t0

    def after_epoch(self) -> None:
        names = self.recorder.metric_names
        row = dict(zip(names, self.recorder.log, strict=False))
        metric = float(row.get(self.metric_name, row.get("valid_loss", math.nan)))
        rec = EpochRecord(
            epoch=self.epoch,
            train_loss=float(row.get("train_loss", math.nan)),
            valid_loss=float(row.get("valid_loss", math.nan)),
            metric=metric,
            seconds=time.perf_counter() - self._t0,
            images_per_s=self._seen / max(getattr(self, "_train_s", 0.0), 1e-9),
        )
        self.result.epochs.append(rec)
        if self.on_epoch is not None and self.on_epoch(rec) is False:
            self.result.cancelled = True
            raise CancelFitException()


def metric_for(dataset: str, metric: str) -> tuple[Any | None, str]:
    """The fastai metric object and the name fastai's Recorder logs it under."""
    if metric == "balanced_accuracy":
        return BalancedAccuracy(), "balanced_accuracy_score"
    if metric == "accuracy":
        return accuracy, "accuracy"
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
) -> tuple[Learner, str]:
    """A fastai Learner over device-resident loaders.

    augment: an AugmentSpec (or a dict with its keys, or a RandomAffine); None or `enabled: false` = no
    augmentation. Only the training loader is augmented, with draws keyed by (seed, epoch).
    performance: a PerformanceSpec (or a dict with its keys); None = its defaults (`auto`: bf16 autocast,
    channels-last and cuDNN benchmark on CUDA; plain fp32 on a CPU). The resolved settings are left on
    the Learner as `learn.kt_performance`.
    """
    close_leaked_autocast()  # an earlier attempt that died mid-batch (out of memory) may have left one open
    perf = resolve_performance(performance, device)
    aug = augment if isinstance(augment, RandomAffine) else RandomAffine.from_spec(augment)
    mean, std = splits.mean_std
    train = make_split(splits.x_train, splits.y_train, device, mean, std, seed)
    vx, vy = valid if valid is not None else (splits.x_valid, splits.y_valid)
    val: TensorSplit = make_split(vx, vy, device, mean, std)
    dls = make_dls(train, val, int(params["batch_size"]), device, augment=aug, channels_last=perf.channels_last)
    torch.manual_seed(seed)
    model = build_model(params["arch"], splits.n_classes, params["stem"], float(params["dropout"]))
    model = prepare_model(model, device, perf)
    m, name = metric_for(splits.dataset, metric)
    # fastai writes temporary weights (lr_find) under path/model_dir: keep them out of the user's cwd.
    learn = Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        metrics=[m] if m is not None else [],
        path=Path(tempfile.gettempdir()) / "kmnist-tune",
        model_dir="models",
    )
    learn.logger = _quiet  # without fastprogress, Recorder would print raw metric lists
    if any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)  # our own progress display replaces fastprogress's
    if perf.precision == "bf16":
        learn.add_cb(Bf16Autocast(device.type))
    learn.kt_performance = perf
    return learn, name


class Bf16Autocast(MixedPrecision):
    """fastai's MixedPrecision in bf16 (autocast, no loss scaling), made exception-safe, on any device type.

    fastai enters autocast in before_batch and leaves it in after_loss. An exception in between (a CUDA
    out-of-memory error in the forward pass, which the batch-halving guard turns into a restart) skips
    after_loss and leaves autocast entered for the rest of the process: later fp32 code would run under
    it, and the cache of bf16 weight copies (cleared only when the outermost autocast exits) would keep
    handing out the weights of an earlier step. Every context this class enters is recorded per thread,
    and any left open is closed before the next batch, fit, or Learner (build_learner) starts.
    """

    def __init__(self, device_type: str = "cuda"):
        super().__init__(amp_mode="bf16")
        self.device_type = device_type

    def before_fit(self) -> None:
        # MixedPrecision.before_fit for bf16, with autocast on this device type (fastai's is CUDA-only).
        close_leaked_autocast()
        if self.device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bfloat16; set performance.precision: fp32")
        self.autocast = torch.autocast(self.device_type, dtype=torch.bfloat16)
        # bf16 has fp32's range: no loss scaling. A disabled GradScaler passes MixedPrecision's step through.
        self.learn.scaler, self.scales = GradScaler(self.device_type, enabled=False), L()

    def before_batch(self) -> None:
        close_leaked_autocast()
        self.autocast.__enter__()
        _open_autocasts().append(self.autocast)

    def after_loss(self) -> None:
        close_leaked_autocast()

    def after_batch(self) -> None:
        close_leaked_autocast()  # a cancelled batch skips after_loss

    def after_fit(self) -> None:
        close_leaked_autocast()
        super().after_fit()


_autocast_state = threading.local()


def _open_autocasts() -> list[Any]:
    if not hasattr(_autocast_state, "stack"):
        _autocast_state.stack = []
    return _autocast_state.stack


def close_leaked_autocast() -> int:
    """Leave every autocast context Bf16Autocast entered on this thread and did not leave; returns how many."""
    stack = _open_autocasts()
    n = len(stack)
    while stack:
        stack.pop().__exit__(None, None, None)
    return n


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def fit(learn: Learner, params: dict[str, Any], log: EpochLog, extra_cbs: Sequence[Callback] = ()) -> FitResult:
    learn.fit_one_cycle(
        int(params["epochs"]),
        float(params["lr"]),
        wd=float(params["weight_decay"]),
        pct_start=float(params["pct_start"]),
        cbs=[log, *extra_cbs],
    )
    return log.result
