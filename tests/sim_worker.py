"""A simulated worker: the real worker loop (service/worker.py) with its own storage and an
objective that only sleeps, so dozens fit on two cores without torch. Shared by tests/test_claims.py
and benchmarks/bench_scale.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

from kmnist_tune.contract.events import Listener
from kmnist_tune.contract.spec import parse_spec
from kmnist_tune.service.storage import open_storage, unwrap
from kmnist_tune.service.studies import create_study, open_for_work
from kmnist_tune.service.worker import Worker


def make_study(url: str, name: str, n_trials: int, *, heartbeat_interval: int = 2, grace_period: int = 10) -> None:
    """A study of one searched parameter (random sampler) with an exact budget."""
    spec = parse_spec(
        {
            "name": name,
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}},
            "pruner": "none",
            "sampler": "random",
            "budget": {"n_trials": n_trials},
            "workers": {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period},
        }
    )
    storage = open_storage(url, create=True)
    create_study(spec, storage, resume=False)
    unwrap(storage).engine.dispose()


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
        unwrap(storage).engine.dispose()
