"""Seeded studies repeat: the same spec run twice by one worker gives the same trials, parameters,
pruning decisions, halvings and values. Each trial's sampler is seeded by (spec seed, trial number)
(service/studies.seed_sampler), its training by spec seed + trial number (shuffles, augmentation,
MixUp's draws, dropout, initial weights). On the CPU the thread count changes the arithmetic (a
reduction split over more threads adds in another order), so both runs fix it with --threads, as the
README tells a user who wants a study to repeat."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from conftest import cli_here, tiny_spec, write_spec

from kmnist_tune.contract.records import TrialRecord


def seeded_spec() -> dict[str, Any]:
    spec = tiny_spec(
        "seeded",
        data={"train_size": 96, "valid_size": 48},
        budget={"n_trials": 4},
        seed=7,
        sampler={"name": "tpe", "options": {"n_startup_trials": 2}},
        # A trial below the median of those before it at its first epoch is pruned there.
        pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
    )
    spec["parameters"].update(
        {
            "epochs": {"value": 2},
            "lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 3e-2},
            "weight_decay": {"values": [0.0, 0.01, 0.1]},
            "mixup": {"values": [0.0, 0.4]},
            "dropout": {"distribution": "uniform", "min": 0.1, "max": 0.5},
        }
    )
    return spec


def close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-6))


def same_numbers(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))


def test_a_seeded_study_run_twice_repeats_trial_for_trial(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "seeded.yaml", seeded_spec())
    runs: list[list[optuna.trial.FrozenTrial]] = []
    for run in ("first", "second"):
        url = f"sqlite:///{tmp_path / f'{run}.db'}"
        cli_here("run", str(spec), "--storage", url, "--threads", "2")
        runs.append(optuna.load_study(study_name="seeded", storage=url).trials)
    first, second = runs
    assert [t.number for t in first] == [t.number for t in second] == list(range(4))
    states = {t.state.name for t in first}
    assert "COMPLETE" in states and "PRUNED" in states, states  # the pruner's decisions are compared too
    for a, b in zip(first, second, strict=True):
        where = f"trial {a.number}"
        assert a.state == b.state, where
        assert a.params == b.params, where  # the sampler's draws: exactly equal
        assert close(a.value, b.value), (where, a.value, b.value)
        assert a.intermediate_values.keys() == b.intermediate_values.keys(), where
        assert all(close(v, b.intermediate_values[k]) for k, v in a.intermediate_values.items()), where
        ra, rb = TrialRecord.of(a), TrialRecord.of(b)
        assert ra.threads == rb.threads == 2, where
        assert ra.batch_size_used == rb.batch_size_used and len(ra.halving_events) == len(rb.halving_events), where
        assert same_numbers(ra.train_loss, rb.train_loss), (where, ra.train_loss, rb.train_loss)
        assert same_numbers(ra.valid_loss, rb.valid_loss), (where, ra.valid_loss, rb.valid_loss)
