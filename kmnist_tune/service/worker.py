"""The worker loop: claim a trial of a shared study, train it with heartbeats, report it; repeat
until the study's budget is used, the time is up, or a signal asks it to stop.

Trials are taken with Optuna's ask/tell rather than `study.optimize` so that the budget check and
the trial's creation are one atomic claim (claims.py): with n_trials N, no number of workers can
make the study finish more than N trials (MaxTrialsCallback alone can overshoot by one per worker).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..contract.events import Listener, TrialEnd
from ..contract.records import Budget, StudyStop, TrialRecord, WorkerInfo
from ..contract.spec import SweepSpec
from ..errors import Interrupted, WorkerStopped, one_line
from ..optuna_internals import study_id, trial_id
from .artifacts import artifact_store, checkpoint_ids, remove_artifacts, remove_checkpoints
from .claims import budget_slot, make_trial, pending_claims
from .retry import is_transient
from .storage import StateCounts, count_states, finished_and_best, first_line, running_without_heartbeat, study_attrs, study_names
from .studies import records_of, seed_sampler, stop_study

POLL_S = 2.0  # how often an idle worker looks again while other workers' trials may still fail


class TrialsKeepFailing(WorkerStopped):
    pass


class StudyGone(WorkerStopped):
    pass


class StorageLost(WorkerStopped):
    pass


@dataclass(frozen=True)
class Outcome:
    """How the objective ended: the state and value to tell, the one-line error of a failed trial,
    and whether it was interrupted by a stop (then it is handed back, not counted as a failure)."""

    state: TrialState
    value: float | None = None
    error: str = ""
    interrupted: bool = False


@dataclass
class StopFlag:
    """First SIGINT/SIGTERM: finish cleanly (the running trial stops at its next batch and is
    handed back for another worker to retry). Second: exit at once; the heartbeat then fails
    the trial after the grace period and it is retried all the same."""

    requested: bool = False
    reason: str = ""
    signum: int = 0
    log: Callable[[str], None] | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def request(self, reason: str) -> None:
        """Stop as the first signal would (from `study stop --now`, seen by the heartbeat thread)."""
        if not self.requested:
            self.requested, self.reason = True, reason
            if self.log is not None:
                self.log(f"{reason}: stopping after the current batch; the trial is handed back")

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            os._exit(128 + signum)
        self.requested, self.reason, self.signum = True, name, signum
        if self.log is not None:
            self.log(f"{name}: stopping after the current batch (again to stop at once)")


class _Heartbeat:
    """Records the trial's heartbeat every interval (Optuna's storage API) while it trains, and calls
    `on_beat` after each beat (the worker looks whether its study was stopped with --now)."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: int | None, on_beat: Callable[[], None] | None = None):
        self.storage, self.trial_id, self.interval, self.on_beat = storage, trial_id, interval, on_beat
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
                if self.on_beat is not None:
                    self.on_beat()

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
        storage: BaseStorage,
        spec: SweepSpec,
        objective: Callable[[optuna.Trial], float],
        events: Listener,
        *,
        stop: StopFlag | None = None,
        max_consecutive_failures: int | None = None,
    ):
        self.study, self.storage, self.spec = study, storage, spec
        # W&B's agent flag (--max-consecutive-failed-runs) overrides the spec's workers.max_consecutive_failures.
        self.max_failures = max_consecutive_failures or spec.workers.max_consecutive_failures
        self.objective, self.events = objective, events
        self.stop = stop or StopFlag()
        self.identity = WorkerInfo.here()
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=spec.workers.max_retry)
        self.sampler_done = False  # the sampler has nothing left to suggest (a finished grid)
        hb = getattr(storage, "get_heartbeat_interval", None)
        self.heartbeat_interval: int | None = hb() if hb is not None else None
        self.study_id = study_id(study)
        self._new_trials: set[int] = set()  # made by this worker's claim, not popped from Optuna's queue: no retry
        self._silent_since: dict[int, float] = {}  # RUNNING trials seen without a heartbeat, since when
        self.budget = Budget.of({}, spec)  # the study's budget, as the last claim read it

    # -- claiming -----------------------------------------------------------
    def counts(self) -> StateCounts:
        return count_states(self.storage, self.study_id)

    def study_state(self) -> tuple[Budget, StudyStop | None]:
        """The study's budget and stop, as they are now: `study extend` and `study stop` change them
        while workers run, and every worker reads them before each claim."""
        attrs = study_attrs(self.storage, self.study_id, (Budget.ATTR, StudyStop.ATTR))
        with records_of(self.study.study_name):
            return Budget.of(attrs, self.spec), StudyStop.read(attrs)

    def claim(self) -> optuna.Trial | StudyStop | None:
        """Atomically: if the budget allows, create (or pop a waiting retry) and return a trial; the
        stop if the study was stopped; None if the budget is claimed (claims.py says how)."""
        budget, stopped = self.study_state()
        self.budget = budget
        if stopped is not None:
            return stopped
        with budget_slot(self.storage, self.study_id, self.study.study_name, budget.n_trials) as granted:
            return self.make_trial() if granted else None

    def make_trial(self) -> optuna.Trial:
        trial, new = make_trial(self.study, self.storage, self.study_id, lambda n: seed_sampler(self.study, self.spec, n))
        if new:
            self._new_trials.add(trial_id(trial))
        return trial

    def _stop_at_target(self, frozen: optuna.trial.FrozenTrial) -> str | None:
        """W&B's metric.target: the study stops as `study stop` stops it (running trials finish, no
        worker claims another), and the stop says why. The first trial to reach it writes the stop.
        Returns the reason when this trial stopped the study."""
        if not self.spec.reaches_target(frozen.value):
            return None
        reason = f"trial {frozen.number} reached the target: {self.spec.metric} {frozen.value:.6g}, target {self.spec.target:g}"
        stop_study(self.study, now=False, reason=reason)
        self.events.line(f"study {self.study.study_name}: {reason}; workers claim no more trials")
        return reason

    def _look_for_stop_now(self) -> None:
        stopped = self.study_state()[1]
        if stopped is not None and stopped.now:
            self.stop.request("study stop --now")

    def remove_checkpoints(self, frozen: optuna.trial.FrozenTrial) -> None:
        history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        chain = [trial_id(frozen)]
        for n in history if isinstance(history, list) else []:
            if isinstance(n, int) and 0 <= n < frozen.number:
                with contextlib.suppress(KeyError):  # a number no trial has: not Optuna's bookkeeping
                    chain.append(self.storage.get_trial_id_from_study_id_trial_number(self.study_id, n))
        n_epochs = min(int(frozen.params.get("epochs", self.spec.fixed_params()["epochs"])), 1000)
        store = artifact_store(self.storage)
        # Only checkpoints of this trial and those it retries: a record naming anything else was
        # written by someone else, to make this worker remove it.
        remove_artifacts(store, checkpoint_ids(TrialRecord.of(frozen).checkpoint, chain))
        remove_checkpoints(store, chain, n_epochs)

    # -- one trial: start, execute, tell, after (as Optuna's _run_trial and _tell_with_warning) -----
    def run_trial(self, trial: optuna.Trial) -> tuple[optuna.trial.FrozenTrial, Outcome] | None:
        """Run and tell one trial; None when its result was discarded (it was failed as stale while
        this worker could not reach the storage, and another worker retries it)."""
        try:
            self._start(trial)
            with _Heartbeat(self.storage, trial_id(trial), self.heartbeat_interval, self._look_for_stop_now):
                outcome = self._execute(trial)
            frozen = self._tell(trial, outcome)
        except UpdateFinishedTrialError:
            self.events.line(
                f"trial {trial.number} was failed as stale while this worker was unreachable; its result is discarded"
            )
            return None
        self._after(trial, frozen, outcome)
        return frozen, outcome

    def _start(self, trial: optuna.Trial) -> None:
        """Record who runs the trial, and whether it retries another. A retry starts with its
        original's attributes: the marks of how that one ended are cleared. Only the system attributes
        are read (one small query; a whole trial takes several), and Optuna's own retried_trial_number
        reads them, so the attribute's name stays Optuna's. A trial made just now by this worker's
        claim (not popped from Optuna's queue) has none yet: no read needed."""
        tid = trial_id(trial)
        new = tid in self._new_trials
        self._new_trials.discard(tid)
        system = SimpleNamespace(system_attrs={} if new else self.storage.get_trial_system_attrs(tid))
        original = RetryHeartbeatStaleTrialCallback.retried_trial_number(system)  # type: ignore[arg-type]
        fresh = TrialRecord.fresh() if original is not None else {}
        # retry_of is written either way: one that a client enqueued in the user attributes is not Optuna's.
        TrialRecord.write(trial, worker=self.identity, **fresh, retry_of=original)

    def _execute(self, trial: optuna.Trial) -> Outcome:
        """The objective, as Optuna's own optimize loop runs it: whatever it raises fails this trial
        (with a one-line reason), not the worker. Losing the storage is the worker's problem."""
        try:
            return Outcome(TrialState.COMPLETE, self.objective(trial))
        except optuna.TrialPruned:
            return Outcome(TrialState.PRUNED)
        except Interrupted:
            TrialRecord.write(trial, interrupted=self.stop.reason)
            return Outcome(TrialState.FAIL, error=f"interrupted by {self.stop.reason}", interrupted=True)
        except UpdateFinishedTrialError:
            raise
        except Exception as e:
            if is_transient(e):
                raise StorageLost(f"the storage stayed unreachable ({first_line(e)[:160]}); this worker stops") from None
            error = f"{type(e).__name__}: {one_line(e, 300)}"
            TrialRecord.write(trial, error=error)
            return Outcome(TrialState.FAIL, error=error)

    def _tell(self, trial: optuna.Trial, outcome: Outcome) -> optuna.trial.FrozenTrial:
        """Optuna's tell, with the two cases it does not expect of an ask/tell loop."""
        try:
            return self.study.tell(trial, outcome.value, state=outcome.state)
        except ValueError:
            # Optuna refuses to tell a finished trial: another worker failed it as stale meanwhile.
            if self.storage.get_trial(trial_id(trial)).state.is_finished():
                raise UpdateFinishedTrialError(f"trial {trial.number} is finished already") from None
            raise
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is used up, which Optuna allows only inside
            # study.optimize, and says so in a RuntimeError that has no type of its own (hence the
            # match on its text). The result is stored before that (tell's finally), so just stop.
            if "Study.stop" not in str(e):
                raise
            self.sampler_done = True
            return self.storage.get_trial(trial_id(trial))

    def _after(self, trial: optuna.Trial, frozen: optuna.trial.FrozenTrial, outcome: Outcome) -> None:
        """Hand an interrupted trial back (the same parameters, and its newest checkpoint, are queued for
        whichever worker comes next), or clean up after one that ended for good; then say so."""
        if outcome.interrupted:
            self.retry(self.study, frozen)
        else:
            # Its checkpoints and those of the trials it retries are not needed any more.
            self.remove_checkpoints(frozen)
        # The budget as it is now (`study extend` may have changed it since the claim), and any stop.
        self.budget, stop = self.study_state()
        stopped = self._stop_at_target(frozen) if stop is None and frozen.state == TrialState.COMPLETE else None
        finished, best = finished_and_best(self.storage, self.study_id, self.spec.direction == "maximize")
        self.events.trial_finished(
            TrialEnd(
                study=self.study.study_name,
                number=trial.number,
                state=frozen.state.name,
                value=frozen.value,
                metric=self.spec.metric,
                record=TrialRecord.of(frozen),
                error=outcome.error,
                best=best,
                finished=finished,
                budget=self.budget.n_trials,
                trial=trial,
                stopped_study=stopped,
            )
        )

    # -- trials nobody works on ---------------------------------------------
    def fail_stale(self) -> None:
        """Fail the trials of workers that died, and queue each again with the same parameters.

        Optuna's `fail_stale_trials` handles trials whose heartbeat stopped. A RUNNING trial that
        never beat at all (made by `optuna ask`, a plain Optuna script, or a worker that died before
        its first beat) it leaves alone; this worker fails one once it has watched it for a grace
        period without a beat (its own clock: hosts' clocks need not agree)."""
        optuna.storages.fail_stale_trials(self.study)
        if not self.heartbeat_interval:
            return
        now = time.monotonic()
        silent = set(running_without_heartbeat(self.storage, self.study_id))
        self._silent_since = {tid: self._silent_since.get(tid, now) for tid in silent}
        for tid, since in list(self._silent_since.items()):
            if now - since < self.spec.workers.grace_period:
                continue
            try:
                failed = self.storage.set_trial_state_values(tid, state=TrialState.FAIL)
            except UpdateFinishedTrialError:  # it ended (or another worker failed it) meanwhile
                failed = False
            if failed:
                frozen = self.storage.get_trial(tid)
                grace = self.spec.workers.grace_period
                self.events.line(f"trial {frozen.number} ran {grace} s without a heartbeat; failed and queued again")
                self.retry(self.study, frozen)
            del self._silent_since[tid]

    # -- the loop -----------------------------------------------------------
    def run(self, *, max_trials: int | None = None, timeout: float | None = None) -> int:
        """Work until the budget is used, `max_trials` ran here, `timeout` passed or a signal came;
        returns how many trials this process ran (results it had to discard do not count)."""
        try:
            return self._loop(max_trials, timeout)
        except KeyError as e:
            # Optuna's storages raise KeyError for a study id that no longer exists.
            if self.study.study_name not in study_names(self.storage):
                raise StudyGone(f"study {self.study.study_name!r} was deleted while this worker ran; it stops") from None
            raise e

    def _loop(self, max_trials: int | None, timeout: float | None) -> int:
        timeout = timeout if timeout is not None else self.study_state()[0].timeout
        start = time.monotonic()
        ran = failures = 0
        waiting_said = False
        last_stale_check = float("-inf")
        while not self.stop.requested and not self.sampler_done:
            if max_trials is not None and ran >= max_trials:
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                break
            # Once per heartbeat interval is enough: a trial only goes stale after several missed beats.
            if time.monotonic() - last_stale_check >= (self.heartbeat_interval or 0):
                self.fail_stale()
                last_stale_check = time.monotonic()
            trial = self.claim()
            if isinstance(trial, StudyStop):
                self.events.line(f"study {self.study.study_name} was {trial.describe()}; this worker claims no more trials")
                break
            if trial is None:
                # Trials running elsewhere, or about to (claimed, not yet made), may still fail and come back.
                running = self.counts().running + pending_claims(self.storage, self.study_id)
                if running == 0 or not self.heartbeat_interval:
                    # Budget used, and no trial elsewhere that could still fail and come back.
                    n = self.budget.n_trials
                    self.events.line(
                        f"study {self.study.study_name}: its budget of {n} trial{'s' if n != 1 else ''} is used; "
                        "raise it with --n-trials N or `kmnist-tune study extend`"
                    )
                    break
                if not waiting_said:
                    self.events.line(f"budget claimed; waiting while {running} trial(s) run elsewhere")
                    waiting_said = True
                time.sleep(POLL_S)
                last_stale_check = float("-inf")  # idle: look for dead workers' trials every poll
                continue
            waiting_said = False
            told = self.run_trial(trial)
            if told is None:
                continue
            frozen, outcome = told
            ran += 1
            if frozen.state == TrialState.FAIL and not outcome.interrupted:
                failures += 1
                if failures >= self.max_failures:
                    raise TrialsKeepFailing(
                        f"{failures} trials in a row failed (last: {outcome.error}); "
                        "check the spec's ranges and `kmnist-tune study show`"
                    )
            else:
                failures = 0
        return ran
