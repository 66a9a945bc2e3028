"""`performance.compile` (issue 23): compiled in place (the module's own state_dict keys, so checkpoints
and exports are unchanged), compiled once per worker (CompiledModels hands a later trial of the same
architecture the compiled module with its own fresh weights), and fits, checkpoints and exports work
on it. On a CPU `auto` does not compile; these tests force it (set KMNIST_TUNE_TEST_COMPILE=1: the
first compile takes about a minute on 2 cores)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_spec

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.training.inference import export_program
from kmnist_tune.training.precision import CompiledModels, resolve_performance
from kmnist_tune.training.splits import Splits
from kmnist_tune.training.train import EpochLog, build_learner, fit

CPU = torch.device("cpu")


def test_auto_compiles_on_cuda_only() -> None:
    spec = parse_spec(tiny_spec())
    assert spec.performance.compile == "auto"
    assert resolve_performance(spec.performance, torch.device("cuda")).compile
    assert not resolve_performance(spec.performance, CPU).compile
    assert not resolve_performance({"compile": False}, torch.device("cuda")).compile


@pytest.mark.skipif(not os.environ.get("KMNIST_TUNE_TEST_COMPILE"), reason="set KMNIST_TUNE_TEST_COMPILE=1 (compiling is slow)")
def test_a_worker_compiles_once_and_each_trial_gets_fresh_weights(small_splits: Splits, tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec(parameters={"lr": {"value": 3e-3}, "stem": {"value": "small"}}))
    params = spec.fixed_params()
    cache = CompiledModels()
    seconds, models = [], []
    for seed in (0, 1):
        t0 = time.perf_counter()
        learn, name = build_learner(
            small_splits, params, CPU, "accuracy", seed=seed, performance={"compile": True}, compiled=cache
        )
        result = fit(learn, params, EpochLog(name))
        seconds.append(time.perf_counter() - t0)
        assert result.epochs and torch.isfinite(torch.tensor(result.epochs[0].train_loss))
        models.append(learn.model)
        if seed == 1:
            plain, _ = build_learner(small_splits, params, CPU, "accuracy", seed=1, performance={"compile": False})
            learn2, _ = build_learner(
                small_splits, params, CPU, "accuracy", seed=1, performance={"compile": True}, compiled=cache
            )
            assert learn2.model is models[0]  # the same compiled module ...
            for (k, a), b in zip(plain.model.state_dict().items(), learn2.model.state_dict().values(), strict=True):
                assert torch.equal(a, b), k  # ... with this trial's fresh weights and buffers
            assert all(p.grad is None for p in learn2.model.parameters())
    assert models[0] is models[1]
    print(f"compile + fit: first trial {seconds[0]:.1f} s, second {seconds[1]:.1f} s")
    assert seconds[1] < seconds[0] / 2  # the second trial does not compile again
    keys = list(models[0].state_dict())
    assert keys and not any(k.startswith("_orig_mod") for k in keys)  # compiled in place
    program = export_program(models[0], 0.2, 0.3, tmp_path / "model.pt2")
    assert program.stat().st_size > 100_000
