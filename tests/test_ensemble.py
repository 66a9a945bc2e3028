"""`best --evaluate --ensemble K [--tta] --export DIR`: the top trials retrained and averaged, scored
once on the official test split beside each member, exported as one network that `predict` uses (and
PyTorch alone: test_export.py loads both exported programs in one fresh interpreter), and test-time
augmentation only when asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from conftest import FIXTURE, cli_here, error_line
from shared_trained import EnsembledStudy

from kmnist_tune.training.inference import TTA_SHIFTS, Averaged, averaged_log_probs, shifted, shifted_log_probs

TEST_IMAGES = FIXTURE / "kmnist-test-imgs.npz"
TEST_LABELS = FIXTURE / "kmnist-test-labels.npz"


@pytest.fixture(scope="module")
def ensemble(ensembled_study: EnsembledStudy) -> dict[str, Any]:
    """The shared evaluated study's copy with its ensemble of 2, TTA on, exported (shared_trained.py)."""
    s = ensembled_study
    trials = optuna.load_study(study_name=s.name, storage=s.url).trials
    return {"url": s.url, "name": s.name, "dir": s.model, "printed": s.printed, "trials": trials}


def test_the_ensemble_is_scored_once_beside_each_member(ensemble: dict[str, Any]) -> None:
    ev = ensemble["printed"]["ensemble_evaluation"]
    stored = json.loads(cli_here("best", ensemble["name"], "--storage", ensemble["url"], "--json").stdout)
    assert stored["ensemble_evaluation"] == ev  # what was printed is what the study keeps
    ranked = sorted((t for t in ensemble["trials"] if t.value is not None), key=lambda t: (-t.value, t.number))
    assert [m["trial"] for m in ev["members"]] == [t.number for t in ranked[:2]]  # the top two, best first
    assert [m["valid_value"] for m in ev["members"]] == [t.value for t in ranked[:2]]
    assert all(m["params"]["lr"] == t.params["lr"] for m, t in zip(ev["members"], ranked, strict=False))
    assert (ev["metric"], ev["n_test"], ev["n_train"]) == ("accuracy", 300, 480)
    values = [ev["test_value"], ev["tta"]["test_value"], *(m["test_value"] for m in ev["members"]), *ev["tta"]["members"]]
    assert all(0.0 <= v <= 1.0 and round(v * 300) == pytest.approx(v * 300) for v in values)  # counts of 300 images
    assert ev["tta"]["shifts"] == [list(s) for s in TTA_SHIFTS]
    text = cli_here("best", ensemble["name"], "--storage", ensemble["url"]).stdout
    a, b = (m["trial"] for m in ev["members"])
    assert f"test accuracy of the ensemble of trials {a}, {b} (official test split, 300 images" in text
    assert f"with test-time augmentation (5 shifted copies): {ev['tta']['test_value']:.6g}" in text
    assert f"  trial {a}: test {ev['members'][0]['test_value']:.6g}, validation" in text


def test_predict_reproduces_the_stored_ensemble_score(ensemble: dict[str, Any]) -> None:
    ev = ensemble["printed"]["ensemble_evaluation"]
    out = cli_here("predict", str(ensemble["dir"]), str(TEST_IMAGES), "--labels", str(TEST_LABELS)).stdout
    assert f"accuracy on 300 labelled images: {ev['tta']['test_value']:.4f}" in out  # the exported one has the shifts


def test_the_card_lists_members_and_the_study_keeps_the_ensemble(ensemble: dict[str, Any], tmp_path: Path) -> None:
    ev = ensemble["printed"]["ensemble_evaluation"]
    folder = ensemble["dir"]
    assert {p.name for p in folder.iterdir()} == {
        "weights.safetensors",
        "model.pt2",
        "classes.csv",
        "model.json",
        "model-card.md",
    }
    card = json.loads((folder / "model.json").read_text())
    assert [m["trial"] for m in card["members"]] == [m["trial"] for m in ev["members"]]
    assert [m["hyperparameters"] for m in card["members"]] == [m["params"] for m in ev["members"]]
    assert [(m["test"], m["test_tta"]) for m in card["members"]] == list(
        zip((m["test_value"] for m in ev["members"]), ev["tta"]["members"], strict=True)
    )
    assert card["metrics"]["test"] == {
        "value": ev["tta"]["test_value"],
        "n_images": 300,
        "split": "the official test split",
        "tta": True,
    }
    assert card["model"]["ensemble"]["shifts"] == ev["tta"]["shifts"]
    md = (folder / "model-card.md").read_text(encoding="utf-8")
    assert (
        f"- this model: **{ev['tta']['test_value']:.4f}**" in md
        and f"| {ev['members'][1]['trial']} | resnet18 / imagenet |" in md
    )
    fetched = tmp_path / "fetched"
    cli_here("export", "--study", ensemble["name"], str(fetched), "--storage", ensemble["url"])
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == {p.name: p.read_bytes() for p in folder.iterdir()}


def test_ensemble_options_refused_in_one_line(ensemble: dict[str, Any]) -> None:
    url, name = ensemble["url"], ensemble["name"]
    too_many = cli_here("best", name, "--storage", url, "--evaluate", "--ensemble", "3", check=False)
    assert too_many.returncode == 2
    assert (
        error_line(too_many)
        == f"error: --ensemble 3: study {name!r} has 2 completed trial(s); give --ensemble 2 or fewer, or run more trials first"
    )
    alone = cli_here("best", name, "--storage", url, "--ensemble", "2", check=False)
    assert alone.returncode == 2 and "--ensemble needs --evaluate" in error_line(alone)
    tta = cli_here("best", name, "--storage", url, "--evaluate", "--tta", check=False)
    assert tta.returncode == 2 and "add --ensemble K" in error_line(tta)
    assert cli_here("best", name, "--storage", url, "--evaluate", "--ensemble", "0", check=False).returncode == 2


@torch.no_grad()
def test_averaging_and_shifts() -> None:
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 5, 7] = 255.0
    assert shifted(x, 1, 0)[0, 0, 5, 8] == 255.0 and shifted(x, 0, -1)[0, 0, 4, 7] == 255.0
    edge = torch.zeros(1, 1, 28, 28)
    edge[0, 0, 3, 27] = 255.0
    assert shifted(edge, 1, 0).sum() == 0  # pushed out of the frame, not wrapped to the other edge
    members = [torch.nn.Linear(28 * 28, 10) for _ in range(2)]
    nets = [torch.nn.Sequential(torch.nn.Flatten(), m) for m in members]
    batch = torch.rand(4, 1, 28, 28) * 255
    mean = (torch.softmax(nets[0](batch), 1) + torch.softmax(nets[1](batch), 1)) / 2
    assert torch.allclose(torch.softmax(Averaged(nets)(batch), 1), mean, atol=1e-6)
    copies = [torch.softmax(n(shifted(batch, dx, dy)), 1) for dx, dy in TTA_SHIFTS for n in nets]
    assert torch.allclose(torch.softmax(Averaged(nets, TTA_SHIFTS)(batch), 1), torch.stack(copies).mean(0), atol=1e-6)
    assert np.isclose(float(torch.softmax(Averaged(nets[:1])(batch), 1)[0].sum()), 1.0)
    # The evaluation runs each member once per shift and averages those outputs: bit for bit what the
    # exported network gives on the same batches (so predict, batch by batch as the evaluation, gives the stored score back).
    images = (torch.rand(7, 28, 28) * 255).to(torch.uint8).numpy()
    outputs = [shifted_log_probs(n, images, torch.device("cpu"), TTA_SHIFTS, batch_size=7) for n in nets]
    whole = Averaged(nets, TTA_SHIFTS)(torch.from_numpy(images).unsqueeze(1).float())
    assert torch.equal(averaged_log_probs([o[s] for s in range(len(TTA_SHIFTS)) for o in outputs]), whole)
