"""The training knobs W&B sweep files tune, each a fastai part, training a real fixture trial: the
optimizer with its momentum and beta2, label smoothing, MixUp/CutMix, and one-cycle or flat fits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_spec
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.optimizer import Lookahead

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.spec import SpecError
from kmnist_tune.training.splits import Splits
from kmnist_tune.training.train import EpochLog, build_learner, fit

CPU = torch.device("cpu")


@pytest.fixture
def splits(small_splits: Splits) -> Splits:
    """320 of the fixture's training images, loaded once per run (shared_trained.py): these tests
    check what fastai trains with, not how well."""
    return small_splits


class Seen(Callback):
    """What fastai actually trained with, batch by batch: the optimizer's hypers and the loss in force
    (MixUp/CutMix swap in their own mixing loss for training batches)."""

    order = 90  # after the schedulers and the mixing callbacks have set up the batch

    def before_fit(self) -> None:
        self.mom_seen: list[float] = []
        self.lr_seen: list[float] = []
        self.mixer: object = None

    def before_batch(self) -> None:
        if self.training:
            self.mom_seen.append(self.opt.hypers[-1]["mom"])
            self.lr_seen.append(self.opt.hypers[-1]["lr"])
            self.mixer = getattr(self.learn.loss_func, "__self__", self.mixer)


def train(splits: Splits, **knobs: object) -> tuple[object, Seen, float]:
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 5e-3}, **{k: {"value": v} for k, v in knobs.items()}}))
    params = {**spec.fixed_params(), "batch_size": 16}  # 20 batches: enough to trace the schedule
    learn, name = build_learner(splits, params, CPU, "accuracy")
    seen = Seen()
    result = fit(learn, params, EpochLog(name), [seen])
    assert len(result.epochs) == 1 and math.isfinite(result.epochs[0].train_loss)
    return learn, seen, result.final_metric


def test_adam_with_label_smoothing_and_mixup(splits: Splits) -> None:
    learn, seen, metric = train(splits, optimizer="adam", label_smoothing=0.2, mixup=0.4, beta2=0.999)
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropyFlat) and learn.loss_func.eps == 0.2
    assert isinstance(seen.mixer, MixUp) and seen.mixer.distrib.concentration1.item() == pytest.approx(0.4)
    assert learn.opt.hypers[0]["sqr_mom"] == 0.999
    # one cycle: momentum goes 0.95 -> 0.85 -> 0.95 (fastai's default cycle) while lr rises and falls
    assert max(seen.mom_seen) == pytest.approx(0.95) and min(seen.mom_seen) == pytest.approx(0.85, abs=0.02)
    assert max(seen.lr_seen) == pytest.approx(5e-3, rel=0.1) and seen.lr_seen[0] < 5e-3 / 10
    assert 0.0 <= metric <= 1.0


def test_sgd_flat_fit_at_its_momentum(splits: Splits) -> None:
    learn, seen, _ = train(splits, optimizer="sgd", one_cycle=False, momentum=0.8)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat) and seen.mixer is None
    assert "sqr_mom" not in learn.opt.hypers[0]  # fastai's SGD has no second moment
    assert set(seen.mom_seen) == {0.8} and set(seen.lr_seen) == {5e-3}  # flat: no schedule


def test_ranger_with_cutmix_and_a_lower_momentum_cycle(splits: Splits) -> None:
    learn, seen, _ = train(splits, optimizer="ranger", cutmix=1.0, momentum=0.9)
    assert isinstance(learn.opt, Lookahead)  # fastai's ranger: RAdam inside Lookahead
    assert isinstance(seen.mixer, CutMix)
    assert max(seen.mom_seen) == pytest.approx(0.9) and min(seen.mom_seen) == pytest.approx(0.9 * 0.85 / 0.95, abs=0.02)


@pytest.mark.parametrize("optimizer", ["rmsprop", "lamb"])
def test_the_other_fastai_optimizers_train(splits: Splits, optimizer: str) -> None:
    learn, _, metric = train(splits, optimizer=optimizer, beta2=0.98)
    assert type(learn.opt).__name__ == "Optimizer" and learn.opt.hypers[0]["sqr_mom"] == 0.98
    steps = {getattr(cb, "func", cb).__name__ for cb in learn.opt.cbs}  # fastai's optimizer steps, some partials
    assert {"rmsprop": "rms_prop_step", "lamb": "lamb_step"}[optimizer] in steps
    assert 0.0 <= metric <= 1.0


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"optimizer": {"values": ["adam", "Adamw"]}}, "parameters.optimizer: 'Adamw' is not one of adam, sgd, rmsprop"),
        ({"one_cycle": {"values": [1, 0]}}, "parameters.one_cycle: 1 is not true or false"),
        ({"one_cycle": {"min": 0, "max": 1}}, "parameters.one_cycle: one_cycle is true or false"),
        ({"mixup": {"values": [0, 0.4]}, "cutmix": {"value": 1.0}}, "parameters.mixup and parameters.cutmix: a trial mixes"),
        ({"momentum": {"value": 1.0}}, "parameters.momentum: 1.0 is above the allowed range (< 1)"),
    ],
)
def test_knob_values_that_cannot_train_get_one_line(parameters: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(tiny_spec(parameters=parameters))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
