"""`best --evaluate --ensemble K [--tta]`: the top K completed trials, each retrained on the official
train split as `--evaluate` retrains the best one (recipe/evaluate.py), their softmax outputs averaged
and scored once on the official test split, beside each member's own score.

The ensemble is one network (training/inference.Averaged): what is scored here is what `--export`
writes and what `predict` loads, so predict on the test split gives the stored score back. With
--tta, each image is also classified shifted by one pixel each way (never flipped: these are
characters) and every copy's softmax goes into the average; that score is reported separately, and
the exported network is the one with the shifts the user asked for."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from ..contract.events import Listener
from ..contract.records import EnsembleEvaluation
from ..contract.spec import SweepSpec
from ..signing import store_signed
from ..training.inference import TTA_SHIFTS, Averaged, Classifier, averaged_log_probs, scored, shifted_log_probs
from .evaluate import Retrained, official_splits, retrain, top_trials


@dataclass
class Ensemble:
    members: list[Retrained]  # best first
    net: Averaged  # what is kept and exported: the members, with TTA's shifts when asked for
    evaluation: EnsembleEvaluation

    @property
    def exported_value(self) -> float:
        ev = self.evaluation
        return float(ev.tta["test_value"]) if ev.tta is not None else ev.test_value


def evaluate_ensemble(
    study: optuna.Study,
    spec: SweepSpec,
    data_dir: Path,
    device: torch.device,
    events: Listener,
    *,
    k: int,
    tta: bool = False,
    mirror: str | None = None,
    train_size: int | None = None,
) -> Ensemble:
    """Retrain the top k trials, average them, score the official test split (stored on the study)."""
    trials = top_trials(study, spec, k)  # before loading data or training: too few is one line
    splits = official_splits(spec, data_dir, mirror, train_size)
    assert splits.x_test is not None and splits.y_test is not None
    t0 = time.perf_counter()
    members = [retrain(study, spec, t, splits, device, events) for t in trials]
    mean, std = splits.mean_std
    nets = [Classifier(getattr(r.learn.model, "_orig_mod", r.learn.model), mean, std).to(device).eval() for r in members]
    x, truth = splits.x_test, splits.y_test
    # Each member runs once per shift; every figure below averages those outputs as Averaged does, so
    # the exported network, run by `predict` on this device, gives its score back.
    shifts = TTA_SHIFTS if tta else ((0, 0),)
    outputs = [shifted_log_probs(net, x, device, shifts) for net in nets]  # [member][shift]

    def value(logs: list[torch.Tensor]) -> float:
        return scored(spec.metric, averaged_log_probs(logs), truth)

    tta_record = None
    if tta:
        tta_record = {
            "shifts": [list(s) for s in TTA_SHIFTS],
            "test_value": value([o[s] for s in range(len(shifts)) for o in outputs]),  # Averaged's order
            "members": [value(o) for o in outputs],
        }
    evaluation = EnsembleEvaluation(
        metric=spec.metric,
        test_value=value([o[0] for o in outputs]),
        members=[
            {"trial": r.trial.number, "valid_value": r.trial.value, "test_value": value([o[0]]), "params": r.params}
            for r, o in zip(members, outputs, strict=True)
        ],
        tta=tta_record,
        n_train=int(len(splits.y_train)),
        n_test=int(len(truth)),
        device=str(device),
        seconds=round(time.perf_counter() - t0, 2),
        at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    net = Averaged(nets, shifts)
    store_signed(evaluation, study)  # with the key, signed for this study
    return Ensemble(members, net, evaluation)
