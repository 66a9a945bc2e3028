"""`performance.compile` (issue 23): compiled in place (the module's own state_dict keys, so checkpoints
and exports are unchanged), compiled once per worker (CompiledModels hands a later trial of the same
architecture the compiled module with its own fresh weights), and fits, checkpoints and exports work
on it. On a CPU `auto` does not compile; these tests force it.

Issue 35: a compile that fails (here: no C++ compiler for inductor) falls back to the plain module with
one line, once per worker, and the trial records it; a halving under compile does not recompile per
batch size. The fallback and halving tests run by default (a failing compile costs its tracing, about
20 s; on the CPU the halving test compiles with dynamo's aot_eager backend, not inductor); the longer
compile-and-export test asks for KMNIST_TUNE_TEST_COMPILE=1."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import FIXTURE, cli_env, run_cli, tiny_spec, write_spec
from test_halving import InjectOOM, make_spec

from kmnist_tune.contract.load import parse_spec
from kmnist_tune.observe.progress import Reporter
from kmnist_tune.recipe.evaluate import official_splits, retrain
from kmnist_tune.recipe.objective import Objective
from kmnist_tune.training.inference import export_program
from kmnist_tune.training.precision import CompiledModels, resolve_performance
from kmnist_tune.training.splits import Splits
from kmnist_tune.training.train import EpochLog, build_learner, fit

CPU = torch.device("cpu")
# benchmarks/gpu_check.sh runs the fallback and halving tests on CUDA (KMNIST_TUNE_TEST_DEVICE=cuda).
DEVICE = torch.device(os.environ.get("KMNIST_TUNE_TEST_DEVICE", "cpu"))


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


def test_a_compile_that_fails_trains_uncompiled_with_one_line(tmp_path: Path) -> None:
    """Before (issue 35): trials 0, 1 and 2 failed with `InductorError: InvalidCxxCompiler`, then the
    worker exited 3. Now the worker's preflight tries the compiled step once, says in one line that it
    trains uncompiled, and every trial completes with the fallback recorded; no trial tries again."""
    spec = tiny_spec("nocxx", performance={"compile": True}, parameters={"stem": {"value": "imagenet"}})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # No C++ compiler for inductor (it reads CXX), no C compiler for Triton (CC), and no cache of kernels
    # an earlier compile built.
    env = cli_env(CXX="/nonexistent", CC="/nonexistent", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1")
    gpus = "0" if DEVICE.type == "cuda" else "none"
    proc = run_cli("run", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", url, "--gpus", gpus, env=env)
    said = [line for line in proc.stderr.splitlines() if "compile:" in line]
    assert len(said) == 1, proc.stderr
    assert f"resnet18 on {DEVICE.type}" in said[0] and said[0].endswith("training uncompiled"), said[0]
    cause = "InvalidCxxCompiler: " if DEVICE.type == "cpu" else ""  # Triton's own words on CUDA
    assert "Traceback" not in proc.stderr
    trials = optuna.load_study(study_name="nocxx", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        assert t.user_attrs["compile"].startswith(f"fell back: {cause}"), t.user_attrs
        assert t.user_attrs["recompiles"] == 0
        assert t.user_attrs["loop"] == "fast"


def test_a_halving_under_compile_reuses_the_graph_and_completes(small_splits: Splits, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An out-of-memory error at batch size 32 halves the trial to 16 under compile: the batch dimension
    was marked dynamic at the first compile, so the new size recompiles at most once (training), and the
    trial completes with its compile and recompile count recorded.

    Graphs, guards and recompiles are dynamo's, whatever backend compiles the graphs: on the CPU this
    test hands them to dynamo's aot_eager backend (AOTAutograd's forward and backward, run eagerly)
    instead of inductor, whose C++ build of resnet18 with a dynamic batch takes 60-110 s cold (its
    cache is keyed by the checkout's path: cold in every fresh clone). Inductor builds that same module
    in the worker image (test_container's compiled trial) and on CUDA here (benchmarks/gpu_check.sh)."""
    if DEVICE.type == "cpu":
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, **kw, backend="aot_eager"))
    spec = make_spec(lr=5e-3, trend_drop=0.0).model_copy(
        update={"performance": parse_spec(tiny_spec(performance={"compile": True})).performance}
    )
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'h.db'}", study_name="h", direction="maximize")
    said: list[str] = []
    compiled = CompiledModels()
    objective = Objective(
        spec, small_splits, DEVICE, Reporter(io.StringIO()), extra_cbs=lambda: [InjectOOM(limit=16)], compiled=compiled
    )
    objective.compiled.say = said.append
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs
    assert [(e["from_bs"], e["to_bs"]) for e in trial.user_attrs["halving_events"]] == [(32, 16)]
    assert trial.user_attrs["compile"] == "compiled" and not said
    print(f"recompiles: {trial.user_attrs['recompiles']}")
    assert trial.user_attrs["recompiles"] <= 1  # the new size, once; validation's size was compiled already
    import torch._inductor.config as inductor_config

    # Inductor's compile pool is this process's share of the cores, not a process per core.
    assert inductor_config.compile_threads == torch.get_num_threads()


def test_best_evaluate_says_when_its_retraining_falls_back(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`best --evaluate` retrains the winner compiled as its study asks; a compile that fails there
    falls back with the worker's one line (before: silently). The failure is injected: dynamo traces
    the model and hands the graph to a backend that raises."""

    def broken_backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected compile failure")

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, **kw, backend=broken_backend))
    spec = parse_spec(tiny_spec("ev", performance={"compile": True}, parameters={"lr": {"value": 3e-3}}))
    study = optuna.create_study(study_name="ev", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    splits = official_splits(spec, FIXTURE, None, 64)
    lines: list[str] = []
    events = Reporter(io.StringIO())
    monkeypatch.setattr(events, "line", lines.append)
    retrained = retrain(study, spec, study.best_trial, splits, CPU, events)
    assert [ln for ln in lines if ln.startswith("compile:")] == [
        "compile: resnet18 on cpu failed (RuntimeError: injected compile failure); training uncompiled"
    ], lines
    assert 0.0 <= retrained.evaluation.test_value <= 1.0
