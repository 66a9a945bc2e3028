"""The training knobs image-classifier sweeps tune, each one of fastai's own parts: the optimizer
(with its momentum and second-moment decay), the label-smoothing loss, MixUp/CutMix, and the
schedule (one cycle or flat)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.schedule import SchedCos
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.optimizer import SGD, Adam, Lamb, RMSProp, ranger

from ..contract.spec import OPTIMIZERS, PARAMETERS
from .loop import TrialScheduler
from .torch_optim import TorchOptimizer

# The spec's names -> fastai's optimizer functions (ranger is fastai's RAdam + Lookahead).
OPT_FUNCS = {"adam": Adam, "sgd": SGD, "rmsprop": RMSProp, "lamb": Lamb, "ranger": ranger}
assert tuple(OPT_FUNCS) == OPTIMIZERS
# fastai's one-cycle momentum dips from 0.95 to 0.85 and back; a trial's `momentum` is the top of
# that cycle and the dip keeps fastai's proportion (momentum 0.95 is exactly fastai's default).
MOM_DIP = 0.85 / 0.95


def knob(params: dict[str, Any], name: str) -> Any:
    """A training parameter of a trial; a record from before the knob existed gets its default."""
    return params.get(name, PARAMETERS[name]["default"])


def uses_torch_optimizer(params: dict[str, Any], impl: str = "torch") -> bool:
    """Whether this trial's optimizer is PyTorch's multi-tensor one (training/torch_optim.py) rather
    than fastai's own: with `performance.optimizer: torch` (the default), for Adam and SGD, and for
    RMSProp without momentum. fastai's RMSProp applies momentum to the raw gradient and PyTorch's to
    the normalised step, two different optimizers; LAMB and ranger have no PyTorch counterpart."""
    name = knob(params, "optimizer")
    if impl != "torch":
        return False
    return name in ("adam", "sgd") or (name == "rmsprop" and float(knob(params, "momentum")) == 0)


def opt_func(params: dict[str, Any], impl: str = "torch") -> Any:
    """The optimizer for this trial, with `momentum` as fastai's `mom` (Adam's beta1) and `beta2` as its
    `sqr_mom` (SGD has no second moment): PyTorch's fused/foreach one where `uses_torch_optimizer`,
    else fastai's."""
    name = knob(params, "optimizer")
    hypers: dict[str, float] = {"mom": float(knob(params, "momentum"))}
    if name != "sgd":
        hypers["sqr_mom"] = float(knob(params, "beta2"))
    if uses_torch_optimizer(params, impl):
        return partial(TorchOptimizer, kind=name, **hypers)
    return partial(OPT_FUNCS[name], **hypers)


def optimizer_label(opt: Any) -> str:
    """Which implementation a Learner's optimizer is, as checkpoints record it: their states differ."""
    return f"torch.{type(opt.opt).__name__}" if isinstance(opt, TorchOptimizer) else "fastai"


class _PlainTensors:
    """fastai's flattened losses, the same in every way but one: fastai's `BaseLoss._contiguous`
    wraps the predictions and targets in fastai's TensorBase, and the loss it returns is one too, so
    every later op on the loss (clone, backward, the smoothed loss, the divergence guard) runs
    through TensorBase's Python-level `__torch_function__`: about 15 a batch, a third of the loop's
    own time on a small model (benchmarks/bench_loop.py). Here they stay plain tensors."""

    axis: int

    def _contiguous(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if self.axis in (-1, x.dim() - 1):  # fastai's transpose of the last axis with itself is a no-op
            return x.contiguous()
        return x.transpose(self.axis, -1).contiguous()


class CrossEntropy(_PlainTensors, CrossEntropyLossFlat):
    """fastai's CrossEntropyLossFlat on plain tensors. For what every trial hands it, (N, C) logits and
    (N,) int64 labels, fastai's flattening is the identity and its `nn.CrossEntropyLoss` calls
    `F.cross_entropy` with the module's settings: called directly (a module call, a map and two
    views less a batch), with the settings read at each call as MixUp changes `reduction`."""

    def __call__(self, inp: Any, targ: Any, **kwargs: Any) -> Any:
        if (
            not kwargs
            and type(inp) is torch.Tensor
            and type(targ) is torch.Tensor
            and inp.dim() == 2
            and targ.dim() == 1
            and targ.dtype == torch.int64
            and self.axis in (-1, 1)
            and self.flatten
            and not self.floatify
        ):
            f = self.func
            return F.cross_entropy(
                inp, targ, weight=f.weight, ignore_index=f.ignore_index, reduction=f.reduction, label_smoothing=f.label_smoothing
            )
        return super().__call__(inp, targ, **kwargs)


class LabelSmoothingCrossEntropy(_PlainTensors, LabelSmoothingCrossEntropyFlat):
    """fastai's LabelSmoothingCrossEntropyFlat on plain tensors."""


def loss_func(params: dict[str, Any]) -> Any:
    """fastai's cross-entropy, or its label-smoothing cross-entropy when `label_smoothing` > 0."""
    eps = float(knob(params, "label_smoothing"))
    return LabelSmoothingCrossEntropy(eps=eps) if eps > 0 else CrossEntropy()


def mixing_callbacks(params: dict[str, Any]) -> list[Callback]:
    """fastai's MixUp or CutMix with the trial's alpha (0 = off); the spec refuses both at once."""
    mixup, cutmix = float(knob(params, "mixup")), float(knob(params, "cutmix"))
    return [*([MixUp(mixup)] if mixup > 0 else []), *([CutMix(cutmix)] if cutmix > 0 else [])]


def moms(params: dict[str, Any]) -> tuple[float, float, float]:
    top = float(knob(params, "momentum"))
    return top, top * MOM_DIP, top


class Phases:
    """fastai's `combine_scheds` for two phases (what `fit_one_cycle`'s `combined_cos` builds), with the
    phase picked by one comparison: fastai's finds it with five tensor ops per call, two calls a batch,
    on the host (a tenth of the loop's own time on a small model, benchmarks/bench_loop.py). The
    phases are fastai's own schedule functions; the positions agree with fastai's to float32 rounding
    (fastai computes them in float32 tensors)."""

    def __init__(self, pct: float, first: Any, second: Any):
        self.pct, self.first, self.second = float(pct), first, second

    def __call__(self, pos: float) -> float:
        if pos < self.pct:
            return float(self.first(pos / self.pct))
        return float(self.second((pos - self.pct) / (1 - self.pct) if self.pct < 1 else 1.0))


def one_cycle_scheduler(lr_max: float, pct_start: float, moms: tuple[float, float, float]) -> Callback:
    """fastai's one-cycle `ParamScheduler` (as loop.TrialScheduler) as `fit_one_cycle` makes it (cosine warm-up of the lr from
    lr_max/25 for `pct_start`, cosine decay to lr_max/1e5; momentum the other way), on `Phases`."""
    div, div_final = 25.0, 1e5  # fit_one_cycle's defaults
    return TrialScheduler(
        {
            "lr": Phases(pct_start, SchedCos(lr_max / div, lr_max), SchedCos(lr_max, lr_max / div_final)),
            "mom": Phases(pct_start, SchedCos(moms[0], moms[1]), SchedCos(moms[1], moms[2])),
        }
    )
