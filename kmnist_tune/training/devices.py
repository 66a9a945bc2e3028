"""Which device trains: CUDA when there is one and it is asked for, else the CPU."""

from __future__ import annotations

import os

import torch

from ..errors import UserError

DEVICES = ("auto", "cpu", "cuda")
# Devices whose per-batch values (the loss, its smoothings) the training loop reads at once into
# Python floats: reading there waits for nothing, and a float op costs a tenth of a tensor op. On
# the others (CUDA, MPS) those values stay on the device and are read late or once an epoch.
HOST_DEVICES = frozenset({"cpu"})


def pick_device(requested: str = "auto") -> torch.device:
    """auto -> CUDA when present, else CPU; asking for cuda without one is the caller's error to report."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_device(requested: str) -> torch.device:
    """`--device auto|cpu|cuda` checked against this machine; a bad choice is one line."""
    if requested not in DEVICES:
        raise UserError(f"--device {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return pick_device(requested)


def slot_device() -> torch.device:
    """A supervised worker slot's device: the GPU its supervisor pinned with CUDA_VISIBLE_DEVICES, else
    the CPU. Pinned to a GPU that CUDA cannot use, it is still CUDA: the slot's preflight says why it
    does not work (recipe/preflight.py) rather than training on the CPU unasked."""
    return torch.device("cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")


def visible_gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name(device: torch.device) -> str:
    """What a trial records as its device: `cpu`, or `cuda:<the GPU's name>`."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
