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
from .spec import (
    ALIASES,
    LR_FIND_ITERATIONS,
    BudgetSpec,
    SweepSpec,
    default_metric,
    natural_direction,
    spec_to_dict,
)

# W&B's search methods -> Optuna's samplers (TPE is Optuna's Bayesian optimisation).
METHODS = {"grid": "grid", "random": "random", "bayes": "tpe"}
# Keys only W&B's own agent uses: accepted, reported once, not used.
AGENT_ONLY = ("program", "command", "controller", "job", "image_uri", "scheduler", "apiVersion", "kind")
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
    return any(k in data for k in ("method", "early_terminate", "run_cap", *AGENT_ONLY, "project", "entity")) or isinstance(
        data.get("metric"), dict
    )


def translate(data: dict[str, Any], default_name: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the spec's keys, notes for the user: what was read how, and what was ignored). default_name: the
    study's name when a W&B file gives none (the file's name)."""
    out = dict(data)
    notes: list[str] = []
    if isinstance(out.get("parameters"), dict):
        params = dict(out["parameters"])
        if "seed" in params:
            _seed(out, params.pop("seed"), notes)
        out["parameters"], renamed = _parameters(params)
        if renamed:
            _set_wandb(out, "param_names", renamed)
    if not looks_like_wandb(data):
        return out, notes
    if "name" not in out and default_name:
        out["name"] = re.sub(r"[^A-Za-z0-9._-]+", "-", default_name).strip("._-")[:100] or "wandb-sweep"
        notes.append(f"name: none given; the study is named {out['name']!r} after the file")
    if "metrics" in out:
        raise TranslationError("metrics: multi-objective sweeps (W&B's method: custom) are not supported; give one `metric`")
    ignored = [k for k in AGENT_ONLY if k in out]
    for k in ignored:
        out.pop(k)
    if "method" in out:
        method = out.pop("method")
        if method not in METHODS:
            raise TranslationError(f"method: {method!r} is not supported; use one of {', '.join(METHODS)}")
        if "sampler" in out:
            raise TranslationError("give either W&B's `method` or `sampler`, not both")
        out["sampler"] = {"name": METHODS[method]}
    unused_metric: list[str] = []
    if isinstance(out.get("metric"), dict):
        unused_metric = _metric(out, out.pop("metric"), notes)
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
        out["budget"] = _open_budget(out, notes)
    for key in ("project", "entity"):  # where W&B puts the runs: the spec's tracking.wandb says the same
        if key in out:
            _set_wandb(out, key, out.pop(key), keep=True)
    if ignored:
        notes.append(f"ignored: {', '.join(ignored)} (used by W&B's own agent; kmnist-tune runs the trials itself)")
    if unused_metric:
        notes.append(
            f"ignored: {', '.join(unused_metric)} (W&B's bayes search scores crashed runs with it; "
            "Optuna's samplers leave failed trials out)"
        )
    return out, notes


def _set_wandb(out: dict[str, Any], key: str, value: Any, keep: bool = False) -> None:
    """Set tracking.wandb.KEY in the spec being built (keep: a value the spec gives already wins). A
    `tracking` or `wandb` that is not a mapping is left as it is, for validation to name."""
    tracking = out.get("tracking") or {}
    wandb = tracking.get("wandb") or {} if isinstance(tracking, dict) else None
    if not isinstance(wandb, dict):
        return
    tracking, wandb = dict(tracking), dict(wandb)
    if not (keep and key in wandb):
        wandb[key] = value
    out["tracking"] = {**tracking, "wandb": wandb}


def _seed(out: dict[str, Any], block: Any, notes: list[str]) -> None:
    """`parameters.seed: {value: N}` (how W&B files pass a seed to the script) is the study's seed."""
    if isinstance(block, dict):
        if set(block) == {"value"}:
            block = block["value"]
        elif set(block) <= {"values", "distribution"} and isinstance(block.get("values"), list) and len(block["values"]) == 1:
            block = block["values"][0]
        else:
            raise TranslationError(
                "parameters.seed: a seed is not searched here; give one seed as `seed: N` at the top level "
                "(or parameters.seed: {value: N}): the study's seed drives its sampler and training"
            )
    if "seed" in out and out["seed"] != block:
        raise TranslationError(f"parameters.seed ({block!r}) contradicts seed ({out['seed']!r}); give one")
    out["seed"] = block
    notes.append(f"parameters.seed: read as the study's seed (seed: {block!r} at the top level)")


def _metric(out: dict[str, Any], block: Any, notes: list[str]) -> list[str]:
    """W&B's `metric: {name, goal, target}` -> the spec's metric, direction and target, with the file's own
    metric name kept for its W&B runs. W&B never checks the name (the metric is whatever the program logs,
    and here the program is ours): a name this project does not log is read by what it says. Returns the
    metric keys that have no use here."""
    metric = dict(block)
    name, goal, target = metric.pop("name", None), metric.pop("goal", None), metric.pop("target", None)
    # impute* fill in W&B's bayes search for crashed runs (Optuna's samplers leave failed trials out instead).
    unused = [f"metric.{key}" for key in ("impute", "impute_while_running") if metric.pop(key, None) is not None]
    if metric:
        raise TranslationError(
            f"metric: unknown key {next(iter(metric))!r}; W&B's metric has name, goal, target, impute, impute_while_running"
        )
    if goal is not None and goal not in GOALS:
        raise TranslationError(f"metric.goal: {goal!r}; use maximize or minimize")
    d = out.get("data")
    dataset = d.get("dataset", "kmnist") if isinstance(d, dict) else "kmnist"
    if name is None:
        mapped, how = default_metric(dataset), ""
    elif not isinstance(name, str) or not name.strip() or len(name) > 128:
        raise TranslationError(f"metric.name: {name!r}; give the metric's name as text (at most 128 characters)")
    else:
        mapped, how = _read_metric_name(name, goal, dataset)
    if name is not None and goal is None and mapped != "valid_loss":
        # W&B's default goal is minimize: it would minimise an accuracy. Say so rather than guess.
        raise TranslationError(f"metric.goal: W&B's default goal is minimize, which would minimise {name}; add goal: maximize")
    natural = natural_direction(mapped)
    if goal is not None and GOALS[goal] != natural:
        what = "a loss" if mapped == "valid_loss" else "an accuracy"
        raise TranslationError(f"metric.goal: {goal} would {goal[:-3]}ise {name or mapped}, {what} here; use goal: {natural}")
    out["metric"], out["direction"] = mapped, natural
    if how:
        notes.append(f"metric.name: {name!r} {how}: the study {natural[:-3]}ises {mapped} (on the validation split)")
    if name is not None:
        _set_wandb(out, "metric_name", name)
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, int | float):
            raise TranslationError(f"metric.target: {target!r} is not a number; give the value that ends the sweep")
        if mapped != "valid_loss" and not 0 < target <= 1:
            raise TranslationError(
                f"metric.target: {target:g} is never reached by {name or mapped}, an accuracy from 0 to 1; "
                "give a fraction such as 0.99"
            )
        out["target"] = target
    return unused


def _read_metric_name(name: str, goal: str | None, dataset: str) -> tuple[str, str]:
    """(this project's metric for a W&B metric name, how it was read: '' for a name it records)."""
    if name in METRIC_NAMES:
        return METRIC_NAMES[name], ""
    low = name.lower()
    accuracy = default_metric(dataset)  # balanced accuracy on the imbalanced K49
    if "loss" in low:  # before "acc": an `accumulated_loss` is a loss
        return "valid_loss", "names a loss"
    if "acc" in low:
        return ("balanced_accuracy" if "balanced" in low else accuracy), "names an accuracy"
    if goal == "maximize":
        return accuracy, "is not a metric this project logs; with goal maximize"
    said = "goal minimize" if goal else "no goal (W&B minimises by default)"
    return "valid_loss", f"is not a metric this project logs; with {said}"


def _open_budget(spec: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """A W&B sweep without run_cap: a grid ends when it is used up; random and bayes run until stopped."""
    if (spec.get("sampler") or {}).get("name") == "grid":
        return _grid_budget(spec)
    notes.append(
        "run_cap: none given, so the study runs until stopped, as a W&B sweep does: `kmnist-tune study stop NAME`, "
        "or bound it with --n-trials N (run) or `study extend NAME --n-trials N`"
    )
    return {}


def _grid_budget(spec: dict[str, Any]) -> dict[str, Any]:
    """A grid without run_cap runs each point of its grid once."""
    size = 1
    for block in (spec.get("parameters") or {}).values():
        if isinstance(block, dict) and isinstance(block.get("values"), list):
            size *= max(1, len(block["values"]))
    return {"n_trials": size}


def _parameters(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the blocks under this project's parameter names, our name -> the file's name where they differ)."""
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
    return out, {ours: theirs for ours, theirs in given.items() if ours != theirs}


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
    wandb_spec = spec.tracking.wandb
    # The file's own names, where the study was made from one: they read back as the same metric and parameters.
    out["metric"] = {"name": wandb_spec.metric_name or WANDB_METRICS[spec.metric], "goal": spec.direction}
    if spec.target is not None:
        out["metric"]["target"] = spec.target
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
    for key in ("project", "entity"):
        if getattr(wandb_spec, key) is not None:
            out[key] = getattr(wandb_spec, key)
    names = wandb_spec.param_names or {}
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
        params[names.get(name, name)] = block
    defaults = spec_to_dict(SweepSpec(name=spec.name, budget=BudgetSpec(n_trials=1)))
    mine = spec_to_dict(spec)
    if mine.get("seed") != defaults.get("seed"):
        params["seed"] = {"value": spec.seed}  # how W&B files pass a seed; it reads back as the study's seed
    out["parameters"] = params
    for section in OWN_SECTIONS:
        if mine.get(section) != defaults.get(section):
            notes.append(f"{section}: {_flow(mine[section])}")
    written = ("project", "entity", "metric_name", "param_names")  # in the file, under W&B's keys
    wandb = {k: v for k, v in mine["tracking"]["wandb"].items() if k not in written}
    if wandb != defaults["tracking"]["wandb"]:
        notes.append(f"tracking.wandb: {_flow(wandb)}")
    return out, notes


def _flow(value: Any) -> str:
    """A setting as the one-line YAML a spec would hold (`{train_size: 300}`), not a Python repr."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
