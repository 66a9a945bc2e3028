"""Does `torch.compile` work on a device? A real, tiny compile: a conv + BatchNorm net's forward and
backward through `nn.Module.compile` (as prepare_model compiles), so that dynamo traces it, AOT
autograd splits it and inductor generates and builds its kernels (C++ on a CPU, Triton on CUDA, each
with the host's compiler). `kmnist-tune doctor` runs it in a child process (bounded in time); a
worker's preflight may call `probe_compile` itself.

    python -m kmnist_tune.training.compile_probe [DEVICE|auto] [MODE]   # one JSON line: ok, reason, seconds, eager
"""

from __future__ import annotations

import json
import sys
import time
from typing import NamedTuple

import torch
from torch import nn

from ..errors import one_line


class CompileProbe(NamedTuple):
    ok: bool
    reason: str  # one line: what failed ("" when it worked)
    seconds: float  # the compiled forward + backward, compiling included


class DeviceBroken(RuntimeError):
    """The device fails uncompiled (CUDA init, a kernel launch): no fallback helps there."""


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def _step(model: nn.Module, device: torch.device) -> None:
    x = torch.randn(4, 1, 28, 28, device=device)
    y = torch.arange(4, device=device)
    nn.functional.cross_entropy(model(x), y).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_eager(device: torch.device | str) -> None:
    """One uncompiled forward and backward on `device`; DeviceBroken with the reason if it fails."""
    device = torch.device(device)
    try:
        _step(_tiny_net().to(device), device)
    except Exception as e:
        raise DeviceBroken(f"{type(e).__name__}: {one_line(e, 200)}") from e


def probe_compile(device: torch.device | str, mode: str | None = None) -> CompileProbe:
    """Compile the tiny net on `device` and run one forward and backward. A compile error of any kind
    (dynamo, AOT autograd, inductor, the C/C++ compiler, Triton) is (False, "<Type>: <first words>",
    seconds), never raised. Dynamo's caches are left alone: a worker's compiled models stay compiled."""
    device = torch.device(device)
    model = _tiny_net().to(device)
    model.compile(mode=None if mode in (None, "default") else mode)
    t0 = time.perf_counter()
    try:
        _step(model, device)
    except Exception as e:
        return CompileProbe(False, _reason(e), time.perf_counter() - t0)
    return CompileProbe(True, "", time.perf_counter() - t0)


def _reason(e: BaseException) -> str:
    # Inductor wraps the cause (InductorError: InvalidCxxCompiler: ...); its message's first line
    # names it, the rest is a stack trace and advice about TORCHDYNAMO_VERBOSE.
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return one_line(Exception(f"{type(e).__name__}: {first}" if first else type(e).__name__), 240)


def main(argv: list[str]) -> int:
    device = argv[0] if argv else "auto"
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    mode = argv[1] if len(argv) > 1 else None
    result: dict[str, object] = {"device": device}
    try:
        check_eager(device)
    except DeviceBroken as e:
        result.update(eager=False, ok=False, reason=str(e), seconds=0.0)
    else:
        result.update(eager=True, **probe_compile(device, mode)._asdict())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
