"""A slot's preflight (issue 35): before it claims anything, a slot checks its device with one training
step; a device that does not work ends the slot with one line and exit status 4, the study untouched,
while the worker's other slots go on.

Before: a slot pinned to a GPU CUDA could not use trained on the CPU unasked (slot_device fell back),
and a GPU that failed at its first kernel failed a trial, three in a row, each taken from the budget.

The broken device here is a real one: a slot pinned (CUDA_VISIBLE_DEVICES, as the supervisor pins it)
to a GPU index this machine does not have. On a machine without a driver CUDA's own cause is "no
NVIDIA driver"; with one, "no CUDA GPUs are available"."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
import torch
from conftest import FIXTURE, cli_env, created_study, error_line, run_cli

from kmnist_tune.errors import UserError
from kmnist_tune.observe.progress import SlotBoard
from kmnist_tune.service.slots import Slot, run_slots, worker_args

MISSING_GPU = torch.cuda.device_count() if torch.cuda.is_available() else 0  # an index no GPU has here


def test_a_slot_whose_device_fails_claims_nothing_and_the_other_slots_go_on(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url = created_study(tmp_path, "pf")
    before = optuna.load_study(study_name="pf", storage=url).user_attrs

    # The slot alone, as its supervisor starts it: one line naming the device and the cause, exit 4.
    env = cli_env(CUDA_VISIBLE_DEVICES=str(MISSING_GPU), KMNIST_TUNE_SLOT="0", KMNIST_TUNE_STORAGE=url)
    proc = run_cli("worker", "--study", "pf", "--in-process", env=env, check=False)
    line = error_line(proc)
    assert proc.returncode == 4, proc.stderr
    assert f"device cuda (CUDA_VISIBLE_DEVICES={MISSING_GPU}) failed its preflight (" in line, line
    assert line.endswith("this slot claims no trial")
    study = optuna.load_study(study_name="pf", storage=url)
    assert study.trials == [] and study.user_attrs == before  # no trial, the budget as it was

    # A supervisor with that slot and a CPU slot: the CPU slot works the whole budget.
    for k, v in {"KMNIST_TUNE_DATA": str(FIXTURE), "KMNIST_TUNE_MIRROR": "http://127.0.0.1:9/nowhere"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    slots = [Slot(0, MISSING_GPU), Slot(1, None)]
    shown = io.StringIO()
    with pytest.raises(UserError, match=r"exit status 4"):
        run_slots(url, slots, worker_args("pf"), SlotBoard([s.label for s in slots], "accuracy", shown))
    assert "failed its preflight" in shown.getvalue(), shown.getvalue()
    trials = optuna.load_study(study_name="pf", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.user_attrs["worker"]["gpu"] for t in trials} == {"cpu"}
    assert all("compile" not in t.user_attrs for t in trials)  # not asked for: nothing recorded
