"""The CUDA fast path: bf16 autocast really on, channels-last model and batches, cuDNN benchmark,
the same shuffle and augmentation as on a CPU, and fits that complete. Skipped without a GPU."""

from __future__ import annotations

import math
import os
import shutil
import warnings

import pytest
import torch
from conftest import tiny_spec
from fastai.callback.core import Callback

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.training.augment import RandomAffine
from kmnist_tune.training.loader import TensorBatches, make_split
from kmnist_tune.training.precision import Bf16Autocast, close_leaked_autocast
from kmnist_tune.training.splits import Splits
from kmnist_tune.training.train import EpochLog, build_learner, fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
# Compiling (the default on CUDA) takes most of a minute a model: the tests about something else opt out.
NO_COMPILE = {"compile": False}
# `splits`: the fixture's images as tiny_spec splits them, loaded once per run (shared_trained.py).


def params(**over: object) -> dict[str, object]:
    return {**parse_spec(tiny_spec()).fixed_params(), "lr": 5e-3, **over}


class Probe:
    """Records dtype and memory format of a module's outputs during a fit."""

    def __init__(self, module: torch.nn.Module):
        self.dtypes: list[torch.dtype] = []
        self.channels_last: list[bool] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.dtypes.append(out.dtype)
        self.channels_last.append(out.is_contiguous(memory_format=torch.channels_last))

    def remove(self) -> None:
        self.handle.remove()


class BatchLayout(Callback):
    def __init__(self) -> None:
        self.layouts: list[tuple[torch.dtype, bool, str]] = []

    def before_batch(self) -> None:
        xb = self.xb[0]
        self.layouts.append((xb.dtype, xb.is_contiguous(memory_format=torch.channels_last), xb.device.type))


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_auto_performance_fits_in_bf16_channels_last(splits: Splits, stem: str) -> None:
    learn, name = build_learner(splits, params(stem=stem), CUDA, "accuracy", performance=NO_COMPILE)
    perf = learn.kt_performance
    assert perf.channels_last and perf.cudnn_benchmark
    assert perf.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert torch.backends.cudnn.benchmark
    conv_weights = [p for p in learn.model.parameters() if p.dim() == 4]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters()), "autocast keeps fp32 master weights"
    assert all(p.device.type == "cuda" for p in learn.model.parameters())
    if perf.precision == "bf16":
        assert sum(isinstance(cb, Bf16Autocast) for cb in learn.cbs) == 1
    first_conv = learn.model[0][0]
    probe = Probe(first_conv)
    layout = BatchLayout()
    try:
        result = fit(learn, params(stem=stem), EpochLog(name), [layout])
    finally:
        probe.remove()
    assert len(result.epochs) == 1
    rec = result.epochs[0]
    assert math.isfinite(rec.train_loss) and math.isfinite(rec.valid_loss) and 0.0 <= rec.metric <= 1.0
    if perf.precision == "bf16":
        assert probe.dtypes and all(d == torch.bfloat16 for d in probe.dtypes), set(probe.dtypes)
    assert all(probe.channels_last), "conv activations are channels-last"
    assert layout.layouts and all(d == torch.float32 and cl and dev == "cuda" for d, cl, dev in layout.layouts)
    assert not torch.is_autocast_enabled("cuda")
    assert close_leaked_autocast() == 0


def test_fp32_when_asked(splits: Splits) -> None:
    learn, name = build_learner(
        splits,
        params(),
        CUDA,
        "accuracy",
        performance={"precision": "fp32", "channels_last": False, "cudnn_benchmark": False, **NO_COMPILE},
    )
    assert not any(isinstance(cb, Bf16Autocast) for cb in learn.cbs)
    assert not torch.backends.cudnn.benchmark
    probe = Probe(learn.model[0][0])
    try:
        learn.fit_one_cycle(1, 5e-3)
    finally:
        probe.remove()
    assert probe.dtypes and all(d == torch.float32 for d in probe.dtypes)
    build_learner(splits, params(), CUDA, "accuracy", performance=NO_COMPILE)  # cuDNN's default back for the tests that follow


def test_augmented_fit_on_cuda_completes(splits: Splits) -> None:
    spec = parse_spec(tiny_spec(augment={"enabled": True}, performance=NO_COMPILE))
    learn, name = build_learner(splits, params(), CUDA, "accuracy", augment=spec.augment, performance=spec.performance)
    result = fit(learn, params(), EpochLog(name))
    assert len(result.epochs) == 1 and math.isfinite(result.epochs[0].train_loss)


def test_shuffle_and_augmentation_match_the_cpu(splits: Splits) -> None:
    """Draws come from CPU generators keyed by (seed, epoch): a GPU and a CPU worker see the same epoch."""
    mean, std = splits.mean_std
    out = {}
    for dev in (torch.device("cpu"), CUDA):
        ds = make_split(splits.x_train, splits.y_train, dev, mean, std, seed=7)
        dl = TensorBatches(ds, bs=128, shuffle=True, drop_last=True, augment=RandomAffine())
        out[dev.type] = [(xb.cpu(), yb.cpu()) for xb, yb in dl]
    for (xc, yc), (xg, yg) in zip(out["cpu"], out["cuda"], strict=True):
        assert torch.equal(yc, yg)
        torch.testing.assert_close(xg, xc, atol=2e-3, rtol=0)


def test_oom_mid_batch_does_not_leave_autocast_on(splits: Splits) -> None:
    class OOM(Callback):
        def after_pred(self) -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    learn, _ = build_learner(splits, params(), CUDA, "accuracy", performance=NO_COMPILE)
    if learn.kt_performance.precision != "bf16":
        pytest.skip("this GPU has no bf16")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        learn.fit_one_cycle(1, 5e-3, cbs=[OOM()])
    build_learner(splits, params(), CUDA, "accuracy", performance=NO_COMPILE)
    assert not torch.is_autocast_enabled("cuda")


@pytest.mark.skipif(not os.environ.get("KMNIST_TUNE_TEST_COMPILE"), reason="set KMNIST_TUNE_TEST_COMPILE=1 (compiling is slow)")
def test_compiled_model_fits(splits: Splits) -> None:
    learn, name = build_learner(splits, params(), CUDA, "accuracy", performance={"compile": True})
    assert learn.kt_performance.compile
    result = fit(learn, params(), EpochLog(name))
    assert len(result.epochs) == 1 and math.isfinite(result.epochs[0].train_loss)


class SyncWatch(Callback):
    """Puts torch's sync debug mode on `warn` from the end of each epoch's second training batch to the
    end of its training part, and keeps what it warns of: every time the host waited for the GPU in
    the training loop (the bookkeeping, the guard, the optimizer, the loader's next batch)."""

    order = 100  # after every other callback's after_batch

    def __init__(self) -> None:
        self.watched, self.syncs = 0, []
        self._catch: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def before_train(self) -> None:
        self.seen = 0

    def after_batch(self) -> None:
        if not self.learn.training:
            return
        self.seen += 1
        if self.seen == 2:  # warm-up: the epoch's first batch allocates, cuDNN picks its kernels
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif self.seen > 2:
            self.watched += 1

    def after_train(self) -> None:
        torch.cuda.set_sync_debug_mode("default")
        if self._catch is not None:
            self.syncs += [str(w.message) for w in self._caught if "synchroniz" in str(w.message)]
            self._catch.__exit__(None, None, None)
            self._catch = None


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_training_batches_wait_for_nothing_after_warm_up(splits: Splits, metric: str) -> None:
    """Issue 23: after warm-up a training batch makes no host-device synchronisation at all: the guard
    reads its values a batch late from a non-blocking pinned copy, the smoothed loss and the metrics
    are summed on the device, the optimizer is PyTorch's fused one; the model compiled, as by default
    (the accuracy run), and not."""
    from kmnist_tune.contract.spec import HalvingSpec
    from kmnist_tune.recipe.halving import DivergenceGuard
    from kmnist_tune.training.torch_optim import TorchOptimizer
    from kmnist_tune.training.train import ShareThreads, StopOnRequest

    p = params(epochs=2)
    learn, name = build_learner(splits, p, CUDA, metric, performance=None if metric == "accuracy" else NO_COMPILE)
    assert learn.kt_performance.compile == (metric == "accuracy")
    watch = SyncWatch()
    extra = [DivergenceGuard(HalvingSpec()), StopOnRequest(lambda: False), ShareThreads(torch.get_num_threads), watch]
    result = fit(learn, p, EpochLog(name), extra)
    assert isinstance(learn.opt, TorchOptimizer) and learn.opt.opt.defaults.get("fused") is True
    assert len(result.epochs) == 2 and all(math.isfinite(e.train_loss) and 0 <= e.metric <= 1 for e in result.epochs)
    assert watch.watched >= 2 * 20
    assert watch.syncs == [], watch.syncs[:5]


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="needs NVIDIA's MPS (nvidia-cuda-mps-control)")
def test_an_mps_daemon_is_started_for_the_slots_and_stopped_after() -> None:
    from kmnist_tune.service import mps

    said: list[str] = []
    daemon = mps.share_gpus([0], 2, said.append)
    assert daemon is not None and len(said) == 1, said
    try:
        assert mps._running(daemon.pipe_dir)
    finally:
        daemon.stop(said.append)
    if "started" in said[0]:
        assert not mps._running(daemon.pipe_dir)
