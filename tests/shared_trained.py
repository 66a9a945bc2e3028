"""Trained setups that several test modules read, built once per run (issue 22).

- `lr_prior_study` (test_lr_prior.py, test_artifacts.py): a PostgreSQL study whose spec searches the
  LR with the LR finder's prior; three worker processes started together from one working directory
  ("host A") work its two trials, so one of them runs the finder and uploads its plot into the
  database, and the other two read the prior back. The workers hold `SIGNING_KEY`: what they store
  is signed (test_attacks.py moves and edits copies of it). Tests only read it; one that changes it works on
  a copy (`conftest.copy_database`, after every client of it has closed).
- `evaluated_study` (test_export.py, test_sweep.py): `run` of a
  two-trial tiny spec in a folder with no storage given (the SQLite default there), `run` again (it
  resumes, nothing runs), `best --evaluate --export` (the winner retrained on the whole official
  train split, scored on the test split, exported and kept on the study), then `best`, each with
  `SIGNING_KEY` (test_attacks.py moves and edits copies of what it signs). A test that changes the
  study works on a copy (`conftest.sqlite_copy`).
- `ensembled_study` (test_ensemble.py, test_export.py): a copy of `evaluated_study`, then
  `best --evaluate --ensemble 2 --tta --export` on it (the two trials retrained on 480 images, averaged),
  with `SIGNING_KEY`.
- `splits` (test_halving.py, test_loader.py, test_perf_gpu.py): all of the fixture's images, split
  as `tiny_spec` splits them, loaded once; `small_splits` (test_training_knobs.py, test_halving.py):
  320 of its training images, for tests that check what fastai trains with, not how well.

conftest.py imports this module (`from shared_trained import *`) before it has defined its own names,
so conftest is only looked up inside the fixtures, when they run."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The LR finder's steps in tests: a curve with a minimum on the fixture's images, in a third of fastai's 100.
FINDER_STEPS = 30
# The KMNIST_TUNE_SIGNING_KEY the trained setups are signed with (without it, loading checks nothing).
SIGNING_KEY = "k" * 32

__all__ = [
    "FINDER_STEPS",
    "SIGNING_KEY",
    "EnsembledStudy",
    "EvaluatedStudy",
    "LrPriorStudy",
    "ensembled_study",
    "evaluated_study",
    "lr_prior_spec",
    "lr_prior_study",
    "small_splits",
    "splits",
]


def lr_prior_spec(name: str, n_trials: int, width: float = 1.0) -> dict[str, Any]:
    """tiny_spec with the LR finder's prior for the learning rate and a second, categorical parameter."""
    import conftest

    spec = conftest.tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["lr"] = {"distribution": "lr_finder", "width": width, "suggestion": "minimum", "iterations": FINDER_STEPS}
    spec["parameters"]["weight_decay"] = {"values": [0.0, 0.01]}
    return spec


@dataclass(frozen=True)
class LrPriorStudy:
    url: str  # the PostgreSQL database's SQLAlchemy URL
    name: str  # the study
    host: Path  # the working directory every worker ran in
    errs: tuple[str, ...]  # each worker's stderr


@pytest.fixture(scope="session")
def lr_prior_study(pg_schema_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LrPriorStudy]:
    import conftest

    tmp = tmp_path_factory.mktemp("lr-prior")
    host = tmp / "host-a"
    host.mkdir()
    with conftest.copy_database(pg_schema_template) as url:
        spec = conftest.write_spec(tmp / "p.yaml", lr_prior_spec("prior-pg", 2))
        conftest.cli_here("study", "create", str(spec), "--storage", url)
        keyed = conftest.cli_env(KMNIST_TUNE_SIGNING_KEY=SIGNING_KEY)
        workers = [conftest.spawn_cli("worker", "--study", "prior-pg", "--storage", url, cwd=host, env=keyed) for _ in range(3)]
        errs = []
        try:
            for w in workers:
                _, err = w.communicate(timeout=900)
                assert w.returncode == 0, err
                conftest.deprecation_free(err)
                errs.append(err)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait(10)
        yield LrPriorStudy(url, "prior-pg", host, tuple(errs))


@pytest.fixture(scope="session")
def splits() -> Any:
    import conftest

    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.training.splits import load_splits

    whole = conftest.tiny_spec(data=conftest.WHOLE_FIXTURE)  # the halving rule's tests need its warm-up
    return load_splits(parse_spec(whole).data, conftest.FIXTURE, download=False)


@pytest.fixture(scope="session")
def small_splits() -> Any:
    import conftest

    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.training.splits import load_splits

    spec = conftest.tiny_spec(data={"train_size": 320, "valid_size": None})
    return load_splits(parse_spec(spec).data, conftest.FIXTURE, download=False)


@dataclass(frozen=True)
class EvaluatedStudy:
    home: Path  # the working directory: kmnist-tune.db, the default storage, lives here
    url: str  # that storage's URL
    name: str  # the study
    model: Path  # the model directory `best --evaluate --export` wrote
    first: subprocess.CompletedProcess[str]  # the first `run`
    again: subprocess.CompletedProcess[str]  # the second `run` of the same spec (in this process)
    evaluation: dict[str, Any]  # `best --evaluate --export DIR --json`
    shown: str  # `best` afterwards (stdout)


@pytest.fixture(scope="session")
def evaluated_study(tmp_path_factory: pytest.TempPathFactory) -> EvaluatedStudy:
    import conftest

    home = tmp_path_factory.mktemp("evaluated")
    name = "tiny-sqlite"
    spec = conftest.write_spec(home / "tiny.yaml", conftest.tiny_spec(name, data=conftest.WHOLE_FIXTURE))  # its trials learn
    keyed = conftest.cli_env(KMNIST_TUNE_SIGNING_KEY=SIGNING_KEY)
    # No --storage and no storage in the env: the SQLite file in the working directory is the default.
    first = conftest.run_cli("run", str(spec), cwd=home, env=keyed)
    again = conftest.cli_here("run", str(spec), cwd=home, env=keyed)  # resumes, nothing runs: the process is not what is tested
    model = home / "winner"
    evaluated = conftest.run_cli("best", "--study", name, "--evaluate", "--export", str(model), "--json", cwd=home, env=keyed)
    shown = conftest.cli_here("best", "--study", name, cwd=home, env=keyed).stdout  # reads only: in this process
    url = f"sqlite:///{home / 'kmnist-tune.db'}"
    return EvaluatedStudy(home, url, name, model, first, again, json.loads(evaluated.stdout), shown)


@dataclass(frozen=True)
class EnsembledStudy:
    url: str  # a copy of evaluated_study's storage
    name: str
    model: Path  # the ensemble's model directory
    printed: dict[str, Any]  # `best --evaluate --ensemble 2 --tta --export DIR --json`


@pytest.fixture(scope="session")
def ensembled_study(evaluated_study: EvaluatedStudy, tmp_path_factory: pytest.TempPathFactory) -> EnsembledStudy:
    import conftest

    home = tmp_path_factory.mktemp("ensemble")
    url = conftest.sqlite_copy(evaluated_study.home / "kmnist-tune.db", home / "kmnist-tune.db")
    folder = home / "ensemble"
    args = ("best", "--study", evaluated_study.name, "--storage", url, "--evaluate", "--ensemble", "2", "--tta")
    # 480 of the fixture's training images: what is checked is that the scores are kept, printed and
    # reproduced, not how good they are.
    keyed = conftest.cli_env(KMNIST_TUNE_SIGNING_KEY=SIGNING_KEY)
    printed = conftest.cli_here(*args, "--train-size", "480", "--export", str(folder), "--json", env=keyed).stdout
    return EnsembledStudy(url, evaluated_study.name, folder, json.loads(printed))
