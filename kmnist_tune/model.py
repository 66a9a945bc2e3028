"""fastai ResNets adapted to 1-channel 28x28 characters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from fastai.vision.learner import create_vision_model
from torch import nn
from torchvision import models

ARCHS = {"resnet18": models.resnet18, "resnet34": models.resnet34, "resnet50": models.resnet50}


def build_model(arch: str, n_classes: int, stem: str = "imagenet", dropout: float = 0.5) -> nn.Module:
    """fastai's vision model (torchvision body + fastai head), 1 input channel, random init.

    stem="imagenet" keeps the stride-2 7x7 conv and max-pool (fast: 28x28 becomes 7x7 at once);
    stem="small" uses a 3x3 stride-1 conv and no max-pool (4x the activations, usually more accurate).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ARCHS)}")
    model = create_vision_model(ARCHS[arch], n_out=n_classes, pretrained=False, n_in=1, ps=dropout)
    if stem == "small":
        body = model[0]
        conv = nn.Conv2d(1, body[0].out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        body[0] = conv
        body[3] = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}; use imagenet or small")
    return model


def pick_device(requested: str = "auto") -> torch.device:
    """auto -> CUDA when present, else CPU; asking for cuda without one is the caller's error to report."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass(frozen=True)
class Performance:
    """A PerformanceSpec resolved for one device: what a Learner actually uses."""

    precision: str = "fp32"  # "fp32" | "bf16"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False

    def describe(self) -> str:
        flags = [self.precision] + [n for n in ("channels_last", "cudnn_benchmark", "compile") if getattr(self, n)]
        return "+".join(flags)


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
    channels_last = opt("channels_last", "auto")
    channels_last = cuda if channels_last == "auto" else bool(channels_last)
    return Performance(
        precision=precision,
        channels_last=channels_last,
        cudnn_benchmark=cuda and bool(opt("cudnn_benchmark", True)),
        compile=bool(opt("compile", False)),
    )


def prepare_model(model: nn.Module, device: torch.device, perf: Performance) -> nn.Module:
    """Move the model to its device in the memory format `perf` asks for; set cuDNN's autotuner; compile if asked."""
    model = model.to(device)
    if perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    if perf.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model
