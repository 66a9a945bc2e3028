"""How a trial uses its device: fp32 or bf16 autocast, channels-last, cuDNN's autotuner, torch.compile.

`performance: auto` means the fast choice on CUDA and plain fp32 on a CPU (bf16 autocast on a CPU is
slower than fp32, and compiling there costs more than it saves on these small models).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from fastai.callback.fp16 import MixedPrecision
from fastcore.foundation import L
from torch import nn
from torch.amp import GradScaler

from .compiling import CompiledModels, CompileOutcome


@dataclass(frozen=True)
class Performance:
    """A PerformanceSpec resolved for one device: what a Learner actually uses."""

    precision: str = "fp32"  # "fp32" | "bf16"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False  # CUDA: deterministic algorithms (a CPU's are already, at a fixed thread count)
    compile: bool = False
    compile_mode: str = "default"
    optimizer: str = "torch"  # "torch" (PyTorch's fused/foreach where it matches fastai's) | "fastai"
    loop: str = "fast"  # "fast" (training/loop.py) | "fastai" (fastai's own Learner, Recorder and metrics)

    def describe(self) -> str:
        named = ("channels_last", "cudnn_benchmark", "deterministic", "compile")
        flags = [self.precision] + [n for n in named if getattr(self, n)]
        return "+".join(flags + (["fastai_optimizer"] if self.optimizer == "fastai" else []))


def resolve_performance(spec: Any, device: torch.device) -> Performance:
    """`auto` -> bf16 autocast and channels-last on CUDA (bf16 only where the GPU supports it), fp32 and
    the default memory format elsewhere (bf16 autocast on a CPU is slower than fp32). `spec` is a
    PerformanceSpec, a dict with its keys, or None for its defaults."""
    get = (spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)) if spec is not None else None

    def opt(key: str, default: Any) -> Any:
        return default if get is None else get(key, default)

    cuda = device.type == "cuda"
    precision = opt("precision", "auto")
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; use auto, fp32 or bf16")
    optimizer, compile_ = opt("optimizer", "torch"), opt("compile", "auto")
    if optimizer not in ("torch", "fastai"):
        raise ValueError(f"unknown optimizer implementation {optimizer!r}; use torch or fastai")
    channels_last = opt("channels_last", "auto")
    channels_last = cuda if channels_last == "auto" else bool(channels_last)
    deterministic = cuda and bool(opt("deterministic", False))
    return Performance(
        precision=precision,
        channels_last=channels_last,
        cudnn_benchmark=cuda and not deterministic and bool(opt("cudnn_benchmark", True)),
        deterministic=deterministic,
        compile=cuda if compile_ == "auto" else bool(compile_),
        compile_mode=str(opt("compile_mode", "default")),
        optimizer=optimizer,
        loop=str(opt("loop", "fast")),
    )


def prepare_model(
    model: nn.Module,
    device: torch.device,
    perf: Performance,
    cache: CompiledModels | None = None,
    key: tuple[Any, ...] = (),
    batch_shape: tuple[int, ...] = (2, 1, 28, 28),
) -> tuple[nn.Module, CompileOutcome | None]:
    """Move the model to its device in the memory format `perf` asks for; set cuDNN's autotuner; compile
    if asked: a compiled step on a synthetic batch of `batch_shape` first (compiling.py), falling back to
    the plain module on a compile error. `cache` keeps the compiled module and the decision for its
    `key` (the architecture's constructor arguments) across a worker's trials. Returns the model and
    the compile decision (None when not compiling)."""
    model = model.to(device)
    if perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
        use_deterministic(perf.deterministic)
    if not perf.compile:
        return model, None
    full_key = (*key, str(device), perf.channels_last, perf.compile_mode)
    models = cache if cache is not None else CompiledModels()
    return models.prepare(full_key, model, batch_shape, device, perf, str(key[0]) if key else type(model).__name__)


def use_deterministic(on: bool) -> None:
    """PyTorch's deterministic algorithms on CUDA (its reproducibility notes): cuDNN's deterministic
    kernels, and cuBLAS with a fixed workspace (read when its first handle is made, so set before the
    first matmul of the process; a worker's first trial comes before any other CUDA work). An op with
    no deterministic kernel warns rather than failing the trial."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on, warn_only=True)


class Bf16Autocast(MixedPrecision):
    """fastai's MixedPrecision in bf16 (autocast, no loss scaling), made exception-safe, on any device type.

    fastai enters autocast in before_batch and leaves it in after_loss. An exception in between (a CUDA
    out-of-memory error in the forward pass, which the batch-halving guard turns into a restart) skips
    after_loss and leaves autocast entered for the rest of the process: later fp32 code would run under
    it, and the cache of bf16 weight copies (cleared only when the outermost autocast exits) would keep
    handing out the weights of an earlier step. Every context this class enters is recorded per thread,
    and any left open is closed before the next batch, fit, or Learner (build_learner) starts.
    """

    def __init__(self, device_type: str = "cuda"):
        super().__init__(amp_mode="bf16")
        self.device_type = device_type

    def before_fit(self) -> None:
        # MixedPrecision.before_fit for bf16, with autocast on this device type (fastai's is CUDA-only).
        close_leaked_autocast()
        if self.device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bfloat16; set performance.precision: fp32")
        self.autocast = torch.autocast(self.device_type, dtype=torch.bfloat16)
        # bf16 has fp32's range: no loss scaling. A disabled GradScaler passes MixedPrecision's step through.
        self.learn.scaler, self.scales = GradScaler(self.device_type, enabled=False), L()

    def before_batch(self) -> None:
        close_leaked_autocast()
        self.autocast.__enter__()
        _open_autocasts().append(self.autocast)

    def after_loss(self) -> None:
        close_leaked_autocast()

    def after_batch(self) -> None:
        close_leaked_autocast()  # a cancelled batch skips after_loss

    def after_fit(self) -> None:
        close_leaked_autocast()
        super().after_fit()


_autocast_state = threading.local()


def _open_autocasts() -> list[Any]:
    if not hasattr(_autocast_state, "stack"):
        _autocast_state.stack = []
    return _autocast_state.stack


def close_leaked_autocast() -> int:
    """Leave every autocast context Bf16Autocast entered on this thread and did not leave; returns how many."""
    stack = _open_autocasts()
    n = len(stack)
    while stack:
        stack.pop().__exit__(None, None, None)
    return n
