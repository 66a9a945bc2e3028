"""The LR-finder prior on real training: computed once, stored, shared, and tried first."""

from __future__ import annotations

import math
import re
from pathlib import Path

import optuna
import pytest
from conftest import error_line, run_cli, spawn_cli, tiny_spec, write_spec

from kmnist_tune.contract.records import PRIOR_ATTR, TrialRecord
from kmnist_tune.service.storage import open_storage


def prior_spec(name: str, n_trials: int, width: float = 1.0) -> dict:
    spec = tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["lr"] = {"distribution": "lr_finder", "width": width, "suggestion": "minimum"}
    spec["parameters"]["weight_decay"] = {"values": [0.0, 0.01]}
    return spec


def test_prior_is_stored_read_by_another_process_and_tried_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    run_cli("run", str(write_spec(tmp_path / "p.yaml", prior_spec("prior", 2))), "--storage", url)
    study = optuna.load_study(study_name="prior", storage=url)
    prior = study.user_attrs[PRIOR_ATTR]
    assert prior["key"] == "kmnist/resnet18/imagenet/bs32"
    assert set(prior["suggestions"]) == {"minimum", "steep", "valley"}
    lrs, losses = prior["lrs"], prior["losses"]
    assert len(lrs) == len(losses) >= 50 and lrs == sorted(lrs)
    # fastai's `minimum` is the tutorial's rule: one decade below the lowest smoothed loss
    # (fastai skips the first 10% and the last 5 points of the curve).
    lo, hi = len(lrs) // 10, len(lrs) - 5
    i = min(range(lo, hi), key=lambda k: losses[k])
    assert prior["suggestions"]["minimum"] == pytest.approx(lrs[i] / 10, rel=1e-6)
    assert prior["centre"] == prior["suggestions"]["minimum"]
    assert prior["low"] == pytest.approx(prior["centre"] / math.sqrt(10))
    assert prior["high"] == pytest.approx(prior["centre"] * math.sqrt(10))

    first, second = sorted(study.trials, key=lambda t: t.number)
    assert first.params["lr"] == pytest.approx(prior["centre"])  # the suggestion itself, first
    assert first.params["weight_decay"] == 0.01  # the other parameters take their defaults
    assert TrialRecord.key("enqueued") in first.user_attrs
    assert prior["low"] <= second.params["lr"] <= prior["high"]
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE

    # Another process reads the same prior back from the storage, without running the finder.
    png = tmp_path / "curve.png"
    shown = run_cli("lr-find", "--study", "prior", "--storage", url, "--stored", "--out", str(png)).stdout
    assert f"minimum: {prior['suggestions']['minimum']:.4g}  <- centre" in shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert optuna.load_study(study_name="prior", storage=url).user_attrs[PRIOR_ATTR] == prior


def test_many_workers_on_a_fresh_study_run_the_finder_once(tmp_path: Path, pg_url: str) -> None:
    run_cli("study", "create", str(write_spec(tmp_path / "p.yaml", prior_spec("prior-pg", 2))), "--storage", pg_url)
    workers = [spawn_cli("worker", "--study", "prior-pg", "--storage", pg_url, cwd=tmp_path) for _ in range(3)]
    errs = []
    for w in workers:
        _, err = w.communicate(timeout=900)
        assert w.returncode == 0, err
        errs.append(err)
    computed = sum("(computed here)" in e for e in errs)
    read = sum("(read from the storage)" in e for e in errs)
    assert (computed, read) == (1, 2), errs
    study = optuna.load_study(study_name="prior-pg", storage=open_storage(pg_url))
    tagged = [t for t in study.trials if TrialRecord.key("enqueued") in t.user_attrs]
    assert len(tagged) == 1 and tagged[0].params["lr"] == pytest.approx(study.user_attrs[PRIOR_ATTR]["centre"])


def test_sqlite_lock_serialises_two_workers(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_cli("study", "create", str(write_spec(tmp_path / "p.yaml", prior_spec("prior-sq", 1))), "--storage", url)
    workers = [spawn_cli("worker", "--study", "prior-sq", "--storage", url, cwd=tmp_path) for _ in range(2)]
    errs = [w.communicate(timeout=900)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), errs
    assert sum("(computed here)" in e for e in errs) == 1, errs
    assert re.search(r"LR finder \(kmnist/resnet18/imagenet/bs32\): minimum", errs[0] + errs[1])
    # Not on a terminal, the finder's progress is a plain line at its start, every 5 s, and its end.
    finder = next(e for e in errs if "(computed here)" in e)
    assert re.search(r"LR finder \(kmnist/resnet18/imagenet/bs32\): 1/100\n", finder), finder
    assert re.search(r"LR finder \(kmnist/resnet18/imagenet/bs32\): (\d+)/\1\n", finder), finder


def test_lr_find_needs_a_study_that_uses_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", tiny_spec("plain"))), "--storage", url)
    assert "lr_finder" in error_line(run_cli("lr-find", "--study", "plain", "--storage", url, check=False))
    spec_path = write_spec(tmp_path / "p.yaml", prior_spec("fresh", 1))
    run_cli("study", "create", str(spec_path), "--storage", url)
    assert "no stored LR-finder prior" in error_line(
        run_cli("lr-find", "--study", "fresh", "--storage", url, "--stored", check=False)
    )
