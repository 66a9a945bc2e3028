"""The search space: turn a spec's W&B-style parameter blocks into Optuna suggestions."""

from __future__ import annotations

import math
from typing import Any

import optuna

from ..optuna_internals import trial_id
from .quantiles import QUANTILE_EPS, categorical_at
from .spec import BOUNDED_BY_SHAPE, LOG_UNIFORM, PARAMETERS, THROUGH_QUANTILE, ParamSpec, SweepSpec

# The sampler's own parameter for a distribution drawn through its quantile: "lr_quantile".
QUANTILE_SUFFIX = "_quantile"


def suggest(trial: optuna.Trial, name: str, p: ParamSpec, grid: bool = False) -> Any:
    kind = p.kind()
    is_int = PARAMETERS[name]["kind"] == "int"
    if kind == "categorical" and p.probabilities is not None and not grid:
        u = trial.suggest_float(name + QUANTILE_SUFFIX, 0.0, 1.0)
        value = categorical_at(list(p.values or []), p.probabilities, u)
        return _store(trial, name, value, optuna.distributions.CategoricalDistribution(list(p.values or [])))
    if kind == "categorical":
        return trial.suggest_categorical(name, list(p.values or []))
    if kind in THROUGH_QUANTILE:
        return _through_quantile(trial, name, p, is_int)
    if kind == "lr_finder":
        # The prior turns this block into a log-uniform range (LRPrior.resolve) before any trial.
        raise ValueError("lr: distribution lr_finder must be resolved by the study's LR-finder prior first")
    lo, hi = p.support()
    if kind == "uniform":
        return trial.suggest_float(name, lo, hi)
    if kind in LOG_UNIFORM:
        # W&B's exp(U(min, max)), exp(-U(min, max)) and 1/LogUniform(1/max, 1/min) are log-uniform
        # over their support: Optuna's own log-uniform, and the stored value is the one used.
        return trial.suggest_float(name, lo, hi, log=True)
    if kind == "int_uniform":
        return trial.suggest_int(name, int(lo), int(hi))
    raise ValueError(f"cannot sample {name}: distribution {kind}")


def _through_quantile(trial: optuna.Trial, name: str, p: ParamSpec, is_int: bool) -> Any:
    """W&B's way: the sampler proposes the quantile u (its own parameter, NAME_quantile), the value
    is the distribution's inverse CDF at u, rounded to q. Optuna has no normal, beta or W&B-rounded
    distribution, so the value used is then stored as the trial's parameter NAME itself."""
    lo_u, hi_u = (QUANTILE_EPS, 1 - QUANTILE_EPS) if p.kind() in BOUNDED_BY_SHAPE else (0.0, 1.0)
    value = p.at_quantile(trial.suggest_float(name + QUANTILE_SUFFIX, lo_u, hi_u))
    lo, hi = p.support()
    dist: optuna.distributions.BaseDistribution
    if is_int:
        value = int(round(value))
        dist = optuna.distributions.IntDistribution(math.floor(lo), max(math.ceil(hi), math.floor(lo)))
    else:
        value = float(value)
        dist = optuna.distributions.FloatDistribution(min(lo, hi), max(lo, hi))
    return _store(trial, name, value, dist)


def _store(trial: optuna.Trial, name: str, value: Any, dist: optuna.distributions.BaseDistribution) -> Any:
    """Record `value` as the trial's parameter `name` (BaseStorage.set_trial_param, what suggest_*
    does after sampling), so every Optuna client shows the value training used."""
    trial.storage.set_trial_param(trial_id(trial), name, dist.to_internal_repr(value), dist)
    return value


def without_quantiles(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored parameters less the sampler's quantiles (NAME_quantile beside NAME)."""
    return {k: v for k, v in params.items() if not (k.endswith(QUANTILE_SUFFIX) and k.removesuffix(QUANTILE_SUFFIX) in params)}


def sample_params(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Every training parameter for this trial: spec defaults and fixed values, then the searched ones."""
    params = spec.fixed_params()
    grid = spec.sampler.name == "grid"
    for name, p in spec.searched_params().items():
        params[name] = suggest(trial, name, p, grid)
    return params


def default_within(name: str, p: ParamSpec) -> Any | None:
    """The parameter's built-in default if this block's space contains it, else None."""
    default = PARAMETERS[name]["default"]
    kind = p.kind()
    if kind == "categorical":
        return default if default in (p.values or []) else None
    if kind in ("lr_finder", "constant"):
        return None
    if p.min is None or p.max is None:
        return None
    lo, hi = p.support()
    return default if lo <= default <= hi else None


def fit_into(name: str, p: ParamSpec, value: Any) -> tuple[Any | None, str]:
    """`value` (from another study) placed in this block's space: (the value to use or None to leave
    it to the sampler, what was done to it: "" when it fits as it is)."""
    kind = p.kind()
    if kind == "categorical":
        return (value, "") if value in (p.values or []) else (None, f"{value!r} is not among {p.values}; left to the sampler")
    if kind == "lr_finder":
        return value, ""  # the range is the prior's; Optuna samples instead if the value falls outside it
    if kind in THROUGH_QUANTILE or p.probabilities is not None:
        return None, f"W&B's {kind} is drawn through its quantile; left to the sampler"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"{value!r} is not a number; left to the sampler"
    lo, hi = p.support()
    fitted = min(max(value, lo), hi)  # type: ignore[type-var]
    if PARAMETERS[name]["kind"] == "int":
        fitted = int(round(fitted))
    return fitted, "" if fitted == value else f"{value:g} clipped to {fitted:g} (the range is {lo:g} .. {hi:g})"


def grid_space(spec: SweepSpec) -> dict[str, list[Any]]:
    return {name: list(p.values or []) for name, p in spec.searched_params().items()}
