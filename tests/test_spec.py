"""The sweep spec: shipped specs load, every kind of mistake is one line naming the field,
W&B shorthands resolve as W&B resolves them, and sampling stays inside the spec's ranges."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from kmnist_tune.contract.load import load_spec, parse_spec
from kmnist_tune.contract.space import grid_space, sample_params
from kmnist_tune.contract.spec import PARAMETERS, SpecError, SweepSpec, spec_to_dict
from kmnist_tune.service.studies import make_sampler

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def base(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "t", "budget": {"n_trials": 2}}
    spec.update(over)
    return spec


def load_text(tmp_path: Path, text: str | bytes) -> SweepSpec:
    path = tmp_path / "spec.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return load_spec(path)


def load_dict(tmp_path: Path, data: Any) -> SweepSpec:
    return load_text(tmp_path, yaml.safe_dump(data, sort_keys=False))


def spec_error(tmp_path: Path, data: Any) -> str:
    with pytest.raises(SpecError) as info:
        load_text(tmp_path, data) if isinstance(data, (str, bytes)) else load_dict(tmp_path, data)
    msg = str(info.value)
    assert "\n" not in msg, f"message spans lines: {msg!r}"
    assert msg.strip(), "empty message"
    return msg


# -- the shipped specs ----------------------------------------------------------------------


def test_at_least_three_specs_ship() -> None:
    assert len(SHIPPED) >= 3, SHIPPED
    assert "quickstart.yaml" in {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_loads(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name
    assert spec.budget.n_trials or spec.budget.timeout
    assert spec.searched_params(), f"{path.name} searches nothing"
    assert set(spec.fixed_params()) == set(PARAMETERS)


def test_quickstart_is_what_its_comment_says() -> None:
    path = REPO / "sweeps" / "quickstart.yaml"
    comment = path.read_text().splitlines()[0]
    assert "resnet18" in comment and "2 epochs" in comment and "6 trials" in comment, comment
    spec = load_spec(path)
    fixed = spec.fixed_params()
    assert fixed["arch"] == "resnet18"
    assert fixed["epochs"] == 2
    assert spec.budget.n_trials == 6
    assert spec.data.train_size == 10_000
    assert "arch" not in spec.searched_params() and "epochs" not in spec.searched_params()


# -- mistakes: one line, naming the field ----------------------------------------------------

LR = {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}

NESTED_ALIASES = """name: laughs
budget: {n_trials: 2}
sampler:
  name: tpe
  options:
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
"""


MISTAKES: list[tuple[str, Any, list[str]]] = [
    # A misspelt top-level key also leaves `budget` missing: the typo must be what is reported.
    ("unknown top-level key", {"name": "t", "budgte": {"n_trials": 2}}, ["budgte", "'budget'"]),
    ("unknown top-level key beside budget", base(sede=3), ["sede", "'seed'"]),
    (
        "unknown nested key",
        base(parameters={"lr": {"distribution": "uniform", "mni": 1e-4, "max": 0.1}}),
        ["mni", "parameters.lr", "'min'"],
    ),
    ("unknown data key", base(data={"datset": "k49"}), ["datset", "data", "'dataset'"]),
    (
        "finder iterations too few",
        base(parameters={"lr": {"distribution": "lr_finder", "iterations": 5}}),
        ["parameters.lr.iterations", "greater than or equal to 10"],
    ),
    (
        "finder settings on another distribution",
        base(parameters={"lr": {"distribution": "uniform", "min": 1e-4, "max": 0.1, "iterations": 50}}),
        ["parameters.lr", "iterations: only for distribution lr_finder, not uniform"],
    ),
    ("epochs not a number (bare)", base(parameters={"epochs": "ten"}), ["parameters.epochs", "'ten'", "not a number"]),
    ("epochs not a number (value)", base(parameters={"epochs": {"value": "ten"}}), ["parameters.epochs", "'ten'"]),
    ("epochs not whole", base(parameters={"epochs": 2.5}), ["parameters.epochs", "2.5", "whole number"]),
    ("n_trials not a number", {"name": "t", "budget": {"n_trials": "many"}}, ["budget.n_trials", "'many'"]),
    (
        "min greater than max",
        base(parameters={"lr": {"distribution": "uniform", "min": 0.1, "max": 0.01}}),
        ["parameters.lr", "min", "greater than max"],
    ),
    (
        "unknown distribution",
        base(parameters={"lr": {"distribution": "gaussian", "min": 0.1, "max": 0.2}}),
        ["parameters.lr.distribution", "'gaussian'", "log_uniform_values"],
    ),
    ("unknown sampler", base(sampler="bayes"), ["sampler", "'bayes'", "tpe"]),
    ("unknown pruner", base(pruner={"name": "asha"}), ["pruner", "'asha'", "hyperband"]),
    ("unknown parameter", base(parameters={"weight_decy": {"value": 0.1}}), ["parameters.weight_decy", "'weight_decay'"]),
    (
        "log distribution, min 0",
        base(parameters={"weight_decay": {"distribution": "log_uniform_values", "min": 0, "max": 0.1}}),
        ["parameters.weight_decay", "log_uniform_values", "min > 0"],
    ),
    (
        "q distribution with a q of 0",  # no q at all is W&B's q = 1 (test_wandb_sweeps.py)
        base(parameters={"batch_size": {"distribution": "q_uniform", "min": 16, "max": 256, "q": 0}}),
        ["parameters.batch_size", "q_uniform", "`q`"],
    ),
    (
        "q_log range without a multiple of q",
        base(parameters={"batch_size": {"distribution": "q_log_uniform_values", "min": 20, "max": 30, "q": 16}}),
        ["parameters.batch_size", "no multiple of q (16)", "min (20)", "max (30)"],
    ),
    (
        "grid with a continuous parameter",
        base(sampler="grid", parameters={"arch": {"values": ["resnet18", "resnet34"]}, "lr": LR}),
        ["grid", "parameters.lr", "log_uniform_values"],
    ),
    ("metric/direction contradiction", base(metric="valid_loss", direction="maximize"), ["direction", "valid_loss", "minimize"]),
    ("arch not allowed", base(parameters={"arch": {"value": "resnet101"}}), ["parameters.arch", "'resnet101'", "resnet18"]),
    ("arch values not allowed", base(parameters={"arch": {"values": ["resnet18", "vgg16"]}}), ["parameters.arch", "'vgg16'"]),
    ("missing budget", {"name": "t"}, ["budget", "missing"]),
    ("a YAML list", "- name: t\n- budget: {n_trials: 2}\n", ["mapping", "list"]),
    ("an empty file", "", ["mapping"]),
    ("a key given twice", "name: t\nbudget: {n_trials: 2}\nname: u\n", ["line 3", "duplicate", "'name'"]),
    ("invalid YAML", "name: t\nbudget: {n_trials: 2\nseed: 0\n", ["not valid YAML", "line 3"]),
    ("tab indentation", "name: t\nbudget:\n\tn_trials: 2\n", ["not valid YAML", "line 3"]),
    ("a control character", "name: t\nseed: 0\x00\nbudget: {n_trials: 2}\n", ["not valid YAML", "line 2", "#x0000"]),
    ("non-UTF-8 (latin-1)", "name: caf\u00e9\nbudget: {n_trials: 2}\n".encode("latin-1"), ["UTF-8"]),
    ("non-UTF-8 (UTF-16)", "name: t\nbudget: {n_trials: 2}\n".encode("utf-16"), ["UTF-8"]),
    # Bounded input: booleans are no numbers, a whole-number parameter takes a whole-number step,
    # NaN is called NaN, a spec stays a page of settings even through YAML aliases.
    ("a boolean trial budget", base(budget={"n_trials": True}), ["budget.n_trials", "true is a boolean"]),
    ("a boolean retry count", base(workers={"max_retry": False}), ["workers.max_retry", "false is a boolean"]),
    ("a boolean timeout", base(budget={"timeout": True}), ["budget.timeout", "boolean"]),
    (
        "a fractional step for a whole number",
        base(parameters={"batch_size": {"distribution": "q_uniform", "min": 16, "max": 64, "q": 0.5}}),
        ["parameters.batch_size", "q must be a whole number", "0.5"],
    ),
    ("NaN as a value", "name: t\nbudget: {n_trials: 2}\nparameters: {weight_decay: .nan}\n", ["weight_decay", "NaN"]),
    ("NaN as a bound", "name: t\nbudget: {timeout: .nan}\n", ["budget.timeout", "NaN"]),
    ("NaN as a range end", "name: t\nbudget: {n_trials: 2}\nparameters: {lr: {min: .nan, max: 0.1}}\n", ["lr.min", "NaN"]),
    ("infinity as a fraction", "name: t\nbudget: {n_trials: 2}\ndata: {valid_fraction: .inf}\n", ["valid_fraction", "infinity"]),
    ("nested YAML aliases", NESTED_ALIASES, ["expands to more than 64 KB"]),
    ("a spec past 64 KB", "name: t\nbudget: {n_trials: 2}\n" + "# padding\n" * 7000, ["at most 64 KB"]),
]


@pytest.mark.parametrize(("data", "expected"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_naming_the_field(tmp_path: Path, data: Any, expected: list[str]) -> None:
    msg = spec_error(tmp_path, data)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "spec.yaml" in msg, f"the message should name the file: {msg!r}"


def test_missing_spec_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(missing) in msg and "does not exist" in msg


def test_mistakes_are_reported_not_fixed_by_parse_spec() -> None:
    # parse_spec (used for specs stored in a study) applies the same checks as load_spec.
    with pytest.raises(SpecError, match="budgte"):
        parse_spec({"name": "t", "budgte": {"n_trials": 1}}, "stored")
    with pytest.raises(SpecError, match="got str"):
        parse_spec("name: t", "stored")


# -- W&B shorthands --------------------------------------------------------------------------


def test_values_alone_is_categorical(tmp_path: Path) -> None:
    spec = load_text(tmp_path, "name: t\nbudget: {n_trials: 2}\nparameters:\n  arch: {values: [resnet18, resnet34]}\n")
    p = spec.parameters["arch"]
    assert p.kind() == "categorical" and p.searched
    assert "arch" in spec.searched_params()


def test_int_min_max_alone_is_int_uniform(tmp_path: Path) -> None:
    spec = load_text(tmp_path, "name: t\nbudget: {n_trials: 2}\nparameters:\n  batch_size: {min: 16, max: 256}\n")
    assert spec.parameters["batch_size"].kind() == "int_uniform"
    assert spec.parameters["batch_size"].searched


def test_float_min_max_alone_is_uniform_even_when_whole(tmp_path: Path) -> None:
    # W&B infers the distribution from the *type* of min/max: 0.0..1.0 is a float range.
    spec = load_text(tmp_path, "name: t\nbudget: {n_trials: 2}\nparameters:\n  weight_decay: {min: 0.0, max: 1.0}\n")
    assert spec.parameters["weight_decay"].kind() == "uniform"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(10):
        v = sample_params(study.ask(), spec)["weight_decay"]
        assert isinstance(v, float) and 0.0 <= v <= 1.0
        seen.add(v)
    assert len(seen) > 2, f"a float range sampled only {seen}"


def test_bare_scalar_is_a_fixed_value(tmp_path: Path) -> None:
    spec = load_text(tmp_path, "name: t\nbudget: {n_trials: 2}\nparameters:\n  epochs: 3\n  arch: resnet34\n")
    assert spec.parameters["epochs"].kind() == "constant"
    assert not spec.parameters["epochs"].searched
    assert spec.fixed_params()["epochs"] == 3
    assert spec.fixed_params()["arch"] == "resnet34"
    assert spec.searched_params() == {}


def test_single_element_values_is_not_searched(tmp_path: Path) -> None:
    spec = load_text(
        tmp_path,
        "name: t\nbudget: {n_trials: 2}\nsampler: grid\nparameters:\n  batch_size: {values: [64]}\n"
        "  arch: {values: [resnet18, resnet50]}\n",
    )
    assert not spec.parameters["batch_size"].searched
    assert set(spec.searched_params()) == {"arch"}
    assert spec.fixed_params()["batch_size"] == 64
    assert grid_space(spec) == {"arch": ["resnet18", "resnet50"]}


def test_sampler_and_pruner_name_shorthand() -> None:
    spec = parse_spec(base(sampler="random", pruner="none"))
    assert spec.sampler.name == "random" and spec.pruner.name == "none"


def test_metric_and_direction_defaults() -> None:
    assert (parse_spec(base()).metric, parse_spec(base()).direction) == ("accuracy", "maximize")
    k49 = parse_spec(base(data={"dataset": "k49"}))
    assert (k49.metric, k49.direction) == ("balanced_accuracy", "maximize")
    loss = parse_spec(base(metric="valid_loss"))
    assert loss.direction == "minimize"


# -- round trip -------------------------------------------------------------------------------

EVERY_DISTRIBUTION: dict[str, Any] = {
    "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
    "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.1},
    "epochs": {"distribution": "int_uniform", "min": 1, "max": 5},
    "dropout": {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.1},
    "batch_size": {"distribution": "q_log_uniform_values", "min": 20, "max": 200, "q": 16},
    "arch": {"distribution": "categorical", "values": ["resnet18", "resnet34"]},
    "stem": {"distribution": "constant", "value": "small"},
    "pct_start": {"min": 0.1, "max": 0.5},  # W&B shorthand: uniform
}
INT_STEPS: dict[str, Any] = {
    "epochs": {"distribution": "q_uniform", "min": 2, "max": 10, "q": 2},
    "batch_size": {"min": 32, "max": 96},  # W&B shorthand: int_uniform
    "lr": 0.01,
}


def test_the_lr_finder_block_stores_what_it_used() -> None:
    """A stored spec says the finder's width, suggestion and steps, defaults filled in, so that a
    later default changes no study."""
    lr = parse_spec(base(parameters={"lr": {"distribution": "lr_finder"}})).parameters["lr"]
    assert (lr.width, lr.suggestion, lr.iterations) == (2.0, "minimum", 100)
    lr = parse_spec(base(parameters={"lr": {"iterations": 30}})).parameters["lr"]  # the block's own keys say lr_finder
    assert lr.kind() == "lr_finder" and lr.lr_finder_settings() == (2.0, "minimum", 30)
    assert spec_to_dict(parse_spec(base(parameters={"lr": {"iterations": 30}})))["parameters"]["lr"]["iterations"] == 30


@pytest.mark.parametrize(
    "data",
    [
        base(parameters=EVERY_DISTRIBUTION, sampler={"name": "random", "options": {}}, seed=3),
        base(parameters=INT_STEPS, data={"dataset": "k49", "train_size": 500, "valid_size": 100}),
        base(
            parameters={"weight_decay": {"min": 0.0, "max": 1.0}, "batch_size": {"values": [64]}},
            pruner={"name": "hyperband", "options": {"min_resource": 1}},
            budget={"timeout": 60.5},
            metric="valid_loss",
        ),
        *(yaml.safe_load(p.read_text()) for p in SHIPPED),
    ],
    ids=["every-distribution", "int-steps", "whole-floats", *(p.stem for p in SHIPPED)],
)
def test_spec_to_dict_round_trips(data: dict[str, Any]) -> None:
    spec = parse_spec(data)
    d = spec_to_dict(spec)
    # Stored in Optuna's user attrs, i.e. through JSON.
    again = parse_spec(json.loads(json.dumps(d)))
    assert spec_to_dict(again) == d
    assert again == spec
    for name, p in spec.parameters.items():
        assert again.parameters[name].kind() == p.kind(), name


# -- sampling -----------------------------------------------------------------------------------


def sample_many(spec: SweepSpec, n: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        out.append(sample_params(trial, spec))
        return 0.0

    study.optimize(objective, n_trials=n)
    return out


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def test_sampling_every_distribution_stays_in_range() -> None:
    spec = parse_spec(base(parameters=EVERY_DISTRIBUTION))
    kinds = {name: p.kind() for name, p in spec.parameters.items()}
    assert set(kinds.values()) == {
        "log_uniform_values",
        "uniform",
        "int_uniform",
        "q_uniform",
        "q_log_uniform_values",
        "categorical",
        "constant",
    }
    fixed = spec.fixed_params()
    samples = sample_many(spec)
    assert len(samples) == 30
    for s in samples:
        assert set(s) == set(PARAMETERS)
        assert isinstance(s["lr"], float) and 1e-4 <= s["lr"] <= 1e-1
        assert isinstance(s["weight_decay"], float) and 0.0 <= s["weight_decay"] <= 0.1
        assert is_int(s["epochs"]) and 1 <= s["epochs"] <= 5
        assert isinstance(s["dropout"], float) and 0.0 <= s["dropout"] <= 0.5
        assert math.isclose(s["dropout"] * 10, round(s["dropout"] * 10), abs_tol=1e-9), s["dropout"]
        # q_log_uniform_values with q=16 on [20, 200]: W&B rounds the draw to the nearest multiple of 16
        # (20 can become 16; 200 becomes 192, half to even), as ints.
        assert is_int(s["batch_size"]) and s["batch_size"] % 16 == 0 and 16 <= s["batch_size"] <= 192, s["batch_size"]
        assert s["arch"] in ("resnet18", "resnet34")
        assert s["stem"] == "small"
        assert isinstance(s["pct_start"], float) and 0.1 <= s["pct_start"] <= 0.5
        # Parameters the spec does not mention keep their defaults.
        assert s["stem"] == fixed["stem"]
    # 30 random trials actually explore: not one value repeated.
    assert len({s["lr"] for s in samples}) == 30
    assert len({s["epochs"] for s in samples}) > 2
    assert len({s["batch_size"] for s in samples}) > 3
    assert {s["arch"] for s in samples} == {"resnet18", "resnet34"}


def test_sampling_int_steps_and_fixed_defaults() -> None:
    spec = parse_spec(base(parameters=INT_STEPS))
    fixed = spec.fixed_params()
    assert fixed["lr"] == 0.01
    for name in ("weight_decay", "dropout", "pct_start", "arch", "stem"):
        assert fixed[name] == PARAMETERS[name]["default"], name
    samples = sample_many(spec, seed=7)
    for s in samples:
        assert is_int(s["epochs"]) and s["epochs"] in (2, 4, 6, 8, 10), s["epochs"]
        assert is_int(s["batch_size"]) and 32 <= s["batch_size"] <= 96
        for name, value in fixed.items():
            if name not in ("epochs", "batch_size"):
                assert s[name] == value, name
    assert len({s["epochs"] for s in samples}) >= 3


def test_grid_sampler_enumerates_the_product_and_stops() -> None:
    spec = parse_spec(
        base(
            sampler="grid",
            parameters={
                "arch": {"values": ["resnet18", "resnet34"]},
                "batch_size": {"values": [32, 64, 128]},
                "stem": {"values": ["imagenet", "small"]},
                "lr": {"values": [0.003]},  # one value: fixed, not part of the grid
                "epochs": 3,
            },
        )
    )
    study = optuna.create_study(sampler=make_sampler(spec, seed=0))
    seen: list[tuple[Any, ...]] = []

    def objective(trial: optuna.Trial) -> float:
        s = sample_params(trial, spec)
        assert s["lr"] == 0.003 and s["epochs"] == 3
        seen.append((s["arch"], s["batch_size"], s["stem"]))
        return 0.0

    study.optimize(objective, n_trials=100)  # the grid sampler stops the study when it is done
    expected = list(itertools.product(["resnet18", "resnet34"], [32, 64, 128], ["imagenet", "small"]))
    assert len(seen) == len(expected) == 12
    assert sorted(seen) == sorted(expected)
