"""The batch-halving rule on real training: divergence, out-of-memory, the floor."""

from __future__ import annotations

import gc
import io
import weakref
from pathlib import Path

import optuna
import pytest
import torch
from fastai.callback.core import Callback

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.observe.progress import Reporter
from kmnist_tune.recipe.halving import train_with_halving, trend_detail
from kmnist_tune.recipe.objective import Objective

pytestmark = pytest.mark.filterwarnings("ignore")
# `splits`: the fixture's images as tiny_spec splits them, loaded once per run (shared_trained.py).


def make_spec(lr: float, *, min_bs: int = 8, epochs: int = 1, halve_on: list[str] | None = None, **halving: float):
    return parse_spec(
        {
            "halving": halving,
            "name": "halving",
            "data": {"dataset": "kmnist", "valid_fraction": 0.2},
            "parameters": {
                "arch": "resnet18",
                "epochs": epochs,
                "lr": lr,
                "batch_size": {"initial": 32, "min": min_bs, "halve_on": halve_on or ["divergence", "oom"]},
            },
            "pruner": "none",
            "budget": {"n_trials": 1},
        }
    )


def run_trial(spec, splits, tmp_path: Path, extra_cbs=None) -> optuna.trial.FrozenTrial:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'h.db'}", study_name="h", direction="maximize")
    objective = Objective(spec, splits, torch.device("cpu"), Reporter(io.StringIO()), extra_cbs=extra_cbs)
    study.optimize(objective, n_trials=1)
    return study.trials[0]


def test_absurd_lr_diverges_is_halved_and_stops_at_the_floor(splits, tmp_path: Path) -> None:
    trial = run_trial(make_spec(lr=50.0, min_bs=8), splits, tmp_path)
    events = trial.user_attrs["halving_events"]
    assert [(e["from_bs"], e["to_bs"]) for e in events] == [(32, 16), (16, 8), (8, None)]
    assert all(e["reason"] in ("non_finite", "blowup", "no_trend") for e in events)
    assert all(e["epoch"] == 0 and e["batch"] >= 0 and e["detail"] for e in events)
    assert trial.user_attrs["attempts"] == 3
    assert trial.user_attrs["batch_size_used"] == 8
    # Reaching the floor ends the trial as PRUNED (samplers learn from it) with the reason recorded.
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "batch size 8, the minimum" in trial.user_attrs["stopped"]
    assert trial.intermediate_values == {}  # no diverged epoch was ever reported


def test_sane_lr_is_not_halved(splits, tmp_path: Path) -> None:
    trial = run_trial(make_spec(lr=5e-3), splits, tmp_path)
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["halving_events"] == []
    assert trial.user_attrs["attempts"] == 1
    assert trial.user_attrs["batch_size_used"] == 32
    assert trial.value > 0.1


class InjectOOM(Callback):
    """The one place an out-of-memory error is injected (there is no GPU here): any batch larger
    than `limit` raises exactly what CUDA raises, from inside fastai's training loop."""

    def __init__(self, limit: int):
        self.limit = limit

    def before_batch(self) -> None:
        if self.training and self.xb[0].shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: batch {self.xb[0].shape[0]} > {self.limit})")


def test_oom_halves_until_it_fits_and_records_it(small_splits, tmp_path: Path) -> None:
    # 320 images, the no-trend rule off: what is tested is the out-of-memory path.
    spec = make_spec(lr=5e-3, trend_drop=0.0)
    trial = run_trial(spec, small_splits, tmp_path, extra_cbs=lambda: [InjectOOM(limit=16)])
    assert trial.state == optuna.trial.TrialState.COMPLETE
    events = trial.user_attrs["halving_events"]
    assert [(e["from_bs"], e["to_bs"], e["reason"]) for e in events] == [(32, 16, "oom")]
    assert "out of memory" in events[0]["detail"]
    assert trial.user_attrs["batch_size_used"] == 16
    assert trial.user_attrs["attempts"] == 2
    assert set(trial.intermediate_values) == {1}


def test_failed_attempt_memory_is_released_before_the_retry(small_splits) -> None:
    """The model of an attempt that ran out of memory is garbage by the time the next one starts
    (fit alone, no divergence guard: 320 training images are enough)."""
    splits = small_splits
    from kmnist_tune.training.train import EpochLog, build_learner, fit

    spec = make_spec(lr=5e-3)
    models: list[weakref.ref] = []
    alive_at_start: list[bool] = []

    def attempt(bs: int):
        gc.collect()
        alive_at_start.append(any(r() is not None for r in models))
        params = {**spec.fixed_params(), "batch_size": bs}
        learn, name = build_learner(splits, params, torch.device("cpu"), "accuracy")
        models.append(weakref.ref(learn.model))
        return fit(learn, params, EpochLog(name), [InjectOOM(limit=8)])

    out = train_with_halving(attempt, 32, spec.halving)
    assert [e.to_bs for e in out.events] == [16, 8]
    assert out.batch_size == 8 and out.result.epochs
    assert alive_at_start == [False, False, False]


def test_oom_is_not_caught_when_not_asked_for(splits, tmp_path: Path) -> None:
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_trial(make_spec(lr=5e-3, halve_on=["divergence"]), splits, tmp_path, extra_cbs=lambda: [InjectOOM(limit=16)])


def test_a_restarted_attempt_does_not_re_report_steps(small_splits, tmp_path: Path) -> None:
    """Epoch 0 is reported by the first attempt; an OOM injected in epoch 1 restarts training at half
    the batch size; the restart's epoch 0 is not reported again, its epoch 1 is. The smoothed-loss
    checks are off (a warm-up longer than an epoch): at batch size 16 an epoch of 320 images is 16
    batches, past the default warm-up, and on one thread its loss rose (no_trend), halving it again;
    what is tested is the reporting."""

    class OOMInSecondEpoch(Callback):
        def before_batch(self) -> None:
            if self.training and self.epoch == 1 and self.xb[0].shape[0] > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected in epoch 1)")

    spec = make_spec(lr=5e-3, epochs=2, warmup_batches=1000)
    trial = run_trial(spec, small_splits, tmp_path, extra_cbs=lambda: [OOMInSecondEpoch()])
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert [(e["from_bs"], e["to_bs"]) for e in trial.user_attrs["halving_events"]] == [(32, 16)]
    assert set(trial.intermediate_values) == {1, 2}
    assert trial.intermediate_values[2] == pytest.approx(trial.value)


# -- the guard's decisions on scripted losses, on both of its paths ---------------------------------


def reference(losses: list[float], cfg, beta: float = 0.9):  # type: ignore[no-untyped-def]
    """The rule as the README states it, checked at every batch on Python floats: (reason, detail,
    batch) of the first divergence in one epoch of `losses`, or None."""
    avg, low, after_warmup, smooth = 0.0, float("inf"), None, None
    for i, loss in enumerate(losses):
        if loss != loss or loss in (float("inf"), float("-inf")):
            return "non_finite", f"loss {loss} at batch {i}", i
        n = i + 1  # every batch before a non-finite one was finite
        avg = beta * avg + (1 - beta) * loss
        smooth = avg / (1 - beta**n)
        if n == cfg.warmup_batches:
            after_warmup = smooth
        if n > cfg.warmup_batches and smooth > cfg.blowup_factor * low:
            return "blowup", f"smoothed loss {smooth:.3g} > {cfg.blowup_factor:g} x its minimum {low:.3g}", i
        low = min(low, smooth)
    if after_warmup is not None:
        drop = 1 - smooth / after_warmup
        if drop < cfg.trend_drop:
            return "no_trend", trend_detail(drop, cfg.trend_drop, after_warmup, smooth), len(losses) - 1
    return None


class Scripted:
    """The part of a fastai Learner the guard reads: the loss, the phase, the epoch and the batch."""

    def __init__(self) -> None:
        self.training, self.epoch, self.iter, self.loss = True, 0, 0, None


def guarded(losses: list[float], cfg, device_path: bool, monkeypatch):  # type: ignore[no-untyped-def]
    """One epoch of `losses` through DivergenceGuard, as fastai calls it; (reason, detail, batch) or None."""
    from kmnist_tune.recipe import halving
    from kmnist_tune.training import devices

    if device_path:  # the GPU's path (float64 tensors, values read a batch later), run on CPU tensors
        monkeypatch.setattr(devices, "HOST_DEVICES", frozenset())
    guard = halving.DivergenceGuard(cfg)
    guard.learn = Scripted()  # type: ignore[assignment]
    guard.before_fit()
    try:
        for i, loss in enumerate(losses):
            guard.learn.iter, guard.learn.loss = i, torch.tensor(loss, dtype=torch.float32)
            guard.after_loss()
        guard.before_validate()
    except halving.Diverged as d:
        assert d.epoch == 0
        return d.reason, d.detail, d.batch
    return None


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _by_a_hair(falling: list[float], at: int) -> tuple[list[float], list[float]]:
    """Two scripts that differ only in the loss at batch `at`, by one float32 step: with the larger
    the rule's smoothed loss is just above 4x its minimum there, with the smaller just below it."""
    from kmnist_tune.contract.spec import HalvingSpec

    def blows(v: float) -> bool:
        found = reference([*falling[:at], v], HalvingSpec())
        return found is not None and found[0] == "blowup"

    lo, hi = 0.0, 400.0
    while True:
        mid = f32((lo + hi) / 2)
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if blows(mid) else (mid, hi)
    assert blows(hi) and not blows(lo)
    return [*falling[:at], hi, *falling[at + 1 :]], [*falling[:at], lo, *falling[at + 1 :]]


def _scripts() -> dict[str, list[float]]:
    torch.manual_seed(3)
    falling = [f32(2.3 * 0.97**i + 0.05 * float(torch.rand(()))) for i in range(40)]
    above, below = _by_a_hair(falling, 25)
    return {
        "falling": falling,  # no divergence
        "nan mid-epoch": falling[:17] + [float("nan")] + falling[18:],
        "inf at the last batch": falling[:-1] + [float("inf")],
        "spike after the warm-up": falling[:25] + [60.0, 80.0] + falling[27:],
        "spike at the last warm-up batch": falling[:9] + [400.0] + falling[10:],  # watched from the next batch on
        "spike in the warm-up": [30.0 if i in (3, 4) else x for i, x in enumerate(falling)],
        "blowup by a hair": above,
        "no blowup by a hair": below,
        "flat": [f32(2.3 + 0.01 * float(torch.rand(()))) for _ in range(40)],
        "just under the trend drop": [f32(2.3 * 0.9985**i) for i in range(40)],
    }


@pytest.mark.parametrize("name", list(_scripts()))
@pytest.mark.parametrize("device_path", [False, True], ids=["host floats", "device tensors"])
def test_the_guard_decides_as_the_rule_at_every_batch(name: str, device_path: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Read a batch late, or on the device, the guard raises for the same batch, for the same
    reason, with the same numbers in its detail as the rule checked at once on Python floats."""
    from kmnist_tune.contract.spec import HalvingSpec

    losses = _scripts()[name]  # float32 values, what a float32 loss holds
    cfg = HalvingSpec()
    expected = reference(losses, cfg)
    assert guarded(losses, cfg, device_path, monkeypatch) == expected
    reason = expected[0] if expected else None
    wanted = {"falling": None, "nan mid-epoch": "non_finite", "inf at the last batch": "non_finite",
              "spike after the warm-up": "blowup", "spike at the last warm-up batch": "blowup",
              "blowup by a hair": "blowup", "flat": "no_trend", "just under the trend drop": "no_trend"}  # fmt: skip
    if name in wanted:  # the scripts reach the branches they are named for
        assert reason == wanted[name], expected
    if name == "spike at the last warm-up batch":
        assert expected is not None and expected[2] == 10  # not at batch 9, the warm-up's last
    if name == "no blowup by a hair":
        assert reason != "blowup" or expected[2] != 25  # type: ignore[index]


def test_the_no_trend_line_says_whether_the_loss_fell_or_rose() -> None:
    """Issue 24: a loss that rose over the first epoch is not "lowered by -0.8%"."""
    assert (
        trend_detail(0.012, 0.05, 2.31, 2.28)
        == "first epoch lowered the smoothed loss by 1.2% (a drop of 5% is needed) from 2.31 to 2.28"
    )
    assert (
        trend_detail(-0.008, 0.05, 2.3, 2.32)
        == "first epoch raised the smoothed loss by 0.8% (a drop of 5% is needed) from 2.3 to 2.32"
    )
