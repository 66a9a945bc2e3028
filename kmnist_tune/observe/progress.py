"""Progress for long work: a live rich display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import IO, Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..contract.events import Listener, TrialEnd, TrialStart
from ..contract.records import EpochRecord, HalvingEvent
from ..masking import mask

STATUS_ENV = "KMNIST_TUNE_STATUS"  # set by the supervisor: slot processes report structured lines
STATUS_PREFIX = "STATUS "
PLAIN_PROGRESS_EVERY_S = 5.0  # off a terminal, long work prints a line this often


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


class Reporter(Listener):
    """Plain lines, one per event that matters (trial start, epoch end, trial end, a halving).

    Used when stderr is not a terminal (CI, logs, `nohup`), so the output stays greppable.
    """

    def __init__(self, stream: TextIO | None = None, total_trials: int | None = None, label: str = "", done: int = 0):
        self.stream = stream or sys.stderr
        self.label = f"[{label}] " if label else ""
        # Under a supervisor, every line also carries this slot's state for its live row.
        self.structured = os.environ.get(STATUS_ENV) == "1"
        self.state: dict[str, Any] = {"trial": None, "epoch": None, "metric": None, "best": None, "left": total_trials}
        self.current: TrialStart | None = None
        self._last_progress: dict[str, float] = {}

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def line(self, text: str) -> None:
        text = mask(text)  # lines carry text from storage (a stop reason, an error): no terminal escapes
        if self.structured:
            print(STATUS_PREFIX + json.dumps({**self.state, "text": text}), file=self.stream, flush=True)
            return
        print(f"{time.strftime('%H:%M:%S')} {self.label}{text}", file=self.stream, flush=True)

    def progress(self, task: str, done: int, total: int) -> None:
        now = time.monotonic()
        first = task not in self._last_progress
        if first or done >= total or now - self._last_progress[task] >= PLAIN_PROGRESS_EVERY_S:
            self._last_progress[task] = now
            self.line(f"{task}: {done}/{total}")
        if done >= total:
            self._last_progress.pop(task, None)

    def trial_started(self, start: TrialStart) -> None:
        self.current = start
        self.state.update(trial=start.number, epoch=f"0/{start.n_epochs}", metric=None)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in start.shown_params.items())
        self.line(f"trial {start.number} started: {shown}")

    def epoch(self, number: int, rec: EpochRecord) -> None:
        n_epochs = self.current.n_epochs if self.current else rec.epoch + 1
        metric = self.current.metric if self.current else "metric"
        self.state.update(epoch=f"{rec.epoch + 1}/{n_epochs}", metric=rec.metric)
        self.line(
            f"trial {number} epoch {rec.epoch + 1}/{n_epochs}: {metric}={rec.metric:.4f} "
            f"({rec.seconds:.1f} s, {rec.images_per_s:,.0f} images/s)"
        )

    def halving(self, number: int, event: HalvingEvent) -> None:
        to = f"halving to {event.to_bs}" if event.to_bs else "at the minimum batch size, giving up"
        self.line(f"trial {number}: {event.reason} at batch size {event.from_bs} ({event.detail}); {to}")

    def trial_finished(self, end: TrialEnd) -> None:
        left = None if end.budget is None else end.budget - end.finished
        self.state.update(best=end.best, left=left)
        state = end.state.lower() + (f" ({end.error})" if end.error else "")
        self.line(
            f"trial {end.number} {state}: value={_fmt(end.value)} best={_fmt(end.best)} "
            f"({end.finished} finished{'' if left is None else f', {left} left'})"
        )


class LiveReporter(Reporter):
    """A live display for a terminal: the study's trial count and the running trial's batches (or
    the LR finder's iterations)."""

    def __init__(self, stream: TextIO | None = None, total_trials: int | None = None, label: str = "", done: int = 0):
        super().__init__(stream, total_trials, label, done)
        self.console = Console(file=self.stream)
        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        # A resumed study's bar starts at what is done already.
        self.trials_task = self.bars.add_task(f"{self.label}trials (best -)", total=total_trials, completed=done)
        self.batch_task = self.bars.add_task("waiting for a trial", total=None)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> LiveReporter:
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()

    def line(self, text: str) -> None:
        self.bars.console.print(f"{time.strftime('%H:%M:%S')} {self.label}{mask(text)}", highlight=False, markup=False)

    def progress(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bars.add_task(task, total=total)
        self.bars.update(self.tasks[task], completed=done, total=total)
        if done >= total:
            self.bars.remove_task(self.tasks.pop(task))

    def batch(self, number: int, epoch: int, i: int, n: int) -> None:
        self.bars.update(self.batch_task, description=f"trial {number} epoch {epoch + 1}", completed=i, total=n)

    def trial_finished(self, end: TrialEnd) -> None:
        super().trial_finished(end)
        # The total follows `study extend` (end.budget is the budget as this trial's end read it).
        self.bars.update(
            self.trials_task, completed=end.finished, total=end.budget, description=f"{self.label}trials (best {_fmt(end.best)})"
        )


def make_reporter(total_trials: int | None = None, label: str = "", stream: TextIO | None = None, done: int = 0) -> Reporter:
    """Live bars on a terminal, plain lines elsewhere; `done`: trials the study has finished already."""
    stream = stream or sys.stderr
    cls = LiveReporter if stream.isatty() else Reporter
    return cls(stream, total_trials, label, done)


class SlotBoard:
    """The supervisor's view of its slot processes: one live row per slot on a terminal
    (trial, epoch, the study's metric, best so far, trials left), plain prefixed lines otherwise."""

    # Slot processes write structured status lines for the rows (see Reporter.structured).
    child_env = {STATUS_ENV: "1"}

    def __init__(self, labels: list[str], metric: str, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.metric = metric  # the column's header: what the slots report (valid_loss, balanced_accuracy, ...)
        self.rows: dict[str, dict[str, Any]] = {lb: {} for lb in labels}
        self.live: Live | None = None
        self.lock = threading.Lock()
        if self.stream.isatty():
            self.console = Console(file=self.stream)
            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> SlotBoard:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()

    def _table(self) -> Table:
        t = Table(title="workers", expand=False)
        for col in ("slot", "trial", "epoch", self.metric, "best", "left", "last"):
            t.add_column(col)
        for label, st in self.rows.items():
            t.add_row(
                label,
                str(st.get("trial", "-")),
                str(st.get("epoch") or "-"),
                _fmt(st.get("metric")),
                _fmt(st.get("best")),
                str(st.get("left", "-")),
                str(st.get("text", ""))[:60],
            )
        return t

    def feed(self, label: str, raw: str) -> None:
        raw = raw.rstrip("\n")
        text = raw
        if raw.startswith(STATUS_PREFIX):
            try:
                status = json.loads(raw[len(STATUS_PREFIX) :])
            except json.JSONDecodeError:
                status = {"text": raw}
            text = str(status.get("text", ""))
            with self.lock:
                self.rows[label] = status
        text = mask(text)
        with self.lock:
            if self.live is not None:
                self.live.console.print(f"{time.strftime('%H:%M:%S')} [{label}] {text}", highlight=False, markup=False)
                self.live.update(self._table())
            else:
                print(f"{time.strftime('%H:%M:%S')} [{label}] {text}", file=self.stream, flush=True)

    def follow(self, label: str, pipe: IO[str]) -> threading.Thread:
        def pump() -> None:
            for raw in pipe:
                self.feed(label, raw)

        th = threading.Thread(target=pump, daemon=True, name=f"slot-{label}")
        th.start()
        return th
