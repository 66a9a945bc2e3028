"""Device-resident batches for fastai: no per-item work, no worker processes.

Each split is held on the training device as uint8; a batch is an index slice,
converted and normalised there. It subclasses fastai's DataLoader so Learner,
fit_one_cycle, lr_find, metrics and callbacks use it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader


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


class TensorBatches(DataLoader):
    """A fastai DataLoader over a TensorSplit; shuffling is seeded and reproducible per epoch."""

    def __init__(self, dataset: TensorSplit, bs: int = 64, shuffle: bool = False, drop_last: bool = False, **kwargs: Any):
        kwargs.pop("n", None)
        super().__init__(dataset, bs=bs, shuffle=shuffle, drop_last=drop_last, n=len(dataset), **kwargs)
        self._epoch = 0

    def __iter__(self):  # type: ignore[override]
        ds: TensorSplit = self.dataset
        self.before_iter()
        n, bs = len(ds), self.bs
        if self.shuffle:
            # A CPU generator keyed by (seed, epoch): the same order on every device and every rerun.
            g = torch.Generator().manual_seed(ds.seed * 100_003 + self._epoch)
            order = torch.randperm(n, generator=g).to(ds.x.device)
            self._epoch += 1
        else:
            order = None
        stop = (n // bs) * bs if self.drop_last else n
        for start in range(0, stop, bs):
            if order is None:
                xb, yb = ds.x[start : start + bs], ds.y[start : start + bs]
            else:
                idx = order[start : start + bs]
                xb, yb = ds.x[idx], ds.y[idx]
            xb = xb.unsqueeze(1).float().div_(255.0).sub_(ds.mean).div_(ds.std)
            yield self.after_batch((xb, yb))
        self.after_iter()


def make_split(x: np.ndarray, y: np.ndarray, device: torch.device, mean: float, std: float, seed: int = 0) -> TensorSplit:
    return TensorSplit(
        torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y.astype(np.int64)).to(device), mean, std, seed
    )


def make_dls(train: TensorSplit, valid: TensorSplit, bs: int, device: torch.device) -> DataLoaders:
    train_dl = TensorBatches(train, bs=bs, shuffle=True, drop_last=len(train) > bs, device=device)
    # Validation order never matters; a larger batch is free since no gradients are kept.
    valid_dl = TensorBatches(valid, bs=max(bs, 1024), shuffle=False, device=device)
    return DataLoaders(train_dl, valid_dl, device=device)
