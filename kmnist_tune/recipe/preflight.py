"""A worker slot's preflight: before it claims any trial, one training step of the study's model on a
synthetic batch on its device, with the spec's `performance:` settings, and the divergence guard's
device path once. A device that fails here (CUDA that does not initialise, a kernel that does not
launch, bf16 missing) ends the slot with one line, before anything of the study is touched; a compile
that fails only falls back (training/compiling.py), and the decision holds for the slot's trials."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..contract.spec import SweepSpec
from ..errors import WorkerStopped
from ..training.compiling import CompiledModels, is_oom, root_cause, synthetic_batch
from ..training.model import build_model
from ..training.optim import opt_func
from ..training.precision import Performance, prepare_model, resolve_performance
from .halving import HostCopy
from .lr_prior import prior_config


class DeviceUnusable(WorkerStopped):
    """The slot's device failed its preflight: exit status 4, which a supervisor or container can tell
    from bad input (2) and from a run of failed trials (3). No trial was claimed."""

    exit_code = 4


def describe_device(device: torch.device) -> str:
    """The device as a user finds it: `cpu`, or `cuda` with the GPU the supervisor pinned."""
    if device.type != "cuda":
        return str(device)
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cuda (CUDA_VISIBLE_DEVICES={pinned})" if pinned else "cuda"


def check_device(device: torch.device) -> None:
    """Raise with the cause when `device` cannot be used at all: CUDA that does not initialise (no
    driver, a driver older than this wheel's CUDA, no GPU visible), bf16 asked of a GPU without it."""
    if device.type == "cuda":
        torch.cuda.init()  # raises with CUDA's own reason, where is_available() only says False
        if torch.cuda.device_count() == 0:
            raise RuntimeError("no CUDA device is visible")


def preflight(
    spec: SweepSpec, n_classes: int, device: torch.device, compiled: CompiledModels, say: Callable[[str], None]
) -> None:
    """One forward, backward and optimizer step of the study's first configuration (prior_config: the
    fixed values, a searched arch's first) at its first batch size on `device`, compiled when the
    spec asks (a failed compile is decided here for the slot's trials); then the guard's device copy.
    Raises DeviceUnusable naming the device and the cause."""
    params = prior_config(spec)
    bs = int(params["batch_size"])
    where = describe_device(device)
    try:
        check_device(device)
        perf = resolve_performance(spec.performance, device)
        if perf.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU does not support bfloat16; set performance.precision: fp32")
        torch.manual_seed(spec.seed)
        model = build_model(params["arch"], n_classes, params["stem"], float(params["dropout"]))
        key = (params["arch"], n_classes, params["stem"], float(params["dropout"]))
        model, _ = prepare_model(model, device, perf, compiled, key, (bs, 1, 28, 28))
        step(model, params, bs, device, perf)
        # The divergence guard's path on this device: a copy to pinned host memory and an event (CUDA).
        loss = torch.ones((), device=device, dtype=torch.float64)
        HostCopy((loss, loss, loss), True, 0, 0).values()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous kernel error surfaces here, not in a trial
    except Exception as e:
        if is_oom(e):  # the batch-halving rule's business, trial by trial
            say(f"preflight: out of memory at batch size {bs} on {where}; the trials halve it")
            return
        raise DeviceUnusable(f"device {where} failed its preflight ({root_cause(e)}); this slot claims no trial") from None


def step(model: torch.nn.Module, params: dict[str, Any], bs: int, device: torch.device, perf: Performance) -> None:
    """One training step on a random batch: forward (under bf16 autocast when asked), backward, and
    the trial's optimizer implementation (fused or foreach PyTorch, or fastai's)."""
    x, y = synthetic_batch((bs, 1, 28, 28), device, perf)
    opt = opt_func(params, perf.optimizer)(list(model.parameters()), lr=1e-3)
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=perf.precision == "bf16"):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
