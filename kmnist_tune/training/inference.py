"""A trained model as a plain PyTorch program, and predictions from it.

The program is written with `torch.export` (TorchScript is deprecated): it takes raw pixel values
(N, 1, 28, 28) in 0..255, white ink on black as in KMNIST, normalises them itself, and returns the
class logits. Loading it needs torch only, not fastai nor this package.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .inputs import Inputs, read_inputs

PROGRAM, CARD_JSON, CLASSES = "model.pt2", "model.json", "classes.csv"
FORMAT = "kmnist-tune model directory"


class Classifier(nn.Module):
    """A trained network with its input normalisation: pixel values in, logits out."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor(255.0 * mean))
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.shift) * self.scale)


def export_program(model: nn.Module, mean: float, std: float, path: Path) -> Path:
    """Write `model` (in eval mode, on the CPU, fp32, any batch size) as an exported program."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: export the module itself
    net = Classifier(model, mean, std).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    batch = torch.export.Dim("batch", min=1)
    example = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def load_program(path: Path, device: torch.device) -> nn.Module:
    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a loadable exported model ({type(e).__name__}); export it again") from None
    return program.module().to(device)


@torch.no_grad()
def probabilities(net: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (N, C) for uint8 images (N, 28, 28)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).to(device).unsqueeze(1).float()
        out.append(torch.softmax(net(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Model:
    """A model directory, loaded: the program, its classes, and its card."""

    net: nn.Module
    classes: list[dict[str, str]]
    card: dict[str, Any]
    device: torch.device


def load_model_dir(folder: Path, device: torch.device) -> Model:
    """A model directory written by `best --evaluate --export` (or `export`), checked file by file."""
    hint = "export one with `kmnist-tune best --study NAME --evaluate --export DIR`"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model directory; {hint}")
    try:
        card = json.loads((folder / CARD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{folder}: not a kmnist-tune model directory ({CARD_JSON} missing or unreadable); {hint}") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UserError(f"{folder}: {CARD_JSON} is not a kmnist-tune model card; {hint}")
    for name, digest in (card.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder}: {name} is missing; copy the whole model directory")
        if name in (PROGRAM, CLASSES) and sha256(path) != digest:
            raise UserError(f"{folder}: {name} does not match its checksum in {CARD_JSON}; the directory is damaged")
    with open(folder / CLASSES, encoding="utf-8", newline="") as fh:
        classes = list(csv.DictReader(fh))
    return Model(load_program(folder / PROGRAM, device), classes, card, device)


@dataclass
class Prediction:
    name: str
    top: list[tuple[int, str, float]]  # (class index, character, probability), most likely first


def predict(model: Model, inputs: Inputs, top: int = 1) -> list[Prediction]:
    probs = probabilities(model.net, inputs.images, model.device)
    k = min(top, probs.shape[1]) if len(probs) else 0
    out = []
    for name, p in zip(inputs.names, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        out.append(Prediction(name, [(int(i), model.classes[i]["char"], float(p[i])) for i in order]))
    return out


@dataclass
class PredictResult:
    predictions: list[Prediction]
    metric: str | None = None  # with labels: the model's metric on them
    value: float | None = None


def run_predict(model_dir: Path, inputs: list[Path], *, device: torch.device, top: int, labels: Path | None) -> PredictResult:
    """`kmnist-tune predict`: a model directory applied to pictures or image arrays; with labels, scored
    by the model card's metric (accuracy, or balanced accuracy for K49)."""
    from .data import read_array_file

    model = load_model_dir(model_dir, device)
    data = read_inputs(inputs)
    result = PredictResult(predict(model, data, top=max(top, 1)))
    if labels is not None:
        truth = read_array_file(labels, images=False)
        if len(truth) != len(data.names):
            raise UserError(f"--labels {labels}: {len(truth)} labels for {len(data.names)} images; give the matching file")
        guessed = np.array([p.top[0][0] for p in result.predictions])
        result.metric = str(model.card.get("metrics", {}).get("metric", "accuracy"))
        if result.metric == "balanced_accuracy":
            per_class = [float(np.mean(guessed[truth == c] == c)) for c in np.unique(truth)]
            result.value = float(np.mean(per_class))
        else:
            result.metric, result.value = "accuracy", float(np.mean(guessed == truth))
    return result


def write_predictions(predictions: list[Prediction], path: Path) -> None:
    """`--out`: a CSV (one row per input and rank) or a JSON list, chosen by the suffix."""
    rows = [
        {"input": p.name, "rank": rank, "index": i, "char": c, "probability": round(prob, 6)}
        for p in predictions
        for rank, (i, c, prob) in enumerate(p.top, 1)
    ]
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif path.suffix.lower() == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["input", "rank", "index", "char", "probability"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise UserError(f"--out {path}: end the name in .csv or .json")
