"""A W&B sweep file read as a spec: W&B's top-level keys, metric names, hyperband, run_cap, parameter
aliases, YAML 1.1 numbers, and a real run of such a file on the fixture."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import run_cli

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
    assert set(spec.parameters) == {"lr", "batch_size", "weight_decay", "epochs"}  # W&B names -> ours
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
