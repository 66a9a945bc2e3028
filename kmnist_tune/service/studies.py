"""Optuna studies that carry their spec: create, open and delete them, build their sampler and
pruner, and summarise them (the one summary `study show`, `study list`, `best` and `run` print)."""

from __future__ import annotations

import collections.abc
import datetime as dt
import inspect
import json
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import get_all_artifact_meta
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from pydantic import TypeAdapter, ValidationError

from .. import __version__
from .. import optuna_internals as internals
from ..contract.load import parse_spec
from ..contract.records import (
    BUDGET_ATTR,
    CREATED_ATTR,
    FINISHED_STATES,
    SPEC_ATTR,
    Budget,
    EnsembleEvaluation,
    LRPrior,
    MalformedRecord,
    StudyStop,
    TestEvaluation,
    TrialRecord,
    who_and_when,
)
from ..contract.space import fit_into, grid_space, without_quantiles
from ..contract.spec import SpecError, SweepSpec, spec_to_dict
from ..contract.wandb import to_wandb
from ..errors import UserError, one_line
from ..masking import mask
from .artifacts import artifact_store, artifacts_lock, checkpoint_ids, remove_artifacts, remove_checkpoints
from .evaluations import signed_evaluations
from .listing import ListedStudy, listed_studies
from .lock import storage_lock
from .lr_curve import with_curve
from .retry import RetryingRDBStorage, RetryingStorage, open_worker_storage
from .schema import create_storage
from .storage import (
    StateCounts,
    count_states,
    describe,
    finished_and_best,
    is_grpc,
    open_grpc,
    open_storage,
    require_schema,
    require_study,
    short_engine,
    study_names,
    unknown_study,
    user_errors,
)

SAMPLER_CLASSES: dict[str, type] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
}
# Samplers that keep their state in the study's trials as a pickle and unpickle it on the next ask
# (Optuna's CmaEsSampler: `cma:optimizer:*` system attributes, optuna/samplers/_cmaes.py). Everyone who
# can write the study database (any user of a shared one, whoever handed over a SQLite file, anyone who
# reaches a storage proxy) could plant one and run code on every worker of the study, with its
# secrets. Never built; a study that names one can still be read. (Every other sampler and pruner
# offered here keeps plain JSON: tests/test_attacks.py plants a pickle for each.)
UNSAFE_SAMPLERS: dict[str, str] = {
    "cmaes": "Optuna's CMA-ES sampler keeps its state as a pickle in the study database, and anyone who can "
    "write that database could make every worker run code by unpickling it",
}
PRUNER_CLASSES: dict[str, type] = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}


def check_options(cls: type, options: dict[str, Any], where: str) -> None:
    """Each option against the type its constructor declares, so that a wrong one fails when the study
    is created rather than later in every worker (TPE's `gamma: 5` fails only when it samples)."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    module = sys.modules[cls.__module__]
    names = {**vars(typing), **vars(collections.abc), **vars(optuna), **vars(module), "FrozenTrial": FrozenTrial}
    for key, value in options.items():
        if key not in params:
            continue  # the constructor itself names an unknown option
        annotation = params[key].annotation
        try:
            hint = eval(annotation, names) if isinstance(annotation, str) else annotation  # Optuna's own annotations
            adapter = TypeAdapter(hint)
        except Exception:  # a type this check cannot evaluate: the constructor still checks what it can
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as e:
            problem = e.errors()[0]["msg"].lower()
            wanted = getattr(annotation, "__name__", annotation)
            raise SpecError(f"{where}.{key}: {value!r} does not fit {cls.__name__}'s {key} ({wanted}): {problem}") from None


def refuse_unsafe_sampler(spec: SweepSpec, where: str) -> None:
    """A SpecError for a sampler this project never builds (UNSAFE_SAMPLERS), naming the safe ones."""
    why = UNSAFE_SAMPLERS.get(spec.sampler.name)
    if why is not None:
        raise SpecError(f"{where}: sampler {spec.sampler.name!r} is refused: {why}; use tpe (the default), random or grid")


class RefusedSampler(optuna.samplers.RandomSampler):
    """Stands in for a refused sampler (UNSAFE_SAMPLERS) in a study opened to be read: `best`, `study
    show` and the report work, and anything that would sample fails with the reason instead."""

    def __init__(self, spec: SweepSpec) -> None:
        super().__init__()
        self.spec = spec

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        refuse_unsafe_sampler(self.spec, f"study {self.spec.name!r}")
        return {}


def make_sampler(spec: SweepSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    refuse_unsafe_sampler(spec, "sampler.name")
    opts: dict[str, Any] = {"seed": seed, **spec.sampler.options}
    name = spec.sampler.name
    cls = SAMPLER_CLASSES[name]
    check_options(cls, spec.sampler.options, "sampler.options")
    try:
        return cls(grid_space(spec), **opts) if name == "grid" else cls(**opts)
    except (TypeError, ValueError) as e:  # a constructor's own range check is a ValueError, like the pruners'
        raise SpecError(f"sampler.options: {e}; see Optuna's {name} sampler for its options") from None


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number` of a study seeded `seed`. A trial's random draws depend on
    these two alone, not on which worker samples it or how many trials that worker sampled before: a
    seeded study run again by one worker repeats, and several workers never share a random stream."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def seed_sampler(study: optuna.Study, spec: SweepSpec, number: int) -> None:
    """Give the study, for the trial about to be sampled, its own seeded sampler (trial_seed). Samplers
    keep nothing between trials but their random state."""
    study.sampler = make_sampler(spec, trial_seed(spec.seed, number))


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    opts: dict[str, Any] = dict(spec.pruner.options)
    name = spec.pruner.name
    if name == "hyperband":
        opts.setdefault("max_resource", "auto")
    check_options(PRUNER_CLASSES[name], opts, "pruner.options")
    try:
        return PRUNER_CLASSES[name](**opts)
    except (TypeError, ValueError) as e:
        raise SpecError(f"pruner.options: {e}; see Optuna's {name} pruner for its options") from None


class NotOurStudy(UserError):
    """A study without a stored spec: another tool made it (or a `study create` is writing it now)."""


def stored_spec(study_name: str, attrs: dict[str, Any]) -> SweepSpec:
    data = attrs.get(SPEC_ATTR)
    if data is None:
        raise NotOurStudy(
            f"study {study_name!r} was not created by kmnist-tune (it has no stored spec); "
            "create it with `kmnist-tune study create SPEC`"
        )
    # Anyone sharing the database can write this: parse_spec bounds its size, nesting and option values
    # (a RecursionError or a giant option there is one line here, not a crash in every worker).
    return parse_spec(data, f"spec stored in study {study_name!r}")


@contextmanager
def records_of(name: str) -> Iterator[None]:
    """A malformed record read inside names its study (records.py knows only the attribute)."""
    try:
        yield
    except MalformedRecord as e:
        raise e.in_study(name) from None


def create_study(spec: SweepSpec, storage: BaseStorage, *, resume: bool, seed: int | None = None) -> tuple[optuna.Study, bool]:
    """Create the study for `spec`, or (resume=True) reopen it if it exists with the same spec.

    Returns (study, created). The spec is stored in the study's user attrs, so workers need
    only the study name and the storage URL.
    """
    # Under a storage-held lock: of several `run`/`study create` of one new study, exactly one creates
    # it and writes its spec before any other looks (workers wait on the same lock: open_for_work).
    with storage_lock(storage, f"kmnist-tune/create/{spec.name}"):
        try:
            return _create_or_reopen(spec, storage, resume=resume, seed=seed)
        except optuna.exceptions.DuplicatedStudyError:  # no shared lock (the gRPC proxy): it won the race
            return _create_or_reopen(spec, storage, resume=resume, seed=seed)


def _create_or_reopen(spec: SweepSpec, storage: BaseStorage, *, resume: bool, seed: int | None) -> tuple[optuna.Study, bool]:
    if spec.name in study_names(storage):
        if not resume:
            raise UserError(
                f"study {spec.name!r} already exists; use `kmnist-tune run` to resume it, or give the spec another name"
            )
        old = stored_spec(spec.name, storage.get_study_user_attrs(storage.get_study_id_from_name(spec.name)))
        if spec_identity(old) != spec_identity(spec):
            raise UserError(
                f"study {spec.name!r} already exists with a different spec ({spec_differences(old, spec)}); "
                f"rename the study in your spec, or delete the old one (`kmnist-tune study delete {spec.name}`)"
            )
        study = open_study(storage, spec.name, seed=seed)[0]
        raise_budget(study, spec, spec.budget.n_trials, spec.budget.timeout)  # a budget only ever grows here
        return study, False
    make_pruner(spec)  # fail on bad options before anything is written
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        direction=spec.direction,
        sampler=make_sampler(spec, seed),
        pruner=make_pruner(spec),
    )
    # Write the spec right after creation; a reader that finds the study before this
    # line lands is told it has no spec and retries (workers poll), never trains blind.
    study.set_user_attr(SPEC_ATTR, spec_to_dict(spec))
    study.set_user_attr(CREATED_ATTR, {"version": __version__, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    Budget(spec.budget.n_trials, spec.budget.timeout, *who_and_when()).store(study)
    return study, True


def create_warm(spec: SweepSpec, url: str, old_name: str | None, top: int) -> list[str]:
    """`study create` [--warm-start OLD --top K]: the configurations to carry over are worked out
    before anything is written, so a refusal leaves no new study behind."""
    storage = create_storage(url)
    plan: list[tuple[dict[str, Any], str]] = []
    lines: list[str] = []
    if old_name is not None:
        if old_name == spec.name:
            raise UserError(f"--warm-start {old_name!r} is the study being created; name an earlier one")
        plan, lines = warm_start_plan(spec, open_study(storage, old_name)[0], top)
    study, _ = create_study(spec, storage, resume=False)
    for params, tag in plan:
        study.enqueue_trial(params, user_attrs={TrialRecord.key("enqueued"): tag}, skip_if_exists=True)
    return lines


def warm_start_plan(spec: SweepSpec, old: optuna.Study, top: int) -> tuple[list[tuple[dict[str, Any], str]], list[str]]:
    """The `top` best configurations of `old` for this spec's first trials: only the parameters this
    spec searches, each clipped into its range or left to the sampler. Returns (params and tag per
    configuration, a line for each configuration and for every value that had to change)."""
    searched = spec.searched_params()
    done = old.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise UserError(f"study {old.study_name!r} has no completed trial to warm-start from")
    ranked = sorted(done, key=lambda t: t.value, reverse=old.direction == optuna.study.StudyDirection.MAXIMIZE)
    if not set(ranked[0].params) & set(searched):
        raise UserError(
            f"study {old.study_name!r} searched {', '.join(sorted(ranked[0].params)) or 'nothing'}; this spec searches "
            f"{', '.join(sorted(searched)) or 'nothing'}: no parameter to carry over"
        )
    plan, lines = [], []
    taken: dict[str, int] = {}  # a configuration once fitted -> the old trial that brought it
    for t in ranked:
        if len(plan) == top:
            break
        params: dict[str, Any] = {}
        changes = []
        for name, p in searched.items():
            if name in t.params:
                value, change = fit_into(name, p, t.params[name])
                if change:
                    changes.append(f"  trial {t.number}, {name}: {change}")
                if value is not None:
                    params[name] = value
        # Clipping can make two old configurations one; Optuna would skip the second enqueue
        # silently (skip_if_exists), so say so here and take the next best instead.
        key = json.dumps(params, sort_keys=True, default=str)
        if key in taken:
            lines.append(f"  trial {t.number}: the same configuration as trial {taken[key]} once fitted; skipped")
            continue
        taken[key] = t.number
        lines.extend(changes)
        plan.append((params, f"warm start: trial {t.number} of {old.study_name} ({t.value:.4f})"))
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        lines.append(f"queued trial {t.number} of {old.study_name} ({t.value:.4f}): {shown}")
    return plan, lines


def spec_identity(spec: SweepSpec) -> dict[str, Any]:
    """What makes two specs the same study: everything but the budget, which is study state, and the
    names W&B runs log under (a file's `learning_rate` for lr), which change no trial: a study made
    from a W&B file before they were kept still resumes from the same file."""
    out = {k: v for k, v in spec_to_dict(spec).items() if k != "budget"}
    wandb = out.get("tracking", {}).get("wandb", {})
    out["tracking"] = {**out.get("tracking", {}), "wandb": {k: v for k, v in wandb.items() if k not in WANDB_NAMES}}
    return out


WANDB_NAMES = ("metric_name", "param_names")  # tracking.wandb's names of the sweep file


def spec_differences(stored: SweepSpec, given: SweepSpec, most: int = 3) -> str:
    """Where two specs of one study name differ, as dotted paths with both values (the first `most`)."""
    found: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(f"{path}.{k}" if path else str(k), a.get(k), b.get(k))
        elif a != b:
            found.append(f"{path}: {a!r} stored, {b!r} in yours")

    walk("", spec_identity(stored), spec_identity(given))
    more = f"; and {len(found) - most} more" if len(found) > most else ""
    return "; ".join(found[:most]) + more


def raise_budget(study: optuna.Study, spec: SweepSpec, n_trials: int | None, timeout: float | None) -> Budget:
    """The study's budget, grown to `n_trials` / `timeout` where they are larger (`run --n-trials`,
    `worker --n-trials`): running the same spec file again never shrinks an extended study."""
    with records_of(study.study_name):
        current = Budget.of(study.user_attrs, spec)
    grown_n = current.n_trials if n_trials is None or (current.n_trials or 0) >= n_trials else n_trials
    grown_t = current.timeout if timeout is None or (current.timeout or 0) >= timeout else timeout
    if (grown_n, grown_t) == (current.n_trials, current.timeout):
        return current
    budget = Budget(grown_n, grown_t, *who_and_when())
    budget.store(study)
    return budget


def set_budget(study: optuna.Study, spec: SweepSpec, n_trials: int | None, timeout: float | None) -> Budget:
    """`study extend`: the new total (and/or timeout). Every worker reads it before its next claim.
    A budget record of another shape is replaced (what it does not give comes from the spec)."""
    try:
        current = Budget.of(study.user_attrs, spec)
    except MalformedRecord:
        current = Budget.of({}, spec)
    if n_trials is not None:
        done = count_states(internals.study_storage(study), internals.study_id(study)).finished
        if n_trials < done:
            raise UserError(f"study {study.study_name!r} has {done} finished trials already; give --n-trials of at least {done}")
    budget = Budget(
        current.n_trials if n_trials is None else n_trials, current.timeout if timeout is None else timeout, *who_and_when()
    )
    budget.store(study)
    return budget


def stop_study(study: optuna.Study, *, now: bool, reason: str | None = None) -> StudyStop:
    """Workers on every host stop claiming; with `now`, they hand their running trials back as well.
    `reason`: why, when no user asked (a trial reached the spec's target)."""
    stop = StudyStop(*who_and_when(), now=now, reason=reason)
    stop.store(study)
    return stop


def resume_study(study: optuna.Study) -> StudyStop | None:
    """Workers may claim again; returns the stop that was lifted, if there was one (None also for a
    stop record of another shape, which this clears)."""
    try:
        stop = StudyStop.read(study.user_attrs)
    except MalformedRecord:
        stop = None
    study.set_user_attr(StudyStop.ATTR, {})
    return stop


def open_study(storage: BaseStorage, name: str, *, seed: int | None = None) -> tuple[optuna.Study, SweepSpec]:
    """The study with its spec's sampler and pruner: one lookup by name (Optuna's load_study), then
    the spec read by the study's id."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise unknown_study(describe(storage), name, study_names(storage)) from None
    spec = stored_spec(name, storage.get_study_user_attrs(internals.study_id(study)))
    # Public attributes that every later ask reads: built from the spec, which is read after the study.
    sampler = RefusedSampler(spec) if spec.sampler.name in UNSAFE_SAMPLERS else make_sampler(spec, seed)
    study.sampler, study.pruner = sampler, make_pruner(spec)
    return study, spec


def open_for_work(
    url: str, name: str, *, log: Callable[[str], None] | None = None
) -> tuple[RetryingRDBStorage | RetryingStorage, optuna.Study, SweepSpec]:
    """The worker's one storage (retried calls; heartbeats and stale-trial retries as its spec sets
    them) and the study with its spec. The worker seeds the sampler afresh for each trial it makes
    (seed_sampler): workers never share a random stream, and a seeded study repeats."""
    storage = open_worker_storage(url, log=log)
    try:
        study, spec = open_study(storage, name)
    except NotOurStudy:
        # Created this instant by another process, which holds the lock until the spec is written.
        with storage_lock(storage, f"kmnist-tune/create/{name}"):
            pass
        study, spec = open_study(storage, name)
    # Before the first claim: a worker never works a study whose stored spec names a refused sampler
    # (anyone sharing the database can write that spec).
    refuse_unsafe_sampler(spec, f"the spec stored in study {name!r}")
    storage.use_heartbeat(spec.workers.heartbeat_interval, spec.workers.grace_period, spec.workers.max_retry)
    return storage, study, spec


def check_study(url: str, name: str) -> SweepSpec:
    """The stored spec of a study, to fail once on a bad URL, an unknown study or a foreign one before
    worker processes start: one short connection and two small queries, not a storage."""
    if is_grpc(url):
        proxy = open_grpc(url)
        return stored_spec(name, proxy.get_study_user_attrs(require_study(proxy, name)))
    with user_errors(url):
        require_schema(url)
        with short_engine(url) as eng, eng.connect() as conn:

            def run(statement: Any, params: dict[str, Any]) -> list[Any]:
                return list(conn.execute(statement, params))

            sid = internals.study_id_by_name(run, name)
            attrs = internals.study_user_attrs(run, sid, (SPEC_ATTR,)) if sid is not None else {}
            known = internals.study_names(run) if sid is None else []
    if sid is None:
        raise unknown_study(mask(url), name, known)
    return stored_spec(name, attrs)


def delete_study(storage: BaseStorage, name: str, artifacts: str | None = None) -> int:
    """Delete a study with its artifacts (plots, checkpoints, kept models). Returns how many went.

    So that nothing is left behind, not even an upload in flight: under the study's artifacts lock
    (which `upload_file` takes too), list its artifacts (Optuna keeps the list in the study's
    attributes, which go with it), delete the study (on PostgreSQL its DELETE waits for a checkpoint
    write in flight, which holds the study's row), then remove what was listed and every checkpoint
    named after its trials."""
    require_study(storage, name)
    with storage_lock(storage, artifacts_lock(name)):
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        trial_ids = [internals.trial_id(t) for t in trials]
        ids = [m.artifact_id for m in get_all_artifact_meta(study)]
        ids += [m.artifact_id for t in trials for m in get_all_artifact_meta(t, storage=storage)]
        ids += [
            i for t in trials for i in checkpoint_ids(TrialRecord.of(t).checkpoint, trial_ids)
        ]  # checkpoints left by failed trials
        try:
            epochs = int(stored_spec(name, study.user_attrs).fixed_params()["epochs"])
        except UserError:  # a study another tool made: it has no checkpoints of ours by name
            epochs = 0
        # Searched epochs are capped (the spec's range); a stored number could be anything.
        n_epochs = {internals.trial_id(t): min(max(int(t.params.get("epochs", epochs)), 0), 1000) for t in trials}
        store = artifact_store(storage, artifacts)
        optuna.delete_study(study_name=name, storage=storage)
        if ids:
            remove_artifacts(store, ids)
        for trial_id, n in n_epochs.items():  # and any a killed worker uploaded but never recorded
            remove_checkpoints(store, [trial_id], n)
    return len(ids)


def best_or_none(study: optuna.Study) -> FrozenTrial | None:
    """The best finished trial, or None while there is none (Optuna raises)."""
    try:
        return study.best_trial
    except ValueError:
        return None


def no_completed_trial(name: str) -> UserError:
    return UserError(f"study {name!r} has no completed trial yet; run `kmnist-tune worker --study {name}` first")


def require_best(study: optuna.Study) -> FrozenTrial:
    best = best_or_none(study)
    if best is None:
        raise no_completed_trial(study.study_name)
    return best


def read_study(url: str, name: str) -> tuple[optuna.Study, SweepSpec]:
    """Open a study to read it, or to change its budget or stop: nothing else is created or written,
    not even Optuna's tables."""
    return open_study(open_storage(url), name)


def wandb_sweep(url: str, name: str) -> tuple[dict[str, Any], list[str]]:
    """`study show --as-wandb`: the study's spec as a W&B sweep config, with its current budget and
    LR-finder range (contract/wandb.py), and what W&B has no key for."""
    study, spec = read_study(url, name)
    with records_of(name):
        budget = Budget.of(study.user_attrs, spec)
        prior = LRPrior.read(study.user_attrs)
    return to_wandb(spec, budget.n_trials, budget.timeout, (prior.low, prior.high) if prior is not None else None)


def read_prior(url: str, name: str) -> LRPrior:
    """The LR-finder prior stored on a study; one line saying why when there is none."""
    study, spec = read_study(url, name)
    require_lr_finder(name, spec)
    with records_of(name):
        prior = LRPrior.read(study.user_attrs)
    if prior is None:
        raise UserError(f"study {name!r} has no stored LR-finder prior yet; run `kmnist-tune lr-find --study {name}`")
    return with_curve(internals.study_storage(study), name, prior)


def require_lr_finder(name: str, spec: SweepSpec) -> None:
    if spec.lr_finder is None:
        raise UserError(
            f"study {name!r} does not search lr with the LR finder; set `lr: {{distribution: lr_finder}}` in its spec"
        )


# -- summaries --------------------------------------------------------------------------------


@dataclass
class BestTrial:
    trial: int
    value: float
    params: dict[str, Any]
    config: dict[str, Any] | None


@dataclass
class WorkerRow:
    """One worker process: two on one host (one per GPU slot, or side by side on a CPU) are two rows."""

    host: str
    pid: int
    gpu: str
    running: list[int] = field(default_factory=list)
    finished: int = 0
    failed: int = 0


@dataclass
class StudySummary:
    """What a user asks of a study: counts, the best trial, who runs what, and the test score."""

    study: str
    storage: str  # masked
    metric: str
    direction: str
    states: StateCounts
    budget: dict[str, Any]
    best: BestTrial | None
    test_evaluation: TestEvaluation | None
    ensemble_evaluation: EnsembleEvaluation | None = None
    stopped: StudyStop | None = None
    workers: list[WorkerRow] | None = None  # None: not asked for (summarize(with_trials=False))
    retried: list[dict[str, Any]] | None = None
    # With the signing key: one line for each stored score left out as unsigned (service/evaluations.py).
    withheld: list[str] = field(default_factory=list)
    # One line about the trials whose records had fields of another shape (left out), None when none
    # had (of the trials read: the best one, and every one with_trials). Not in the JSON.
    malformed: str | None = None

    def as_json(self) -> dict[str, Any]:
        """`run`, `worker` and `study show --json`: every key always there (null where unset: no best yet,
        no test score, not stopped, workers not asked for), every state counted (zeros too)."""
        full = {**asdict(self), "states": all_states(self.states)}
        del full["withheld"], full["malformed"]  # said on stderr, not keys of the JSON
        return full

    def best_json(self) -> dict[str, Any]:
        """`best --json`: the same names as `as_json` (best.value, test_evaluation, ensemble_evaluation),
        without the counts."""
        full = self.as_json()
        keys = ("study", "storage", "metric", "direction", "best", "test_evaluation", "ensemble_evaluation")
        return {k: full[k] for k in keys}


def summarize(study: optuna.Study, spec: SweepSpec, *, with_trials: bool = True) -> StudySummary:
    """One pass over the study: the summary every command prints. with_trials=False skips the
    per-worker table (which loads every trial)."""
    storage = internals.study_storage(study)
    attrs = study.user_attrs
    best = best_or_none(study)
    trials = study.get_trials(deepcopy=False) if with_trials else [best] if best is not None else []
    records = {t.number: TrialRecord.of(t) for t in trials}
    best_config = records[best.number].config if best is not None and best.number in records else None
    with records_of(study.study_name):
        test, ensemble, withheld = signed_evaluations(study.study_name, attrs)
        summary = StudySummary(
            study=study.study_name,
            storage=describe(storage),
            metric=spec.metric,
            direction=spec.direction,
            states=count_states(storage, internals.study_id(study)),
            budget=budget_json(Budget.of(attrs, spec)),
            best=None if best is None else BestTrial(best.number, best.value, without_quantiles(best.params), best_config),
            test_evaluation=test,
            ensemble_evaluation=ensemble,
            stopped=StudyStop.read(attrs),
            withheld=withheld,
        )
    summary.malformed = malformed_trials(records)
    if with_trials:
        summary.workers, summary.retried = _by_worker(trials, records)
    return summary


def malformed_trials(records: dict[int, TrialRecord]) -> str | None:
    """One line about the trials whose records had fields of another shape, or None."""
    lines = [line for n, r in sorted(records.items()) if (line := r.malformed_line(n)) is not None]
    if not lines:
        return None
    return lines[0] + (f"; and {len(lines) - 1} more trial(s) like it" if len(lines) > 1 else "")


def budget_json(budget: Budget) -> dict[str, Any]:
    """The budget's fixed keys: n_trials and timeout (null: no limit; both null: until stopped), and
    who set it when (null for a study's first budget from its spec)."""
    return {
        "n_trials": budget.n_trials,
        "timeout": budget.timeout,
        "until_stopped": budget.until_stopped,
        "at": budget.at or None,
        "by": budget.by or None,
    }


def read_summary(url: str, name: str, *, with_trials: bool = True) -> tuple[StudySummary, SweepSpec]:
    study, spec = read_study(url, name)
    return summarize(study, spec, with_trials=with_trials), spec


def _by_worker(trials: list[FrozenTrial], records: dict[int, TrialRecord]) -> tuple[list[WorkerRow], list[dict[str, Any]]]:
    """Trials grouped by the worker process (host, pid, GPU) that ran them, and the retried ones with
    both states: the retry's and its original's."""
    groups: dict[tuple[str, int, str], WorkerRow] = {}
    retried = []
    states = {t.number: t.state.name for t in trials}
    for t in trials:
        rec = records[t.number]
        if rec.worker is None:
            continue
        w = rec.worker
        pid = w.pid if w.pid is not None else -1  # an older record without it
        row = groups.setdefault((str(w.host), pid, str(w.gpu)), WorkerRow(str(w.host), pid, str(w.gpu)))
        if t.state == TrialState.RUNNING:
            row.running.append(t.number)
        elif t.state.name in FINISHED_STATES:
            row.finished += 1
        elif t.state == TrialState.FAIL:
            row.failed += 1
        if rec.retry_of is not None:
            original = states.get(rec.retry_of) if isinstance(rec.retry_of, int) else None
            retried.append({"trial": t.number, "state": t.state.name, "retry_of": rec.retry_of, "retry_of_state": original})
    return sorted(groups.values(), key=lambda g: (g.host, g.gpu, g.pid)), retried


@dataclass
class StudyListing:
    """One row of `study list`: finished trials against the budget (what the budget counts), every
    state's count, the best value, and why the budget could not be read, when it could not."""

    study: str
    finished: int
    budget: dict[str, Any] | None  # budget_json; None: not a study of kmnist-tune's, or `problem`
    states: dict[str, int]
    best: float | None
    problem: str | None = None  # one line: a record of this study that does not read (malformed, too long)


# What a row shows of a study's attributes: its budget, and its spec for a study made before budgets
# were study state. Nothing else is read (listing.py: each bounded in size).
LISTED_ATTRS = (BUDGET_ATTR, SPEC_ATTR)


def list_studies(storage: BaseStorage) -> list[StudyListing]:
    """Every study's row. A study whose records do not read (anyone who shares the database can write
    them) gets the line that says so in its row; the other rows are as ever."""
    out = []
    for s in listed_studies(storage, LISTED_ATTRS):
        counts = count_states(storage, s.study_id)
        best = None
        if len(s.directions) == 1:  # another tool's multi-objective study has no single best
            maximize = s.directions[0] == optuna.study.StudyDirection.MAXIMIZE
            best = finished_and_best(storage, s.study_id, maximize)[1]
        budget, problem = _listed_budget(s)
        out.append(StudyListing(s.name, counts.finished, budget, all_states(counts), best, problem))
    return out


def _listed_budget(s: ListedStudy) -> tuple[dict[str, Any] | None, str | None]:
    """(the row's budget, None) or (None, the line saying why it does not read)."""
    try:
        with records_of(s.name):
            if BUDGET_ATTR in s.unread:
                raise MalformedRecord(BUDGET_ATTR, s.unread[BUDGET_ATTR])
            record = Budget.read(s.user_attrs)
        if record is None:  # a study made before budgets were study state: its spec's
            if SPEC_ATTR in s.unread:
                raise UserError(f"study {s.name!r}: its attribute {SPEC_ATTR} {s.unread[SPEC_ATTR]}")
            if SPEC_ATTR not in s.user_attrs:
                return None, None  # another tool's study
            record = Budget.of({}, stored_spec(s.name, s.user_attrs))
    except UserError as e:
        return None, one_line(e, 400)
    return budget_json(record), None


def all_states(counts: StateCounts) -> dict[str, int]:
    """Every Optuna trial state's count, zeros included (JSON keys that do not come and go)."""
    return {state.name: counts[state.name] for state in TrialState}
