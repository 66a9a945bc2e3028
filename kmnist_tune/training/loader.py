"""Device-resident batches for fastai: no per-item work, no worker processes.

Each split is held on the training device as uint8; a batch is an index slice,
converted and normalised there. It subclasses fastai's DataLoader so Learner,
fit_one_cycle, lr_find, metrics and callbacks use it unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

from .augment import RandomAffine


@dataclass
class TensorSplit:
    """uint8 images (N, 28, 28) and int64 labels (N,), on one device."""

    x: torch.Tensor
    y: torch.Tensor
    mean: float
    std: float
    seed: int = 0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Only for fastai's checks and show_batch; training batches are sliced in TensorBatches.
        return self.x[i], self.y[i]

    def to(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device), self.mean, self.std, self.seed)

    def new_empty(self) -> TensorSplit:
        """No images, same normalisation: what fastai's `Learner.export` keeps of the data."""
        return TensorSplit(self.x[:0], self.y[:0], self.mean, self.std, self.seed)


class TensorBatches(DataLoader):
    """A fastai DataLoader over a TensorSplit; shuffling is seeded and reproducible per epoch.

    `augment` (a RandomAffine) warps every batch on the device, with per-image draws keyed by
    (seed, epoch) on a stream of their own, so turning it on does not change the shuffle order.
    `channels_last` hands batches over in that memory format (for a channels-last model on CUDA).
    """

    def __init__(
        self,
        dataset: TensorSplit,
        bs: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: RandomAffine | None = None,
        channels_last: bool = False,
        **kwargs: Any,
    ):
        kwargs.pop("n", None)
        super().__init__(dataset, bs=bs, shuffle=shuffle, drop_last=drop_last, n=len(dataset), **kwargs)
        self.augment, self.channels_last = augment, channels_last
        self._epoch = 0

    def __iter__(self):  # type: ignore[override]
        ds: TensorSplit = self.dataset
        self.before_iter()
        n, bs = len(ds), self.bs
        epoch = self._epoch
        if self.shuffle or self.augment is not None:
            self._epoch += 1  # each pass over a training loader is a new epoch for its random draws
        if self.shuffle:
            # A CPU generator keyed by (seed, epoch): the same order on every device and every rerun.
            g = torch.Generator().manual_seed(ds.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g).to(ds.x.device)
        else:
            order = None
        # One transfer per epoch: every affine matrix of the epoch, indexed by position in the order.
        thetas = self.augment.epoch_thetas(n, ds.seed, epoch, ds.x.device) if self.augment is not None else None
        # (x / 255 - mean) / std in two in-place ops on the raw intensities.
        shift, inv = 255.0 * ds.mean, 1.0 / (255.0 * ds.std)
        stop = (n // bs) * bs if self.drop_last else n
        for start in range(0, stop, bs):
            if order is None:
                xb, yb = ds.x[start : start + bs], ds.y[start : start + bs]
            else:
                idx = order[start : start + bs]
                xb, yb = ds.x[idx], ds.y[idx]
            xb = xb.unsqueeze(1).float()
            if thetas is not None:
                xb = self.augment.apply(xb, thetas[start : start + bs])  # type: ignore[union-attr]
            xb = xb.sub_(shift).mul_(inv)
            if self.channels_last:
                xb = to_channels_last(xb)
            yield self.after_batch((xb, yb))
        self.after_iter()


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) batch in channels-last memory format.

    With one channel both layouts hold the same bytes and `contiguous(memory_format=...)` keeps the
    NCHW strides, which conv kernels then read as NCHW; the exact channels-last strides are set
    without a copy, so the first convolution already runs (and writes) channels-last."""
    if x.dim() == 4 and x.shape[1] == 1 and x.is_contiguous():
        _, _, h, w = x.shape
        return x.as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


def make_split(x: np.ndarray, y: np.ndarray, device: torch.device, mean: float, std: float, seed: int = 0) -> TensorSplit:
    xt, yt = _on_device(x, y, torch.device(device))
    return TensorSplit(xt, yt, mean, std, seed)


# A worker's trials and attempts train on the same arrays (loaded once per process): on a GPU their
# copies stay there, instead of going over again for every attempt. The arrays are kept with their
# copies (an id is only unique while its object lives) and never change once loaded; the last few
# are kept (a training and a validation split, and room for an evaluation's).
_DEVICE_COPIES: OrderedDict[tuple[int, int, str], tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]] = OrderedDict()
_KEEP = 4


def _on_device(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cpu":  # from_numpy shares the array's memory: nothing to keep
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
    key = (id(x), id(y), str(device))
    hit = _DEVICE_COPIES.get(key)
    if hit is not None and hit[0] is x and hit[1] is y:
        _DEVICE_COPIES.move_to_end(key)
        return hit[2], hit[3]
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)
    _DEVICE_COPIES[key] = (x, y, xt, yt)
    while len(_DEVICE_COPIES) > _KEEP:
        _DEVICE_COPIES.popitem(last=False)
    return xt, yt


def make_dls(
    train: TensorSplit,
    valid: TensorSplit,
    bs: int,
    device: torch.device,
    *,
    augment: RandomAffine | None = None,
    channels_last: bool = False,
) -> DataLoaders:
    """Training loader (shuffled, drop_last when there is more than one batch, augmented when asked)
    and validation loader (in order, never augmented)."""
    train_dl = TensorBatches(
        train, bs=bs, shuffle=True, drop_last=len(train) > bs, augment=augment, channels_last=channels_last, device=device
    )
    # Validation order never matters; a larger batch is free since no gradients are kept.
    valid_dl = TensorBatches(valid, bs=max(bs, 1024), shuffle=False, channels_last=channels_last, device=device)
    return DataLoaders(train_dl, valid_dl, device=device)
