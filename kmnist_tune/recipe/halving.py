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

from ..contract.records import HalvingEvent
from ..contract.spec import HalvingSpec
from ..errors import one_line
from ..training import devices
from ..training.compiling import is_oom
from ..training.loop import TrialCallback


class Diverged(Exception):
    """Raised by DivergenceGuard inside fastai's fit; caught by `train_with_halving`."""

    def __init__(self, reason: str, detail: str, epoch: int, batch: int):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.epoch, self.batch = reason, detail, epoch, batch


class DivergenceGuard(TrialCallback):
    """Watches the raw and smoothed training loss and raises `Diverged` when training goes wrong.

    - non_finite: a NaN/inf loss at any batch;
    - blowup: after `warmup_batches`, the smoothed loss above `blowup_factor` x its running minimum;
    - no_trend: at the end of the first epoch, the smoothed loss has not fallen by at least
      `trend_drop` (a fraction) from where it stood after the warm-up.

    On a GPU the host never waits for the guard mid-epoch: the smoothing runs on the device, and
    each batch's values go to the host in a non-blocking copy that is read at the next batch (and at
    the end of the training part of each epoch). A divergence is then raised one batch later than it
    happens, naming that batch and its values: the same triggers and the same recorded events as a
    check made at once (the attempt that diverged is thrown away either way). The device sums are
    float64, the same arithmetic as Python's floats, so every threshold compares the same numbers
    (float32 on MPS, which has no float64). On a CPU, where reading the loss waits for nothing,
    the sums are Python floats and the values are ready at once.
    """

    order = 5  # before Recorder: a diverged batch must not reach the metrics

    def __init__(self, cfg: HalvingSpec):
        self.cfg = cfg
        self.beta = 0.9  # smoothing of the loss; short memory so a real spike shows within a few batches

    def before_fit(self) -> None:
        self.lr_finding = hasattr(self.learn, "lr_finder")  # lr_find drives the loss up on purpose
        self.n = 0
        # Python floats on a CPU, 0-d tensors on the loss's device elsewhere.
        self.avg: Any = None  # the running sum (unbiased by 1 - beta**n)
        self.smooth_min: Any = None
        self.after_warmup: Any = None
        self.last_smooth: Any = None
        self._pending: HostCopy | None = None

    def after_loss(self) -> None:
        learn = self.learn
        if not learn.training or self.lr_finding:
            return
        self._check()  # the batch before this one
        on_host = learn.loss.device.type in devices.HOST_DEVICES
        if on_host:
            loss: Any = learn.loss.item()
        else:
            loss = learn.loss.detach().reshape(()).to(_SUM_DTYPE.get(learn.loss.device.type, torch.float64))
        if self.avg is None:
            self.avg, self.smooth_min = (0.0, math.inf) if on_host else (torch.zeros_like(loss), torch.full_like(loss, math.inf))
        self.n += 1
        # Two products and a sum, each rounded, as `beta * avg + (1 - beta) * loss` on Python floats.
        self.avg = self.avg * self.beta + loss * (1 - self.beta)
        smooth = self.avg / (1 - self.beta**self.n)
        if self.n == self.cfg.warmup_batches:
            self.after_warmup = smooth
        watched = self.n > self.cfg.warmup_batches
        self._pending = HostCopy((loss, smooth, self.smooth_min), watched, learn.epoch, learn.iter)
        self.smooth_min = min(self.smooth_min, smooth) if on_host else torch.minimum(self.smooth_min, smooth)
        self.last_smooth = smooth

    def _check(self) -> None:
        """Raise for the batch whose values were sent to the host last, if they diverged."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        loss, smooth, smooth_min = pending.values()
        if not math.isfinite(loss):
            raise Diverged("non_finite", f"loss {loss} at batch {pending.batch}", pending.epoch, pending.batch)
        if pending.watched and smooth > self.cfg.blowup_factor * smooth_min:
            raise Diverged(
                "blowup",
                f"smoothed loss {smooth:.3g} > {self.cfg.blowup_factor:g} x its minimum {smooth_min:.3g}",
                pending.epoch,
                pending.batch,
            )

    def before_validate(self) -> None:
        if self.lr_finding:
            return
        self._check()  # the epoch's last batch
        if self.epoch != 0 or self.after_warmup is None or self.last_smooth is None:
            return
        last, after_warmup = float(self.last_smooth), float(self.after_warmup)  # once an epoch
        drop = 1 - last / after_warmup
        if drop < self.cfg.trend_drop:
            raise Diverged("no_trend", trend_detail(drop, self.cfg.trend_drop, after_warmup, last), self.epoch, self.iter)


def trend_detail(drop: float, wanted: float, start: float, end: float) -> str:
    """The no_trend line: the first epoch's change of the smoothed loss, in words that fit its sign."""
    moved = f"lowered the smoothed loss by {drop:.1%}" if drop >= 0 else f"raised the smoothed loss by {-drop:.1%}"
    return f"first epoch {moved} (a drop of {wanted:.0%} is needed) from {start:.3g} to {end:.3g}"


# The dtype of the device-side sums: float64 (Python's floats), where the device has it.
_SUM_DTYPE = {"mps": torch.float32}


class HostCopy:
    """A batch's (loss, smoothed loss, minimum before it) on their way to the host: from CUDA a
    non-blocking copy into pinned memory and an event after it, which the next batch's read finds
    long passed; from other devices a plain copy; Python floats as they are."""

    def __init__(self, vals: tuple[Any, Any, Any], watched: bool, epoch: int, batch: int):
        self.watched, self.epoch, self.batch = watched, epoch, batch
        self._event: torch.cuda.Event | None = None
        self._floats: list[float] | None = None
        if isinstance(vals[0], torch.Tensor):
            device = torch.stack(vals)
            self._host = torch.empty(device.shape, dtype=device.dtype, pin_memory=device.is_cuda)
            self._host.copy_(device, non_blocking=device.is_cuda)
            if device.is_cuda:
                self._event = torch.cuda.Event()
                self._event.record()
        else:
            self._floats = list(vals)  # Python floats already

    def values(self) -> list[float]:
        if self._floats is None:
            if self._event is not None:
                self._event.synchronize()
            self._floats = [float(x) for x in self._host.tolist()]
        return self._floats


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
