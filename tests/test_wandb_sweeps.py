"""A W&B sweep file read as a spec: W&B's top-level keys, metric names, hyperband, run_cap, parameter
aliases, YAML 1.1 numbers, and a real run of such a file on the fixture."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import run_cli

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.contract.spec import SpecError, load_spec
from kmnist_tune.service.storage import open_storage

# What a W&B user of a fastai image classifier has (W&B's keys and distributions, as documented);
# `data:` and the epochs are the only lines that size it for the test fixture.
WANDB_FILE = """\
program: train.py
method: bayes
name: wb-fastai
description: a W&B sweep of a fastai classifier
project: kuzushiji
entity: my-team
metric:
  name: val_accuracy
  goal: maximize
early_terminate:
  type: hyperband
  min_iter: 1
  eta: 2
run_cap: 2
command:
  - ${env}
  - python
  - ${program}
  - ${args}
parameters:
  learning_rate:
    distribution: log_uniform
    min: -6.2   # e^-6.2 = 0.002
    max: -4.6   # e^-4.6 = 0.010
  batch_size:
    values: [16, 32]
  weight_decay:
    values: [0, 1e-5, 1e-4]
  num_epochs:
    value: 1
  dropout:
    distribution: beta
    a: 2
    b: 5
data:
  dataset: kmnist
  valid_fraction: 0.2
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_wandb_sweep_file_reads_as_a_spec(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, WANDB_FILE))
    assert spec.name == "wb-fastai" and spec.description.startswith("a W&B sweep")
    assert spec.sampler.name == "tpe"  # bayes
    assert (spec.metric, spec.direction) == ("accuracy", "maximize")
    assert spec.pruner.name == "hyperband" and spec.pruner.options == {"reduction_factor": 2, "min_resource": 1}
    assert spec.budget.n_trials == 2  # run_cap
    assert spec.tracking.wandb.project == "kuzushiji"
    assert set(spec.parameters) == {"lr", "batch_size", "weight_decay", "epochs", "dropout"}  # W&B names -> ours
    lo, hi = spec.parameters["lr"].support()
    assert lo == pytest.approx(math.exp(-6.2)) and hi == pytest.approx(math.exp(-4.6))
    assert spec.parameters["weight_decay"].values == [0, 1e-5, 1e-4]  # YAML 1.1 would read "1e-5" as text
    assert spec.halving.min_batch_size == 16  # a value below the default floor lowers it
    assert spec.notes == ["ignored: program, command, entity (used by W&B's own agent; kmnist-tune runs the trials itself)"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("method: bayes", "method: hyperopt"), "method: 'hyperopt' is not a W&B search method; use one of grid, random, bayes"),
        (("name: val_accuracy", "name: f1_macro"), "metric.name: 'f1_macro' is not a metric this project records"),
        (("goal: maximize", "goal: up"), "metric.goal: 'up'; use maximize or minimize"),
        (("run_cap: 2\n", ""), "run_cap: W&B runs a random or bayes sweep until you stop it; give run_cap: N"),
        (("type: hyperband", "type: envelope"), "early_terminate: only `type: hyperband` exists in W&B"),
        (
            ("  batch_size:\n", "  bs:\n    value: 64\n  batch_size:\n"),
            "parameters: bs and batch_size name the same parameter (batch_size)",
        ),
        (
            ("  num_epochs:\n    value: 1\n", "  optim:\n    parameters:\n      lr: {value: 1}\n"),
            "parameters.optim: nested `parameters:` blocks are not supported; flatten them",
        ),
        (("  num_epochs:", "  num_epoch:"), "parameters.num_epoch: unknown parameter (did you mean 'num_epochs'?)"),
    ],
)
def test_a_wandb_file_that_cannot_run_gets_one_line(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = WANDB_FILE.replace(*edit)
    assert text != WANDB_FILE
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    out = run_cli("study", "create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_grid_without_run_cap_runs_its_grid_once() -> None:
    from kmnist_tune.contract.spec import parse_spec

    spec = parse_spec({"method": "grid", "name": "g", "parameters": {"lr": {"values": [1e-3, 2e-3]}, "wd": {"values": [0, 0.1]}}})
    assert spec.sampler.name == "grid" and spec.budget.n_trials == 4 and set(spec.parameters) == {"lr", "weight_decay"}
    assert spec.pruner.name == "none"  # W&B stops no run early without early_terminate


def test_wandb_log_uniform_family_is_sampled_in_value_space(tmp_path: Path) -> None:
    """W&B's log_uniform (exponents), inv_log_uniform (negative exponents) and inv_log_uniform_values
    are log-uniform over their support; the stored parameter is the value used."""
    from kmnist_tune.contract.space import sample_params
    from kmnist_tune.contract.spec import parse_spec

    blocks = {
        "lr": {"distribution": "log_uniform", "min": math.log(1e-4), "max": math.log(1e-2)},
        "weight_decay": {"distribution": "inv_log_uniform", "min": math.log(10), "max": math.log(1000)},
        "pct_start": {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 0.5},
    }
    spec = parse_spec({"name": "logs", "parameters": blocks, "budget": {"n_trials": 1}, "sampler": "random"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws: dict[str, list[float]] = {k: [] for k in blocks}
    for _ in range(3000):
        trial = study.ask()
        params = sample_params(trial, spec)
        for k in blocks:
            assert trial.params[k] == params[k]
            draws[k].append(params[k])
        study.tell(trial, 0.0)
    for k, (lo, hi) in {"lr": (1e-4, 1e-2), "weight_decay": (1e-3, 1e-1), "pct_start": (0.01, 0.5)}.items():
        xs = sorted(draws[k])
        assert lo <= xs[0] and xs[-1] <= hi
        # log-uniform: the median is the geometric mean of the ends, the quartiles a quarter of the way in logs
        for q in (0.25, 0.5, 0.75):
            expected = math.exp(math.log(lo) + q * (math.log(hi) - math.log(lo)))
            got = xs[int(q * len(xs))]
            assert abs(math.log(got / expected)) < 0.05 * (math.log(hi) - math.log(lo)), (k, q, got, expected)


def test_the_wandb_file_runs_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, WANDB_FILE)
    url = f"sqlite:///{tmp_path / 'wb.db'}"
    out = run_cli("run", str(path), "--storage", url)
    assert "ignored: program, command, entity" in out.stderr
    study = optuna.load_study(study_name="wb-fastai", storage=open_storage(url))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2 and all(t.state != optuna.trial.TrialState.FAIL for t in finished)
    for t in finished:
        assert math.exp(-6.2) <= t.params["lr"] <= math.exp(-4.6) and t.params["batch_size"] in (16, 32)
        assert 0 < t.params["dropout"] < 1 and TrialRecord.of(t).config["dropout"] == t.params["dropout"]  # used = stored
    best = json.loads(run_cli("best", "--study", "wb-fastai", "--storage", url, "--json").stdout)
    assert "dropout" in best["params"] and "dropout_quantile" not in best["params"]  # the sampler's quantile stays inside


# -- W&B's distributions, drawn by Optuna's random sampler through the product's own code ---------
# The reference is scipy.stats, the library W&B's own sweeps code draws with; our code uses the
# standard library's NormalDist and scipy.special.betaincinv, so the two are independent.
N_DRAWS = 3000
TOL = 0.035  # |empirical - expected| of a cumulative share, about 4 standard errors at 3000 draws


def draws(parameters: dict, n: int = N_DRAWS) -> tuple[dict[str, list], list[optuna.trial.FrozenTrial]]:
    from kmnist_tune.contract.space import sample_params
    from kmnist_tune.contract.spec import parse_spec

    spec = parse_spec({"name": "dists", "parameters": parameters, "budget": {"n_trials": 1}, "sampler": "random"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    used: dict[str, list] = {k: [] for k in parameters}
    for _ in range(n):
        trial = study.ask()
        params = sample_params(trial, spec)
        for k in parameters:
            used[k].append(params[k])
        study.tell(trial, 0.0)
    return used, study.trials


def assert_continuous(xs: list[float], cdf, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95)) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    arr = np.asarray(xs, dtype=float)
    for p in quantiles:
        x = float(np.quantile(arr, p))
        assert abs(cdf(x) - p) < TOL, (p, x, cdf(x))


def assert_rounded(xs: list[float], q: float, cdf, lo: float, hi: float) -> None:  # type: ignore[no-untyped-def]
    """W&B rounds to the nearest multiple of q: P(X <= g) = F(g + q/2) at each multiple g."""
    import numpy as np

    arr = np.asarray(xs, dtype=float)
    assert np.allclose(arr / q, np.round(arr / q)), "every value is a multiple of q"
    grid = sorted(set(np.round(arr / q).astype(int).tolist()))
    inner = [g * q for g in grid[len(grid) // 10 : -max(1, len(grid) // 10)]] or [grid[0] * q]
    for g in inner:
        assert abs(float(np.mean(arr <= g + 1e-12)) - cdf(g + q / 2)) < TOL, (g, float(np.mean(arr <= g)), cdf(g + q / 2))
    assert lo - 1e-9 <= arr.min() and arr.max() <= hi + 1e-9


def test_wandb_shaped_distributions_follow_wandb_definitions() -> None:
    from scipy import stats

    used, trials = draws(
        {
            "lr": {"distribution": "log_normal", "mu": -7, "sigma": 1},
            "pct_start": {"distribution": "beta", "a": 2, "b": 2},
            "dropout": {"distribution": "q_beta", "a": 2, "b": 5, "q": 0.05},
            "batch_size": {"distribution": "q_normal", "mu": 128, "sigma": 16, "q": 8},
            "epochs": {"distribution": "q_log_normal", "mu": 3, "sigma": 0.3},  # q: W&B's default 1
            "weight_decay": {"distribution": "q_log_uniform", "min": math.log(1e-3), "max": math.log(1e-1), "q": 0.001},
        }
    )
    assert_continuous(used["lr"], stats.lognorm(s=1, scale=math.exp(-7)).cdf)
    assert_continuous(used["pct_start"], stats.beta(2, 2).cdf)
    assert_rounded(used["dropout"], 0.05, stats.beta(2, 5).cdf, 0.0, 1.0)
    assert_rounded(used["batch_size"], 8, stats.norm(128, 16).cdf, 0, 256)
    assert_rounded(used["epochs"], 1, stats.lognorm(s=0.3, scale=math.exp(3)).cdf, 1, 1000)
    log_cdf = stats.uniform(-3 * math.log(10), 2 * math.log(10)).cdf
    assert_rounded(used["weight_decay"], 0.001, lambda x: log_cdf(math.log(x)), 1e-3, 0.1)
    assert all(isinstance(b, int) for b in used["batch_size"] + used["epochs"])
    # The parameter Optuna stores is the value training used, for every trial.
    for i, t in enumerate(trials):
        assert {k: t.params[k] for k in used} == {k: v[i] for k, v in used.items()}


def test_wandb_quantised_and_weighted_distributions_follow_wandb_definitions() -> None:
    from collections import Counter

    from scipy import stats

    used, trials = draws(
        {
            "weight_decay": {"distribution": "q_uniform", "min": 0, "max": 0.1, "q": 0.05},
            "epochs": {"distribution": "q_uniform", "min": 3, "max": 12, "q": 3},
            "batch_size": {"distribution": "q_log_uniform_values", "min": 16, "max": 256, "q": 16},
            "lr": {"distribution": "normal", "mu": 0.05, "sigma": 0.005},
            "arch": {"values": ["resnet18", "resnet34", "resnet50"], "probabilities": [0.7, 0.2, 0.1]},
        }
    )
    # W&B rounds a uniform draw: the ends of the range get half the share of the inner multiples
    # (Optuna's stepped uniform would give each a third).
    share = {k: v / N_DRAWS for k, v in Counter(round(x, 9) for x in used["weight_decay"]).items()}
    assert set(share) == {0.0, 0.05, 0.1}
    for value, expected in ((0.0, 0.25), (0.05, 0.5), (0.1, 0.25)):
        assert abs(share[value] - expected) < TOL, share
    share = {k: v / N_DRAWS for k, v in Counter(used["epochs"]).items()}
    for value, expected in ((3, 1.5 / 9), (6, 3 / 9), (9, 3 / 9), (12, 1.5 / 9)):
        assert abs(share[value] - expected) < TOL, share
    log_cdf = stats.uniform(math.log(16), math.log(256) - math.log(16)).cdf
    assert_rounded(used["batch_size"], 16, lambda x: log_cdf(math.log(x)), 16, 256)
    assert_continuous(used["lr"], stats.norm(0.05, 0.005).cdf)
    share = {k: v / N_DRAWS for k, v in Counter(used["arch"]).items()}
    for value, expected in (("resnet18", 0.7), ("resnet34", 0.2), ("resnet50", 0.1)):
        assert abs(share[value] - expected) < TOL, share
    for i, t in enumerate(trials):
        assert {k: t.params[k] for k in used} == {k: v[i] for k, v in used.items()}
        assert t.params["batch_size"] % 16 == 0  # the used, rounded value: never the raw draw


def test_shaped_distributions_refuse_what_cannot_be_used() -> None:
    from kmnist_tune.contract.spec import parse_spec

    cases = [
        ({"dropout": {"distribution": "beta", "min": 0, "max": 1}}, "distribution beta is shaped by a and b, not min/max"),
        ({"epochs": {"distribution": "normal", "mu": 10, "sigma": 1}}, "epochs is a whole number"),
        ({"lr": {"distribution": "normal", "mu": 0.001, "sigma": 0.01}}, "is below the allowed range"),
        ({"arch": {"values": ["resnet18", "resnet34"], "probabilities": [0.5]}}, "`probabilities` needs one weight"),
    ]
    for parameters, message in cases:
        with pytest.raises(SpecError) as err:
            parse_spec({"name": "bad", "parameters": parameters, "budget": {"n_trials": 1}})
        assert message in str(err.value), str(err.value)
