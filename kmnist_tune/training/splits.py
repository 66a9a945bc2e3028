"""The arrays a study trains on: the official train split carved into a stratified (train,
validation) pair with a fixed seed, the spec's subsets, and (for the final evaluation only) the
official test split."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..contract.spec import DataSpec
from . import data as kdata
from .data import DataError


@dataclass
class Splits:
    """The arrays one study trains on. `valid` is carved from the official train split;
    `test` is the official test split, loaded only for the final evaluation."""

    dataset: str
    n_classes: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @cached_property
    def mean_std(self) -> tuple[float, float]:
        """The training images' pixel mean and std (0..1): every Learner and export normalises with
        them. Once per Splits: it takes a float copy of every training image."""
        x = self.x_train.astype(np.float32) / 255.0
        return float(x.mean()), float(x.std())


def load_splits(
    spec: DataSpec,
    data_dir: Path,
    *,
    mirror: str | None = None,
    download: bool = True,
    with_test: bool = False,
    full_train: bool = False,
) -> Splits:
    """Official train split -> stratified (train, valid) with a fixed seed, then the spec's subsets.

    full_train=True keeps every official train image for training (the final evaluation retrains on it);
    the validation part is then still returned for reference but overlaps nothing it is scored on.
    """
    info = kdata.get_dataset(spec.dataset)
    x, y = kdata.load_split(spec.dataset, "train", data_dir, fmt=spec.format, download=download, mirror=mirror)
    train_idx, valid_idx = stratified_split(y, spec.valid_fraction, spec.split_seed)
    if full_train:
        train_idx = np.sort(np.concatenate([train_idx, valid_idx]))
    train_idx = stratified_subset(train_idx, y, spec.train_size, spec.split_seed)
    valid_idx = stratified_subset(valid_idx, y, spec.valid_size, spec.split_seed)
    out = Splits(spec.dataset, info.n_classes, x[train_idx], y[train_idx], x[valid_idx], y[valid_idx])
    if with_test:
        out.x_test, out.y_test = kdata.load_split(
            spec.dataset, "test", data_dir, fmt=spec.format, download=download, mirror=mirror
        )
    return out


def _class_positions(labels: np.ndarray) -> list[np.ndarray]:
    """Positions of each class, classes in sorted order (so results do not depend on dict order)."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return np.split(order, starts[1:]) if len(classes) else []


def stratified_split(labels: np.ndarray, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, valid_idx) into labels, each class split in the same proportion.

    Every class with at least two items lands in both parts. Deterministic for a seed;
    indices come back sorted.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) < 2:
        raise DataError(f"cannot split {labels.shape} labels; need a 1-D array of 2 or more")
    if not 0.0 < float(valid_fraction) < 1.0:
        raise DataError(f"valid fraction {valid_fraction} must be between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    train_parts, valid_parts = [], []
    for pos in _class_positions(labels):
        n = len(pos)
        n_valid = round(n * valid_fraction)
        # Both parts get every class that has two items; a lone example is more use for training.
        n_valid = min(max(n_valid, 1), n - 1) if n >= 2 else 0
        perm = rng.permutation(pos)
        valid_parts.append(perm[:n_valid])
        train_parts.append(perm[n_valid:])
    if sum(len(v) for v in valid_parts) == 0:
        raise DataError("cannot make a validation split: every class has a single example")
    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    valid_idx = np.sort(np.concatenate(valid_parts)).astype(np.int64)
    return train_idx, valid_idx


def stratified_subset(indices: np.ndarray, labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A stratified, deterministic subset of `indices` (positions into the full `labels`).

    size None or >= len(indices): indices unchanged. Class shares are kept by largest
    remainders, so the subset has exactly `size` items; the input order is kept.
    """
    indices = np.asarray(indices)
    if size is None or size >= len(indices):
        return indices
    if size <= 0:
        raise DataError(f"subset size {size} must be positive")
    labels = np.asarray(labels)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(labels)):
        raise DataError(f"indices run past the {len(labels)} labels given")
    sub_labels = labels[indices]
    groups = _class_positions(sub_labels)
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    quota = counts * size / counts.sum()
    take = np.floor(quota).astype(np.int64)
    # Hand the leftover slots to the largest remainders; ties go to the lower class (stable).
    leftover = size - int(take.sum())
    if leftover:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:leftover]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(g, size=k, replace=False) for g, k in zip(groups, take, strict=True) if k]
    positions = np.sort(np.concatenate(chosen))
    return indices[positions]
