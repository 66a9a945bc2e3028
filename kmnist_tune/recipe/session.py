"""Working a study: the data loaded once, the LR prior, the objective, the worker loop and the
listeners that watch it, put together for the `run` and `worker` commands."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from ..contract.events import Events
from ..contract.records import Budget, WorkerInfo
from ..contract.spec import SweepSpec
from ..masking import mask
from ..observe.notes import NoteListener
from ..observe.progress import SlotBoard, make_reporter
from ..observe.tracking import WandbListener
from ..optuna_internals import study_id, study_storage
from ..service.schema import create_storage
from ..service.slots import Slot, Stopped, in_this_process, run_slots, worker_args
from ..service.storage import count_states, release
from ..service.studies import StudySummary, check_study, create_study, open_for_work, raise_budget, read_study, summarize
from ..service.worker import StopFlag, Worker
from ..training.compiling import CompiledModels
from ..training.data import resolve_data_dir
from ..training.devices import slot_device
from ..training.splits import Splits, load_splits
from .cpu_threads import training_process
from .lr_prior import resolve_spec
from .objective import Objective
from .preflight import preflight


@dataclass
class DataOptions:
    data_dir: Path | None = None
    mirror: str | None = None


@dataclass
class WorkResult:
    ran: int  # trials this process ran
    stalled_s: float  # seconds it waited for the storage to come back
    study: optuna.Study
    spec: SweepSpec
    label: str
    stopped: StopFlag


def load_data(spec: SweepSpec, data: DataOptions) -> Splits:
    # Once per process, before any trial is claimed: a data problem must not leave a trial behind.
    return load_splits(spec.data, resolve_data_dir(data.data_dir), mirror=data.mirror)


def work_here(
    url: str,
    study_name: str,
    data: DataOptions,
    *,
    device: torch.device | None = None,
    label: str = "",
    max_trials: int | None = None,
    timeout: float | None = None,
    splits: Splits | None = None,
    n_trials: int | None = None,
    max_failures: int | None = None,
) -> WorkResult:
    """Work the study in this process until its budget is used, the time is up or a signal comes:
    the LR prior first (once per study), then the trial loop. `n_trials` raises the study's budget
    first (it never lowers it). All of it through the worker's one storage."""
    device = device or slot_device()

    def log(m: str) -> None:
        print(f"[{label}] {mask(m)}" if label else mask(m), file=sys.stderr, flush=True)

    storage, study, spec = open_for_work(url, study_name, log=log)
    splits = splits if splits is not None else load_data(spec, data)
    # Registered as a trainer on this host, its share of the cores applied, before the preflight: that
    # trains (and may compile) too, as the LR finder does if this worker runs it.
    with training_process() as cpu_share:
        # Before anything of the study is written (its budget, the LR prior, a trial): a device that does
        # not work ends this slot here with one line; a compile that fails is decided for its trials.
        compiled = CompiledModels(say=log)
        preflight(spec, splits.n_classes, device, compiled, log)
        if n_trials is not None:
            raise_budget(study, spec, n_trials, None)
        total, done = Budget.of(study.user_attrs, spec).n_trials, count_states(storage, study_id(study)).finished
        with make_reporter(total, label=label, done=done) as reporter:
            events = Events(reporter, WandbListener(spec.tracking.wandb, reporter.line), NoteListener())
            stop = StopFlag(log=reporter.line)
            stop.install()
            reporter.line(
                f"study {study_name}: {len(splits.y_train)} train / {len(splits.y_valid)} valid "
                f"images of {spec.data.dataset}, device {device}"
            )
            resolved = resolve_spec(study, storage, spec, splits, device, events)
            objective = Objective(
                resolved, splits, device, events, stop_requested=lambda: stop.requested, cpu_share=cpu_share, compiled=compiled
            )
            worker = Worker(study, storage, spec, objective, events, stop=stop, max_consecutive_failures=max_failures)
            ran = worker.run(max_trials=max_trials, timeout=timeout)
            if stop.requested:
                reporter.line(f"stopped by {stop.reason}")
    return WorkResult(ran, getattr(storage, "stalled_s", 0.0), study, spec, label, stop)


def own_wandb_settings(spec: SweepSpec) -> None:
    """`run` was handed its spec file by its own user: the file's W&B folder, mode and account are this
    user's choice, for this process and the slot processes it starts (which read them as W&B's own
    variables; a spec read back from the study database may only narrow them, observe/tracking.py).
    What the environment sets already wins."""
    w = spec.tracking.wandb
    chosen = {
        "WANDB_DIR": str(Path(w.dir).expanduser().resolve()) if w.dir else None,
        "WANDB_MODE": w.mode if w.mode != "auto" else None,
        "WANDB_ENTITY": w.entity,
        "WANDB_PROJECT": w.project,
    }
    for var, value in chosen.items():
        if value and not os.environ.get(var):
            os.environ[var] = value


def run_sweep(spec: SweepSpec, url: str, slots: list[Slot], data: DataOptions) -> StudySummary:
    """`kmnist-tune run`: create the study (or resume it), work it with local slots, summarise it."""
    own_wandb_settings(spec)
    splits = load_data(spec, data)  # data problems surface before anything is stored
    storage = create_storage(url)
    study, created = create_study(spec, storage, resume=True, seed=spec.seed)
    print(f"{'created' if created else 'resuming'} study {spec.name} in {mask(url)}", file=sys.stderr, flush=True)
    # The workers have storages of their own (at most 2 connections each): this one holds none meanwhile.
    release(storage)
    if in_this_process(slots):
        result = work_here(url, spec.name, data, device=torch.device("cpu"), splits=splits)
        if result.stopped.signum:  # a signal, not `study stop` (which ends a run as planned)
            raise Stopped(result.stopped.reason, 128 + result.stopped.signum)
        return summarize(result.study, result.spec, with_trials=False)
    run_slots(url, slots, worker_args(spec.name, data_dir=data.data_dir, mirror=data.mirror), _board(slots, spec))
    return summarize(study, spec, with_trials=False)


def attach_worker(
    url: str,
    study_name: str,
    slots: list[Slot],
    data: DataOptions,
    *,
    in_process: bool,
    n_trials: int | None = None,
    max_trials: int | None = None,
    timeout: float | None = None,
    max_failures: int | None = None,
) -> WorkResult | None:
    """`kmnist-tune worker`: work a study created elsewhere, here (one CPU slot, or one slot of a
    supervisor) or with one pinned process per GPU slot (then None: each slot reports itself).
    `n_trials` raises the study's budget first (it never lowers it)."""
    if in_process or in_this_process(slots):
        label = WorkerInfo.here().label
        return work_here(
            url,
            study_name,
            data,
            # A supervisor's slot trains on the GPU it was pinned to; one CPU slot (--gpus none) on the CPU.
            device=slot_device() if in_process else torch.device("cpu"),
            label=label,
            max_trials=max_trials,
            timeout=timeout,
            n_trials=n_trials,
            max_failures=max_failures,
        )
    # Fail here, once, on an unknown study or a bad URL, before the slot processes start.
    if n_trials is not None:
        study, spec = read_study(url, study_name)
        raise_budget(study, spec, n_trials, None)
        release(study_storage(study))
    else:
        spec = check_study(url, study_name)
    args = worker_args(
        study_name,
        data_dir=data.data_dir,
        mirror=data.mirror,
        max_trials=max_trials,
        timeout=timeout,
        max_consecutive_failed_runs=max_failures,
    )
    # A worker asked to stop hands its trials back and exits 0 (containers are stopped that way).
    with contextlib.suppress(Stopped):
        run_slots(url, slots, args, _board(slots, spec))
    return None


def _board(slots: list[Slot], spec: SweepSpec) -> SlotBoard:
    return SlotBoard([s.label for s in slots], spec.metric)
