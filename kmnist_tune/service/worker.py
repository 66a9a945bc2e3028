"""The worker loop: claim a trial of a shared study, train it with heartbeats, report it; repeat
until the study's budget is used, the time is up, or a signal asks it to stop.

Trials are taken with Optuna's ask/tell rather than `study.optimize` so that the budget check and
the trial's creation happen together under a lock held by the storage backend: with n_trials N,
no number of workers can make the study finish more than N trials (MaxTrialsCallback alone can
overshoot by one per worker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..contract.events import Listener, TrialEnd
from ..contract.records import TrialRecord, WorkerInfo
from ..contract.spec import SweepSpec
from ..errors import Interrupted, UserError
from .lock import storage_lock
from .storage import StateCounts, count_states
from .studies import best_or_none

MAX_FAILURES_IN_A_ROW = 3
POLL_S = 2.0  # how often an idle worker looks again while other workers' trials may still fail


class TrialsKeepFailing(UserError):
    pass


@dataclass
class StopFlag:
    """First SIGINT/SIGTERM: finish cleanly (the running trial stops at its next batch and is
    handed back for another worker to retry). Second: exit at once; the heartbeat then fails
    the trial after the grace period and it is retried all the same."""

    requested: bool = False
    reason: str = ""
    log: Callable[[str], None] | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            os._exit(128 + signum)
        self.requested, self.reason = True, name
        if self.log is not None:
            self.log(f"{name}: stopping after the current batch (again to stop at once)")


class _Heartbeat:
    """Records the trial's heartbeat every interval (Optuna's storage API) while it trains."""

    def __init__(self, storage: Any, trial_id: int, interval: int | None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            # A missed beat is retried next interval; the grace period covers a few.
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Worker:
    """Works one study in this process: claims trials under the budget, runs `objective` on each
    with heartbeats, reports the outcome, and stops on a signal, a timeout or an exhausted budget."""

    def __init__(
        self,
        study: optuna.Study,
        storage: Any,
        spec: SweepSpec,
        objective: Callable[[optuna.Trial], float],
        events: Listener,
        *,
        stop: StopFlag | None = None,
    ):
        self.study, self.storage, self.spec = study, storage, spec
        self.objective, self.events = objective, events
        self.stop = stop or StopFlag()
        self.identity = WorkerInfo.here()
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.workers.max_retry)
        self.sampler_done = False  # the sampler has nothing left to suggest (a finished grid)
        hb = getattr(storage, "get_heartbeat_interval", None)
        self.heartbeat_interval: int | None = hb() if hb is not None else None
        self.study_id = storage.get_study_id_from_name(study.study_name)

    # -- claiming -----------------------------------------------------------
    def counts(self) -> StateCounts:
        return count_states(self.storage, self.study_id)

    def claim(self) -> optuna.Trial | None:
        """Atomically: if the budget allows, create (or pop a waiting retry) and return a trial."""
        n_budget = self.spec.budget.n_trials
        with storage_lock(self.storage, f"kmnist-tune/budget/{self.study.study_name}"):
            if n_budget is not None:
                c = self.counts()
                if c.finished + c.running >= n_budget:
                    return None
            return self.study.ask()

    # -- one trial ----------------------------------------------------------
    def run_trial(self, trial: optuna.Trial) -> tuple[optuna.trial.FrozenTrial, str]:
        # Optuna's Trial has no public id; its storage record says whether this is a retry.
        original = RetryHeartbeatStaleTrialCallback.retried_trial_number(self.storage.get_trial(trial._trial_id))
        TrialRecord.write(trial, worker=self.identity, **({"retry_of": original} if original is not None else {}))
        error = ""
        with _Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval):
            try:
                value = self.objective(trial)
                state = TrialState.COMPLETE
            except optuna.TrialPruned:
                state, value = TrialState.PRUNED, None
            except Interrupted:
                state, value, error = TrialState.FAIL, None, f"interrupted by {self.stop.reason}"
                TrialRecord.write(trial, interrupted=self.stop.reason)
            except (RuntimeError, ValueError) as e:
                state, value = TrialState.FAIL, None
                error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                TrialRecord.write(trial, error=error)
        try:
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value, state=state)
            else:
                self.study.tell(trial, state=state)
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is used up, which Optuna allows only
            # inside study.optimize; the result is stored before that (tell's finally), so just stop.
            if "Study.stop" not in str(e):
                raise
            self.sampler_done = True
        frozen = self.storage.get_trial(trial._trial_id)
        if error.startswith("interrupted"):
            # Hand the trial back: the same parameters are queued for whichever worker comes next.
            self.retry(self.study, frozen)
        self.events.trial_finished(
            TrialEnd(
                study=self.study.study_name,
                number=trial.number,
                state=frozen.state.name,
                value=frozen.value,
                metric=self.spec.metric,
                record=TrialRecord.of(frozen),
                error=error,
                best=None if (best := best_or_none(self.study)) is None else best.value,
                finished=self.counts().finished,
                budget=self.spec.budget.n_trials,
                trial=trial,
            )
        )
        return frozen, error

    # -- the loop -----------------------------------------------------------
    def run(self, *, max_trials: int | None = None, timeout: float | None = None) -> int:
        """Work until the budget is used, `max_trials` ran here, `timeout` passed or a signal came;
        returns how many trials this process ran."""
        timeout = timeout if timeout is not None else self.spec.budget.timeout
        start = time.monotonic()
        ran = failures = 0
        waiting_said = False
        last_stale_check = float("-inf")
        while not self.stop.requested and not self.sampler_done:
            if max_trials is not None and ran >= max_trials:
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                break
            # Fail the trials of workers that died (no heartbeat for the grace period); the retry
            # callback queues each again with the same parameters. Once per heartbeat interval is
            # enough: a trial only goes stale after several missed beats.
            if time.monotonic() - last_stale_check >= (self.heartbeat_interval or 0):
                optuna.storages.fail_stale_trials(self.study)
                last_stale_check = time.monotonic()
            trial = self.claim()
            if trial is None:
                running = self.counts().running
                if running == 0 or not self.heartbeat_interval:
                    break  # budget used, and no trial elsewhere that could still fail and come back
                if not waiting_said:
                    self.events.line(f"budget claimed; waiting while {running} trial(s) run elsewhere")
                    waiting_said = True
                time.sleep(POLL_S)
                last_stale_check = float("-inf")  # idle: look for dead workers' trials every poll
                continue
            waiting_said = False
            frozen, error = self.run_trial(trial)
            ran += 1
            if frozen.state == TrialState.FAIL and not error.startswith("interrupted"):
                failures += 1
                if failures >= MAX_FAILURES_IN_A_ROW:
                    raise TrialsKeepFailing(
                        f"{failures} trials in a row failed (last: {error}); check the spec's ranges and `kmnist-tune study show`"
                    )
            else:
                failures = 0
        return ran
