"""The training loop's own parts (issue 23): TrialLearner dispatches fastai's events exactly as
fastai's Learner does, and the losses compute fastai's values on plain tensors. The parity checks run
on both loops a trial may use (`performance: {loop: fast|fastai}`, issue 35), each against a plain
fastai Learner; on a fastai whose internals the fast loop cannot use, it falls back to fastai's own."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FIXTURE, REPO, tiny_spec
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


LOOPS = ["fast", "fastai"]


def traced(loop: str | None, splits: Splits) -> tuple[list[tuple[str, ...]], StopsItself]:
    """A fit traced on the Learner build_learner makes for `loop`, or (None) on a plain fastai Learner."""
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 5e-3}, "epochs": {"value": 2}}))
    params = {**spec.fixed_params(), "batch_size": 64}
    learn, name = build_learner(splits, params, CPU, "accuracy", performance={"loop": loop or "fastai"})
    if loop is None:
        learn = Learner(learn.dls, learn.model, loss_func=learn.loss_func, opt_func=learn.opt_func, metrics=learn.metrics)
        learn.logger = lambda *a, **k: None
    events: list[tuple[str, ...]] = []
    stops = StopsItself()
    cbs = [Trace("late", events, 70), Trace("early", events, -5), Trace("train-only", events, 20, valid=False), SkipEveryThird()]
    fit(learn, params, EpochLog(name), [*cbs, stops, DivergenceGuard(spec.halving), StopOnRequest(lambda: False)])
    return events, stops


@pytest.fixture(scope="module")
def fastais_trace(small_splits: Splits) -> tuple[list[tuple[str, ...]], StopsItself]:
    return traced(None, small_splits)  # once for both loops


@pytest.mark.parametrize("loop", LOOPS)
def test_trial_learner_dispatches_what_fastai_dispatches_in_its_order(small_splits: Splits, fastais_trace, loop: str) -> None:  # type: ignore[no-untyped-def]
    theirs, _ = fastais_trace
    ours, our_stops = traced(loop, small_splits)
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


RECORD_PARAMS = {"lr": {"value": 5e-3}, "epochs": {"value": 2}, "optimizer": {"value": "sgd"}, "batch_size": {"value": 64}}


def recorded_fit(learn: Learner, params: dict) -> Learner:  # type: ignore[type-arg]
    torch.manual_seed(0)  # the same dropout draws
    learn.fit(2, float(params["lr"]), wd=float(params["weight_decay"]))
    return learn


@pytest.fixture(scope="module")
def fastais_record(small_splits: Splits) -> Learner:
    """fastai's own Learner, callbacks and metric (AvgMetric(accuracy)) over the model, data, loss and
    optimizer a trial builds: the reference both loops are held to, fitted once."""
    from fastai.callback.progress import ProgressCallback
    from fastai.metrics import accuracy

    params = parse_spec(tiny_spec(parameters=RECORD_PARAMS)).fixed_params()
    built, _ = build_learner(small_splits, params, CPU, "accuracy")  # the same seed: the same initial model
    theirs = Learner(built.dls, built.model, loss_func=built.loss_func, opt_func=built.opt_func, metrics=accuracy)
    theirs.logger = built.logger
    theirs.remove_cb(ProgressCallback)  # a display only; build_learner takes it out too
    return recorded_fit(theirs, params)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_trial_callbacks_record_what_fastais_record(small_splits: Splits, fastais_record: Learner, loop: str) -> None:
    """`loop: fast`: TrialTrainEval and TrialRecorder (with DeviceSmoothLoss) and DeviceAccuracy, in the
    place of fastai's TrainEvalCallback, Recorder, CastToTensor and accuracy: the same fit records the same
    numbers (the smoothed losses, on Python floats on a CPU, within float32 rounding), the rest bit for
    bit. `loop: fastai`: fastai's own Learner, callbacks and metric, the same numbers exactly."""
    from fastai.callback.core import TrainEvalCallback
    from fastai.learner import CastToTensor, Recorder

    from kmnist_tune.training.loop import TrialRecorder, TrialTrainEval

    params = parse_spec(tiny_spec(parameters=RECORD_PARAMS)).fixed_params()
    ours, _ = build_learner(small_splits, params, CPU, "accuracy", performance={"loop": loop})
    theirs = fastais_record
    kinds = {type(cb) for cb in ours.cbs}
    if loop == "fast":
        assert isinstance(ours, TrialLearner) and {TrialTrainEval, TrialRecorder} <= kinds and CastToTensor not in kinds
        assert ours.recorder is ours.cbs.filter(lambda cb: isinstance(cb, TrialRecorder))[0] and ours.train_eval
    else:
        assert type(ours) is Learner and {TrainEvalCallback, Recorder, CastToTensor} <= kinds
        assert type(ours.recorder) is Recorder and ours.kt_performance.loop == "fastai"
    recorded_fit(ours, params)
    r_ours, r_theirs = ours.recorder, theirs.recorder
    assert len(r_ours.losses) == 10
    if loop == "fast":
        # float32 rounding compounds over the smoothing's steps (1.003e-6 seen once): 1e-5 is still far
        # below any real difference (a changed batch or weight moves it by percents).
        assert [float(x) for x in r_ours.losses] == pytest.approx([float(x) for x in r_theirs.losses], rel=1e-5)
    else:
        assert [float(x) for x in r_ours.losses] == [float(x) for x in r_theirs.losses]
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


# -- `performance: {loop: fastai}`, and the fast loop's fallback to it (issue 35) ----------------------


def test_the_spec_names_the_loop() -> None:
    from kmnist_tune.contract.spec import SpecError

    assert parse_spec(tiny_spec()).performance.loop == "fast"
    assert parse_spec(tiny_spec(performance={"loop": "fastai"})).performance.loop == "fastai"
    with pytest.raises(SpecError) as e:
        parse_spec(tiny_spec(performance={"loop": "slow"}))
    assert "performance.loop" in str(e.value) and "\n" not in str(e.value).strip()


def test_a_changed_fastai_internal_is_named(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What the check finds on a fastai unlike the pinned one: a missing name, a method of another
    shape, a changed event list, state a Recorder no longer has (the real classes, patched here only)."""
    import fastai.callback.core
    from fastai.learner import Recorder

    from kmnist_tune.training.loop import FASTAI_INTERNALS, fast_loop_problem_now

    assert fast_loop_problem_now() is None  # the fastai installed: the one the pin names
    assert "fastai.learner.Learner._call_one" in FASTAI_INTERNALS
    with monkeypatch.context() as m:
        m.setattr(Learner, "_set_device", lambda self, b, device: b)
        assert fast_loop_problem_now() == "fastai.learner.Learner._set_device now takes (self, b, device), not (self, b)"
    with monkeypatch.context() as m:
        m.delattr(fastai.callback.core, "_inner_loop")
        assert fast_loop_problem_now() == "fastai.callback.core._inner_loop is missing"
    with monkeypatch.context() as m:
        m.setattr(fastai.callback.core, "_inner_loop", ["before_fit"])
        assert fast_loop_problem_now() == "fastai.callback.core._inner_loop no longer lists the batch events"
    with monkeypatch.context() as m:
        m.setattr(Recorder, "__init__", lambda self, add_time=True, train_metrics=False, valid_metrics=True, beta=0.98: None)
        assert fast_loop_problem_now() == "fastai's Recorder no longer has `add_time`"
    assert fast_loop_problem_now() is None


# A fastai release that folded Learner._split into one_batch: fastai's own loop still works, and the
# fast loop's override of `_split` would no longer be called. Applied before our package is imported.
_NO_SPLIT = """
import fastai.learner as fl

def one_batch(self, i, b):
    self.iter = i
    b = self._set_device(b)
    n = getattr(self.dls, "n_inp", 1 if len(b) == 1 else len(b) - 1)
    self.xb, self.yb = b[:n], b[n:]
    self._with_events(self._do_one_batch, "batch", fl.CancelBatchException)

fl.Learner.one_batch = one_batch
del fl.Learner._split
"""


def test_a_fastai_without_an_internal_trains_on_its_own_loop_with_one_line() -> None:
    """In a fresh process whose fastai lacks `Learner._split`: importing the package works; a Learner
    for `loop: fastai` says nothing; then two for the default `loop: fast` are fastai's own, with one line
    on stderr saying why, and the trial trains and records its epoch."""
    spec = tiny_spec(data={"train_size": 64, "valid_size": 32})
    script = _NO_SPLIT + textwrap.dedent(f"""
        import sys

        import torch
        from fastai.learner import Learner
        from kmnist_tune.contract.load import parse_spec
        from kmnist_tune.training.splits import load_splits
        from kmnist_tune.training.train import EpochLog, build_learner, fit

        torch.set_num_threads(1)
        spec = parse_spec({spec!r})
        splits = load_splits(spec.data, {str(FIXTURE)!r}, download=False)
        params = spec.fixed_params()
        build_learner(splits, params, torch.device("cpu"), "accuracy", performance={{"loop": "fastai"}})
        print("built for loop: fastai", file=sys.stderr, flush=True)
        for _ in range(2):
            learn, name = build_learner(splits, params, torch.device("cpu"), "accuracy", performance=spec.performance)
        assert type(learn) is Learner and learn.kt_performance.loop == "fastai", type(learn)
        result = fit(learn, params, EpochLog(name))
        print("epochs", len(result.epochs), result.epochs[0].metric)
    """)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epochs 1 " in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0] == "built for loop: fastai", lines
    line = lines[1]
    assert line.startswith("warning: fastai 2.") and "fastai.learner.Learner._split is missing" in line
    assert "trials train with fastai's own loop" in line and "`performance: {loop: fastai}`" in line


def test_a_trial_on_fastais_loop_keeps_every_trial_feature(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`loop: fastai` through the recipe's Objective, in bf16: fastai's own Learner and Recorder; the
    divergence guard sees a non-finite loss at batch size 32 and the trial is halved to 16; each epoch is
    reported to Optuna once, a checkpoint is stored after the first, and the pruner stops it after the
    second. Then fastai's LR finder on the same loop."""
    import io

    import optuna
    from fastai.learner import Recorder

    from kmnist_tune.observe.progress import Reporter
    from kmnist_tune.recipe.objective import Objective
    from kmnist_tune.training.splits import load_splits
    from kmnist_tune.training.train import find_lr

    seen: dict[str, set] = {"learner": set(), "recorder": set(), "pred": set()}  # type: ignore[type-arg]

    class NaNAbove16(Callback):
        order = 4  # before the guard (5), as a loss gone bad would reach it; before MixedPrecision (10) casts

        def after_pred(self) -> None:
            learn = self.learn
            seen["learner"].add(type(learn))
            seen["recorder"].add(type(learn.recorder))
            seen["pred"].add(learn.pred.dtype)

        def after_loss(self) -> None:
            learn = self.learn
            if learn.training and learn.yb[0].shape[0] > 16:
                learn.loss = torch.full_like(learn.loss, math.nan)

    spec = parse_spec(
        tiny_spec(
            "fastai-loop",
            data={"train_size": 128, "valid_size": 64},  # 8 batches an epoch at 16: what is tested is the plumbing
            parameters={"lr": {"value": 5e-3}, "epochs": {"value": 3}, "batch_size": {"initial": 32, "min": 8}},
            performance={"loop": "fastai", "precision": "bf16"},
            checkpoints={"enabled": True, "min_interval_s": 0},
            halving={"warmup_batches": 100},  # the smoothed-loss rules off: only the injected loss halves
        )
    )
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'loop.db'}",
        study_name="loop",
        direction="maximize",
        pruner=optuna.pruners.ThresholdPruner(lower=1.01, n_warmup_steps=2),  # prunes at step 2 (the second epoch)
    )
    splits = load_splits(spec.data, FIXTURE, download=False)
    study.optimize(Objective(spec, splits, CPU, Reporter(io.StringIO()), extra_cbs=lambda: [NaNAbove16()]), n_trials=1)
    trial = study.trials[0]
    assert seen == {"learner": {Learner}, "recorder": {Recorder}, "pred": {torch.bfloat16}}
    events = trial.user_attrs["halving_events"]
    assert [(e["from_bs"], e["to_bs"], e["reason"]) for e in events] == [(32, 16, "non_finite")]
    assert trial.user_attrs["batch_size_used"] == 16
    assert trial.user_attrs["loop"] == "fastai"  # recorded on the trial
    assert trial.state == optuna.trial.TrialState.PRUNED and set(trial.intermediate_values) == {1, 2}
    assert all(0 <= v <= 1 for v in trial.intermediate_values.values())
    assert trial.user_attrs["checkpoint"]["meta"] and trial.user_attrs["checkpoint"]["batch_size"] == 16

    params = {**spec.fixed_params(), "batch_size": 32}
    learn, _ = build_learner(splits, params, CPU, "accuracy", performance={"loop": "fastai"})
    curve = find_lr(learn, num_it=12)
    assert type(learn) is Learner and len(curve.lrs) == len(curve.losses) == 12
    assert all(math.isfinite(v) and v > 0 for v in curve.suggestions.values())
