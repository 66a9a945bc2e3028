"""The training loop's own cost per batch, on the CPU: what the GPU issue (23) removes, measurable
without a GPU.

One model so small that the loop, not the arithmetic, sets the pace (a single linear layer over
the 28x28 pixels), the same device-resident batches (training/loader.py) and the same one-cycle
Adam, trained three ways:

- **kmnist-tune**: `build_learner` + `fit` with the callbacks every trial's attempt adds (the
  divergence guard, the epoch log, the stop and CPU-share callbacks): the product's loop;
- **loop: fastai**: the same trial with `performance: {loop: fastai}` (issue 35): fastai's own
  Learner, Recorder and metrics, what the fast loop falls back to on a fastai it was not checked against;
- **fastai default**: a plain `Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)`
  and `fit_one_cycle`;
- **bare PyTorch**: `for xb, yb in dls.train`, forward, `cross_entropy`, backward,
  `torch.optim.AdamW` (foreach; the trial's weight decay and fastai's eps, which is what fastai's
  Adam computes) stepped under `OneCycleLR`.

For each: microseconds per training batch (epochs after the first; median of --repeats runs) and,
in one more run, host reads per training batch: `.item()`, `float()`, `int()`, `bool()`,
`.tolist()`, `.numpy()` or `.cpu()` of a value computed from the batch (`OnDevice` below). On a CPU
a read costs little; on a GPU each one makes the host wait for every kernel queued before it, which
is what keeps a trial at the tutorial's speed there (`--where` says who makes them).

    .venv/bin/python benchmarks/bench_loop.py [--epochs 8 --bs 32 --repeats 3 --json out.json]

Target (issue 23): kmnist-tune's loop at most 1.3x the bare loop's microseconds per batch. The last
line is the fast loop's time against `loop: fastai`'s, per training batch and per whole epoch
(training and validation, as a trial's epoch record times it), measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.metrics import accuracy  # noqa: E402
from torch import nn  # noqa: E402

from kmnist_tune.contract.load import parse_spec  # noqa: E402
from kmnist_tune.contract.spec import HalvingSpec  # noqa: E402
from kmnist_tune.recipe.halving import DivergenceGuard  # noqa: E402
from kmnist_tune.training import devices  # noqa: E402
from kmnist_tune.training.splits import load_splits  # noqa: E402
from kmnist_tune.training.train import EpochLog, ShareThreads, StopOnRequest, build_learner, fit  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "kmnist-mini"
READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")


class OnDevice(torch.Tensor):
    """Marks what a counting run computes from the training batch: on a GPU those values live on the
    device, and reading one makes the host wait. torch's subclass rules carry the mark through every
    op (the model's output, the loss, the metrics); what the host makes itself (fastai's schedule
    positions, torch.optim's step counters, kept on the host on purpose) stays unmarked."""


class HostReads:
    """Counts reads of marked tensors back to the host (outermost calls only), and where they are
    made, while `active`."""

    def __init__(self) -> None:
        self.active, self.count, self._inside = False, 0, False
        self.where: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def installed(self) -> Iterator[HostReads]:
        originals = {name: getattr(torch.Tensor, name) for name in READS}

        def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
            def read(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if self._inside:  # torch's dispatch of the same read to the subclass
                    return original(t, *args, **kwargs)
                if self.active and isinstance(t, OnDevice):
                    caller = sys._getframe(1)
                    self.count += 1
                    self.where[f"{name} in {caller.f_globals.get('__name__', '?')}.{caller.f_code.co_name}"] += 1
                self._inside = True
                try:
                    return original(t, *args, **kwargs)
                finally:
                    self._inside = False

            return read

        try:
            for name, original in originals.items():
                setattr(torch.Tensor, name, counting(name, original))
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


class Phase:
    """Training-phase seconds and batches of the epochs after the first; with `reads`, a counting
    run: its batches are marked and the host reads of the same epochs counted. `epoch_s`: the whole
    epochs' seconds after the first, where the trial's epoch records time them (kmnist-tune's loops)."""

    def __init__(self, reads: HostReads | None = None) -> None:
        self.reads, self.seconds, self.batches, self.epoch = reads, 0.0, 0, 0
        self._t0 = 0.0
        self.epoch_s: list[float] = []

    def mark(self, t: torch.Tensor) -> torch.Tensor:
        return t.as_subclass(OnDevice) if self.reads is not None else t

    def start(self) -> None:
        if self.reads is not None:
            self.reads.active = self.epoch > 0
        self._t0 = time.perf_counter()

    def stop(self, batches: int) -> None:
        if self.epoch > 0:
            self.seconds += time.perf_counter() - self._t0
            self.batches += batches
        if self.reads is not None:
            self.reads.active = False
        self.epoch += 1


class Probe(Callback):
    """fastai's side of Phase: the training phase is before_train .. after_train."""

    order = -100  # first in, so the phase brackets every other callback's training work

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def before_train(self) -> None:
        self.phase.start()

    def after_train(self) -> None:
        self.phase.stop(len(self.dls.train))


class MarkedLoss:
    """A fastai loss whose result carries the mark: fastai's losses cast their inputs to TensorBase,
    which drops it."""

    def __init__(self, loss: Any, phase: Phase) -> None:
        self.loss, self.phase = loss, phase

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.phase.mark(self.loss(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loss, name)


class Mark(Callback):
    """Marks a counting run's training batch (Phase.mark), once fastai's CastToTensor (order 9) has
    cast it to a plain tensor and before the model sees it; and the loss computed from it."""

    order = 9.5

    def __init__(self, phase: Phase) -> None:
        self.phase = phase

    def before_fit(self) -> None:
        if self.phase.reads is not None and not isinstance(self.learn.loss_func, MarkedLoss):
            self.learn.loss_func = MarkedLoss(self.learn.loss_func, self.phase)

    def before_batch(self) -> None:
        if self.training:
            self.learn.xb = tuple(map(self.phase.mark, self.xb))
            self.learn.yb = tuple(map(self.phase.mark, self.yb))


def marks(phase: Phase) -> list[Callback]:
    """The Mark callback in counting runs only: in timed runs the bare loop marks nothing either."""
    return [Mark(phase)] if phase.reads is not None else []


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def ours(splits: Any, params: dict[str, Any], phase: Phase, loop: str = "fast") -> None:
    learn, name = build_learner(splits, params, torch.device("cpu"), "accuracy", seed=0, performance={"loop": loop})
    learn.model = linear()
    # What every attempt of a trial adds (recipe/objective.py), checkpoints aside.
    trial_cbs = [DivergenceGuard(HalvingSpec()), StopOnRequest(lambda: False), ShareThreads(torch.get_num_threads)]
    cbs = [Probe(phase), *marks(phase), *trial_cbs]
    result = fit(learn, params, EpochLog(name), cbs)
    phase.epoch_s = [e.seconds for e in result.epochs[1:]]


def fastai_loop(splits: Any, params: dict[str, Any], phase: Phase) -> None:
    ours(splits, params, phase, loop="fastai")


def fastai_default(splits: Any, params: dict[str, Any], phase: Phase) -> None:
    dls = build_learner(splits, params, torch.device("cpu"), "accuracy", seed=0)[0].dls
    # The loss fastai infers for category labels (these loaders carry no fastai types to infer it from).
    learn = Learner(dls, linear(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learn.fit_one_cycle(int(params["epochs"]), float(params["lr"]), cbs=[Probe(phase), *marks(phase)])


def bare(splits: Any, params: dict[str, Any], phase: Phase) -> None:
    dls = build_learner(splits, params, torch.device("cpu"), "accuracy", seed=0)[0].dls
    model, epochs, lr = linear(), int(params["epochs"]), float(params["lr"])
    # The trial's optimizer: fastai's Adam is AdamW with eps 1e-5 and the trial's decoupled decay.
    wd = float(params["weight_decay"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.99), eps=1e-5, weight_decay=wd, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(dls.train), pct_start=0.25)
    for _ in range(epochs):
        model.train()
        phase.start()
        for xb, yb in dls.train:
            xb, yb = phase.mark(xb), phase.mark(yb)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        phase.stop(len(dls.train))
        model.eval()
        with torch.no_grad():
            correct = torch.zeros((), dtype=torch.int64)
            for xb, yb in dls.valid:
                correct += (model(xb).argmax(1) == yb).sum()
        float(correct) / len(dls.valid.dataset)  # one read per epoch, as a bare script logs it


LOOPS = {"kmnist-tune": ours, "loop: fastai": fastai_loop, "fastai default": fastai_default, "bare PyTorch": bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", type=Path, default=FIXTURE, help="a folder with the official KMNIST files (default: the test fixture)"
    )
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the loop, not the arithmetic)")
    ap.add_argument("--where", action="store_true", help="also print where the host reads are made")
    ap.add_argument(
        "--device-paths",
        action="store_true",
        help="run kmnist-tune's GPU code paths on the CPU (the guard's and the smoothed loss's device sums, read late)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device_paths:
        devices.HOST_DEVICES = frozenset()  # the guard and the smoothed loss treat the CPU as a GPU
    spec = parse_spec(
        {
            "name": "loop",
            "data": {"dataset": "kmnist", "valid_fraction": 0.2},
            "parameters": {"arch": "resnet18", "epochs": args.epochs, "batch_size": args.bs, "lr": 5e-3},
            "budget": {"n_trials": 1},
        }
    )
    splits = load_splits(spec.data, args.data, download=False)
    params = spec.fixed_params()
    # The loops take turns, repeat after repeat, so that a drift in the machine's speed reaches all
    # three alike; each one's figure is its median.
    us: dict[str, list[float]] = {name: [] for name in LOOPS}
    epoch_s: dict[str, list[float]] = {name: [] for name in LOOPS}
    for _ in range(args.repeats):
        for name, loop in LOOPS.items():
            phase = Phase()
            loop(splits, params, phase)
            us[name].append(1e6 * phase.seconds / phase.batches)
            epoch_s[name] += phase.epoch_s
    results: dict[str, dict[str, Any]] = {}
    for name, loop in LOOPS.items():
        counter = HostReads()  # a separate run: marking and counting cost time of their own
        phase = Phase(counter)
        with counter.installed():
            loop(splits, params, phase)
        where = {k: round(v / phase.batches, 2) for k, v in counter.where.most_common()}
        reads = counter.count / phase.batches
        results[name] = {"us_per_batch": statistics.median(us[name]), "host_reads_per_batch": reads, "where": where}
        if epoch_s[name]:
            results[name]["s_per_epoch"] = statistics.median(epoch_s[name])
    base = results["bare PyTorch"]["us_per_batch"]
    n_train = len(splits.y_train)
    setup = f"{n_train} training images, batch {args.bs}, {args.epochs} epochs, {args.threads} thread(s)"
    paths = ", the GPU's code paths" if args.device_paths else ""
    print(f"linear model, {setup}{paths}, torch {torch.__version__}")
    print(f"{'loop':<16} {'µs/batch':>9} {'x bare':>7} {'host reads/batch':>17}")
    for name, r in results.items():
        print(f"{name:<16} {r['us_per_batch']:>9.0f} {r['us_per_batch'] / base:>7.2f} {r['host_reads_per_batch']:>17.2f}")
    if args.where:
        for name, r in results.items():
            print(f"{name}: " + "; ".join(f"{k} {v:g}" for k, v in r["where"].items()))
    ratio = results["kmnist-tune"]["us_per_batch"] / base
    print(f"kmnist-tune / bare: {ratio:.2f}x (target <= 1.3x)")
    fast, slow = results["kmnist-tune"], results["loop: fastai"]
    vs_fastai = {"batch": fast["us_per_batch"] / slow["us_per_batch"], "epoch": fast["s_per_epoch"] / slow["s_per_epoch"]}
    print(
        f"loop: fast / loop: fastai: {vs_fastai['batch']:.2f}x per training batch, {vs_fastai['epoch']:.2f}x per epoch "
        f"({1e3 * fast['s_per_epoch']:.0f} ms vs {1e3 * slow['s_per_epoch']:.0f} ms, training and validation)"
    )
    if args.json:
        out = {"results": results, "ratio": ratio, "fast_vs_fastai_loop": vs_fastai}
        args.json.write_text(json.dumps({**out, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
