"""The LR-finder prior on real training: computed once, stored, shared, and tried first.

The PostgreSQL study three workers started together on (`lr_prior_study`, shared_trained.py) is read
by the first two tests, and by test_artifacts.py."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import optuna
import pytest
from conftest import cli_here, error_line, run_cli, spawn_cli, tiny_spec, write_spec
from shared_trained import FINDER_STEPS, LrPriorStudy, lr_prior_spec

from kmnist_tune.contract.records import PRIOR_ATTR, LRPrior, TrialRecord
from kmnist_tune.errors import UserError
from kmnist_tune.service.lr_curve import with_curve
from kmnist_tune.service.storage import open_storage, release


def stored(shared: LrPriorStudy) -> tuple[dict, list[optuna.trial.FrozenTrial]]:
    """The study's prior and its trials in number order, read through one storage, closed after."""
    storage = open_storage(shared.url)
    try:
        study = optuna.load_study(study_name=shared.name, storage=storage)
        return study.user_attrs[PRIOR_ATTR], sorted(study.trials, key=lambda t: t.number)
    finally:
        release(storage)


def test_prior_is_stored_read_by_another_process_and_tried_first(lr_prior_study: LrPriorStudy, tmp_path: Path) -> None:
    prior, trials = stored(lr_prior_study)
    assert prior["key"] == "kmnist/resnet18/imagenet/bs32"
    assert set(prior["suggestions"]) == {"minimum", "steep", "valley"}
    # The curve is an artifact of the study, not two hundred floats in its attributes.
    assert "lrs" not in prior and "losses" not in prior and len(json.dumps(prior)) < 1500, len(json.dumps(prior))
    storage = open_storage(lr_prior_study.url)
    try:
        kept = LRPrior.read({PRIOR_ATTR: prior})
        curve = with_curve(storage, lr_prior_study.name, kept)
        # What comes back is checked: another hash, another id form, and it is refused in one line.
        for bad in ({**prior["curve"], "sha256": "0" * 64}, {**prior["curve"], "artifact": "../../etc/passwd"}):
            with pytest.raises(UserError) as err:
                with_curve(storage, lr_prior_study.name, dataclasses.replace(kept, curve=bad))
            assert "\n" not in str(err.value)
    finally:
        release(storage)
    lrs, losses = curve.lrs, curve.losses
    assert prior["curve"]["points"] == len(lrs)
    assert len(lrs) == len(losses) >= FINDER_STEPS * 2 // 3 and lrs == sorted(lrs)  # it may stop once the loss diverges
    # fastai's `minimum` is the tutorial's rule: one decade below the lowest smoothed loss
    # (fastai skips the first 10% and the last 5 points of the curve).
    lo, hi = len(lrs) // 10, len(lrs) - 5
    i = min(range(lo, hi), key=lambda k: losses[k])
    assert prior["suggestions"]["minimum"] == pytest.approx(lrs[i] / 10, rel=1e-6)
    assert prior["centre"] == prior["suggestions"]["minimum"]
    assert prior["low"] == pytest.approx(prior["centre"] / math.sqrt(10))
    assert prior["high"] == pytest.approx(prior["centre"] * math.sqrt(10))

    first, second = trials  # the budget, exactly, across the three workers
    assert first.params["lr"] == pytest.approx(prior["centre"])  # the suggestion itself, first
    assert first.params["weight_decay"] == 0.01  # the other parameters take their defaults
    assert TrialRecord.key("enqueued") in first.user_attrs
    assert TrialRecord.key("enqueued") not in second.user_attrs
    assert prior["low"] <= second.params["lr"] <= prior["high"]
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE

    # Another process reads the same prior back from the storage, without running the finder.
    png = tmp_path / "curve.png"
    url = lr_prior_study.url
    shown = run_cli("lr-find", "--study", lr_prior_study.name, "--storage", url, "--stored", "--out", str(png)).stdout
    assert f"minimum: {prior['suggestions']['minimum']:.4g}  <- centre" in shown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert stored(lr_prior_study)[0] == prior


def test_many_workers_on_a_fresh_study_run_the_finder_once(lr_prior_study: LrPriorStudy) -> None:
    errs = lr_prior_study.errs
    computed = sum("(computed here)" in e for e in errs)
    read = sum("(read from the storage)" in e for e in errs)
    assert (computed, read) == (1, 2), errs
    prior, trials = stored(lr_prior_study)
    tagged = [t for t in trials if TrialRecord.key("enqueued") in t.user_attrs]
    assert len(tagged) == 1 and tagged[0].params["lr"] == pytest.approx(prior["centre"])


def test_sqlite_lock_serialises_two_workers(tmp_path: Path, sqlite_schema_url: str) -> None:
    url = sqlite_schema_url  # the tables made once per run (conftest)
    cli_here("study", "create", str(write_spec(tmp_path / "p.yaml", lr_prior_spec("prior-sq", 1))), "--storage", url)
    workers = [spawn_cli("worker", "--study", "prior-sq", "--storage", url, cwd=tmp_path) for _ in range(2)]
    errs = [w.communicate(timeout=900)[1] for w in workers]
    assert all(w.returncode == 0 for w in workers), errs
    assert sum("(computed here)" in e for e in errs) == 1, errs
    assert re.search(r"LR finder \(kmnist/resnet18/imagenet/bs32\): minimum", errs[0] + errs[1])
    # Not on a terminal, the finder's progress is a plain line at its start, every 5 s, and its end.
    finder = next(e for e in errs if "(computed here)" in e)
    assert re.search(rf"LR finder \(kmnist/resnet18/imagenet/bs32\): 1/{FINDER_STEPS}\n", finder), finder
    assert re.search(r"LR finder \(kmnist/resnet18/imagenet/bs32\): (\d+)/\1\n", finder), finder


def test_lr_find_needs_a_study_that_uses_it(tmp_path: Path, sqlite_schema_url: str) -> None:
    url = sqlite_schema_url
    cli_here("study", "create", str(write_spec(tmp_path / "s.yaml", tiny_spec("plain"))), "--storage", url)
    # A real process for the first refusal (the entry point's one line and exit status), then in this one.
    assert "lr_finder" in error_line(run_cli("lr-find", "--study", "plain", "--storage", url, check=False))
    cli_here("study", "create", str(write_spec(tmp_path / "p.yaml", lr_prior_spec("fresh", 1))), "--storage", url)
    assert "no stored LR-finder prior" in error_line(
        cli_here("lr-find", "--study", "fresh", "--storage", url, "--stored", check=False)
    )


def test_lr_find_on_a_study_with_trials_needs_force(tmp_path: Path, sqlite_schema_url: str) -> None:
    """Re-running the finder re-centres the lr range: on a study with trials that splits it into trials
    drawn from two ranges, so it is refused without --force, and with it the change is said."""
    url = sqlite_schema_url
    spec = lr_prior_spec("forced", 2)
    spec["parameters"]["lr"]["iterations"] = 10  # the fewest the spec allows: the finder runs twice here
    cli_here("study", "create", str(write_spec(tmp_path / "f.yaml", spec)), "--storage", url)
    # A queued trial (a warm start) holds its own lr: it was drawn from no range, so it does not count.
    optuna.load_study(study_name="forced", storage=url).enqueue_trial({"lr": 1e-3, "weight_decay": 0.0})
    first = cli_here("lr-find", "--study", "forced", "--storage", url, "--threads", "1", "--out", str(tmp_path / "a.png"))
    assert "search range" in first.stdout and "re-centred" not in first.stderr
    before = stored_prior(url, "forced")
    study = optuna.load_study(study_name="forced", storage=url)
    study.tell(study.ask(), 0.5)  # the queued suggestion runs: one trial now came from the stored range
    refused = cli_here("lr-find", "--study", "forced", "--storage", url, check=False)
    assert refused.returncode == 2 and "--force" in error_line(refused)
    assert f"1 trial(s) drawn from lr {before['low']:.3g} .. {before['high']:.3g}" in error_line(refused)
    assert stored_prior(url, "forced") == before  # nothing changed
    forced = cli_here("lr-find", "forced", "--storage", url, "--force", "--threads", "1", "--out", str(tmp_path / "b.png"))
    after = stored_prior(url, "forced")
    assert after["computed_at"] >= before["computed_at"] and "search range" in forced.stdout
    if (after["low"], after["high"]) != (before["low"], before["high"]):
        assert f"lr range re-centred: {before['low']:.4g} .. {before['high']:.4g} -> {after['low']:.4g}" in forced.stderr


def stored_prior(url: str, name: str) -> dict:
    storage = open_storage(url)
    try:
        return storage.get_study_user_attrs(storage.get_study_id_from_name(name))[PRIOR_ATTR]
    finally:
        release(storage)
