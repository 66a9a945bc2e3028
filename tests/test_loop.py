"""The training loop's own parts (issue 23): TrialLearner dispatches fastai's events exactly as
fastai's Learner does, and the losses compute fastai's values on plain tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_spec
from fastai.callback.core import Callback, CancelBatchException
from fastai.callback.mixup import MixUp
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.torch_core import TensorBase

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.recipe.halving import DivergenceGuard
from kmnist_tune.training.loop import TrialLearner
from kmnist_tune.training.optim import CrossEntropy, LabelSmoothingCrossEntropy
from kmnist_tune.training.splits import Splits
from kmnist_tune.training.train import EpochLog, StopOnRequest, build_learner, fit

CPU = torch.device("cpu")


class Trace(Callback):
    """Writes each event it handles, with the learner's phase and batch, into a shared list."""

    def __init__(self, name: str, events: list[tuple[str, ...]], order: int, *, valid: bool = True) -> None:
        self.label, self.events, self.order, self.run_valid = name, events, order, valid

    def _note(self, event: str) -> None:
        self.events.append((self.label, event, str(self.learn.training), str(getattr(self.learn, "iter", -1))))


TRACED = ("before_fit", "before_batch", "after_loss", "after_batch", "after_epoch", "after_fit")
for _event in TRACED:  # a method per event: the dispatch looks for the methods a callback has
    setattr(Trace, _event, lambda self, e=_event: self._note(e))


class SkipEveryThird(Callback):
    """Cancels every third training batch before its loss, as a callback may."""

    order = 1

    def after_pred(self) -> None:
        if self.training and self.iter % 3 == 2:
            raise CancelBatchException()


class StopsItself(Callback):
    """Switches itself off (run = False) after two batches; fastai switches it back on after the fit."""

    order = 3

    def before_fit(self) -> None:
        self.calls = 0

    def after_batch(self) -> None:
        self.calls += 1
        if self.calls == 2:
            self.run = False


def traced(cls: type[Learner], splits: Splits) -> tuple[list[tuple[str, ...]], StopsItself]:
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 5e-3}, "epochs": {"value": 2}}))
    params = {**spec.fixed_params(), "batch_size": 64}
    built, name = build_learner(splits, params, CPU, "accuracy")
    learn = cls(built.dls, built.model, loss_func=built.loss_func, opt_func=built.opt_func, metrics=built.metrics)
    learn.logger = lambda *a, **k: None
    events: list[tuple[str, ...]] = []
    stops = StopsItself()
    cbs = [Trace("late", events, 70), Trace("early", events, -5), Trace("train-only", events, 20, valid=False), SkipEveryThird()]
    fit(learn, params, EpochLog(name), [*cbs, stops, DivergenceGuard(spec.halving), StopOnRequest(lambda: False)])
    return events, stops


def test_trial_learner_dispatches_what_fastai_dispatches_in_its_order(small_splits: Splits) -> None:
    theirs, their_stops = traced(Learner, small_splits)
    ours, our_stops = traced(TrialLearner, small_splits)
    assert ours == theirs
    assert len(theirs) > 100 and {e[1] for e in theirs} == {
        "before_fit",
        "before_batch",
        "after_loss",
        "after_batch",
        "after_epoch",
        "after_fit",
    }
    assert ("train-only", "before_batch", "False", "0") not in ours  # run_valid=False: training batches only
    assert our_stops.run and our_stops.calls == 2  # switched off after 2 batches, back on after the fit


def test_the_trial_learner_exports_without_its_dispatch_lists(small_splits: Splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 5e-3}}))
    params = {**spec.fixed_params(), "batch_size": 64}
    learn, name = build_learner(small_splits, params, CPU, "accuracy")
    assert isinstance(learn, TrialLearner)
    fit(learn, params, EpochLog(name), [StopOnRequest(lambda: False)])
    learn._kt_dispatch = {("before_batch", ()): [StopOnRequest(lambda: False)]}  # as if a fit had left some
    assert "_kt_dispatch" not in learn.__getstate__()
    learn.export(tmp_path / "learner.pkl")
    assert (tmp_path / "learner.pkl").stat().st_size > 1_000_000


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(CrossEntropy(), CrossEntropyLossFlat()), (LabelSmoothingCrossEntropy(eps=0.2), LabelSmoothingCrossEntropyFlat(eps=0.2))],
    ids=["cross-entropy", "label smoothing"],
)
def test_the_losses_are_fastais_on_plain_tensors(ours: object, theirs: object) -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(32, 10, requires_grad=True), torch.randint(0, 10, (32,))
    mine, fastais = ours(logits, target), theirs(logits, target)  # type: ignore[operator]
    assert type(mine) is torch.Tensor and isinstance(fastais, TensorBase)
    assert mine.item() == pytest.approx(fastais.item(), rel=1e-6)
    (g_mine,) = torch.autograd.grad(mine, logits)
    (g_fastai,) = torch.autograd.grad(fastais, logits)
    torch.testing.assert_close(g_mine, g_fastai.as_subclass(torch.Tensor))
    torch.testing.assert_close(ours.activation(logits), theirs.activation(logits))  # type: ignore[attr-defined]
    assert torch.equal(ours.decodes(logits), theirs.decodes(logits))  # type: ignore[attr-defined]


def test_mixup_mixes_the_plain_loss(small_splits: Splits) -> None:
    """MixUp swaps in its own loss around ours (with reduction 'none'); a fit runs and its loss is finite."""
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 5e-3}, "mixup": {"value": 0.4}, "label_smoothing": {"value": 0.1}}))
    params = {**spec.fixed_params(), "batch_size": 64}
    learn, name = build_learner(small_splits, params, CPU, "accuracy")
    mixed: list[object] = []

    class Look(Callback):
        order = 90

        def after_loss(self) -> None:
            if self.training:
                mixed.append(getattr(self.learn.loss_func, "__self__", None))
                assert type(self.learn.loss) is torch.Tensor

    result = fit(learn, params, EpochLog(name), [Look()])
    assert mixed and all(isinstance(m, MixUp) for m in mixed)
    assert result.epochs and torch.isfinite(torch.tensor(result.epochs[0].train_loss))


@pytest.mark.parametrize("device_path", [False, True], ids=["host floats", "device tensors"])
def test_the_smoothed_loss_is_fastais_kept_where_the_loss_is(small_splits: Splits, device_path: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On the device path (a GPU's; run here on CPU tensors) fastai's float32 lerp bit for bit, on a CPU
    the same lerp on Python floats, within float32 rounding of fastai's."""
    from types import SimpleNamespace

    from fastai.learner import AvgSmoothLoss

    from kmnist_tune.training import devices
    from kmnist_tune.training.loop import DeviceSmoothLoss

    learn, _ = build_learner(small_splits, parse_spec(tiny_spec()).fixed_params(), CPU, "accuracy")
    assert isinstance(learn.recorder.smooth_loss, DeviceSmoothLoss) and learn.recorder.smooth_loss.beta == 0.98
    if device_path:
        monkeypatch.setattr(devices, "HOST_DEVICES", frozenset())
    theirs, ours = AvgSmoothLoss(), DeviceSmoothLoss()
    torch.manual_seed(0)
    for _ in range(50):
        batch = SimpleNamespace(loss=torch.rand(32) * 3)  # what fastai's Recorder hands the metric
        theirs.accumulate(batch)
        ours.accumulate(batch)
        if device_path:
            assert isinstance(ours.value, torch.Tensor) and ours.value.item() == theirs.value.item()
        else:
            assert isinstance(ours.value, float) and ours.value == pytest.approx(theirs.value.item(), rel=1e-6)
    ours.reset()
    assert ours.count == 0 and float(ours.val) == 0.0


def test_the_trial_callbacks_record_what_fastais_record(small_splits: Splits) -> None:
    """TrialTrainEval and TrialRecorder (with DeviceSmoothLoss), in the place of fastai's
    TrainEvalCallback, Recorder and CastToTensor: the same fit records the same numbers (the smoothed
    losses, on Python floats on a CPU, within float32 rounding), the rest bit for bit."""
    from fastai.callback.core import TrainEvalCallback
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import CastToTensor, Recorder

    from kmnist_tune.training.loop import TrialRecorder, TrialTrainEval

    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 5e-3}, "epochs": {"value": 2}, "optimizer": {"value": "sgd"}}))
    params = spec.fixed_params()
    ours, _ = build_learner(small_splits, params, CPU, "accuracy")
    built, _ = build_learner(small_splits, params, CPU, "accuracy")  # the same seed: the same initial model
    theirs = Learner(built.dls, built.model, loss_func=built.loss_func, opt_func=built.opt_func, metrics=built.metrics)
    theirs.logger = ours.logger
    theirs.remove_cb(ProgressCallback)  # a display only; build_learner takes it out too
    kinds = {type(cb) for cb in theirs.cbs}
    assert {TrainEvalCallback, Recorder, CastToTensor} <= kinds
    assert {TrialTrainEval, TrialRecorder} <= {type(cb) for cb in ours.cbs} and CastToTensor not in {type(cb) for cb in ours.cbs}
    assert ours.recorder is ours.cbs.filter(lambda cb: isinstance(cb, TrialRecorder))[0] and ours.train_eval
    for learn in (ours, theirs):
        torch.manual_seed(0)  # the same dropout draws
        learn.fit(2, float(params["lr"]), wd=float(params["weight_decay"]))
    r_ours, r_theirs = ours.recorder, theirs.recorder
    assert len(r_ours.losses) == 20
    # float32 rounding compounds over the smoothing's steps (1.003e-6 seen once): 1e-5 is still far
    # below any real difference (a changed batch or weight moves it by percents).
    assert [float(x) for x in r_ours.losses] == pytest.approx([float(x) for x in r_theirs.losses], rel=1e-5)
    assert r_ours.lrs == r_theirs.lrs and r_ours.iters == r_theirs.iters
    assert list(r_ours.metric_names) == list(r_theirs.metric_names)
    assert len(r_ours.values) == len(r_theirs.values) == 2
    for row_ours, row_theirs in zip(r_ours.values, r_theirs.values, strict=True):
        assert [float(v) for v in row_ours] == pytest.approx([float(v) for v in row_theirs], rel=1e-6)
    assert (ours.train_iter, ours.pct_train) == (theirs.train_iter, theirs.pct_train)


def test_the_one_cycle_phases_are_fastais_schedule() -> None:
    from fastai.callback.schedule import combined_cos

    from kmnist_tune.training.optim import Phases, one_cycle_scheduler

    for pct in (0.25, 0.3, 0.1):
        sched = one_cycle_scheduler(1e-2, pct, (0.95, 0.85, 0.95)).scheds
        fastai_lr, fastai_mom = combined_cos(pct, 1e-2 / 25, 1e-2, 1e-2 / 1e5), combined_cos(pct, 0.95, 0.85, 0.95)
        for i in range(1000):
            pos = i / 1000
            assert sched["lr"](pos) == pytest.approx(float(fastai_lr(pos)), rel=1e-6, abs=1e-8), (pct, pos)
            assert sched["mom"](pos) == pytest.approx(float(fastai_mom(pos)), rel=1e-6), (pct, pos)
    assert isinstance(sched["lr"], Phases)


def test_the_validation_metrics_are_fastais_summed_where_the_batches_are() -> None:
    """DeviceAvgLoss, DeviceAccuracy and balanced_accuracy over the same batches as fastai's AvgLoss,
    AvgMetric(accuracy) and BalancedAccuracy: the same values; their sums stay tensors on the batches'
    device until the value is asked for (fastai's are on the host after every batch). The accuracy is
    the exact fraction of right answers (fastai's is a float32 mean of batch means)."""
    from types import SimpleNamespace

    from fastai.learner import AvgLoss, AvgMetric
    from fastai.metrics import BalancedAccuracy, accuracy

    from kmnist_tune.training.loop import DeviceAccuracy, DeviceAvgLoss, balanced_accuracy

    pairs = [
        (DeviceAvgLoss(), AvgLoss()),
        (DeviceAccuracy(), AvgMetric(accuracy)),
        (balanced_accuracy(), BalancedAccuracy()),
    ]
    torch.manual_seed(0)
    for ours, theirs in pairs:
        ours.reset()
        theirs.reset()
    for bs in (32, 32, 17):  # a short last batch: the sums weigh by batch size
        pred, y = torch.randn(bs, 10), torch.randint(0, 10, (bs,))
        batch = SimpleNamespace(pred=pred, yb=(y,), y=y, loss=torch.nn.functional.cross_entropy(pred, y, reduction="none"))
        batch.to_detach = lambda b, cpu=True, gather=True: b.detach().cpu()
        for ours, theirs in pairs:
            ours.accumulate(batch)
            theirs.accumulate(batch)
    assert isinstance(pairs[0][0].total, torch.Tensor) and isinstance(pairs[1][0].total, torch.Tensor)
    for ours, theirs in pairs:
        assert ours.name == theirs.name
        assert float(ours.value) == pytest.approx(float(theirs.value), rel=1e-6), ours.name
    assert 0 < float(pairs[2][0].value) < 1
    right = int(pairs[1][0].total)
    assert type(pairs[1][0].value) is float and pairs[1][0].value == right / 81  # exactly right/total, no float32
