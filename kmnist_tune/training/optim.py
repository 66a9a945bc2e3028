"""The training knobs image-classifier sweeps tune, each one of fastai's own parts: the optimizer
(with its momentum and second-moment decay), the label-smoothing loss, MixUp/CutMix, and the
schedule (one cycle or flat)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.optimizer import SGD, Adam, Lamb, RMSProp, ranger

from ..contract.spec import OPTIMIZERS, PARAMETERS

# The spec's names -> fastai's optimizer functions (ranger is fastai's RAdam + Lookahead).
OPT_FUNCS = {"adam": Adam, "sgd": SGD, "rmsprop": RMSProp, "lamb": Lamb, "ranger": ranger}
assert tuple(OPT_FUNCS) == OPTIMIZERS
# fastai's one-cycle momentum dips from 0.95 to 0.85 and back; a trial's `momentum` is the top of
# that cycle and the dip keeps fastai's proportion (momentum 0.95 is exactly fastai's default).
MOM_DIP = 0.85 / 0.95


def knob(params: dict[str, Any], name: str) -> Any:
    """A training parameter of a trial; a record from before the knob existed gets its default."""
    return params.get(name, PARAMETERS[name]["default"])


def opt_func(params: dict[str, Any]) -> Any:
    """fastai's optimizer for this trial, with `momentum` as fastai's `mom` (Adam's beta1) and
    `beta2` as its `sqr_mom` (SGD has no second moment)."""
    name = knob(params, "optimizer")
    hypers: dict[str, float] = {"mom": float(knob(params, "momentum"))}
    if name != "sgd":
        hypers["sqr_mom"] = float(knob(params, "beta2"))
    return partial(OPT_FUNCS[name], **hypers)


class _PlainTensors:
    """fastai's flattened losses, the same in every way but one: fastai's `BaseLoss._contiguous`
    wraps the predictions and targets in fastai's TensorBase, and the loss it returns is one too, so
    every later op on the loss (clone, backward, the smoothed loss, the divergence guard) runs
    through TensorBase's Python-level `__torch_function__`: about 15 a batch, a third of the loop's
    own time on a small model (benchmarks/bench_loop.py). Here they stay plain tensors."""

    axis: int

    def _contiguous(self, x: Any) -> Any:
        return x.transpose(self.axis, -1).contiguous() if isinstance(x, torch.Tensor) else x


class CrossEntropy(_PlainTensors, CrossEntropyLossFlat):
    """fastai's CrossEntropyLossFlat on plain tensors."""


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
