"""Batched random affine augmentation on the training device.

One affine matrix per image (shift, rotation, scale) is drawn for a whole epoch at once from a
CPU generator keyed by (seed, epoch), so the draws are the same on every device and every rerun;
each batch is then warped in one `affine_grid` + `grid_sample` call on the device. Nothing is
done per item and nothing runs on the CPU per batch.

Images are warped as raw intensities (0..255, background 0) before normalisation, so pixels
pulled in from outside the frame are background, not the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RandomAffine:
    """Uniform draws: shift in +-max_shift (fraction of the image side) on each axis,
    rotation in +-max_rotate degrees, scale in 1 +- max_scale (above 1 enlarges the character)."""

    max_shift: float = 0.1
    max_rotate: float = 10.0
    max_scale: float = 0.1

    def __post_init__(self) -> None:
        if not (0.0 <= self.max_shift <= 0.5 and 0.0 <= self.max_rotate <= 180.0 and 0.0 <= self.max_scale < 1.0):
            raise ValueError(
                f"augmentation out of range: max_shift {self.max_shift} (0..0.5), max_rotate {self.max_rotate} (0..180), "
                f"max_scale {self.max_scale} (0..<1)"
            )

    @classmethod
    def from_spec(cls, spec: Any) -> RandomAffine | None:
        """An AugmentSpec (or anything with its attributes, or a dict) -> RandomAffine, or None when disabled."""
        if spec is None:
            return None
        get = spec.get if isinstance(spec, dict) else lambda k, d=None: getattr(spec, k, d)
        if not get("enabled", False):
            return None
        return cls(float(get("max_shift", 0.1)), float(get("max_rotate", 10.0)), float(get("max_scale", 0.1)))

    def epoch_thetas(self, n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, 2, 3) float32 affine matrices for one epoch, one per position in the epoch's order."""
        g = torch.Generator().manual_seed(stream_seed(seed, epoch, _AUGMENT_STREAM))
        u = torch.rand(n, 4, generator=g, dtype=torch.float64).mul_(2.0).sub_(1.0)  # uniform in [-1, 1)
        # affine_grid works in coordinates where the image spans [-1, 1]: a shift of a fraction f of
        # the side is 2f there. The matrix maps output coordinates to input ones, so the inverse
        # transform is written: content moved by +t, rotated by +a and scaled by s reads the input at
        # R(-a) (p - t) / s.
        tx, ty = u[:, 0] * (2.0 * self.max_shift), u[:, 1] * (2.0 * self.max_shift)
        angle = u[:, 2] * math.radians(self.max_rotate)
        scale = 1.0 + u[:, 3] * self.max_scale
        c, s = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.empty(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 1] = c, s
        theta[:, 1, 0], theta[:, 1, 1] = -s, c
        theta[:, 0, 2] = -(c * tx + s * ty)
        theta[:, 1, 2] = -(-s * tx + c * ty)
        return theta.to(dtype=torch.float32).to(device)

    def apply(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Warp a float batch (B, C, H, W) with matrices (B, 2, 3); pixels from outside the frame are 0."""
        return warp(x, theta)


_AUGMENT_STREAM = 1


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A 64-bit generator seed for (seed, epoch, stream), well mixed so nearby keys give unrelated streams."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]).generate_state(1, np.uint64)[0])
