"""The search space: turn a spec's W&B-style parameter blocks into Optuna suggestions."""

from __future__ import annotations

import math
from typing import Any

import optuna

from .spec import LOG_UNIFORM, PARAMETERS, ParamSpec, SweepSpec


def suggest(trial: optuna.Trial, name: str, p: ParamSpec) -> Any:
    kind = p.kind()
    is_int = PARAMETERS[name]["kind"] == "int"
    if kind == "categorical":
        return trial.suggest_categorical(name, list(p.values or []))
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
    if kind == "q_uniform":
        if is_int:
            return trial.suggest_int(name, int(lo), int(hi), step=max(1, int(p.q)))  # type: ignore[arg-type]
        return trial.suggest_float(name, lo, hi, step=float(p.q))  # type: ignore[arg-type]
    if kind == "q_log_uniform_values":
        # Optuna has no stepped log-uniform: sample log-uniform, then round to the grid of q
        # (the rounded value is the one used; the sampler keeps the raw one).
        raw = trial.suggest_float(name, lo, hi, log=True)
        q = float(p.q)  # type: ignore[arg-type]
        val = min(max(round(raw / q) * q, math.ceil(lo / q) * q), math.floor(hi / q) * q)
        return int(val) if is_int else val
    raise ValueError(f"cannot sample {name}: distribution {kind}")


def sample_params(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """Every training parameter for this trial: spec defaults and fixed values, then the searched ones."""
    params = spec.fixed_params()
    for name, p in spec.searched_params().items():
        params[name] = suggest(trial, name, p)
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
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"{value!r} is not a number; left to the sampler"
    lo, hi = p.support()
    fitted = min(max(value, lo), hi)  # type: ignore[type-var]
    if PARAMETERS[name]["kind"] == "int":
        fitted = int(round(fitted))
    return fitted, "" if fitted == value else f"{value:g} clipped to {fitted:g} (the range is {lo:g} .. {hi:g})"


def grid_space(spec: SweepSpec) -> dict[str, list[Any]]:
    return {name: list(p.values or []) for name, p in spec.searched_params().items()}
