"""fastai ResNets adapted to 1-channel 28x28 characters."""

from __future__ import annotations

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
