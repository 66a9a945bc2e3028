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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

STATUS_ENV = "KMNIST_TUNE_STATUS"  # set by the supervisor: slot processes report structured lines
STATUS_PREFIX = "STATUS "


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


class Reporter:
    """Plain lines, one per event that matters (trial start, epoch end, trial end).

    Used when stderr is not a terminal (CI, logs, `nohup`), so the output stays greppable.
    """

    def __init__(self, stream: TextIO | None = None, total_trials: int | None = None, label: str = ""):
        self.stream = stream or sys.stderr
        self.total_trials = total_trials
        self.label = f"[{label}] " if label else ""
        # Under a supervisor, every line also carries this slot's state for its live row.
        self.structured = os.environ.get(STATUS_ENV) == "1"
        self.state: dict[str, Any] = {"trial": None, "epoch": None, "metric": None, "best": None, "left": total_trials}

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def line(self, text: str) -> None:
        if self.structured:
            print(STATUS_PREFIX + json.dumps({**self.state, "text": text}), file=self.stream, flush=True)
            return
        print(f"{time.strftime('%H:%M:%S')} {self.label}{text}", file=self.stream, flush=True)

    def trial_started(self, number: int, params: dict[str, Any], n_epochs: int) -> None:
        self.state.update(trial=number, epoch=f"0/{n_epochs}", metric=None)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.line(f"trial {number} started: {shown}")

    def batch(self, number: int, epoch: int, i: int, n: int) -> None:
        pass

    def epoch(
        self, number: int, epoch: int, n_epochs: int, metric_name: str, metric: float, seconds: float, images_per_s: float
    ) -> None:
        self.state.update(epoch=f"{epoch + 1}/{n_epochs}", metric=metric)
        self.line(
            f"trial {number} epoch {epoch + 1}/{n_epochs}: {metric_name}={metric:.4f} "
            f"({seconds:.1f} s, {images_per_s:,.0f} images/s)"
        )

    def trial_finished(self, number: int, state: str, value: float | None, best: float | None, done: int) -> None:
        self.state.update(best=best, left=None if self.total_trials is None else self.total_trials - done)
        left = f", {self.total_trials - done} left" if self.total_trials is not None else ""
        self.line(f"trial {number} {state.lower()}: value={_fmt(value)} best={_fmt(best)} ({done} finished{left})")


class LiveReporter(Reporter):
    """A live display for a terminal: the study's trial count and the running trial's batches."""

    def __init__(self, stream: TextIO | None = None, total_trials: int | None = None, label: str = ""):
        super().__init__(stream, total_trials, label)
        self.console = Console(file=self.stream)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.trials_task = self.progress.add_task(f"{self.label}trials (best -)", total=total_trials)
        self.batch_task = self.progress.add_task("waiting for a trial", total=None)

    def __enter__(self) -> LiveReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def line(self, text: str) -> None:
        self.progress.console.print(f"{time.strftime('%H:%M:%S')} {self.label}{text}", highlight=False)

    def batch(self, number: int, epoch: int, i: int, n: int) -> None:
        self.progress.update(self.batch_task, description=f"trial {number} epoch {epoch + 1}", completed=i, total=n)

    def trial_finished(self, number: int, state: str, value: float | None, best: float | None, done: int) -> None:
        super().trial_finished(number, state, value, best, done)
        self.progress.update(self.trials_task, completed=done, description=f"{self.label}trials (best {_fmt(best)})")


def make_reporter(total_trials: int | None = None, label: str = "", stream: TextIO | None = None) -> Reporter:
    stream = stream or sys.stderr
    cls = LiveReporter if stream.isatty() else Reporter
    return cls(stream, total_trials, label)


class SlotBoard:
    """The supervisor's view of its slot processes: one live row per slot on a terminal
    (trial, epoch, accuracy, best so far, trials left), plain prefixed lines otherwise."""

    def __init__(self, labels: list[str], stream: TextIO | None = None):
        self.stream = stream or sys.stderr
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
        for col in ("slot", "trial", "epoch", "accuracy", "best", "left", "last"):
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
            text = status.get("text", "")
            with self.lock:
                self.rows[label] = status
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
