"""Epoch checkpoints of a fastai run: what it takes to continue exactly where it stopped.

fastai's `learn.save(with_opt=True)` keeps the model and optimizer; the rest travels in a small
JSON beside it: the epoch reached, the batch size in force, the position of the training loader's
shuffle (it is keyed by epoch) and the random generators' states. `fit_one_cycle(start_epoch=k)`
puts the one-cycle schedule back where epoch k begins (fastai's TrainEvalCallback derives it from
the epoch).
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner

from .optim import optimizer_label

FORMAT = 1


class EpochCheckpoints(Callback):
    """After every `every`-th epoch but the last, once at least `min_interval_s` of training has passed
    since the fit began or the last save, calls `save(epoch)` (the recipe stores it)."""

    order = 65  # after EpochLog (60): an epoch that was just pruned is not saved for nothing

    def __init__(self, every: int, save: Callable[[int], None], min_interval_s: float = 0.0):
        self.every, self.save, self.min_interval_s = every, save, min_interval_s
        self._last = time.monotonic()

    def before_fit(self) -> None:
        self._last = time.monotonic()

    def after_epoch(self) -> None:
        done = self.epoch + 1
        due = time.monotonic() - self._last >= self.min_interval_s
        if due and done % self.every == 0 and done < self.n_epoch and not getattr(self, "_skipped", False):
            self.save(self.epoch)
            self._last = time.monotonic()

    def before_epoch(self) -> None:
        # fit(start_epoch=k) skips epochs below k but still ends them: nothing to save there.
        self._skipped = self.epoch < getattr(self.learn, "kt_start_epoch", 0)


def _rng_state() -> dict[str, Any]:
    """The generators' states as plain JSON (no pickle: a checkpoint is data read back from a store)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }


def save_checkpoint(learn: Learner, folder: Path, epoch: int, meta: dict[str, Any]) -> tuple[Path, Path]:
    """`learn.save(with_opt=True)` plus the JSON of everything else; returns (weights file, meta file)."""
    weights = learn.save(folder.resolve() / f"epoch-{epoch}", with_opt=True)
    info = {
        "format": FORMAT,
        "epoch": epoch,
        "n_epochs": learn.n_epoch,
        "batch_size": learn.dls.train.bs,
        "loader_epoch": getattr(learn.dls.train, "_epoch", epoch + 1),
        "optimizer": optimizer_label(learn.opt),
        "rng": _rng_state(),
        "torch": torch.__version__,
        **meta,
    }
    path = folder / f"epoch-{epoch}.json"
    path.write_text(json.dumps(info), encoding="utf-8")
    return Path(weights), path


def read_meta(path: Path) -> dict[str, Any]:
    info = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError("not a kmnist-tune checkpoint description")
    return info


def load_checkpoint(learn: Learner, weights: Path, info: dict[str, Any]) -> int:
    """Put `learn` where the checkpoint left it; returns the epoch to start from."""
    if learn.opt is None:
        learn.create_opt()
    # fastai's load only warns when the optimizer's state does not fit: refuse instead (a state of
    # fastai's optimizer does not load into PyTorch's, nor the other way round).
    saved, ours = info.get("optimizer", "fastai"), optimizer_label(learn.opt)
    if saved != ours:
        raise ValueError(f"its optimizer state is {saved}'s and this trial's optimizer is {ours}")
    learn.load(weights.resolve().with_suffix(""), with_opt=True, strict=True)  # fastai loads weights_only
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(info["rng"]["torch"]), dtype=np.uint8).copy()))
    kind, keys, pos, has_gauss, gauss = info["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = info["rng"]["python"]
    random.setstate((version, tuple(internal), gauss_next))
    learn.dls.train._epoch = int(info["loader_epoch"])  # the shuffle (and augmentation) order goes on
    return int(info["epoch"]) + 1  # fit() records it on the learner, for the callbacks
