"""Optuna studies that carry their spec: create, open, and build sampler and pruner from it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import optuna

from . import __version__
from .errors import UserError
from .space import grid_space
from .spec import SpecError, SweepSpec, parse_spec, spec_to_dict
from .storage import require_study

SPEC_ATTR = "kmnist_tune.spec"


def make_sampler(spec: SweepSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    opts: dict[str, Any] = dict(spec.sampler.options)
    name = spec.sampler.name
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **opts)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, **opts)
        return optuna.samplers.GridSampler(grid_space(spec), seed=seed, **opts)
    except TypeError as e:
        raise SpecError(f"sampler.options: {e}; see Optuna's {name} sampler for its options") from None


def make_pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    opts: dict[str, Any] = dict(spec.pruner.options)
    name = spec.pruner.name
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**opts)
        if name == "hyperband":
            opts.setdefault("max_resource", "auto")
            return optuna.pruners.HyperbandPruner(**opts)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**opts)
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as e:
        raise SpecError(f"pruner.options: {e}; see Optuna's {name} pruner for its options") from None


def stored_spec(study_name: str, attrs: dict[str, Any]) -> SweepSpec:
    data = attrs.get(SPEC_ATTR)
    if data is None:
        raise UserError(
            f"study {study_name!r} was not created by kmnist-tune (it has no stored spec); "
            "create it with `kmnist-tune study create SPEC`"
        )
    return parse_spec(data, f"spec stored in study {study_name!r}")


def create_study(
    spec: SweepSpec, storage: optuna.storages.BaseStorage, *, resume: bool, seed: int | None = None
) -> tuple[optuna.Study, bool]:
    """Create the study for `spec`, or (resume=True) reopen it if it exists with the same spec.

    Returns (study, created). The spec is stored in the study's user attrs, so workers need
    only the study name and the storage URL.
    """
    try:
        existing = storage.get_study_id_from_name(spec.name)
    except KeyError:
        existing = None
    if existing is not None:
        if not resume:
            raise UserError(
                f"study {spec.name!r} already exists; use `kmnist-tune run` to resume it, or give the spec another name"
            )
        old = stored_spec(spec.name, storage.get_study_user_attrs(existing))
        if spec_to_dict(old) != spec_to_dict(spec):
            raise UserError(
                f"study {spec.name!r} already exists with a different spec; rename the study in your spec, "
                f"or delete the old one (`kmnist-tune study delete {spec.name}`)"
            )
        return open_study(storage, spec.name, seed=seed)[0], False
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
    study.set_user_attr(
        "kmnist_tune.created", {"version": __version__, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    )
    return study, True


def open_study(
    storage: optuna.storages.BaseStorage, name: str, *, url: str = "", seed: int | None = None
) -> tuple[optuna.Study, SweepSpec]:
    study_id = require_study(storage, name, url or "the storage")
    spec = stored_spec(name, storage.get_study_user_attrs(study_id))
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec, seed), pruner=make_pruner(spec))
    return study, spec


def delete_study(storage: optuna.storages.BaseStorage, name: str, url: str) -> None:
    require_study(storage, name, url)
    optuna.delete_study(study_name=name, storage=storage)
