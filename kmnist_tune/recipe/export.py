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
nothing half-written behind. The card lists every other file with its sha256 and, with
KMNIST_TUNE_SIGNING_KEY set, is signed; the record kept on the study (every file's artifact id and
sha256, the card's included) is signed for the study. `export` fetches the kept copy back file by
file under the fixed names above (never a name read from the study), each checked against the record,
then checks the directory as `predict` does (training/inference.check_model_dir) and that its card is
of this study's kept model.
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
from ..signing import ENV_KEY, record_refusal, store_signed
from ..training.data import class_map, resolve_data_dir, verify
from ..training.devices import resolve_device
from ..training.inference import (
    CARD_JSON,
    CARD_MD,
    CLASSES,
    FASTAI,
    FORMAT,
    PROGRAM,
    WEIGHTS,
    card_signature,
    check_model_dir,
    export_network,
    export_program,
    save_network,
    save_weights,
    sha256,
)
from ..training.splits import Splits
from .cpu_threads import training_process
from .ensemble import Ensemble, evaluate_ensemble
from .evaluate import Retrained, evaluate_on_test, top_trials

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


def _write_classes(spec: SweepSpec, folder: Path) -> list[dict[str, Any]]:
    classes = class_map(spec.data.dataset)
    with open(folder / CLASSES, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["index", "codepoint", "char"])
        writer.writeheader()
        writer.writerows(classes)
    return classes


def _data_block(spec: SweepSpec, data_dir: Path, splits: Splits) -> dict[str, Any]:
    """The model card's `data`: the data set's files and checksums, the split and its sizes."""
    assert splits.y_test is not None
    return {
        "dataset": spec.data.dataset,
        "files": [{"name": s.path.name, "md5": s.expected_md5} for s in verify(spec.data.dataset, data_dir) if s.state == "ok"],
        "split_seed": spec.data.split_seed,
        "valid_fraction": spec.data.valid_fraction,
        "n_train": int(len(splits.y_train)),
        "n_valid": int(len(splits.y_valid)),
        "n_test": int(len(splits.y_test)),
    }


def _network(r: Retrained, n_classes: int) -> dict[str, Any]:
    """What `predict` builds a retrained network from: its constructor's arguments and normalisation."""
    mean, std = r.splits.mean_std
    return {
        "constructor": {
            "arch": r.params["arch"],
            "stem": r.params["stem"],
            "n_classes": n_classes,
            "dropout": r.params["dropout"],
        },
        "normalisation": {"mean": mean, "std": std},
    }


def _seal(card: dict[str, Any], folder: Path, files: tuple[str, ...], markdown: str) -> None:
    """The card for people, then the card as JSON with every other file's sha256 (the one for people
    included) and, with a signing key, its signature."""
    (folder / CARD_MD).write_text(markdown, encoding="utf-8")
    card["files"] = {name: sha256(folder / name) for name in (*files, CARD_MD)}
    signature = card_signature(card)
    if signature is not None:
        card["signature"] = signature
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_dir(r: Retrained, spec: SweepSpec, study_name: str, storage_kind: str, data_dir: Path, folder: Path) -> None:
    mean, std = r.splits.mean_std
    save_weights(r.learn.model, mean, std, folder / WEIGHTS)
    export_program(r.learn.model, mean, std, folder / PROGRAM)
    r.learn.export(folder.resolve() / FASTAI)
    classes = _write_classes(spec, folder)
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
            **_network(r, len(classes)),
        },
        "data": _data_block(spec, data_dir, r.splits),
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
            "epochs": _epochs(r),
            "device": ev.device,
            "at": ev.at,
        },
        "versions": _versions(),
        "source": {"study": study_name, "trial": r.trial.number, "storage": storage_kind, "exported": who_and_when()[0]},
    }
    _seal(card, folder, (WEIGHTS, PROGRAM, FASTAI, CLASSES), model_card(card, classes))


def _epochs(r: Retrained) -> list[dict[str, Any]]:
    """A retrained network's epochs, as its card lists them."""
    return [{"epoch": e.epoch, "train_loss": e.train_loss, "seconds": round(e.seconds, 2)} for e in r.epochs]


def write_ensemble_dir(e: Ensemble, spec: SweepSpec, study_name: str, storage_kind: str, data_dir: Path, folder: Path) -> None:
    """An ensemble's model directory: one network (weights and program) that averages the members, the
    classes, and a card listing each member's parameters and scores. No fastai export: a Learner
    holds one model."""
    save_network(e.net, folder / WEIGHTS)
    export_network(e.net, folder / PROGRAM)
    classes = _write_classes(spec, folder)
    ev, first = e.evaluation, e.members[0]
    shifts = [list(s) for s in e.net.shifts]
    members = []
    for r, scored in zip(e.members, ev.members, strict=True):
        tta_value = ev.tta["members"][len(members)] if ev.tta is not None else None
        members.append(
            {
                "trial": r.trial.number,
                "hyperparameters": r.params,
                "batch_size_used": r.params["batch_size"],
                "validation": r.trial.value,
                "test": scored["test_value"],
                "test_tta": tta_value,
                "seconds": round(r.seconds, 2),
                "epochs": _epochs(r),
            }
        )
    card: dict[str, Any] = {
        "format": FORMAT,
        "model": {
            "weights": WEIGHTS,
            "program": PROGRAM,
            "input": "uint8 pixel values (N, 1, 28, 28), white ink on black as in KMNIST; the program normalises",
            "output": f"log of the members' averaged softmax (N, {len(classes)}); softmax for probabilities",
            "ensemble": {
                "members": [{"trial": r.trial.number, **_network(r, len(classes))} for r in e.members],
                "shifts": shifts,
            },
        },
        "data": _data_block(spec, data_dir, first.splits),
        "members": members,
        "metrics": {
            "metric": ev.metric,
            "test": {
                "value": e.exported_value,
                "n_images": ev.n_test,
                "split": "the official test split",
                "tta": ev.tta is not None,
            },
            "ensemble_without_tta": ev.test_value,
            "ensemble_with_tta": ev.tta["test_value"] if ev.tta is not None else None,
        },
        "training": {"seconds": ev.seconds, "device": ev.device, "at": ev.at},
        "versions": _versions(),
        "source": {
            "study": study_name,
            "trials": [r.trial.number for r in e.members],
            "storage": storage_kind,
            "exported": who_and_when()[0],
        },
    }
    _seal(card, folder, (WEIGHTS, PROGRAM, CLASSES), ensemble_card(card, classes))


def ensemble_card(card: dict[str, Any], classes: list[dict[str, Any]]) -> str:
    d, met, src = card["data"], card["metrics"], card["source"]
    n = len(card["members"])
    shifts = card["model"]["ensemble"]["shifts"]
    tta = (
        f"with test-time augmentation: each image also shifted by one pixel each way ({len(shifts)} copies, no flips)"
        if met["test"]["tta"]
        else "without test-time augmentation"
    )
    rows = "\n".join(
        f"| {m['trial']} | {m['hyperparameters']['arch']} / {m['hyperparameters']['stem']} | "
        f"{_score(m['validation'])} | {_score(m['test'])} | {_score(m['test_tta'])} | "
        + ", ".join(f"{k}={v}" for k, v in m["hyperparameters"].items() if k not in ("arch", "stem"))
        + " |"
        for m in card["members"]
    )
    files = "\n".join(f"- {f['name']} (md5 {f['md5']})" for f in d["files"])
    versions = ", ".join(f"{k} {v}" for k, v in card["versions"].items())
    with_tta = met["ensemble_with_tta"]
    return f"""# Model card: {d["dataset"]} ensemble of {n} (study {src["study"]}, trials {", ".join(map(str, src["trials"]))})

The top {n} trials of the study, each retrained on {d["n_train"]} images of the official train split, their
softmax outputs averaged, {tta}. Classes ({len(classes)}): {" ".join(c["char"] for c in classes)}

## Scores (test {met["metric"]}, official test split, {met["test"]["n_images"]} images)
- this model: **{met["test"]["value"]:.4f}**
- the ensemble without test-time augmentation: {met["ensemble_without_tta"]:.4f}
- with test-time augmentation: {"not measured (--tta)" if with_tta is None else f"{with_tta:.4f}"}

| trial | network | validation | test | test, shifted copies | hyperparameters |
| --- | --- | --- | --- | --- | --- |
{rows}

## Data files
{files}

## Use
- `kmnist-tune predict DIR IMAGES...`: it builds each member from this card and loads `{WEIGHTS}`
  (safetensors: tensors only); nothing is unpickled.
- PyTorch alone: `torch.export.load("{PROGRAM}").module()(x)` with `x` a float tensor of pixel values
  0..255, shape (N, 1, 28, 28), white ink on black; its output is the log of the averaged softmax.
  PyTorch's loader unpickles parts of a `.pt2` archive: load it only from someone you trust.

Versions: {versions}.
"""


def _score(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


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
    r: Retrained | Ensemble,
    study: optuna.Study,
    storage: BaseStorage,
    spec: SweepSpec,
    data_dir: Path,
    export: Path | None,
    say: Callable[[str], None],
) -> None:
    """Write the model directory (one retrained trial's, or an ensemble's), store it on the study as
    artifacts, and move it to `export`."""
    parent = export.resolve().parent if export is not None else None
    members = [m.trial.number for m in r.members] if isinstance(r, Ensemble) else None
    trial = members[0] if members is not None else r.trial.number  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory(prefix=".kmnist-tune-export-", dir=parent) as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        if isinstance(r, Ensemble):
            write_ensemble_dir(r, spec, study.study_name, backend(storage), data_dir, folder)
        else:
            write_model_dir(r, spec, study.study_name, backend(storage), data_dir, folder)
        ids = {f.name: upload_file(storage, study, f) for f in sorted(folder.iterdir())}
        digests = {f.name: sha256(f) for f in folder.iterdir()}
        # Signed for this study with the key: every file's id and sha256, so the card's hash too.
        store_signed(KeptModel(trial, who_and_when()[0], ids, digests, members), study)
        what = f"the ensemble of trials {', '.join(map(str, members))}" if members else f"the retrained model of trial {trial}"
        say(f"kept {what} on the study ({len(ids)} files)")
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
    ensemble: int | None = None,
    tta: bool = False,
) -> StudySummary:
    """`best --evaluate [--ensemble K [--tta]] [--export DIR]`: score the study's best trial (or its
    top K, averaged) on the official test split, keep the retrained model on the study (and in DIR);
    the study's summary after."""
    dev = resolve_device(device)
    if export is not None:
        check_destination(export)  # before minutes of training, not after
    storage = open_storage(url)
    study, spec = open_study(storage, name)
    folder = resolve_data_dir(data_dir)
    if ensemble is not None:
        top_trials(study, spec, ensemble)  # too few trials is one line before any data is read
    # A retraining is a training process like a worker's: it takes its share of the host's cores, and
    # workers training beside it take theirs (service/cpu_share.py).
    with training_process(), make_reporter(label="evaluate") as reporter:
        model: Retrained | Ensemble
        if ensemble is not None:
            model = evaluate_ensemble(
                study, spec, folder, dev, reporter, k=ensemble, tta=tta, mirror=mirror, train_size=train_size
            )
        else:
            model = evaluate_on_test(study, spec, folder, dev, reporter, mirror=mirror, train_size=train_size)
        keep_model(model, study, storage, spec, folder, export, say=reporter.line)
    return summarize(study, spec, with_trials=False)


def fetch_model(url: str, name: str, dest: Path) -> Path:
    """`export --study NAME DIR`: the model directory kept on the study by `best --evaluate`, each
    file written under its fixed name in a private temporary folder and checked as it is copied, then
    the directory checked as a whole before it is moved to DIR."""
    check_destination(dest, "export folder")
    storage = open_storage(url)
    study, _ = open_study(storage, name)
    attrs = study.user_attrs
    kept = KeptModel.read(attrs)
    again = f"run `kmnist-tune best --study {name} --evaluate` again"
    if kept is None:
        raise UserError(f"study {name!r} keeps no model yet; run `kmnist-tune best --study {name} --evaluate` first")
    artifacts = kept.artifacts if isinstance(kept.artifacts, dict) else {}
    digests = kept.sha256 if isinstance(kept.sha256, dict) else {}
    unknown = sorted(printable(repr(k))[:40] for k in artifacts if k not in MODEL_FILES)
    if unknown or not all(f in artifacts for f in (WEIGHTS, CLASSES, CARD_JSON)):
        what = f"names files {', '.join(unknown)} a model directory does not have" if unknown else "lacks files"
        raise UserError(f"the model kept on study {name!r} {what}; {again}")
    why = record_refusal(KeptModel, name, attrs)
    if why is not None:
        raise UserError(
            f"the model kept on study {name!r} is unsigned or not signed for it with your {ENV_KEY} ({why}); "
            f"refused: {again} with the key"
        )
    store = artifact_store(storage)
    # mkdtemp: mode 0700, in the destination's folder so that the rename below stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=".kmnist-tune-export-", dir=dest.resolve().parent) as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        for file_name in MODEL_FILES:  # our names, not the record's
            if file_name in artifacts:
                what = f"{file_name} of study {name!r}"
                _download(store, artifacts[file_name], folder / file_name, digests.get(file_name), what)
        # The directory as predict checks it (the card's signature, every file against the card, no
        # other file), and the card of this study's kept model, not one copied from another.
        card = check_model_dir(folder, f"the model kept on study {name!r}", again)
        source = card.get("source") if isinstance(card.get("source"), dict) else {}
        of = ("trials", kept.members) if kept.members is not None else ("trial", kept.trial)
        if source.get("study") != name or source.get(of[0]) != of[1]:
            said = f"{printable(repr(source.get('study')))[:60]} ({of[0]} {printable(repr(source.get(of[0])))[:60]})"
            raise UserError(f"the model kept on study {name!r} has the model card of study {said}; {again}")
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
