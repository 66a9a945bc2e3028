"""The batch-halving rule: watch the training loss, and on divergence or out-of-memory halve the
batch size and train again, down to a floor.

The tutorial's rule, automated: "start with a moderately large batch size (512); if the model
acts weird and the loss is not on a clear downward trend, halve it and train again; repeat".
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from fastai.callback.core import Callback

from ..contract.records import HalvingEvent
from ..contract.spec import HalvingSpec
from ..errors import one_line


class Diverged(Exception):
    """Raised by DivergenceGuard inside fastai's fit; caught by `train_with_halving`."""

    def __init__(self, reason: str, detail: str, epoch: int, batch: int):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.epoch, self.batch = reason, detail, epoch, batch


class DivergenceGuard(Callback):
    """Watches the raw and smoothed training loss and raises `Diverged` when training goes wrong.

    - non_finite: a NaN/inf loss at any batch;
    - blowup: after `warmup_batches`, the smoothed loss above `blowup_factor` x its running minimum;
    - no_trend: at the end of the first epoch, the smoothed loss has not fallen by at least
      `trend_drop` (a fraction) from where it stood after the warm-up.
    """

    order = 5  # before Recorder: a diverged batch must not reach the metrics

    def __init__(self, cfg: HalvingSpec):
        self.cfg = cfg
        self.beta = 0.9  # smoothing of the loss; short memory so a real spike shows within a few batches

    def before_fit(self) -> None:
        self.n, self.avg, self.smooth_min = 0, 0.0, math.inf
        self.after_warmup: float | None = None
        self.lr_finding = hasattr(self.learn, "lr_finder")  # lr_find drives the loss up on purpose

    def after_loss(self) -> None:
        if not self.training or self.lr_finding:
            return
        loss = float(self.loss.detach())
        if not math.isfinite(loss):
            raise Diverged("non_finite", f"loss {loss} at batch {self.iter}", self.epoch, self.iter)
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smooth = self.avg / (1 - self.beta**self.n)
        if self.n == self.cfg.warmup_batches:
            self.after_warmup = smooth
        if self.n > self.cfg.warmup_batches and smooth > self.cfg.blowup_factor * self.smooth_min:
            raise Diverged(
                "blowup",
                f"smoothed loss {smooth:.3g} > {self.cfg.blowup_factor:g} x its minimum {self.smooth_min:.3g}",
                self.epoch,
                self.iter,
            )
        self.smooth_min = min(self.smooth_min, smooth)
        self.last_smooth = smooth

    def before_validate(self) -> None:
        if self.lr_finding or self.epoch != 0 or self.after_warmup is None:
            return
        drop = 1 - self.last_smooth / self.after_warmup
        if drop < self.cfg.trend_drop:
            raise Diverged(
                "no_trend",
                f"first epoch lowered the smoothed loss by {drop:.1%} (< {self.cfg.trend_drop:.0%}) "
                f"from {self.after_warmup:.3g} to {self.last_smooth:.3g}",
                self.epoch,
                self.iter,
            )


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    # Other backends (MPS, ROCm builds) raise a plain RuntimeError with this text.
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class HalvingOutcome:
    result: Any = None  # what the last attempt returned; None when the floor was reached
    batch_size: int = 0
    attempts: int = 0
    events: list[HalvingEvent] = field(default_factory=list)
    floor_reached: bool = False

    @property
    def stop_reason(self) -> str | None:
        if not self.floor_reached:
            return None
        e = self.events[-1]
        return f"{e.reason} at batch size {e.from_bs}, the minimum: {e.detail}"


def train_with_halving(
    attempt: Callable[[int], Any], initial_bs: int, cfg: HalvingSpec, on_event: Callable[[HalvingEvent], None] | None = None
) -> HalvingOutcome:
    """Call `attempt(batch_size)` until it returns without diverging or running out of memory,
    halving the batch size after each failure; stop once the floor (`cfg.min_batch_size`) fails too.

    Each attempt must build its own Learner: nothing of a failed attempt is reused, and its
    memory is released before the next one starts.
    """
    out = HalvingOutcome(batch_size=initial_bs)
    bs = initial_bs
    while True:
        out.attempts += 1
        out.batch_size = bs
        try:
            out.result = attempt(bs)
            return out
        except Diverged as d:
            if "divergence" not in cfg.halve_on:
                raise
            reason, detail, epoch, batch = d.reason, d.detail, d.epoch, d.batch
        except Exception as e:
            if not (is_oom(e) and "oom" in cfg.halve_on):
                raise
            # fastai prefixes errors raised in callbacks with a line of its own: keep the whole text.
            reason, detail, epoch, batch = "oom", one_line(e, 300), -1, -1
        release_memory()
        nxt = bs // 2
        floor = nxt < cfg.min_batch_size
        event = HalvingEvent(bs, None if floor else nxt, reason, detail, epoch, batch)
        out.events.append(event)
        if on_event is not None:
            on_event(event)
        if floor:
            out.floor_reached = True
            return out
        bs = nxt
