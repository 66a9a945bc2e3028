"""Does `torch.compile` work on a device? A real, tiny compile: a conv + BatchNorm net's forward and
backward through `nn.Module.compile` (as prepare_model compiles), so that dynamo traces it, AOT
autograd splits it and inductor generates and builds its kernels (C++ on a CPU, Triton on CUDA, each
with the host's compiler), through the same compiled step a worker's trial tries first
(compiling.try_compiled_step). `kmnist-tune doctor` runs it in a child process (bounded in time).

    python -m kmnist_tune.training.compile_probe [DEVICE|auto] [MODE]   # one JSON line: ok, reason, seconds, eager
"""

from __future__ import annotations

import json
import sys
from typing import NamedTuple

import torch
from torch import nn

from .compiling import root_cause, synthetic_step, try_compiled_step
from .precision import resolve_performance

SHAPE = (4, 1, 28, 28)


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


def check_eager(device: torch.device | str) -> None:
    """One uncompiled forward and backward on `device`; DeviceBroken with the reason if it fails."""
    device = torch.device(device)
    try:
        synthetic_step(_tiny_net().to(device), SHAPE, device, resolve_performance({"compile": False}, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:
        raise DeviceBroken(root_cause(e)) from e


def probe_compile(device: torch.device | str, mode: str | None = None) -> CompileProbe:
    """The worker's own compile check (compiling.try_compiled_step: what a trial's first compiled step
    goes through) on the tiny net: a compile error of any kind (dynamo, AOT autograd, inductor, the
    C/C++ compiler, Triton) is (False, its root cause, seconds), never raised."""
    device = torch.device(device)
    perf = resolve_performance({"compile": True, "compile_mode": mode or "default"}, device)
    outcome = try_compiled_step(_tiny_net().to(device), SHAPE, device, perf)
    return CompileProbe(outcome.ok, outcome.reason, outcome.seconds)


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
