"""The LR-finder prior: run fastai's `lr_find` once per study, keep the curve and its suggestions
in the study's storage, and centre the learning-rate search on the chosen suggestion.

The tutorial's rule: take the learning rate one order of magnitude below the minimum of the
smoothed loss curve, which is exactly fastai's `minimum` suggestion (`lr_at_min_loss / 10`).
"""

from __future__ import annotations

import datetime as dt
import math
import socket
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from ..contract.events import Listener
from ..contract.records import LRPrior, TrialRecord
from ..contract.space import default_within
from ..contract.spec import SweepSpec
from ..errors import UserError, one_line
from ..observe.notes import attach_prior
from ..observe.progress import make_reporter
from ..service.lock import storage_lock
from ..service.lr_curve import prior_refusal, store_curve, untrusted_prior
from ..service.storage import open_storage
from ..service.studies import open_study, require_lr_finder
from ..signing import store_signed
from ..training.data import resolve_data_dir
from ..training.devices import resolve_device
from ..training.splits import Splits, load_splits
from ..training.train import build_learner, find_lr
from .cpu_threads import training_process


def prior_config(spec: SweepSpec) -> dict[str, Any]:
    """The configuration the finder runs with: fixed values, and for a searched arch, stem, batch
    size or optimizer its first listed value (the study key says which)."""
    params = spec.fixed_params()
    for name in ("arch", "stem", "batch_size", "optimizer"):
        p = spec.parameters.get(name)
        if p is not None and p.searched and p.values:
            params[name] = p.values[0]
    return params


def study_key(spec: SweepSpec) -> str:
    c = prior_config(spec)
    # The optimizer moves the finder's curve (SGD wants larger rates); named when it is not fastai's default.
    opt = "" if c["optimizer"] == "adam" else f"/{c['optimizer']}"
    return f"{spec.data.dataset}/{c['arch']}/{c['stem']}/bs{c['batch_size']}{opt}"


def compute_prior(spec: SweepSpec, splits: Splits, device: torch.device, events: Listener) -> LRPrior:
    """fastai's `lr_find` on the training split, with the study's fixed configuration."""
    lr_spec = spec.lr_finder
    if lr_spec is None:
        raise ValueError("the spec does not search lr with the LR finder")
    width, chosen, iterations = lr_spec.lr_finder_settings()
    # Not compiled: a compile takes longer than the finder's hundred batches (the trials compile).
    performance = spec.performance.model_copy(update={"compile": False})
    learn, _ = build_learner(
        splits, prior_config(spec), device, spec.metric, seed=spec.seed, augment=spec.augment, performance=performance
    )
    key = study_key(spec)
    task = f"LR finder ({key})"
    events.line(f"running the LR finder for {key} ({iterations} iterations)")
    curve = find_lr(learn, iterations, on_iter=lambda done, total: events.progress(task, done, total))
    centre = curve.suggestions[chosen]
    if not (math.isfinite(centre) and centre > 0):
        raise RuntimeError(f"the LR finder's {chosen} suggestion is {centre}; the loss curve never fell")
    half = 10 ** (width / 2)
    return LRPrior(
        key=key,
        lrs=curve.lrs,
        losses=curve.losses,
        suggestions=curve.suggestions,
        suggestion=chosen,
        centre=centre,
        low=centre / half,
        high=centre * half,
        width=width,
        computed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        seconds=curve.seconds,
        host=socket.gethostname(),
    )


def ensure_prior(
    study: optuna.Study,
    storage: BaseStorage,
    spec: SweepSpec,
    splits: Splits,
    device: torch.device,
    events: Listener,
    *,
    rerun: bool = False,
) -> tuple[LRPrior, bool]:
    """The study's prior, computed at most once however many workers start together.

    Returns (prior, computed_here). The first computation also enqueues the suggestion as a trial,
    and every computation leaves its evidence (curve, note) on the study for the dashboard. With
    KMNIST_TUNE_SIGNING_KEY, a stored prior that is not signed for this study (its range edited, copied
    from another study, or stored without the key) is computed again while no trial was drawn from
    it, and refused in one line after (a new range would split the study's trials between two)."""
    prior, why = _stored_prior(study)
    if prior is not None and why is None and not rerun:
        return prior, False
    with storage_lock(storage, f"kmnist-tune/lr-find/{study.study_name}"):
        # Re-read under the lock (user_attrs asks the storage): another worker may have finished
        # while this one waited.
        prior, why = _stored_prior(study)
        if prior is not None and why is None and not rerun:
            return prior, False
        first = prior is None
        if why is not None and not rerun:
            _replace_untrusted(study, why, events)
            first = True  # no trial was drawn from the one it replaces: its suggestion comes first
        prior = compute_prior(spec, splits, device, events)
        store_signed(prior, study)
        if first:
            enqueue_suggestion(study, spec, prior)
    # The curve after the lock: its upload takes the artifacts lock, and a worker's storage has two
    # connections. Evidence, not the prior: the search range is stored already.
    try:
        prior.curve = store_curve(storage, study, prior)
        store_signed(prior, study)
    except Exception as e:
        events.line(f"could not store the LR-finder curve on the study ({type(e).__name__}: {one_line(e, 120)})")
    attach_prior(study, storage, prior, events.line)
    return prior, True


def _stored_prior(study: optuna.Study) -> tuple[LRPrior | None, str | None]:
    """The prior stored on the study, and why it is not to be sampled from (None: signed for this
    study with this process's key, or no key is set)."""
    prior = LRPrior.read(study.user_attrs)
    return prior, (prior_refusal(study.study_name, prior) if prior is not None else None)


def _drawn_trials(study: optuna.Study) -> int:
    """Trials drawn from the stored range: a waiting one (the queued suggestion, a warm start) holds its own lr."""
    return len(study.get_trials(deepcopy=False, states=tuple(s for s in TrialState if s != TrialState.WAITING)))


def _replace_untrusted(study: optuna.Study, why: str, events: Listener) -> None:
    """A prior this worker may not sample from: computed again (one line says so) while no trial was
    drawn from its range, as the first computation would be; refused once trials were."""
    name = study.study_name
    n = _drawn_trials(study)
    if n:
        raise UserError(
            f"{untrusted_prior(name, why)}, and {n} trial(s) were drawn from its range; run "
            f"`kmnist-tune lr-find --study {name} --force` with the key to compute and sign it again "
            "(later trials come from the new range)"
        )
    events.line(f"{untrusted_prior(name, why)}; no trial was drawn from it yet, so this worker runs the LR finder again")


def resolve_spec(
    study: optuna.Study, storage: BaseStorage, spec: SweepSpec, splits: Splits, device: torch.device, events: Listener
) -> SweepSpec:
    """The spec a worker samples from: an `lr: {distribution: lr_finder}` block becomes the study
    prior's concrete log-uniform range (computing the prior if this worker is the first)."""
    if spec.lr_finder is None:
        return spec
    prior, computed = ensure_prior(study, storage, spec, splits, device, events)
    events.line(f"{prior.summary()} ({'computed here' if computed else 'read from the storage'})")
    return prior.resolve(spec)


def enqueue_suggestion(study: optuna.Study, spec: SweepSpec, prior: LRPrior) -> None:
    """The suggestion itself is the study's first trial; the other searched parameters take their
    built-in defaults where the space holds them (else the sampler picks)."""
    params: dict[str, Any] = {"lr": prior.centre}
    for name, p in spec.searched_params().items():
        if name != "lr" and (d := default_within(name, p)) is not None:
            params[name] = d
    study.enqueue_trial(
        params, user_attrs={TrialRecord.key("enqueued"): f"LR finder {prior.suggestion} suggestion"}, skip_if_exists=True
    )


def rerun_prior(
    url: str, name: str, *, data_dir: Path | None, mirror: str | None, device: str, force: bool = False
) -> tuple[LRPrior, LRPrior | None]:
    """`lr-find`: run the finder again for a study and store the new curve (the first trial stays).
    Returns (the new prior, the one it replaced). A study with trials already is refused unless `force`:
    the new curve re-centres the lr range, so trials before and after it are drawn from different ranges.
    The finder takes this process's share of the host's cores, as a worker's training does."""
    dev = resolve_device(device)
    storage = open_storage(url)
    study, spec = open_study(storage, name)
    require_lr_finder(name, spec)
    old = LRPrior.read(study.user_attrs)
    n_trials = _drawn_trials(study)
    if n_trials and not force:
        searched = f"lr {old.low:.3g} .. {old.high:.3g}" if old is not None else "the stored lr range"
        raise UserError(
            f"study {name!r} has {n_trials} trial(s) drawn from {searched}; a new LR-finder curve re-centres that range, "
            "so later trials would come from another one. Pass --force to re-run it anyway"
        )
    splits = load_splits(spec.data, resolve_data_dir(data_dir), mirror=mirror)
    with training_process(), make_reporter(label="lr-find") as reporter:
        prior, _ = ensure_prior(study, storage, spec, splits, dev, reporter, rerun=True)
    return prior, old
