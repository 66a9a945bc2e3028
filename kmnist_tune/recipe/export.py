"""The winner as a model directory a user takes home, kept on the study as artifacts too:
`evaluate_best` (`best --evaluate [--export DIR]`) retrains and scores it (recipe/evaluate.py) and keeps
it, `fetch_model` (`export`) brings a kept one back.

    weights.safetensors  the network's weights, which `predict` loads (a format that cannot hold code)
    model.pt2            torch.export program: uint8 pixels (N, 1, 28, 28) in, logits out (torch only;
                         its loader unpickles parts of it: open it only from someone you trust)
    fastai-learner.pkl   fastai's `learn.export`, a pickle (load with fastai's `load_learner`, trusted only)
    classes.csv          index, Unicode code point, character
    model.json           the model card as data: data set and checksums, split, hyperparameters,
                         halving events, validation and test scores, time, device, versions, source
    model-card.md        the same for people

The directory is written under a temporary name and renamed when complete, so a failure leaves
nothing half-written behind. The copy kept on the study is fetched back file by file under the fixed
names above (never a name read from the study), each checked against its sha256 and, with
KMNIST_TUNE_SIGNING_KEY set, its signature.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from .. import __version__
from ..contract.records import KeptModel, TrialRecord, who_and_when
from ..contract.spec import SweepSpec
from ..errors import UserError
from ..masking import printable
from ..observe.plots import writable_folder
from ..observe.progress import make_reporter
from ..service.artifacts import BadDownload, CheckedArtifactStore, artifact_store, download_checked, upload_file
from ..service.storage import backend, open_storage
from ..service.studies import StudySummary, open_study, summarize
from ..signing import signer
from ..training.data import class_map, resolve_data_dir, verify
from ..training.devices import resolve_device
from ..training.inference import (
    CARD_JSON,
    CLASSES,
    FORMAT,
    PROGRAM,
    WEIGHTS,
    card_signature,
    export_program,
    save_weights,
    sha256,
)
from .evaluate import Retrained, evaluate_on_test

CARD_MD, FASTAI = "model-card.md", "fastai-learner.pkl"
# Every file of a model directory, by its fixed name; `export` writes these and nothing else.
MODEL_FILES = (WEIGHTS, PROGRAM, FASTAI, CLASSES, CARD_JSON, CARD_MD)
MAX_FILE_BYTES = 4 << 30  # resnet152's fastai export is under 300 MB


def check_destination(dest: Path, named: str = "--export") -> None:
    """A model directory goes to a new (or empty) folder in a folder that can be written. `named`: how
    the command the user typed calls it (`best --export DIR`, `export DIR`)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{named} {dest}: it exists and is not an empty folder; give a new folder")
    writable_folder(dest.resolve().parent, named)


def _versions() -> dict[str, str]:
    out = {"kmnist_tune": __version__, "python": platform.python_version()}
    for dist in ("torch", "torchvision", "fastai", "optuna", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    return out


def write_model_dir(r: Retrained, spec: SweepSpec, study_name: str, storage_kind: str, data_dir: Path, folder: Path) -> None:
    mean, std = r.splits.mean_std
    save_weights(r.learn.model, mean, std, folder / WEIGHTS)
    export_program(r.learn.model, mean, std, folder / PROGRAM)
    r.learn.export(folder.resolve() / FASTAI)
    classes = class_map(spec.data.dataset)
    with open(folder / CLASSES, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["index", "codepoint", "char"])
        writer.writeheader()
        writer.writerows(classes)
    record = TrialRecord.of(r.trial)
    ev = r.evaluation
    card: dict[str, Any] = {
        "format": FORMAT,
        "model": {
            "weights": WEIGHTS,
            "program": PROGRAM,
            "fastai_export": FASTAI,
            "input": "uint8 pixel values (N, 1, 28, 28), white ink on black as in KMNIST; the program normalises",
            "output": f"logits (N, {len(classes)}); softmax for probabilities",
            "constructor": {
                "arch": r.params["arch"],
                "stem": r.params["stem"],
                "n_classes": len(classes),
                "dropout": r.params["dropout"],
            },
            "normalisation": {"mean": mean, "std": std},
        },
        "data": {
            "dataset": spec.data.dataset,
            "files": [
                {"name": s.path.name, "md5": s.expected_md5} for s in verify(spec.data.dataset, data_dir) if s.state == "ok"
            ],
            "split_seed": spec.data.split_seed,
            "valid_fraction": spec.data.valid_fraction,
            "n_train": ev.n_train,
            "n_valid": int(len(r.splits.y_valid)),
            "n_test": ev.n_test,
        },
        "hyperparameters": r.params,
        "batch_size_used": r.params["batch_size"],
        "halving_events": [e.as_dict() for e in record.halving_events],
        "metrics": {
            "metric": ev.metric,
            "validation": {
                "value": ev.valid_value,
                "n_images": int(len(r.splits.y_valid)),
                "split": "carved from the official train split",
            },
            "test": {"value": ev.test_value, "n_images": ev.n_test, "split": "the official test split"},
        },
        "training": {
            "seconds": round(r.seconds, 2),
            "epochs": [{"epoch": e.epoch, "train_loss": e.train_loss, "seconds": round(e.seconds, 2)} for e in r.epochs],
            "device": ev.device,
            "at": ev.at,
        },
        "versions": _versions(),
        "source": {"study": study_name, "trial": r.trial.number, "storage": storage_kind, "exported": who_and_when()[0]},
    }
    card["files"] = {name: sha256(folder / name) for name in (WEIGHTS, PROGRAM, FASTAI, CLASSES)}
    signature = card_signature(card)
    if signature is not None:
        card["signature"] = signature
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / CARD_MD).write_text(model_card(card, classes), encoding="utf-8")


def model_card(card: dict[str, Any], classes: list[dict[str, Any]]) -> str:
    m, d, met, t, src = card["model"], card["data"], card["metrics"], card["training"], card["source"]
    arch, stem = m["constructor"]["arch"], m["constructor"]["stem"]
    hp = "\n".join(f"| {k} | {v} |" for k, v in card["hyperparameters"].items())
    halvings = "\n".join(
        f"- {e['from_bs']} → {e['to_bs'] or 'stop'}: {e['reason']} ({e['detail']})" for e in card["halving_events"]
    )
    chars = " ".join(c["char"] for c in classes)
    files = "\n".join(f"- {f['name']} (md5 {f['md5']})" for f in d["files"])
    versions = ", ".join(f"{k} {v}" for k, v in card["versions"].items())
    test, valid = met["test"], met["validation"]
    return f"""# Model card: {d["dataset"]} {arch} (study {src["study"]}, trial {src["trial"]})

A fastai ResNet ({arch}, {stem} stem) for the {m["constructor"]["n_classes"]} classes of {d["dataset"].upper()}: {chars}

## Scores
- test {met["metric"]}: **{test["value"]:.4f}** on {test["n_images"]} images of the official test split
- validation {met["metric"]}: {valid["value"]:.4f} on {valid["n_images"]} images carved from the official
  train split (what the sweep chose by)

## Training
Retrained on {d["n_train"]} images of the official train split (split seed {d["split_seed"]}, validation
fraction {d["valid_fraction"]}) for {len(t["epochs"])} epochs in {t["seconds"]:.1f} s on {t["device"]} at {t["at"]}.

| hyperparameter | value |
| --- | --- |
{hp}

Batch size used: {card["batch_size_used"]}. Halvings during the sweep's trial:
{halvings or "- none"}

## Data files
{files}

## Use
- `kmnist-tune predict DIR IMAGES...` (pictures, folders, `.npz`/idx files of 28x28 images): it loads
  `{m["weights"]}` (safetensors: tensors only) into the network the card names; nothing is unpickled.
- PyTorch alone: `torch.export.load("{m["program"]}").module()(x)` with `x` a float tensor of pixel
  values 0..255, shape (N, 1, 28, 28), white ink on black; softmax the logits. Classes: `classes.csv`.
  PyTorch's loader unpickles parts of a `.pt2` archive: load it only from someone you trust.
- fastai: `load_learner("{m["fastai_export"]}")` (needs kmnist-tune installed; it is a pickle, which
  runs code as it loads: only from someone you trust).

Versions: {versions}.
Source: study {src["study"]}, trial {src["trial"]} ({src["storage"]} storage).
"""


def keep_model(
    r: Retrained,
    study: optuna.Study,
    storage: BaseStorage,
    spec: SweepSpec,
    data_dir: Path,
    export: Path | None,
    say: Callable[[str], None],
) -> None:
    """Write the model directory, store it on the study as artifacts, and move it to `export`."""
    parent = export.resolve().parent if export is not None else None
    with tempfile.TemporaryDirectory(prefix=".kmnist-tune-export-", dir=parent) as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        write_model_dir(r, spec, study.study_name, backend(storage), data_dir, folder)
        ids = {f.name: upload_file(storage, study, f) for f in sorted(folder.iterdir())}
        digests = {f.name: sha256(f) for f in folder.iterdir()}
        sign = signer()
        signatures = {name: sign.sign("model-file", name, ids[name], d) for name, d in digests.items()}
        KeptModel(r.trial.number, who_and_when()[0], ids, digests, signatures if sign.on else None).store(study)
        say(f"kept the retrained model of trial {r.trial.number} on the study ({len(ids)} files)")
        if export is not None:
            if export.exists():
                export.rmdir()  # empty, checked before training
            os.replace(folder, export)


def evaluate_best(
    url: str,
    name: str,
    *,
    data_dir: Path | None,
    mirror: str | None,
    device: str,
    train_size: int | None,
    export: Path | None = None,
) -> StudySummary:
    """`best --evaluate [--export DIR]`: score the study's best trial on the official test split, keep
    the retrained model on the study (and in DIR); the study's summary after."""
    dev = resolve_device(device)
    if export is not None:
        check_destination(export)  # before minutes of training, not after
    storage = open_storage(url)
    study, spec = open_study(storage, name)
    folder = resolve_data_dir(data_dir)
    with make_reporter(label="evaluate") as reporter:
        retrained = evaluate_on_test(study, spec, folder, dev, reporter, mirror=mirror, train_size=train_size)
        keep_model(retrained, study, storage, spec, folder, export, say=reporter.line)
    return summarize(study, spec, with_trials=False)


def fetch_model(url: str, name: str, dest: Path) -> Path:
    """`export --study NAME DIR`: the model directory kept on the study by `best --evaluate`, each
    file written under its fixed name in a private temporary folder and checked as it is copied."""
    check_destination(dest, "export folder")
    storage = open_storage(url)
    study, _ = open_study(storage, name)
    kept = KeptModel.read(study.user_attrs)
    if kept is None:
        raise UserError(f"study {name!r} keeps no model yet; run `kmnist-tune best --study {name} --evaluate` first")
    artifacts = kept.artifacts if isinstance(kept.artifacts, dict) else {}
    digests = kept.sha256 if isinstance(kept.sha256, dict) else {}
    signatures = kept.signatures if isinstance(kept.signatures, dict) else {}
    unknown = sorted(printable(repr(k))[:40] for k in artifacts if k not in MODEL_FILES)
    if unknown or not all(f in artifacts for f in (WEIGHTS, CLASSES, CARD_JSON)):
        what = f"names files {', '.join(unknown)} a model directory does not have" if unknown else "lacks files"
        raise UserError(f"the model kept on study {name!r} {what}; run `kmnist-tune best --study {name} --evaluate` again")
    sign = signer()
    store = artifact_store(storage)
    # mkdtemp: mode 0700, in the destination's folder so that the rename below stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".kmnist-tune-export-", dir=dest.resolve().parent) as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        for file_name in MODEL_FILES:  # our names, not the record's
            if file_name not in artifacts:
                continue
            artifact_id, digest = artifacts[file_name], digests.get(file_name)
            if not sign.check(signatures.get(file_name), "model-file", file_name, str(artifact_id), str(digest)):
                raise UserError(
                    f"{file_name} of study {name!r} is unsigned or not signed with your KMNIST_TUNE_SIGNING_KEY; refused"
                )
            _download(store, artifact_id, folder / file_name, digest, f"{file_name} of study {name!r}")
        if dest.exists():
            dest.rmdir()
        os.replace(folder, dest)
    return dest


def _download(store: CheckedArtifactStore, artifact_id: Any, target: Path, digest: Any, what: str) -> None:
    try:
        download_checked(store, artifact_id, target, digest, MAX_FILE_BYTES)
    except BadDownload as e:
        raise UserError(f"{what}: {e}; the artifact store is damaged or was written by someone else") from None
    except UserError:
        raise
    except Exception as e:  # a missing or unreadable artifact store
        raise UserError(
            f"cannot fetch {what} from its artifact store ({type(e).__name__}); "
            "is KMNIST_TUNE_ARTIFACTS the folder the model was kept in?"
        ) from None
