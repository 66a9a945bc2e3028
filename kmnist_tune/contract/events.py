"""A trial's events, and the listeners that show or record them.

The objective and the worker loop emit these; the progress reporter, the W&B listener and the
dashboard notes listen. Nothing that trains knows who is listening.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import one_line
from .records import EpochRecord, HalvingEvent, TrialRecord


@dataclass
class TrialStart:
    study: str
    number: int
    params: dict[str, Any]  # every training parameter of the trial
    searched: list[str]  # the names the sampler chose
    n_epochs: int
    device: str
    metric: str

    @property
    def shown_params(self) -> dict[str, Any]:
        """The searched parameters, or all of them when nothing is searched."""
        return {k: self.params[k] for k in self.searched} or self.params


@dataclass
class TrialEnd:
    study: str
    number: int
    state: str  # Optuna's state name: COMPLETE, PRUNED or FAIL
    value: float | None
    metric: str
    record: TrialRecord
    error: str = ""  # why it failed ("interrupted by SIGTERM", an exception's line)
    best: float | None = None  # the study's best value after this trial
    finished: int = 0  # finished (complete or pruned) trials in the study
    budget: int | None = None
    trial: Any = field(default=None, repr=False)  # the optuna.Trial, for listeners that write to the study
    stopped_study: str | None = None  # why, when this trial stopped the study (it reached the spec's target)


class Listener:
    """Receives a trial's events. Every method is optional: the base does nothing."""

    def line(self, text: str) -> None:
        """A free-form line for the user (a lock waited on, a storage stall)."""

    def progress(self, task: str, done: int, total: int) -> None:
        """Progress of long work that is not a trial (the LR finder)."""

    def trial_started(self, start: TrialStart) -> None: ...

    def batch(self, number: int, epoch: int, i: int, n: int) -> None: ...

    def epoch(self, number: int, rec: EpochRecord) -> None: ...

    def halving(self, number: int, event: HalvingEvent) -> None: ...

    def trial_finished(self, end: TrialEnd) -> None: ...


class Events(Listener):
    """Hands every event to each listener in turn. The first listener is the user's display; the
    others record evidence (W&B, dashboard notes) and are best effort: one that raises is reported
    once on the display and dropped, and never fails a trial."""

    def __init__(self, display: Listener, *evidence: Listener):
        self.display = display
        self.evidence = list(evidence)

    def _emit(self, name: str, *args: Any) -> None:
        getattr(self.display, name)(*args)
        for listener in list(self.evidence):
            try:
                getattr(listener, name)(*args)
            except Exception as e:
                self.evidence.remove(listener)
                why = one_line(e, 160)
                self.display.line(f"{type(listener).__name__} stopped ({type(e).__name__}: {why}); training goes on")

    def line(self, text: str) -> None:
        self._emit("line", text)

    def progress(self, task: str, done: int, total: int) -> None:
        self._emit("progress", task, done, total)

    def trial_started(self, start: TrialStart) -> None:
        self._emit("trial_started", start)

    def batch(self, number: int, epoch: int, i: int, n: int) -> None:
        self._emit("batch", number, epoch, i, n)

    def epoch(self, number: int, rec: EpochRecord) -> None:
        self._emit("epoch", number, rec)

    def halving(self, number: int, event: HalvingEvent) -> None:
        self._emit("halving", number, event)

    def trial_finished(self, end: TrialEnd) -> None:
        self._emit("trial_finished", end)
