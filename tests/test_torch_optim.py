"""PyTorch's multi-tensor optimizers behind fastai's OptimWrapper (training/torch_optim.py, issue 23)
take the steps fastai's own optimizers take: the same updates under changing hyper-parameters, no
decay on biases and norm layers, decoupled decay for SGD; in a real fit the same per-batch hypers
and the same loss curve; and a checkpoint's optimizer state goes back where it was."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_spec
from fastai.learner import Learner
from fastai.optimizer import Optimizer
from torch import nn

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.training.checkpoint import load_checkpoint, save_checkpoint
from kmnist_tune.training.optim import CrossEntropy, opt_func, optimizer_label, uses_torch_optimizer
from kmnist_tune.training.splits import Splits
from kmnist_tune.training.torch_optim import TorchOptimizer
from kmnist_tune.training.train import EpochLog, build_learner, fit

CPU = torch.device("cpu")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def optimizer(params: dict[str, Any], impl: str) -> tuple[nn.Module, Any]:
    """A model and the optimizer a Learner makes for it (fastai marks biases and norm layers there)."""
    model = small_model()
    learn = Learner(None, model, loss_func=CrossEntropy(), opt_func=opt_func(params, impl), lr=1e-3)
    learn.create_opt()
    return model, learn.opt


KNOBS = [
    ({"optimizer": "adam", "momentum": 0.9, "beta2": 0.99}, "torch.Adam"),
    ({"optimizer": "sgd", "momentum": 0.9}, "torch.SGD"),
    ({"optimizer": "sgd", "momentum": 0.0}, "torch.SGD"),
    ({"optimizer": "rmsprop", "momentum": 0.0, "beta2": 0.95}, "torch.RMSprop"),
]


@pytest.mark.parametrize(("knobs", "label"), KNOBS, ids=["adam", "sgd", "sgd-no-momentum", "rmsprop"])
def test_each_step_is_fastais_step(knobs: dict[str, Any], label: str) -> None:
    """Twenty steps on the same random gradients, with lr and momentum changed between steps as the
    one-cycle schedule changes them and a weight decay big enough to show: the parameters stay
    fastai's, and biases and BatchNorm's weights are not decayed."""
    params = {**parse_spec(tiny_spec()).fixed_params(), **knobs}
    theirs_model, theirs = optimizer(params, "fastai")
    ours_model, ours = optimizer(params, "torch")
    assert isinstance(theirs, Optimizer) and isinstance(ours, TorchOptimizer) and optimizer_label(ours) == label
    for opt in (theirs, ours):
        opt.set_hypers(wd=0.1)  # what Learner.fit does with the trial's weight decay
    assert len(ours.hypers) == len(theirs.hypers) == 1
    for k in ("lr", "mom", "wd") + (("sqr_mom",) if knobs["optimizer"] != "sgd" else ()):
        assert ours.hypers[0][k] == pytest.approx(theirs.hypers[0][k]), k
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        lr, mom = 1e-2 * (1 + step % 5), knobs["momentum"] * (1 - 0.01 * step)
        for opt in (theirs, ours):
            opt.set_hyper("lr", lr)
            opt.set_hyper("mom", mom)
        for p_theirs, p_ours in zip(theirs_model.parameters(), ours_model.parameters(), strict=True):
            grad = torch.randn(p_theirs.shape, generator=g)
            p_theirs.grad, p_ours.grad = grad.clone(), grad.clone()
        theirs.step()
        ours.step()
        theirs.zero_grad()
        ours.zero_grad()
    assert ours.hypers[0]["lr"] == pytest.approx(lr) and ours.hypers[0]["mom"] == pytest.approx(mom)
    for (name, p_theirs), p_ours in zip(theirs_model.named_parameters(), ours_model.parameters(), strict=True):
        torch.testing.assert_close(p_ours, p_theirs, rtol=1e-5, atol=1e-7, msg=name)


def test_biases_and_norm_layers_are_not_decayed() -> None:
    """With zero gradients SGD without momentum only decays: weights shrink by 1 - lr*wd, biases and
    BatchNorm's parameters (fastai's wd_bn_bias=False) do not move."""
    params = {**parse_spec(tiny_spec()).fixed_params(), "optimizer": "sgd", "momentum": 0.0}
    model, opt = optimizer(params, "torch")
    opt.set_hypers(wd=0.5, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        exempt = n.endswith("bias") or n.startswith("1.")  # "1." is the BatchNorm layer
        torch.testing.assert_close(p.detach(), before[n] * (1.0 if exempt else 0.95), msg=n)


def test_the_choice_of_implementation() -> None:
    base = parse_spec(tiny_spec()).fixed_params()
    assert uses_torch_optimizer({**base, "optimizer": "adam"})
    assert uses_torch_optimizer({**base, "optimizer": "sgd"})
    assert not uses_torch_optimizer({**base, "optimizer": "adam"}, "fastai")
    # fastai's RMSProp puts momentum on the raw gradient, PyTorch's on the normalised step.
    assert not uses_torch_optimizer({**base, "optimizer": "rmsprop", "momentum": 0.9})
    assert not uses_torch_optimizer({**base, "optimizer": "lamb"})
    assert not uses_torch_optimizer({**base, "optimizer": "ranger"})


def curve(splits: Splits, impl: str, optimizer_name: str) -> tuple[Any, list[float], Learner, dict[str, Any]]:
    spec = parse_spec(
        tiny_spec(
            parameters={"lr": {"value": 3e-3}, "epochs": {"value": 2}, "optimizer": {"value": optimizer_name}},
            performance={"optimizer": impl},
        )
    )
    params = spec.fixed_params()  # batch 32: ten batches an epoch of small_splits
    learn, name = build_learner(splits, params, CPU, "accuracy", performance=spec.performance)
    result = fit(learn, params, EpochLog(name))
    return learn.recorder.hps, [float(x) for x in learn.recorder.losses], learn, {"result": result, "params": params}


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_a_fit_has_fastais_hypers_and_loss_curve(small_splits: Splits, optimizer_name: str) -> None:
    """The same seeded fit (one-cycle lr and momentum, weight decay on) with fastai's optimizer and with
    PyTorch's: the same hyper-parameters at every batch, and the same smoothed loss curve. SGD's is the
    same bit for bit. Adam's steps differ from fastai's in the last float bit (where the bias
    correction's root is taken), and a resnet trained on 32-image batches turns such a bit into a
    different max-pool winner or ReLU side within a few steps; so its curve is the same at the first
    batches and within a few percent after."""
    hps_theirs, loss_theirs, learn_theirs, r_theirs = curve(small_splits, "fastai", optimizer_name)
    hps_ours, loss_ours, learn_ours, r_ours = curve(small_splits, "torch", optimizer_name)
    assert isinstance(learn_ours.opt, TorchOptimizer) and not isinstance(learn_theirs.opt, TorchOptimizer)
    assert set(hps_ours) == set(hps_theirs) == {"lr", "mom"}
    for k in hps_ours:
        assert len(hps_ours[k]) == len(hps_theirs[k]) == 20
        assert [float(v) for v in hps_ours[k]] == pytest.approx([float(v) for v in hps_theirs[k]], rel=1e-6), k
    assert len(loss_ours) == len(loss_theirs) == 20
    if optimizer_name == "sgd":
        assert loss_ours == loss_theirs
        assert r_ours["result"].final_metric == r_theirs["result"].final_metric
    else:
        assert loss_ours[0] == loss_theirs[0] and loss_ours[1] == pytest.approx(loss_theirs[1], rel=1e-5)
        assert loss_ours == pytest.approx(loss_theirs, rel=0.04)
    assert loss_ours[-1] < loss_ours[0]  # it learned
    assert math.isfinite(r_ours["result"].final_metric)


def test_a_checkpoint_brings_the_optimizer_state_back(small_splits: Splits, tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 3e-3}, "epochs": {"value": 2}}))
    params = {**spec.fixed_params(), "batch_size": 64}
    learn, name = build_learner(small_splits, params, CPU, "accuracy")
    fit(learn, params, EpochLog(name))
    weights, meta = save_checkpoint(learn, tmp_path, 0, {"seed": 0})
    saved = learn.opt.state_dict()
    assert saved["state"] and all("exp_avg" in s for s in saved["state"].values())
    info = __import__("json").loads(meta.read_text())
    assert info["optimizer"] == "torch.Adam"

    fresh, _ = build_learner(small_splits, params, CPU, "accuracy", seed=1)
    assert load_checkpoint(fresh, weights, info) == 1
    loaded = fresh.opt.state_dict()
    for k, state in saved["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["state"][k][key], value, msg=f"{k}.{key}")

    # A checkpoint of fastai's optimizer (or one from before this field) does not load into PyTorch's.
    other, _ = build_learner(small_splits, params, CPU, "accuracy", seed=1)
    with pytest.raises(ValueError, match="fastai's"):
        load_checkpoint(other, weights, {k: v for k, v in info.items() if k != "optimizer"})
