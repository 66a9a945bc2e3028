"""A W&B sweep file read as this project's spec: W&B's top-level keys and parameter names translated.

W&B's sweep config (https://docs.wandb.ai/guides/sweeps/sweep-config-keys) has `method`, `metric:
{name, goal}`, `early_terminate`, `run_cap` and keys for W&B's own agent (`program`, `command`, ...).
`translate` rewrites them into the keys of `SweepSpec` before validation, and says what it did not
use, so a W&B user's file runs as it is. Native specs pass through untouched (apart from parameter
aliases, which both kinds may use).
"""

from __future__ import annotations

import re
from typing import Any

# One direction only: the spec's models know nothing of W&B's files (contract/load.py joins the two).
from .spec import ALIASES, LR_FIND_ITERATIONS, BudgetSpec, SweepSpec, spec_to_dict

# W&B's search methods -> Optuna's samplers (TPE is Optuna's Bayesian optimisation).
METHODS = {"grid": "grid", "random": "random", "bayes": "tpe"}
# Keys only W&B's own agent uses: accepted, reported once, not used.
AGENT_ONLY = ("program", "command", "entity", "controller", "job", "image_uri", "scheduler", "apiVersion", "kind")
# W&B metric names in common use -> this project's metrics.
METRIC_NAMES: dict[str, str] = {
    **dict.fromkeys(
        ("accuracy", "acc", "val_accuracy", "val_acc", "valid_accuracy", "valid_acc", "validation_accuracy", "eval_accuracy"),
        "accuracy",
    ),
    **dict.fromkeys(("balanced_accuracy", "val_balanced_accuracy", "valid_balanced_accuracy"), "balanced_accuracy"),
    **dict.fromkeys(("loss", "val_loss", "valid_loss", "validation_loss", "eval_loss"), "valid_loss"),
}
GOALS = {"maximize": "maximize", "minimize": "minimize"}


class TranslationError(ValueError):
    """A W&B key this project cannot honour; the message says what to write instead."""


def looks_like_wandb(data: dict[str, Any]) -> bool:
    return any(k in data for k in ("method", "early_terminate", "run_cap", *AGENT_ONLY, "project")) or isinstance(
        data.get("metric"), dict
    )


def translate(data: dict[str, Any], default_name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the spec's keys, notes for the user: what was ignored). default_name: the study's name when
    a W&B file gives none (the file's name)."""
    out = dict(data)
    notes: list[str] = []
    if isinstance(out.get("parameters"), dict):
        out["parameters"] = _parameters(out["parameters"])
    if not looks_like_wandb(data):
        return out, notes
    if "name" not in out and default_name:
        out["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-", default_name).strip("._-")[:100] or "wandb-sweep"
        notes.append(f"name: none given; the study is named {out['name']!r} after the file")
    if "metrics" in out:
        raise TranslationError("metrics: multi-objective sweeps (W&B's method: custom) are not supported; give one `metric`")
    ignored = [k for k in AGENT_ONLY if k in out]
    unused_metric: list[str] = []
    for k in ignored:
        out.pop(k)
    if "method" in out:
        method = out.pop("method")
        if method not in METHODS:
            raise TranslationError(f"method: {method!r} is not supported; use one of {', '.join(METHODS)}")
        if "sampler" in out:
            raise TranslationError("give either W&B's `method` or `sampler`, not both")
        out["sampler"] = {"name": METHODS[method]}
    if isinstance(out.get("metric"), dict):
        metric = dict(out.pop("metric"))
        name = metric.pop("name", None)
        goal = metric.pop("goal", None)
        # target ends a W&B sweep early; impute* fill in W&B's bayes search for crashed runs (Optuna's
        # samplers leave failed trials out instead).
        for key in ("target", "impute", "impute_while_running"):
            if key in metric:
                metric.pop(key)
                unused_metric.append(f"metric.{key}")
        if metric:
            raise TranslationError(
                f"metric: unknown key {next(iter(metric))!r}; W&B's metric has name, goal, target, impute, impute_while_running"
            )
        if name is not None:
            if name not in METRIC_NAMES:
                known = ", ".join(sorted(METRIC_NAMES))
                raise TranslationError(f"metric.name: {name!r} is not a metric this project records; use one of {known}")
            out["metric"] = METRIC_NAMES[name]
            if goal is None and METRIC_NAMES[name] != "valid_loss":
                # W&B's default goal is minimize: it would minimise an accuracy. Say so rather than guess.
                raise TranslationError(
                    f"metric.goal: W&B's default goal is minimize, which would minimise {name}; add goal: maximize"
                )
        if goal is not None:
            if goal not in GOALS:
                raise TranslationError(f"metric.goal: {goal!r}; use maximize or minimize")
            out["direction"] = GOALS[goal]
    if "early_terminate" in out:
        if "pruner" in out:
            raise TranslationError("give either W&B's `early_terminate` or `pruner`, not both")
        out["pruner"] = _hyperband(out.pop("early_terminate"))
    elif "method" in data and "pruner" not in out:
        out["pruner"] = {"name": "none"}  # W&B stops no run early unless early_terminate says so
    if "run_cap" in out:
        cap = out.pop("run_cap")
        budget = dict(out.get("budget") or {})
        if budget.get("n_trials") not in (None, cap):
            raise TranslationError(f"run_cap ({cap}) contradicts budget.n_trials ({budget['n_trials']}); give one")
        out["budget"] = {**budget, "n_trials": cap}
    if "budget" not in out and "method" in data:
        out["budget"] = _grid_budget(out)
    if "project" in out:
        project = out.pop("project")
        tracking = dict(out.get("tracking") or {})
        wandb = dict(tracking.get("wandb") or {})
        wandb.setdefault("project", project)
        out["tracking"] = {**tracking, "wandb": wandb}
    if ignored:
        notes.append(f"ignored: {', '.join(ignored)} (used by W&B's own agent; kmnist-tune runs the trials itself)")
    if unused_metric:
        notes.append(
            f"ignored: {', '.join(unused_metric)} (W&B's controller: target ends a sweep early, impute scores crashed "
            "runs; the budget ends a study here, and Optuna's samplers leave failed trials out)"
        )
    return out, notes


def _grid_budget(spec: dict[str, Any]) -> dict[str, Any]:
    """A W&B sweep without run_cap: a grid ends when it is used up; random and bayes never end."""
    if (spec.get("sampler") or {}).get("name") != "grid":
        raise TranslationError(
            "run_cap: W&B runs a random or bayes sweep until you stop it; give run_cap: N (the number of trials)"
        )
    size = 1
    for block in (spec.get("parameters") or {}).values():
        if isinstance(block, dict) and isinstance(block.get("values"), list):
            size *= max(1, len(block["values"]))
    return {"n_trials": size}


def _parameters(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # our name -> the name the file used
    for name, block in params.items():
        if isinstance(block, dict) and "parameters" in block:
            raise TranslationError(
                f"parameters.{name}: nested `parameters:` blocks are not supported; "
                f"flatten them into top-level parameters (e.g. {name}.x -> x)"
            )
        if isinstance(block, dict) and block.get("distribution") == "categorical_w_probabilities":
            # W&B's name for a categorical with probabilities: `values` + `probabilities` say the same here
            block = {k: v for k, v in block.items() if k != "distribution"}
        target = ALIASES.get(name, name)
        if target in out:
            raise TranslationError(f"parameters: {given[target]} and {name} name the same parameter ({target}); give one")
        out[target], given[target] = block, name
    return out


def _hyperband(block: Any) -> dict[str, Any]:
    """W&B's hyperband -> Optuna's HyperbandPruner with the same smallest budget and rate.

    W&B brackets at min_iter * eta^k (or max_iter / eta^k for k = 1..s); Optuna's brackets are
    min_resource * reduction_factor^k up to max_resource."""
    if not isinstance(block, dict) or block.get("type") != "hyperband":
        raise TranslationError(
            "early_terminate: only `type: hyperband` exists in W&B; give type, min_iter (or max_iter and s), eta"
        )
    known = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
    unknown = set(block) - known
    if unknown:
        first, keys = sorted(unknown)[0], ", ".join(sorted(known))
        raise TranslationError(f"early_terminate: unknown key {first!r}; W&B's hyperband has {keys}")
    eta = block.get("eta", 3)
    if not isinstance(eta, int) or isinstance(eta, bool) or not 2 <= eta <= 100:
        raise TranslationError(f"early_terminate.eta: {eta!r}; give a whole number from 2 to 100")
    options: dict[str, Any] = {"reduction_factor": eta}
    if "min_iter" in block:
        options["min_resource"] = block["min_iter"]
        if "max_iter" in block:
            options["max_resource"] = block["max_iter"]
    elif "max_iter" in block:
        s = block.get("s", 0)
        # eta**s is computed here: an unbounded s is a CPU and memory bomb in a shared sweep file.
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= 64:
            raise TranslationError(f"early_terminate.s: {s!r}; give a whole number from 0 to 64")
        if not isinstance(block["max_iter"], int) or isinstance(block["max_iter"], bool) or block["max_iter"] < 1:
            raise TranslationError(f"early_terminate.max_iter: {block['max_iter']!r}; give a whole number >= 1")
        options["max_resource"] = block["max_iter"]
        options["min_resource"] = max(1, int(block["max_iter"] // eta**s))
    else:
        raise TranslationError("early_terminate: give min_iter, or max_iter (with s)")
    return {"name": "hyperband", "options": options}


# -- the way back: a study's spec as a W&B sweep file (`study show NAME --as-wandb`) ------------------
SAMPLER_METHODS = {"tpe": "bayes", "random": "random", "grid": "grid", "cmaes": "bayes"}
WANDB_METRICS = {"accuracy": "val_accuracy", "balanced_accuracy": "val_balanced_accuracy", "valid_loss": "val_loss"}
# The spec's own sections, which W&B's sweep config has no key for (its schema allows no other keys).
OWN_SECTIONS = ("data", "halving", "workers", "augment", "checkpoints", "performance")


def to_wandb(
    spec: SweepSpec, n_trials: int | None, timeout: float | None, lr_range: tuple[float, float] | None
) -> tuple[dict[str, Any], list[str]]:
    """(a W&B sweep config that `translate` reads back into this spec's search, what W&B cannot say).

    n_trials/timeout: the study's current budget; lr_range: the LR-finder prior's range, if computed."""
    notes: list[str] = []
    out: dict[str, Any] = {"name": spec.name}
    if spec.description:
        out["description"] = spec.description
    out["method"] = SAMPLER_METHODS[spec.sampler.name]
    if spec.sampler.name == "cmaes" or spec.sampler.options:
        notes.append(f"sampler: {spec.sampler.name} {spec.sampler.options or ''}".rstrip() + f" (W&B: method {out['method']})")
    out["metric"] = {"name": WANDB_METRICS[spec.metric], "goal": spec.direction}
    pruner = spec.pruner
    if pruner.name == "hyperband":
        o = pruner.options
        # W&B's min_iter must be a whole number of epochs; Optuna's "auto" (its default) becomes 1,
        # W&B's own smallest, and the note says so.
        min_iter = o.get("min_resource", 1)
        stop: dict[str, Any] = {
            "type": "hyperband",
            "min_iter": min_iter if isinstance(min_iter, int) else 1,
            "eta": o.get("reduction_factor", 3),
        }
        if isinstance(o.get("max_resource"), int):
            stop["max_iter"] = o["max_resource"]
        out["early_terminate"] = stop
        if not isinstance(min_iter, int) or set(o) - {"min_resource", "max_resource", "reduction_factor"}:
            notes.append(f"pruner: hyperband {o} (W&B's hyperband takes min_iter, max_iter, eta)")
    elif pruner.name != "none":
        notes.append(f"pruner: {pruner.name} {pruner.options or ''}".rstrip() + " (W&B's only early stopping is hyperband)")
    if n_trials is not None:
        out["run_cap"] = n_trials
    if timeout is not None:
        notes.append(f"budget.timeout: {timeout:g} s per worker (W&B has no time limit)")
    if spec.tracking.wandb.project is not None:
        out["project"] = spec.tracking.wandb.project
    params: dict[str, Any] = {}
    for name, p in spec.parameters.items():
        block = p.model_dump(mode="json", exclude_none=True)
        if p.probabilities is not None:
            block["distribution"] = "categorical_w_probabilities"  # W&B's categorical takes no probabilities
        if p.kind() == "lr_finder":
            width, suggestion, iterations = p.lr_finder_settings()
            if iterations != LR_FIND_ITERATIONS:
                suggestion += f", {iterations} finder iterations"
            if lr_range is None:
                notes.append(f"parameters.{name}: lr_finder ({width:g} decades around the {suggestion}); not run yet")
                continue
            block = {"distribution": "log_uniform_values", "min": lr_range[0], "max": lr_range[1]}
            notes.append(f"parameters.{name}: lr_finder ({width:g} decades around the {suggestion}), written as its range")
        params[name] = block
    out["parameters"] = params
    defaults = spec_to_dict(SweepSpec(name=spec.name, budget=BudgetSpec(n_trials=1)))
    mine = spec_to_dict(spec)
    for section in OWN_SECTIONS:
        if mine.get(section) != defaults.get(section):
            notes.append(f"{section}: {mine[section]}")
    if mine.get("seed") != defaults.get("seed"):
        notes.append(f"seed: {mine['seed']}")
    wandb = {k: v for k, v in mine["tracking"]["wandb"].items() if k != "project"}
    if wandb != defaults["tracking"]["wandb"]:
        notes.append(f"tracking.wandb: {wandb}")
    return out, notes
