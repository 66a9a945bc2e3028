"""The training loop's fast paths: fastai's Learner, Recorder and callbacks doing the same work per
batch in less host time, and reading nothing back from the device.

On a small model, or a GPU fast enough, fastai's own per-batch Python sets a trial's pace
(benchmarks/bench_loop.py): callback dispatch through fastcore's `GetAttr`, lists made per batch,
attribute writes that first ask the Learner whether they shadow one of its names, and losses read
back to the host. Each class here keeps fastai's behaviour and says what it changes and why.

They override fastai internals (FASTAI_INTERNALS), checked against the fastai that pyproject.toml
pins (its upper bound is the fastai the suite ran on: tests/test_fastai_pin.py). Where one is missing or has another shape
(a newer fastai), `loop_in_use` says so in one line and the trial trains on fastai's own Learner,
Recorder and metrics, as `performance: {loop: fastai}` asks for.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import sys
from typing import Any

import fastai.callback.core
import fastai.learner
import fastcore.xtras
import torch
from fastai.callback.core import (
    Callback,
    CancelBackwardException,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
    TrainEvalCallback,
    event,
)
from fastai.callback.schedule import ParamScheduler
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss, Learner, Recorder
from fastai.metrics import AccumMetric, ActivationType, accuracy
from fastai.torch_core import find_bs, flatten_check

from . import devices

_CANCELS = (
    CancelBatchException,
    CancelBackwardException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    CancelTrainException,
    CancelValidException,
)

# What the classes below override or read of fastai's (and fastcore's) private side, with the
# parameters each callable has in the fastai they were checked against (pyproject.toml's pin).
# Looked up by name, not imported: a fastai without one still imports this module, and trains on
# its own loop (loop_in_use).
FASTAI_INTERNALS: dict[str, tuple[str, ...] | None] = {
    "fastai.callback.core._inner_loop": None,  # the events Callback.__call__ filters by run_train/run_valid
    "fastai.callback.core.Callback.__call__": ("self", "event_name"),  # what TrialLearner's dispatch repeats
    "fastai.learner.Learner.__call__": ("self", "event_name"),
    "fastai.learner.Learner._call_one": ("self", "event_name"),
    "fastai.learner.Learner._split": ("self", "b"),
    "fastai.learner.Learner._set_device": ("self", "b"),
    "fastai.learner.Learner.add_cb": ("self", "cb"),
    "fastai.learner.Learner.remove_cb": ("self", "cb"),
    "fastai.learner.Learner.__getstate__": ("self",),
    "fastai.learner.Recorder.__init__": ("self", "add_time", "train_metrics", "valid_metrics", "beta"),
    "fastai.learner.Recorder.after_batch": ("self",),
    "fastai.learner.Recorder._valid_mets": None,  # a property
    "fastai.learner.CastToTensor": None,
    "fastai.callback.core.TrainEvalCallback.before_fit": ("self",),
    "fastai.callback.core.TrainEvalCallback.after_batch": ("self",),
    "fastai.callback.schedule.ParamScheduler.__init__": ("self", "scheds"),
    "fastai.callback.schedule.ParamScheduler._update_val": ("self", "pct"),
    "fastai.callback.schedule.ParamScheduler.before_batch": ("self",),
    "fastai.callback.schedule.ParamScheduler.after_batch": ("self",),
    "fastai.metrics.AccumMetric.__init__": ("self", "func", "dim_argmax", "activation", "thresh", "to_np", "invert_arg"),
    "fastai.metrics.AccumMetric.accum_values": ("self", "preds", "targs", "learn"),
    "fastai.learner.AvgMetric.__init__": ("self", "func"),
    "fastcore.xtras.modify_exception": ("e", "msg", "replace"),
}
# The state the overrides read or write on fastai's objects, made as a Learner makes them.
_STATE = {
    "Callback": ("run", "run_train", "run_valid"),
    "Recorder": ("add_time", "train_metrics", "valid_metrics", "smooth_loss", "loss"),
    "AvgSmoothLoss": ("beta", "count", "val"),
    "AvgLoss": ("total", "count"),
    "AccumMetric": ("preds", "targs", "flatten"),
}


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _lookup(dotted: str) -> Any:
    """The object a dotted name names (module, then attributes), or raise AttributeError/ImportError."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = inspect.getattr_static(obj, name) if isinstance(obj, type) else getattr(obj, name)
        return obj
    raise ImportError(dotted)


def fast_loop_problem_now() -> str | None:
    """What keeps the fast loop from running on the fastai installed here, in a few words, or None."""
    for dotted, params in FASTAI_INTERNALS.items():
        try:
            obj = _lookup(dotted)
        except (AttributeError, ImportError):
            return f"{dotted} is missing"
        if params is None:
            continue
        fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
        try:
            sig = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return f"{dotted} is no longer a function"
        have = tuple(sig)
        # The same parameters first; any more must be optional (our calls do not pass them).
        extra = [p for p in list(sig.values())[len(params) :] if p.default is p.empty and p.kind in _POSITIONAL]
        if have[: len(params)] != params or extra:
            return f"{dotted} now takes ({', '.join(have)}), not ({', '.join(params)})"
    inner = fastai.callback.core._inner_loop
    if not isinstance(inner, list | tuple) or not {"before_batch", "after_batch"} <= set(inner):
        return "fastai.callback.core._inner_loop no longer lists the batch events"
    made = {
        "Callback": Callback(),
        "Recorder": Recorder(),
        "AvgSmoothLoss": AvgSmoothLoss(),
        "AvgLoss": _reset(AvgLoss()),
        "AccumMetric": _reset(AccumMetric(accuracy)),
    }
    for kind, names in _STATE.items():
        for name in names:
            if not hasattr(made[kind], name):
                return f"fastai's {kind} no longer has `{name}`"
    return None


def _reset(metric: Any) -> Any:
    metric.reset()
    return metric


@functools.cache
def fast_loop_problem() -> str | None:
    """fast_loop_problem_now, checked once per process."""
    try:
        return fast_loop_problem_now()
    except Exception as e:  # a check that cannot run is a problem of its own, not a crash
        first = str(e).splitlines()[0] if str(e) else ""
        return f"checking fastai's internals failed ({type(e).__name__}: {first})"


@functools.cache
def _say_fallback(problem: str) -> None:
    version = importlib.metadata.version("fastai")
    print(
        f"warning: fastai {version}: {problem} (training/loop.py's fast loop overrides it); trials train with "
        "fastai's own loop (set `performance: {loop: fastai}` to silence this)",
        file=sys.stderr,
        flush=True,
    )


def loop_in_use(asked: str) -> str:
    """The loop a trial trains with: `fast` (the classes below) or `fastai` (fastai's own Learner,
    Recorder and metrics). `fast` on a fastai whose internals the fast loop cannot use gives `fastai`,
    said once per process in one line on stderr."""
    if asked not in ("fast", "fastai"):
        raise ValueError(f"unknown loop {asked!r}; use fast or fastai")
    if asked == "fast" and (problem := fast_loop_problem()) is not None:
        _say_fallback(problem)
        return "fastai"
    return asked


class TrialCallback(Callback):
    """fastai's Callback, with plain attribute writes.

    fastai's `Callback.__setattr__` first asks the Learner whether the name shadows one of its own
    (`hasattr(learn, name)`, which fastcore's `GetAttr` sends on to the model and nn.Module answers
    by raising): microseconds per write, and the guard and the epoch log write several a batch. Our
    callbacks write only names of their own, and read the Learner's through `self.learn`."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


class TrialLearner(Learner):
    """fastai's Learner, with the same events dispatched in less time.

    fastai's `Learner._call_one` sorts every callback by order and calls each one for each of the
    dozen events of a batch, whether or not it handles that event, and each `Callback.__call__`
    resolves `training` and the handler through fastcore's `GetAttr`; with a model small enough, or a
    GPU fast enough, those ~130 calls a batch set the pace (benchmarks/bench_loop.py). Here the
    handlers of an event are listed once per event (again after every add_cb/remove_cb), in fastai's order, and
    called as `Callback.__call__` calls them: the same `run`/`run_train`/`run_valid` filter (on the
    learner's `training`), cancel exceptions passed through, other exceptions wrapped with fastai's
    message. A callback with its own `__call__` is called through it. `after_fit` still reaches every
    callback: fastai resets each one's `run` there."""

    def __call__(self, event_name: Any) -> None:
        # fastai wraps every event name in a fastcore list and maps over it; one name needs neither.
        if isinstance(event_name, str):
            self._call_one(event_name)
        else:
            super().__call__(event_name)

    def _call_one(self, event_name: str) -> None:
        if event_name == "after_fit":
            self._kt_dispatch = {}  # the fit's own callbacks are removed after it: forget them
            super()._call_one(event_name)
            return
        dispatch = self.__dict__.get("_kt_dispatch")
        if dispatch is None or dispatch.get("cbs") is not self.cbs:  # first call, or learn.cbs assigned
            dispatch = self._kt_dispatch = {"cbs": self.cbs}
        entry = dispatch.get(event_name)
        if entry is None:
            if not hasattr(event, event_name):
                raise Exception(f"missing {event_name}")  # fastai's own check and message
            handlers = [
                (cb, getattr(cb, event_name) if type(cb).__call__ is Callback.__call__ else None)
                for cb in self.cbs.sorted("order")
                if hasattr(cb, event_name)
            ]
            entry = dispatch[event_name] = (event_name in fastai.callback.core._inner_loop, handlers)
        inner, handlers = entry
        if not handlers:
            return
        training = self.__dict__.get("training", True)
        for cb, handler in handlers:
            if handler is None:
                cb(event_name)
                continue
            if not cb.run or (inner and not (cb.run_train if training else cb.run_valid)):
                continue
            try:
                handler()
            except _CANCELS:
                raise
            except Exception as e:
                # fastai's wording, its spelling included: users search for it
                what = e.args[0] if e.args else e
                msg = f"Exception occured in `{type(cb).__name__}` when calling event `{event_name}`:\n\t{what}"
                raise fastcore.xtras.modify_exception(e, msg, replace=True)  # noqa: B904  (fastai chains it the same way)

    def _split(self, b: Any) -> None:
        # fastai looks `n_inp` up on the loaders at every batch, through three levels of GetAttr;
        # within a fit it is the same (TrialTrainEval.before_fit notes it).
        i = self.__dict__.get("_kt_n_inp")
        if i is None:
            super()._split(b)
        else:
            self.xb, self.yb = b[:i], b[i:]

    def add_cb(self, cb: Any) -> Any:
        self._kt_dispatch = {}
        return super().add_cb(cb)

    def remove_cb(self, cb: Any) -> Any:
        self._kt_dispatch = {}
        return super().remove_cb(cb)

    def _set_device(self, b: Any) -> Any:
        # fastai moves every batch with `to_device`, a recursive walk; these loaders already yield
        # tensors on the model's device, which need no walk. Within a fit the model is on the
        # loaders' device (TrialTrainEval.before_fit); outside one, fastai's own check.
        dev = self.__dict__.get("_kt_fit_device")
        if dev is not None and all(isinstance(t, torch.Tensor) and t.device == dev for t in b):
            return b
        return super()._set_device(b)

    def __getstate__(self) -> dict[str, Any]:
        # learn.export pickles the Learner: not the callbacks a dispatch list holds on to.
        return {k: v for k, v in super().__getstate__().items() if k != "_kt_dispatch"}


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss (the Recorder's `train_loss`): on the GPU kept where the loss is,
    on a CPU in Python floats.

    fastai's AvgSmoothLoss moves every batch's loss to the host (`to_detach`, `.cpu()`) before it
    averages it, which on a GPU makes the host wait for the device at every batch; the same float32
    lerp on the device is read once an epoch, when the Recorder logs it. On a CPU (devices.HOST_DEVICES),
    where reading waits for nothing, the lerp is done on Python floats: a tensor op there costs more
    than the loop's whole bookkeeping of a batch (benchmarks/bench_loop.py), and the values agree with
    fastai's float32 ones to float32 rounding. (No `maybe_gather`: trials train on one device.)"""

    def accumulate(self, learn: Learner) -> None:
        self.count += 1
        loss = learn.loss
        if loss.device.type in devices.HOST_DEVICES:
            x = loss.item() if not loss.dim() else float(loss.detach().mean())
            val = self.val if isinstance(self.val, float) else float(self.val)  # reset() leaves a tensor
            self.val = x + self.beta * (val - x)  # torch.lerp(x, val, beta)
            return
        loss = loss.detach()
        if loss.dim():  # a mean-reduced loss is one number already
            loss = loss.mean()
        if not isinstance(self.val, torch.Tensor) or self.val.device != loss.device:  # reset(): on the host
            self.val = torch.as_tensor(float(self.val), dtype=loss.dtype, device=loss.device)
        self.val = torch.lerp(loss, self.val, self.beta)


class DeviceAvgLoss(AvgLoss):
    """fastai's AvgLoss (the Recorder's `valid_loss`), summed where the loss is: fastai moves every
    validation batch's loss to the host first (`to_detach`), a wait for the GPU per batch. The
    same float32 sum, read once an epoch when the Recorder logs it."""

    def accumulate(self, learn: Learner) -> None:
        bs = find_bs(learn.yb)
        self.total += learn.loss.mean().detach() * bs
        self.count += bs


class DeviceAccuracy(AvgMetric):
    """fastai's accuracy (`AvgMetric(accuracy)`: the argmax equals the target), counted as whole correct
    predictions where the predictions are, and read as correct / total in a Python float: the exact
    fraction. fastai's float32 mean of batch means stores 16 right of 100 as 0.1599999964237213."""

    def __init__(self) -> None:
        super().__init__(accuracy)

    def reset(self) -> None:
        self.total: Any = 0
        self.count = 0

    def accumulate(self, learn: Learner) -> None:
        pred, targ = flatten_check(learn.pred.argmax(dim=-1), learn.yb[0])
        self.total = self.total + (pred == targ).sum()  # an integer tensor on the device, read once an epoch
        self.count += find_bs(learn.yb)

    @property
    def value(self) -> float | None:
        return int(self.total) / self.count if self.count else None


class DeviceAccumMetric(AccumMetric):
    """fastai's AccumMetric (balanced accuracy), keeping the epoch's predictions and targets where they
    are: fastai copies each batch's to the host; here they go in one copy an epoch, when the value is
    asked for (scikit-learn computes it on the host)."""

    def accum_values(self, preds: Any, targs: Any, learn: Any = None) -> None:
        preds, targs = preds.detach(), targs.detach()
        if self.flatten:
            preds, targs = flatten_check(preds, targs)
        self.preds.append(preds)
        self.targs.append(targs)

    @property
    def value(self) -> Any:
        if self.preds and self.preds[0].device.type != "cpu":
            self.preds, self.targs = [torch.cat(self.preds).cpu()], [torch.cat(self.targs).cpu()]
        return super().value


def balanced_accuracy() -> DeviceAccumMetric:
    """fastai's `BalancedAccuracy()` (skm_to_fastai of scikit-learn's balanced_accuracy_score), on
    DeviceAccumMetric."""
    from sklearn.metrics import balanced_accuracy_score

    return DeviceAccumMetric(
        balanced_accuracy_score,
        dim_argmax=-1,
        activation=ActivationType.No,
        to_np=True,
        invert_arg=True,
        sample_weight=None,
        adjusted=False,
    )


class TrialRecorder(Recorder):
    """fastai's Recorder, with its per-batch step (`after_batch`) in less host time.

    fastai's reads the Learner's state through `GetAttr`, builds the list of metrics to update anew
    each batch, and reads the smoothed loss's `value` (a division on the device) twice. The same
    updates, in the same order, are made here with direct reads and one `value`."""

    @property
    def name(self) -> str:
        return "recorder"  # fastai's name for it (learn.recorder), which lr_find and plots read

    def after_batch(self) -> None:
        learn = self.learn
        if len(learn.yb) == 0:
            return
        if not learn.training:
            for met in self._valid_mets:
                met.accumulate(learn)
            return
        if not self.__dict__.get("cancel_train", False):
            self.smooth_loss.accumulate(learn)
            if self.train_metrics:
                for met in learn.metrics:
                    met.accumulate(learn)
        self.lrs.append(learn.opt.hypers[-1]["lr"])
        value = self.smooth_loss.value
        self.losses.append(value)
        learn.smooth_loss = value


class TrialTrainEval(TrainEvalCallback):
    """fastai's TrainEvalCallback, its per-batch counters updated without `GetAttr`."""

    @property
    def name(self) -> str:
        return "train_eval"

    def before_fit(self) -> None:
        super().before_fit()  # moves the model to the loaders' device
        learn = self.learn
        learn._kt_fit_device = next(learn.model.parameters()).device
        learn._kt_n_inp = getattr(learn.dls, "n_inp", None)  # fastai's _split: None = decide by the batch

    def after_fit(self) -> None:
        self.learn._kt_fit_device = self.learn._kt_n_inp = None

    def after_batch(self) -> None:
        learn = self.learn
        learn.pct_train += 1.0 / (learn.n_iter * learn.n_epoch)
        learn.train_iter += 1


class TrialScheduler(ParamScheduler):
    """fastai's ParamScheduler, reading the Learner's position and optimizer without `GetAttr`."""

    @property
    def name(self) -> str:
        return "param_scheduler"

    def before_batch(self) -> None:
        self._update_val(self.learn.pct_train)

    def _update_val(self, pct: float) -> None:
        opt = self.learn.opt
        for n, f in self.scheds.items():
            opt.set_hyper(n, f(pct))

    def after_batch(self) -> None:
        hypers = self.learn.opt.hypers[-1]
        for p, values in self.hps.items():
            values.append(hypers[p])


def use_trial_callbacks(learn: Learner) -> None:
    """Puts TrialTrainEval and TrialRecorder (with DeviceSmoothLoss and DeviceAvgLoss) in the place of the Learner's
    default TrainEvalCallback and Recorder, and takes out fastai's CastToTensor: these loaders and
    fastai's mixing callbacks yield plain tensors, which it would walk through (fastai's `apply`)
    twice a batch for nothing."""
    old = learn.recorder
    rec = TrialRecorder(add_time=old.add_time, train_metrics=old.train_metrics, valid_metrics=old.valid_metrics)
    rec.smooth_loss, rec.loss = DeviceSmoothLoss(beta=old.smooth_loss.beta), DeviceAvgLoss()
    cast = fastai.learner.CastToTensor
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, Recorder | TrainEvalCallback | cast)])
    learn.add_cbs([TrialTrainEval(), rec])
