"""The worker loop: take trials from a shared study until its budget or time runs out."""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError
from .progress import Reporter
from .spec import SweepSpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 3


class TrialsKeepFailing(UserError):
    pass


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def budget_left(study: optuna.Study, n_trials: int | None) -> int | None:
    """Trials still to start: the budget less finished and running ones (running ones count, so
    workers that start together do not all take the last slot)."""
    if n_trials is None:
        return None
    c = counts(study)
    return n_trials - c["COMPLETE"] - c["PRUNED"] - c["RUNNING"]


def best_value(study: optuna.Study) -> float | None:
    try:
        return study.best_value
    except ValueError:
        return None


def work(
    study: optuna.Study,
    spec: SweepSpec,
    objective: Callable[[optuna.Trial], float],
    reporter: Reporter,
    *,
    max_trials: int | None = None,
    timeout: float | None = None,
) -> int:
    """Run trials of `study` in this process; returns how many this process ran.

    Stops when the study's n_trials budget is used, after `max_trials` here, or after `timeout` s.
    A trial whose training raises is marked FAIL and the loop goes on; several in a row stop it.
    """
    n_budget = spec.budget.n_trials
    timeout = timeout if timeout is not None else spec.budget.timeout
    start = time.monotonic()
    ran = failures = 0
    mine: list[FrozenTrial] = []
    last_error = ["unknown"]

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except (RuntimeError, ValueError) as e:
            last_error[0] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise

    def on_done(study: optuna.Study, trial: FrozenTrial) -> None:
        mine.append(trial)
        c = counts(study)
        reporter.trial_finished(trial.number, trial.state.name, trial.value, best_value(study), c["COMPLETE"] + c["PRUNED"])

    while True:
        left = budget_left(study, n_budget)
        if left is not None and left <= 0:
            break
        if max_trials is not None and ran >= max_trials:
            break
        if timeout is not None and time.monotonic() - start >= timeout:
            break
        study.optimize(guarded, n_trials=1, callbacks=[on_done], catch=(RuntimeError, ValueError))
        ran += 1
        last = mine[-1] if mine else None
        failures = failures + 1 if last is not None and last.state == TrialState.FAIL else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            raise TrialsKeepFailing(
                f"{failures} trials in a row failed (last: {last_error[0]}); check the spec's ranges and `kmnist-tune study show`"
            )
    return ran
