"""A trained model as a model directory, and predictions from it.

Two forms of the same network, both taking raw pixel values (N, 1, 28, 28) in 0..255, white ink on
black as in KMNIST, normalising them, and returning the class logits:
- `weights.safetensors`: its weights, in a format that holds tensors and nothing else. `predict`
  builds the network from the card's constructor (an architecture this package knows) and loads
  these: a model directory is data from someone else, and nothing in it is unpickled or run.
- `model.pt2`: a `torch.export` program (TorchScript is deprecated), for PyTorch alone. Its loader
  unpickles parts of the archive (payloads it marks `use_pickle`, and its sample inputs when they do
  not load as weights), so it is safe only from someone you trust; `predict` never opens it.

A directory is checked as a whole before anything in it is used (`check_model_dir`, which `predict`
and `export` share): the card's signature (with KMNIST_TUNE_SIGNING_KEY), every file the card lists
against its sha256, and no file it does not list. The weights file's header (names, dtypes, shapes,
sizes) is then checked against the network the card describes before any network is built, so a card
that asks for 32 resnet50s beside a resnet18's weights costs a header read, not gigabytes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..contract.spec import ARCHS, STEMS
from ..errors import UserError, one_line
from ..masking import printable
from ..signing import ENV_KEY, signer
from .inputs import Inputs, read_inputs

PROGRAM, WEIGHTS, CARD_JSON, CLASSES = "model.pt2", "weights.safetensors", "model.json", "classes.csv"
CARD_MD, FASTAI = "model-card.md", "fastai-learner.pkl"
# What a card's `files` may list (with each one's sha256): fixed names, never a path.
LISTED_FILES = (WEIGHTS, PROGRAM, FASTAI, CLASSES, CARD_MD)
FORMAT = "kmnist-tune model directory"
MAX_CARD_BYTES = 1 << 20  # a card is a few kB of JSON
# A weights file's JSON header: 32 resnet50 members' is about 1.2 MB (330 tensors of ~110 bytes each).
MAX_HEADER_BYTES = 16 << 20
MAX_CLASSES = 1000


class Classifier(nn.Module):
    """A trained network with its input normalisation: pixel values in, logits out."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor(255.0 * mean))
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.shift) * self.scale)


# Test-time augmentation: the image itself and copies shifted by one pixel each way. Never flips or
# rotations: a mirrored character is another character, or none.
TTA_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
MAX_MEMBERS, MAX_SHIFT = 32, 3


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """The batch (N, C, H, W) with its content moved dx pixels right and dy down; what comes in at
    the edge is background (0), never the other edge's pixels (as torch.roll would bring)."""
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2], x.shape[-1]
    p = F.pad(x, (MAX_SHIFT, MAX_SHIFT, MAX_SHIFT, MAX_SHIFT))
    return p[..., MAX_SHIFT - dy : MAX_SHIFT - dy + h, MAX_SHIFT - dx : MAX_SHIFT - dx + w]


class Averaged(nn.Module):
    """Several classifiers, and shifted copies of the input (test-time augmentation), as one network:
    pixel values in, the log of their averaged softmax out. A softmax of the output is that average, so
    `predict`, `probabilities` and the exported program treat an ensemble as any one network."""

    def __init__(self, members: list[nn.Module], shifts: tuple[tuple[int, int], ...] = ((0, 0),)):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.shifts = tuple((int(dx), int(dy)) for dx, dy in shifts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return averaged_log_probs([log_probs(m, shifted(x, dx, dy)) for dx, dy in self.shifts for m in self.members])


def log_probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One classifier's log-softmax, in float32: what Averaged averages."""
    return torch.log_softmax(net(x).float(), dim=1)


def averaged_log_probs(logs: list[torch.Tensor]) -> torch.Tensor:
    """The log of the mean of several softmax outputs, given their logs (Averaged's output)."""
    return torch.logsumexp(torch.stack(logs), dim=0) - math.log(len(logs))


def export_program(model: nn.Module, mean: float, std: float, path: Path) -> Path:
    """Write `model` (in eval mode, on the CPU, fp32, any batch size) as an exported program."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: export the module itself
    return export_network(Classifier(model, mean, std), path)


def export_network(net: nn.Module, path: Path) -> Path:
    """Write a network that takes pixel values (a Classifier, an Averaged) as an exported program."""
    net = net.to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    batch = torch.export.Dim("batch", min=1)
    example = torch.zeros(2, 1, 28, 28)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def save_weights(model: nn.Module, mean: float, std: float, path: Path) -> Path:
    """The network's weights (with its normalisation) as safetensors: what `predict` loads."""
    model = getattr(model, "_orig_mod", model)
    return save_network(Classifier(model, mean, std), path)


def save_network(net: nn.Module, path: Path) -> Path:
    """A Classifier's or an Averaged's weights and buffers as safetensors."""
    from safetensors.torch import save_file

    net = net.to("cpu", torch.float32)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def card_signature(card: dict[str, Any]) -> str | None:
    """The signature of a model card (with KMNIST_TUNE_SIGNING_KEY; None without): it holds every
    file's sha256, so it signs the whole directory."""
    return signer().sign("model-card", _canonical(card))


def _canonical(card: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in card.items() if k != "signature"}, sort_keys=True, ensure_ascii=True)


def _constructor(card: dict[str, Any], where: Path) -> tuple[str, str, int, float, float, float]:
    """(arch, stem, n_classes, dropout, mean, std) from the card, each checked: the card is data."""
    model = card.get("model")
    if not isinstance(model, dict):
        raise _bad_card(where)
    return _checked(model.get("constructor"), model.get("normalisation"), where)


def _bad_card(where: Path) -> UserError:
    return UserError(f"{where}: {CARD_JSON} does not describe a network kmnist-tune builds; export it again")


def _checked(c: Any, norm: Any, where: Path) -> tuple[str, str, int, float, float, float]:
    """One network's constructor and normalisation from a card, each value checked."""
    bad = _bad_card(where)
    if not isinstance(c, dict) or not isinstance(norm, dict):
        raise bad
    arch, stem, n, dropout, mean, std = (
        c.get("arch"),
        c.get("stem"),
        c.get("n_classes"),
        c.get("dropout"),
        norm.get("mean"),
        norm.get("std"),
    )
    if arch not in ARCHS or stem not in STEMS or not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= MAX_CLASSES:
        raise bad
    numbers = (dropout, mean, std)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise bad
    if not 0 <= dropout < 1 or not 0 <= mean <= 1 or not 0 < std <= 1:
        raise bad
    return arch, stem, n, float(dropout), float(mean), float(std)


Built = tuple[str, str, int, float, float, float]  # arch, stem, n_classes, dropout, mean, std


def _int_pair(d: Any) -> bool:
    return isinstance(d, list) and len(d) == 2 and all(type(v) is int and abs(v) <= MAX_SHIFT for v in d)


def _ensemble(card: dict[str, Any], where: Path) -> tuple[list[Built], tuple[tuple[int, int], ...]]:
    """An ensemble card's members (each checked as one network's) and its test-time shifts."""
    bad = _bad_card(where)
    ens = card["model"].get("ensemble")
    if not isinstance(ens, dict) or not isinstance(ens.get("members"), list) or not isinstance(ens.get("shifts"), list):
        raise bad
    members, shifts = ens["members"], ens["shifts"]
    if not 1 <= len(members) <= MAX_MEMBERS or not 1 <= len(shifts) <= (2 * MAX_SHIFT + 1) ** 2:
        raise bad
    if not all(isinstance(m, dict) for m in members) or not all(_int_pair(d) for d in shifts):
        raise bad
    built = [_checked(m.get("constructor"), m.get("normalisation"), where) for m in members]
    if len({b[2] for b in built}) != 1:  # every member classifies the same classes
        raise bad
    return built, tuple((d[0], d[1]) for d in shifts)


def n_classes_of(card: dict[str, Any]) -> int:
    """The class count of a checked card (load_network checked it)."""
    model = card["model"]
    if "ensemble" in model:
        return int(model["ensemble"]["members"][0]["constructor"]["n_classes"])
    return int(model["constructor"]["n_classes"])


def load_network(card: dict[str, Any], weights: Path, device: torch.device, where: Path) -> nn.Module:
    """The card's network, built by this package, with the directory's safetensors weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import build_model

    net: nn.Module
    if isinstance(card.get("model"), dict) and "ensemble" in card["model"]:
        members, shifts = _ensemble(card, where)
        _check_weights(weights, members, True, where)  # before any member is built
        net = Averaged([Classifier(build_model(a, n, s, d), m, sd) for a, s, n, d, m, sd in members], shifts)
    else:
        arch, stem, n_classes, dropout, mean, std = _constructor(card, where)
        _check_weights(weights, [(arch, stem, n_classes, dropout, mean, std)], False, where)
        net = Classifier(build_model(arch, n_classes, stem, dropout), mean, std)
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        why = one_line(e, 120)
        raise UserError(f"{where}: {WEIGHTS} does not hold the weights of its card's network ({why}); export it again") from None
    return net.to(device).eval()


# safetensors' names of the dtypes our networks hold, and their sizes in bytes.
_DTYPES = {torch.float32: ("F32", 4), torch.int64: ("I64", 8)}


@functools.lru_cache(maxsize=8)
def _tensors_of(arch: str, n_classes: int, stem: str) -> tuple[tuple[str, str, tuple[int, ...], int], ...]:
    """(name, dtype, shape, bytes) of each tensor a Classifier of this constructor saves, from a network
    built on PyTorch's meta device: shapes only, no memory for its weights."""
    from .model import build_model

    with torch.device("meta"):
        net = Classifier(build_model(arch, n_classes, stem), 0.0, 1.0)
    out = []
    for name, t in net.state_dict().items():
        dtype, size = _DTYPES.get(t.dtype, (str(t.dtype), t.element_size()))
        out.append((name, dtype, tuple(t.shape), t.numel() * size))
    return tuple(out)


def _check_weights(weights: Path, built: list[Built], ensemble: bool, where: Path) -> None:
    """The weights file's header against the tensors the card's network needs (their names, dtypes,
    shapes and sizes, and the file's length), read without its data: a mismatch is one line before any
    network is built."""
    expected: dict[str, tuple[str, list[int], int]] = {}
    for i, (arch, stem, n, *_) in enumerate(built):
        prefix = f"members.{i}." if ensemble else ""
        for name, dtype, shape, size in _tensors_of(arch, n, stem):
            expected[prefix + name] = (dtype, list(shape), size)
    archs = sorted({b[0] for b in built})
    what = f"{len(built)} {'/'.join(archs)} members" if ensemble else archs[0]
    header, data_bytes = _safetensors_header(weights, where)
    problem = None
    if set(header) != set(expected):
        problem = f"it holds {len(header)} tensors, the card's {what} {len(expected)}"
    else:
        for name, (dtype, shape, size) in expected.items():
            entry = header[name]
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
                problem = f"{printable(name)[:80]} is not {dtype} {shape} as the card's {what} need"
            elif not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                problem = f"{printable(name)[:80]} has no place in the file"
            elif offsets[1] - offsets[0] != size:
                problem = f"{printable(name)[:80]} is not {size} bytes long"
            if problem:
                break
        need = sum(size for _, _, size in expected.values())
        if problem is None and data_bytes != need:
            problem = f"it holds {data_bytes} bytes of tensors, the card's {what} {need}"
    if problem is not None:
        raise UserError(f"{where}: {WEIGHTS} does not hold the weights of its card's network ({problem}); export it again")


def _safetensors_header(weights: Path, where: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (tensor name -> dtype, shape, data_offsets) and the bytes of data
    after it: the format's 8-byte length, then that much JSON; the data is not read."""
    bad = UserError(f"{where}: {WEIGHTS} is not a safetensors file; export it again")
    try:
        size = weights.stat().st_size
        with open(weights, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise bad
            header = json.loads(fh.read(n))
    except (OSError, ValueError, RecursionError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    header.pop("__metadata__", None)
    return header, size - 8 - n


@torch.no_grad()
def probabilities(net: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (N, C) for uint8 images (N, 28, 28)."""
    out = [torch.softmax(net(x).float(), dim=1).cpu().numpy() for x in _pixel_batches(images, device, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _pixel_batches(images: np.ndarray, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 images (N, 28, 28) as float pixel batches (B, 1, 28, 28) on `device`, as a network takes them."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(images[start : start + batch_size]).to(device).unsqueeze(1).float()


@torch.no_grad()
def shifted_log_probs(
    net: nn.Module, images: np.ndarray, device: torch.device, shifts: tuple[tuple[int, int], ...], batch_size: int = 1024
) -> list[torch.Tensor]:
    """`net`'s log-softmax (N, C), on `device`, for uint8 images (N, 28, 28) shifted by each of `shifts`,
    batch by batch as `probabilities` runs a network: averaged_log_probs of several members' outputs
    gives what their Averaged network gives, without running any member twice."""
    out: list[list[torch.Tensor]] = [[] for _ in shifts]
    for x in _pixel_batches(images, device, batch_size):
        for i, (dx, dy) in enumerate(shifts):
            out[i].append(log_probs(net, shifted(x, dx, dy)))
    return [torch.cat(parts) for parts in out]


def scored(metric: str, outputs: torch.Tensor, truth: np.ndarray) -> float:
    """Outputs (N, C) of a network (logits or log-probabilities) scored on their labels by the path
    `probabilities` and `predict` take: the softmax, its top class, the metric."""
    probs = torch.softmax(outputs.float(), dim=1).cpu().numpy()
    return score(metric, np.argmax(probs, axis=1), truth)


def network_score(net: nn.Module, images: np.ndarray, truth: np.ndarray, metric: str, device: torch.device) -> float:
    """A network scored on labelled images as `predict --labels` scores a model directory."""
    return score(metric, np.argmax(probabilities(net, images, device), axis=1), truth)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Model:
    """A model directory, loaded: the network, its classes, and its card."""

    net: nn.Module
    classes: list[dict[str, str]]
    card: dict[str, Any]
    device: torch.device


def load_model_dir(folder: Path, device: torch.device) -> Model:
    """A model directory written by `best --evaluate --export` (or `export`), checked as a whole
    (check_model_dir), then loaded: the card is JSON (bounded), the classes CSV, the weights safetensors
    (their header checked against the card's network first)."""
    card = check_model_dir(folder)
    net = load_network(card, folder / WEIGHTS, device, folder)
    classes = _read_classes(folder / CLASSES, n_classes_of(card), folder)
    return Model(net, classes, card, device)


def check_model_dir(folder: Path, where: str | None = None, again: str = "export it again") -> dict[str, Any]:
    """The card of a model directory, once the directory is what the card says: with the signing key,
    the card's signature; every file the card lists present and matching its sha256; no other file
    (an older export's unlisted model-card.md aside: text no loader reads). `where` names the directory
    in the lines that refuse it, `again` says how to get a good one. Reads no file but the card by a
    name from the card: the names it may list are fixed."""
    said = where or str(folder)
    hint = "export one with `kmnist-tune best --study NAME --evaluate --export DIR`"
    if not folder.is_dir():
        raise UserError(f"{said}: no such model directory; {hint}")
    card_path = folder / CARD_JSON
    try:
        if card_path.is_symlink() or card_path.stat().st_size > MAX_CARD_BYTES:
            raise UserError(f"{said}: {CARD_JSON} is a link or over {MAX_CARD_BYTES >> 10} kB; it is not a model card of ours")
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise UserError(f"{said}: not a kmnist-tune model directory ({CARD_JSON} missing or unreadable); {hint}") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UserError(f"{said}: {CARD_JSON} is not a kmnist-tune model card; {hint}")
    why = signer().refusal(card.get("signature"), "model-card", _canonical(card))
    if why is not None:
        raise UserError(
            f"{said}: its model card is unsigned or not signed with your {ENV_KEY} ({why}); "
            "use a model your team exported, or unset the key to trust this one"
        )
    files = card.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise UserError(f"{said}: {CARD_JSON} lists no files with their sha256; {again}")
    unknown = sorted(printable(repr(k))[:40] for k in files if k not in LISTED_FILES)
    if unknown:
        raise UserError(f"{said}: {CARD_JSON} lists {', '.join(unknown)}, which a model directory does not have; {again}")
    if WEIGHTS not in files:
        raise UserError(f"{said}: it has no {WEIGHTS} (an older kmnist-tune wrote it); run `best --evaluate` again")
    if CLASSES not in files:
        raise UserError(f"{said}: {CARD_JSON} does not list {CLASSES}; {again}")
    allowed = {CARD_JSON, *files} | ({CARD_MD} if CARD_MD not in files else set())
    unlisted = sorted(printable(repr(p.name))[:60] for p in folder.iterdir() if p.name not in allowed)
    if unlisted:
        raise UserError(
            f"{said}: it holds {', '.join(unlisted[:5])}, which its model card does not list; a model directory "
            f"holds only the files its card lists: remove the others, or {again}"
        )
    for name, digest in files.items():  # each a fixed name (checked above): nothing the card says is a path
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{said}: {name} is missing (or a link); copy the whole model directory")
        if sha256(path) != digest:
            raise UserError(f"{said}: {name} does not match its checksum in {CARD_JSON}; the directory is damaged")
    return card


def _read_classes(path: Path, n_classes: int, folder: Path) -> list[dict[str, str]]:
    bad = UserError(f"{folder}: {CLASSES} does not list the {n_classes} classes of its card; export it again")
    try:
        if path.stat().st_size > 64 * MAX_CLASSES:
            raise bad
        with open(path, encoding="utf-8", newline="") as fh:
            classes = list(csv.DictReader(fh))
    except (OSError, ValueError, csv.Error):
        raise bad from None
    if len(classes) != n_classes or any(
        row.get("index") != str(i) or not isinstance(row.get("char"), str) for i, row in enumerate(classes)
    ):
        raise bad
    return classes


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


def run_predict(
    model_dir: Path, inputs: list[Path], *, device: torch.device, top: int, labels: Path | None, max_images: int | None = None
) -> PredictResult:
    """`kmnist-tune predict`: a model directory applied to pictures or image arrays; with labels, scored
    by the model card's metric (accuracy, or balanced accuracy for K49)."""
    from .data import DEFAULT_MAX_IMAGES, read_array_file

    model = load_model_dir(model_dir, device)
    data = read_inputs(inputs, max_images)
    result = PredictResult(predict(model, data, top=max(top, 1)))
    if labels is not None:
        truth = read_array_file(labels, images=False, limit=max_images or DEFAULT_MAX_IMAGES)
        if len(truth) != len(data.names):
            raise UserError(f"--labels {labels}: {len(truth)} labels for {len(data.names)} images; give the matching file")
        guessed = np.array([p.top[0][0] for p in result.predictions])
        metrics = model.card.get("metrics")
        named = metrics.get("metric") if isinstance(metrics, dict) else None
        result.metric = "balanced_accuracy" if named == "balanced_accuracy" else "accuracy"
        result.value = score(result.metric, guessed, truth)
    return result


def score(metric: str, guessed: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy, or balanced accuracy (the mean of per-class recalls, over the classes present)."""
    if metric == "balanced_accuracy":
        return float(np.mean([np.mean(guessed[truth == c] == c) for c in np.unique(truth)]))
    return float(np.mean(guessed == truth))


# A spreadsheet reads a cell that starts with one of these as a formula (`=HYPERLINK(...)`, `@SUM(...)`,
# and tab or carriage return before them): OWASP's CSV-injection advice.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string that starts like a formula gets a leading
    single quote, as OWASP advises (class names come from a model directory, input names from whoever
    named the files). Numbers are written as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_predictions(predictions: list[Prediction], path: Path) -> None:
    """`--out`: a CSV (one row per input and rank; cells that would start a formula quoted: csv_cell) or
    a JSON list, chosen by the suffix."""
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
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    else:
        raise UserError(f"--out {path}: end the name in .csv or .json")
