"""A W&B sweep file read as a spec: W&B's top-level keys, metric names, hyperband, run_cap, parameter
aliases, YAML 1.1 numbers, and a real run of such a file on the fixture."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import cli_here, run_cli

from kmnist_tune.contract.load import load_spec, parse_spec
from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.contract.spec import SpecError
from kmnist_tune.service.storage import open_storage

CORPUS = Path(__file__).parent / "wandb_corpus"
# What a W&B user of a fastai image classifier has: program, method bayes, val_accuracy, hyperband,
# log_uniform learning rate, batch sizes as values, an optimizer categorical (the done-when).
WANDB_FILE = (CORPUS / "fastai_bayes.yaml").read_text()
# W&B's own JSON schema of sweep configs (scripts/ci-deps takes it from W&B's `sweeps` package).
WANDB_SCHEMA = Path(__file__).parents[1] / ".cache" / "wandb-sweeps" / "schema.json"


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_wandb_sweep_file_reads_as_a_spec(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, WANDB_FILE))
    assert spec.name == "wb-fastai" and spec.description.startswith("bayes search of a fastai")
    assert spec.sampler.name == "tpe"  # bayes
    assert (spec.metric, spec.direction) == ("accuracy", "maximize")
    assert spec.pruner.name == "hyperband" and spec.pruner.options == {"reduction_factor": 2, "min_resource": 1}
    assert spec.budget.n_trials == 2  # run_cap
    assert spec.tracking.wandb.project == "kuzushiji"
    assert set(spec.parameters) == {"lr", "batch_size", "optimizer", "weight_decay", "epochs", "dropout"}  # W&B names -> ours
    lo, hi = spec.parameters["lr"].support()
    assert lo == pytest.approx(math.exp(-6.2)) and hi == pytest.approx(math.exp(-4.6))
    assert spec.parameters["weight_decay"].values == [0, 1e-5, 1e-4]  # YAML 1.1 would read "1e-5" as text
    assert spec.halving.min_batch_size == 16  # a value below the default floor lowers it
    assert spec.tracking.wandb.entity == "my-team"  # where W&B puts the runs
    # The file's own names, kept for its W&B runs: the metric, and each parameter renamed here.
    assert spec.tracking.wandb.metric_name == "val_accuracy"
    assert spec.tracking.wandb.param_names == {"lr": "learning_rate", "epochs": "num_epochs"}
    assert spec.notes == ["ignored: program, command (used by W&B's own agent; kmnist-tune runs the trials itself)"]


REAL_PROCESS_EDIT = ("method: bayes", "method: hyperopt")  # the case whose refusal a real process prints


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("method: bayes", "method: hyperopt"), "method: 'hyperopt' is not supported; use one of grid, random, bayes"),
        (("goal: maximize", "goal: up"), "metric.goal: 'up'; use maximize or minimize"),
        (("  goal: maximize\n", ""), "metric.goal: W&B's default goal is minimize, which would minimise val_accuracy"),
        # The file's word is goal: the refusal says goal, not this project's `direction`.
        (
            ("goal: maximize", "goal: minimize"),
            "metric.goal: minimize would minimise val_accuracy, an accuracy here; use goal: maximize",
        ),
        (("name: val_accuracy", "name: epoch/val_loss"), "metric.goal: maximize would maximise epoch/val_loss, a loss here"),
        (("goal: maximize", "goal: maximize\n  target: 99"), "metric.target: 99 is never reached by val_accuracy, an accuracy"),
        (("goal: maximize", "goal: maximize\n  target: high"), "metric.target: 'high' is not a number"),
        (("method: bayes", "method: custom"), "method: 'custom' is not supported; use one of grid, random, bayes"),
        (("values: [adam, sgd]", "values: [adam, adamax]"), "parameters.optimizer: 'adamax' is not one of adam, sgd"),
        (("  num_epochs:", "  seed:\n    values: [1, 2]\n  num_epochs:"), "parameters.seed: a seed is not searched here"),
        (
            ("  num_epochs:", "  seed:\n    value: 7\n  num_epochs:", "program:", "seed: 8\nprogram:"),
            "parameters.seed (7) contradicts seed (8); give one",
        ),
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
def test_a_wandb_file_that_cannot_run_gets_one_line(tmp_path: Path, edit: tuple[str, ...], message: str) -> None:
    text = WANDB_FILE
    for old, new in zip(edit[::2], edit[1::2], strict=True):
        text = text.replace(old, new, 1)
    assert text != WANDB_FILE
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    # The CLI's refusal: one real process (the entry point's contract), the others through its `main` here.
    cli = run_cli if edit == REAL_PROCESS_EDIT else cli_here
    out = cli("study", "create", str(path), "--storage", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("name", "goal", "dataset", "metric", "said"),
    [
        ("Validation/Accuracy", "maximize", "kmnist", "accuracy", "names an accuracy: the study maximises accuracy"),
        ("val/acc", "maximize", "k49", "balanced_accuracy", "names an accuracy: the study maximises balanced_accuracy"),
        ("val/balanced_acc", "maximize", "kmnist", "balanced_accuracy", "names an accuracy"),
        ("epoch/val_loss", "minimize", "kmnist", "valid_loss", "names a loss: the study minimises valid_loss"),
        ("loss_metric", None, "kmnist", "valid_loss", "names a loss: the study minimises valid_loss"),
        ("best_eval", "maximize", "kmnist", "accuracy", "with goal maximize: the study maximises accuracy"),
        ("score", None, "kmnist", "valid_loss", "with no goal (W&B minimises by default): the study minimises valid_loss"),
        ("val_accuracy", "maximize", "kmnist", "accuracy", None),  # a name this project logs: no notice
    ],
)
def test_a_metric_name_is_read_by_what_it_says(name: str, goal: str | None, dataset: str, metric: str, said: str | None) -> None:
    block = {"name": name} if goal is None else {"name": name, "goal": goal}
    spec = parse_spec({"method": "random", "name": "m", "data": {"dataset": dataset}, "metric": block, "parameters": {}})
    assert spec.metric == metric and spec.tracking.wandb.metric_name == name
    notices = [n for n in spec.notes if n.startswith("metric.name")]
    assert len(notices) == (0 if said is None else 1), notices  # one notice line for each mapping
    if said is not None:
        assert notices[0].startswith(f"metric.name: {name!r} ") and said in notices[0] and "\n" not in notices[0]


def test_wandb_keys_that_decide_where_runs_go_and_when_a_sweep_ends() -> None:
    spec = parse_spec(
        {
            "method": "bayes",
            "name": "keys",
            "entity": "my-team",
            "metric": {"name": "val_acc", "goal": "maximize", "target": 0.95},
            "parameters": {"seed": {"value": 42}, "learning_rate": {"min": 1e-4, "max": 1e-2}},
        }
    )
    assert spec.tracking.wandb.entity == "my-team" and spec.target == 0.95 and spec.seed == 42
    assert "seed" not in spec.parameters and spec.budget.n_trials is None and spec.budget.timeout is None
    assert spec.reaches_target(0.95) and not spec.reaches_target(0.949)
    assert any(n.startswith("run_cap: none given, so the study runs until stopped") for n in spec.notes), spec.notes
    assert "parameters.seed: read as the study's seed (seed: 42 at the top level)" in spec.notes
    loss = parse_spec({"method": "random", "name": "l", "metric": {"name": "val_loss", "target": 0.2}, "run_cap": 3})
    assert loss.reaches_target(0.2) and not loss.reaches_target(0.21) and loss.budget.n_trials == 3


def test_a_grid_without_run_cap_runs_its_grid_once() -> None:
    from kmnist_tune.contract.load import parse_spec

    spec = parse_spec({"method": "grid", "name": "g", "parameters": {"lr": {"values": [1e-3, 2e-3]}, "wd": {"values": [0, 0.1]}}})
    assert spec.sampler.name == "grid" and spec.budget.n_trials == 4 and set(spec.parameters) == {"lr", "weight_decay"}
    assert spec.pruner.name == "none"  # W&B stops no run early without early_terminate


def test_wandb_log_uniform_family_is_sampled_in_value_space(tmp_path: Path) -> None:
    """W&B's log_uniform (exponents), inv_log_uniform (negative exponents) and inv_log_uniform_values
    are log-uniform over their support; the stored parameter is the value used."""
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.contract.space import sample_params

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


def test_the_wandb_file_runs_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """...and each trial's offline W&B run carries the file's names: its metric (val_accuracy, with this
    project's valid_accuracy beside it), its parameters (learning_rate, num_epochs), epochs from 1.
    (In this process: test_lifecycle.py runs a W&B file in a real process, with two workers.)"""
    from shared_studies import in_process_cli
    from wandb_records import read_run

    path = write(tmp_path, WANDB_FILE)
    url = f"sqlite:///{tmp_path / 'wb.db'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    _, stderr = in_process_cli(capsys, "run", str(path), "--storage", url)
    assert "ignored: program, command (used by W&B's own agent" in stderr
    study = optuna.load_study(study_name="wb-fastai", storage=open_storage(url))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2 and all(t.state != optuna.trial.TrialState.FAIL for t in finished)
    for t in finished:
        assert math.exp(-6.2) <= t.params["lr"] <= math.exp(-4.6) and t.params["batch_size"] in (16, 32)
        assert t.params["optimizer"] in ("adam", "sgd") and TrialRecord.of(t).config["optimizer"] == t.params["optimizer"]
        assert 0 < t.params["dropout"] < 1 and TrialRecord.of(t).config["dropout"] == t.params["dropout"]  # used = stored
    best = json.loads(cli_here("best", "--study", "wb-fastai", "--storage", url, "--json").stdout)
    assert (
        "dropout" in best["best"]["params"] and "dropout_quantile" not in best["best"]["params"]
    )  # the sampler's quantile stays inside
    runs = {r["name"]: r for r in map(read_run, (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))}
    assert set(runs) == {f"wb-fastai-trial-{t.number}" for t in finished}
    for t in finished:
        run = runs[f"wb-fastai-trial-{t.number}"]
        assert run["config"]["learning_rate"] == t.params["lr"] and "lr" not in run["config"]  # the peak rate
        assert run["config"]["num_epochs"] == 1 and run["config"]["batch_size"] == t.params["batch_size"]
        n_valid = int(re.search(r"(\d+) valid", stderr).group(1))  # type: ignore[union-attr]
        assert t.value == round(t.value * n_valid) / n_valid  # exact: the double nearest k/n, not a float32 of it
        epochs = [h for h in run["history"] if "val_accuracy" in h]
        assert [h["epoch"] for h in epochs] == [1]  # as the CLI says "epoch 1/1"
        assert epochs[0]["val_accuracy"] == epochs[0]["valid_accuracy"] == pytest.approx(t.value)
        assert 0 < epochs[0]["scheduled_lr"] < t.params["lr"] and "lr" not in epochs[0]  # one-cycle's end, below the peak


# -- W&B's distributions, drawn by Optuna's random sampler through the product's own code ---------
# The reference is scipy.stats, the library W&B's own sweeps code draws with; our code uses the
# standard library's NormalDist and scipy.special.betaincinv, so the two are independent.
N_DRAWS = 3000
TOL = 0.035  # |empirical - expected| of a cumulative share, about 4 standard errors at 3000 draws


def draws(parameters: dict, n: int = N_DRAWS) -> tuple[dict[str, list], list[optuna.trial.FrozenTrial]]:
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.contract.space import sample_params

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


def test_a_knob_drawn_through_its_quantile_is_weighed_once() -> None:
    """The report's importances name each knob once: dropout, not dropout and dropout_quantile."""
    from kmnist_tune.observe.report import importance_params

    used, trials = draws(
        {
            "dropout": {"distribution": "beta", "a": 2, "b": 5},
            "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        },
        n=40,
    )
    assert {"dropout", "dropout_quantile", "lr"} == set(trials[0].params)  # what the sampler needs, and the value used
    assert importance_params(trials) == ["dropout", "lr"]
    study = optuna.create_study()
    for t, x in zip(trials, used["dropout"], strict=True):
        study.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=x))
    weights = optuna.importance.get_param_importances(study, params=importance_params(study.trials))
    assert set(weights) == {"dropout", "lr"} and weights["dropout"] > weights["lr"]  # the value is dropout itself


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
    from kmnist_tune.contract.load import parse_spec

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


# -- a corpus of W&B sweep files: W&B's own schema accepts each, and so does kmnist-tune -------------
def wandb_validator():  # type: ignore[no-untyped-def]
    import jsonschema

    assert WANDB_SCHEMA.is_file(), f"{WANDB_SCHEMA} is missing: run ./scripts/ci-deps"
    return jsonschema.Draft7Validator(json.loads(WANDB_SCHEMA.read_text()))


def read_yaml(path: Path) -> dict:
    import yaml

    from kmnist_tune.contract.load import _UniqueKeyLoader

    return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # YAML 1.2 numbers (1e-5), as W&B reads them


CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))


def test_the_corpus_covers_every_wandb_distribution_and_top_level_key() -> None:
    schema = json.loads(WANDB_SCHEMA.read_text())
    # W&B's distributions are the enums of `distribution` in its parameter definitions.
    wandb_dists = {
        d
        for name, block in schema["definitions"].items()
        if name.startswith("param_")
        for alt in block.get("anyOf", [block])
        for d in alt.get("properties", {}).get("distribution", {}).get("enum", [])
    }
    assert len(wandb_dists) >= 17, wandb_dists
    used_dists, used_keys = set(), set()
    for path in CORPUS_FILES:
        data = read_yaml(path)
        used_keys |= set(data)
        for block in data["parameters"].values():
            implied = "categorical_w_probabilities" if "probabilities" in block else "shorthand"
            used_dists.add(block.get("distribution") or implied)
    assert wandb_dists <= used_dists, f"not in the corpus: {sorted(wandb_dists - used_dists)}"
    # Every top-level key but those that need W&B's own machinery: `metrics` (multi-objective, method: custom)
    # and `scheduler` (W&B Launch's Optuna/Ax engines), both refused in one line.
    wanted = set(schema["properties"]) - {"metrics", "scheduler"}
    assert wanted <= used_keys, f"not in the corpus: {sorted(wanted - used_keys)}"
    # The kinds of file issue 24 found refused: each is in the corpus.
    files = [read_yaml(p) for p in CORPUS_FILES]
    recorded = {"accuracy", "val_accuracy", "val_acc", "loss", "val_loss", "valid_loss", "balanced_accuracy"}
    kinds = {
        "no run_cap (random or bayes)": [f for f in files if "run_cap" not in f and f["method"] != "grid"],
        "a metric named as a script logs it": [f for f in files if f["metric"]["name"] not in recorded],
        "metric.target": [f for f in files if "target" in f["metric"]],
        "entity": [f for f in files if "entity" in f],
        "parameters.seed": [f for f in files if "seed" in f["parameters"]],
        "a metric without goal": [f for f in files if "goal" not in f["metric"]],
    }
    assert all(kinds.values()), [k for k, v in kinds.items() if not v]


def test_study_create_accepts_the_corpus_unchanged(tmp_path: Path) -> None:
    """Issue 24's measure: at least 90% of real W&B sweep files that this project can train are accepted
    by `study create` as they are (the corpus was cut to parameters a KMNIST trainer takes)."""
    url = f"sqlite:///{tmp_path / 'corpus.db'}"
    refused = {}
    for path in CORPUS_FILES:
        proc = cli_here("study", "create", str(path), "--storage", url, check=False)
        if proc.returncode != 0:
            refused[path.name] = proc.stderr.strip()
    accepted = 1 - len(refused) / len(CORPUS_FILES)
    assert len(CORPUS_FILES) >= 10 and accepted >= 0.9, refused
    assert not refused, refused  # today every one is


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_each_corpus_file_is_a_wandb_sweep_and_samples_inside_its_space(path: Path) -> None:
    from kmnist_tune.contract.space import sample_params, without_quantiles

    data = read_yaml(path)
    errors = [e.message for e in wandb_validator().iter_errors(data)]
    assert not errors, errors  # a genuine W&B sweep file, by W&B's own schema
    spec = load_spec(path)
    assert spec.sampler.name == {"bayes": "tpe", "random": "random", "grid": "grid"}[data["method"]]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    used = []
    for _ in range(200):
        trial = study.ask()
        params = sample_params(trial, spec)
        used.append({k: params[k] for k in spec.searched_params()})
        for name, p in spec.parameters.items():
            if p.kind() in ("constant",):
                assert params[name] == p.value
            elif p.kind() == "categorical":
                assert params[name] in p.values
            else:
                lo, hi = p.support()
                assert lo <= params[name] <= hi, (name, params[name], lo, hi)
        study.tell(trial, 0.0)
    assert [without_quantiles(t.params) for t in study.trials] == used  # what Optuna stores is what training used


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_study_show_as_wandb_writes_a_wandb_file_that_reads_back(tmp_path: Path, path: Path) -> None:
    import yaml

    from kmnist_tune.contract.spec import spec_to_dict

    url = f"sqlite:///{tmp_path / 's.db'}"
    cli_here("study", "create", str(path), "--storage", url)  # in this process: the text is what is checked
    spec = load_spec(path)
    text = cli_here("study", "show", spec.name, "--as-wandb", "--storage", url).stdout
    back = yaml.safe_load(text)
    errors = [e.message for e in wandb_validator().iter_errors(back)]
    assert not errors, (errors, text)
    again = load_spec(write(tmp_path, text, "back.yaml"))
    a, b = spec_to_dict(spec), spec_to_dict(again)
    for key in ("name", "metric", "direction", "sampler", "pruner", "budget", "parameters"):
        assert a[key] == b[key], key


def test_as_wandb_says_what_wandb_has_no_key_for(tmp_path: Path) -> None:
    from conftest import tiny_spec, write_spec

    native = tiny_spec("native", pruner={"name": "median"}, budget={"n_trials": 3, "timeout": 600})
    native["parameters"]["lr"] = {"distribution": "lr_finder", "width": 2}
    native["parameters"]["dropout"] = {"values": [0.1, 0.5], "probabilities": [0.5, 0.5]}
    url = f"sqlite:///{tmp_path / 'n.db'}"
    cli_here("study", "create", str(write_spec(tmp_path / "n.yaml", native)), "--storage", url)
    out = run_cli("study", "show", "native", "--as-wandb", "--json", "--storage", url).stdout
    got = json.loads(out)
    assert not [e.message for e in wandb_validator().iter_errors(got["sweep"])]
    assert got["sweep"]["method"] == "bayes" and got["sweep"]["run_cap"] == 3 and "early_terminate" not in got["sweep"]
    assert got["sweep"]["parameters"]["dropout"]["distribution"] == "categorical_w_probabilities"
    assert "lr" not in got["sweep"]["parameters"]  # the LR finder has not run: no range to write yet
    notes = "\n".join(got["not_in_wandb"])
    for said in ("pruner: median", "budget.timeout: 600", "parameters.lr: lr_finder (2 decades", "data: {"):
        assert said in notes, (said, notes)
    assert "data: {dataset: kmnist" in notes and "{'" not in notes  # one-line YAML, not a Python dict
    # The file says what reading it back loses, instead of promising a round trip.
    text = run_cli("study", "show", "native", "--as-wandb", "--storage", url).stdout
    assert "reads back its search" in text and "reading this file back" in text and "gives each its default" in text


def test_as_wandb_turns_optunas_automatic_min_resource_into_a_valid_min_iter() -> None:
    from conftest import tiny_spec

    from kmnist_tune.contract.wandb import to_wandb

    for options in ({}, {"min_resource": "auto", "reduction_factor": 2}):
        spec = parse_spec(tiny_spec("hb", pruner={"name": "hyperband", "options": options}))
        sweep, notes = to_wandb(spec, 4, None, None)
        assert not [e.message for e in wandb_validator().iter_errors(sweep)], sweep
        assert sweep["early_terminate"]["min_iter"] == 1
        assert any(n.startswith("pruner: hyperband") for n in notes) == ("min_resource" in options), notes


def test_the_files_names_do_not_make_another_study(tmp_path: Path) -> None:
    """The names W&B runs log under (learning_rate for lr, the metric's name) change no trial: a study
    made from a file resumes from the same file written with this project's names, and vice versa."""
    from kmnist_tune.service.schema import create_storage
    from kmnist_tune.service.studies import create_study

    storage = create_storage(f"sqlite:///{tmp_path / 'n.db'}")
    first = load_spec(write(tmp_path, WANDB_FILE))
    create_study(first, storage, resume=False)
    renamed = WANDB_FILE.replace("learning_rate:", "lr:").replace("name: val_accuracy", "name: accuracy")
    again = load_spec(write(tmp_path, renamed, "renamed.yaml"))
    assert again.tracking.wandb.param_names != first.tracking.wandb.param_names
    _, created = create_study(again, storage, resume=True)
    assert not created
