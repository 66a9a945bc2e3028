"""Progress for long work: a live rich display on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def line(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {self.label}{text}", file=self.stream, flush=True)

    def trial_started(self, number: int, params: dict[str, Any], n_epochs: int) -> None:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        self.line(f"trial {number} started: {shown}")

    def batch(self, number: int, epoch: int, i: int, n: int) -> None:
        pass

    def epoch(
        self, number: int, epoch: int, n_epochs: int, metric_name: str, metric: float, seconds: float, images_per_s: float
    ) -> None:
        self.line(
            f"trial {number} epoch {epoch + 1}/{n_epochs}: {metric_name}={metric:.4f} "
            f"({seconds:.1f} s, {images_per_s:,.0f} images/s)"
        )

    def trial_finished(self, number: int, state: str, value: float | None, best: float | None, done: int) -> None:
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
