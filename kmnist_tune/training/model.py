"""fastai ResNets adapted to 1-channel 28x28 characters."""

from __future__ import annotations

from fastai.vision.learner import create_vision_model
from torch import nn
from torchvision import models

from ..contract.spec import ARCHS, STEMS

# torchvision's constructor of each architecture the spec allows.
BODIES = {name: getattr(models, name) for name in ARCHS}


def build_model(arch: str, n_classes: int, stem: str = "imagenet", dropout: float = 0.5) -> nn.Module:
    """fastai's vision model (torchvision body + fastai head), 1 input channel, random init.

    stem="imagenet" keeps the stride-2 7x7 conv and max-pool (fast: 28x28 becomes 7x7 at once);
    stem="small" uses a 3x3 stride-1 conv and no max-pool (4x the activations, usually more accurate).
    """
    if arch not in BODIES:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
    model = create_vision_model(BODIES[arch], n_out=n_classes, pretrained=False, n_in=1, ps=dropout)
    if stem == "small":
        body = model[0]
        conv = nn.Conv2d(1, body[0].out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        body[0] = conv
        body[3] = nn.Identity()
    return model
