"""Simulated workers: the real worker loop (service/worker.py) with its own storage and an objective
that does not train, so dozens fit on two cores without torch. Shared by tests/test_claims.py,
tests/test_lifecycle.py, tests/test_failures.py and benchmarks/bench_scale.py.

What a test of the budget, a stop or a stale trial needs from a worker is its loop, not its
training: `Simulated` runs the loop on a thread, with an objective that samples the spec's
parameters the way the real one does (contract/space.py) and then, if the test holds it at a
`Gate`, waits there until the test opens it or the worker is asked to stop (as training stops at
its next batch: Interrupted, and the worker hands the trial back)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from kmnist_tune.contract.events import Listener
from kmnist_tune.contract.load import parse_spec
from kmnist_tune.contract.space import sample_params
from kmnist_tune.contract.spec import SweepSpec
from kmnist_tune.errors import Interrupted
from kmnist_tune.service.schema import create_storage
from kmnist_tune.service.studies import create_study, open_for_work
from kmnist_tune.service.worker import StopFlag, Worker


def dispose(storage: Any) -> None:
    """Close a storage's pooled connections (an RDB storage's engine; the proxy has none)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def create(url: str, spec: dict[str, Any], *, seed: int | None = None) -> None:
    """The study of `spec` (a spec as its YAML reads), made as `study create` makes it, in this process."""
    storage = create_storage(url)
    try:
        create_study(parse_spec(spec), storage, resume=False, seed=seed)
    finally:
        dispose(storage)


def make_study(url: str, name: str, n_trials: int, *, heartbeat_interval: int = 2, grace_period: int = 10) -> None:
    """A study of one searched parameter (random sampler) with an exact budget."""
    create(
        url,
        {
            "name": name,
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}},
            "pruner": "none",
            "sampler": "random",
            "budget": {"n_trials": n_trials},
            "workers": {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period},
        },
    )


@dataclass
class WorkLog:
    """What one simulated worker did: each granted claim as (seconds it took, its wall-clock end,
    the seconds of it spent making the trial: make_trial), how many claims found the budget taken, and which
    trial numbers its objective ran."""

    claims: list[tuple[float, float, float]] = field(default_factory=list)
    denied: int = 0
    ran: list[int] = field(default_factory=list)


def work(url: str, name: str, nap: Callable[[], float], log: WorkLog | None = None) -> int:
    """Run one simulated worker until the study's budget is used; returns the trials it ran."""
    log = log if log is not None else WorkLog()
    storage, study, spec = open_for_work(url, name)

    def objective(trial: optuna.Trial) -> float:
        log.ran.append(trial.number)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        time.sleep(nap())
        return lr

    worker = Worker(study, storage, spec, objective, Listener())
    claim, make = worker.claim, worker.make_trial
    asked = [0.0]

    def timed_make() -> optuna.Trial:
        t0 = time.perf_counter()
        try:
            return make()
        finally:
            asked[0] = time.perf_counter() - t0

    worker.make_trial = timed_make  # type: ignore[method-assign]

    def timed_claim() -> Any:
        t0 = time.perf_counter()
        got = claim()
        if isinstance(got, optuna.Trial):
            log.claims.append((time.perf_counter() - t0, time.time(), asked[0]))
        else:
            log.denied += 1
        return got

    worker.claim = timed_claim  # type: ignore[method-assign]
    try:
        return worker.run()
    finally:
        dispose(storage)


# -- a simulated worker that a test steers ---------------------------------------------------------


class Said(Listener):
    """The lines a worker says (a worker process prints them on stderr), kept for the test."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Gate:
    """Where simulated trials wait: each holds until the gate opens, or its worker is asked to stop
    (then it raises Interrupted, as training does at its next batch)."""

    def __init__(self, *, open: bool = False) -> None:
        self._open = threading.Event()
        if open:
            self._open.set()

    def open(self) -> None:
        self._open.set()

    def wait(self, stop: StopFlag) -> None:
        while not self._open.wait(0.05):
            if stop.requested:
                raise Interrupted("stop requested")


class Simulated:
    """One worker on a thread: open_for_work (the worker's own storage, heartbeats on), the real
    Worker loop, and an objective that samples the spec's parameters (the real sampling), waits at
    `gate` and returns `value`. `run_kwargs` go to Worker.run (max_trials, timeout)."""

    def __init__(self, url: str, name: str, gate: Gate | None = None, *, value: float = 0.5, **run_kwargs: Any) -> None:
        self.said = Said()
        self.stop = StopFlag(log=self.said.line)  # no signal handlers: `study stop --now` raises it
        self.storage, study, self.spec = open_for_work(url, name, log=self.said.line)
        self.gate = gate or Gate(open=True)
        self.params: dict[int, dict[str, Any]] = {}  # what each trial's objective was given
        self.worker = Worker(study, self.storage, self.spec, self._objective(value), self.said, stop=self.stop)
        self.run_kwargs = run_kwargs
        self.ran: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"sim-worker-{name}", daemon=True)

    def _objective(self, value: float) -> Callable[[optuna.Trial], float]:
        spec: SweepSpec = self.spec

        def objective(trial: optuna.Trial) -> float:
            self.params[trial.number] = sample_params(trial, spec)
            self.gate.wait(self.stop)
            return value

        return objective

    def _run(self) -> None:
        try:
            self.ran = self.worker.run(**self.run_kwargs)
        except BaseException as e:  # noqa: BLE001  (raised in the test's thread by join)
            self.error = e
        finally:
            dispose(self.storage)

    def start(self) -> Simulated:
        self._thread.start()
        return self

    def join(self, timeout: float = 120) -> int:
        """Wait for the loop to end; what it returned (trials run here), or what it raised."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the simulated worker did not stop within {timeout:.0f} s: {self.said.text}"
        if self.error is not None:
            raise self.error
        assert self.ran is not None
        return self.ran

    def run(self) -> int:
        """Work in the calling thread until the loop ends (a worker that nothing needs to steer)."""
        self._run()
        if self.error is not None:
            raise self.error
        assert self.ran is not None
        return self.ran
