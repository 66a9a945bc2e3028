"""Commands that work a study or its winner: run, worker, best, lr-find, storage-proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .apps import app
from .options import (
    DataDirOpt,
    DeviceOpt,
    GpusOpt,
    JsonOpt,
    MirrorOpt,
    PerGpuOpt,
    StorageOpt,
    StudyArg,
    StudyOpt,
    ThreadsOpt,
    out,
    out_json,
    out_lines,
    plan_slots,
    say,
    storage_url,
    study_name,
    use_threads,
    work_is_done,
)


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")],
    storage: StorageOpt = None,
    gpus: GpusOpt = "auto",
    per_gpu: PerGpuOpt = 1,
    threads: ThreadsOpt = None,
    n_trials: Annotated[
        int | None, typer.Option(help="the study's budget: at least this many trials (an existing study's only grows)", min=1)
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="per-worker timeout in seconds (an existing study's only grows)", min=1)
    ] = None,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the study for SPEC (or resume it), work it with local workers, then print the best trial.

    One CPU slot works in this process; GPU slots (--gpus, --per-gpu) each get a pinned worker process.
    """
    from ..contract.load import load_spec
    from ..observe.summary import summary_lines
    from ..recipe.session import DataOptions, run_sweep
    from ..service.studies import records_of

    slots = plan_slots(gpus, per_gpu)
    use_threads(threads)
    spec = load_spec(spec_path).with_budget(n_trials, timeout)
    for note in spec.notes:
        say(note)
    with records_of(spec.name):  # a malformed record of the study: its line names the study
        summary = run_sweep(spec, storage_url(storage), slots, DataOptions(data_dir, mirror))
    work_is_done()
    if as_json:
        out_json(summary.as_json())
    else:
        out_lines(summary_lines(summary))


@app.command()
def worker(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    gpus: GpusOpt = "auto",
    per_gpu: PerGpuOpt = 1,
    threads: ThreadsOpt = None,
    n_trials: Annotated[
        int | None, typer.Option("--n-trials", metavar="N", help="raise the study's budget to N trials first", min=1)
    ] = None,
    max_trials: Annotated[
        int | None,
        typer.Option("--max-trials", "--count", help="stop after this many trials in each process (W&B's agent: --count)", min=1),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds (default: the spec's)", min=1)] = None,
    max_failures: Annotated[
        int | None,
        typer.Option(
            "--max-consecutive-failed-runs",
            metavar="N",
            help="stop after N failed trials in a row (default: the spec's workers.max_consecutive_failures, 3)",
            min=1,
        ),
    ] = None,
    in_process: Annotated[bool, typer.Option("--in-process", hidden=True, help="be one slot (used by the supervisor)")] = False,
) -> None:
    """Attach to a study created elsewhere and work it until its budget is used.

    The spec is read back from the storage, so only the study name and the storage URL are needed.
    One process per GPU slot, pinned with CUDA_VISIBLE_DEVICES; --gpus none trains on the CPU.
    """
    from ..observe.summary import summary_lines
    from ..recipe.session import DataOptions, attach_worker
    from ..service.studies import records_of, summarize

    name, url = study_name(study_arg, study), storage_url(storage)
    slots = [] if in_process else plan_slots(gpus, per_gpu)
    use_threads(threads)
    with records_of(name):  # a malformed record of the study: its line names the study
        result = attach_worker(
            url,
            name,
            slots,
            DataOptions(data_dir, mirror),
            in_process=in_process,
            n_trials=n_trials,
            max_trials=max_trials,
            timeout=timeout,
            max_failures=max_failures,
        )
    work_is_done()
    if result is None:  # supervised slots: each reported itself
        return
    stalled = f"; waited {result.stalled_s:.1f} s for the storage" if result.stalled_s else ""
    out(f"worker ran {result.ran} trial(s){stalled}" + (f" [{result.label}]" if in_process else ""))
    if not in_process:  # under a supervisor, the supervisor prints the study's summary once
        out_lines(summary_lines(summarize(result.study, result.spec, with_trials=False)))


@app.command()
def best(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--evaluate",
            help="retrain the best configuration on the official train split and report its test score (stored on the study)",
        ),
    ] = False,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    device: DeviceOpt = "auto",
    train_size: Annotated[
        int | None,
        typer.Option(help="with --evaluate: train on this many images instead of the whole official train split", min=1),
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option("--export", metavar="DIR", help="with --evaluate: write the retrained model to this new folder"),
    ] = None,
    ensemble: Annotated[
        int | None,
        typer.Option(
            "--ensemble",
            metavar="K",
            min=1,
            max=32,
            help="with --evaluate: retrain the top K trials and average their softmax outputs (each member's score too)",
        ),
    ] = None,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta", help="with --ensemble: also score each image shifted by one pixel each way (reported separately; exported)"
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the best trial's parameters and validation score; --evaluate scores it on the test split."""
    from ..observe.summary import summary_lines

    name, url = study_name(study_arg, study), storage_url(storage)
    if export is not None and not evaluate:
        raise UserError(
            f"--export needs --evaluate (the model is the one retrained for the test score); or fetch a kept one "
            f"with `kmnist-tune export --study {name} {export}`"
        )
    if ensemble is not None and not evaluate:
        raise UserError("--ensemble needs --evaluate (its members are retrained and scored): add --evaluate")
    if tta and ensemble is None:
        raise UserError("--tta scores an ensemble's shifted copies: add --ensemble K (--ensemble 1 for the best trial alone)")
    if evaluate:
        from ..recipe.export import evaluate_best

        summary = evaluate_best(
            url,
            name,
            data_dir=data_dir,
            mirror=mirror,
            device=device,
            train_size=train_size,
            export=export,
            ensemble=ensemble,
            tta=tta,
        )
    else:
        from ..service.studies import read_summary

        summary, _ = read_summary(url, name, with_trials=False)
    for line in summary.withheld:  # on stderr: the JSON on stdout stays one document
        say(line)
    if as_json:
        out_json(summary.best_json())
        return
    out_lines(summary_lines(summary))
    if export is not None:
        out(f"model: {export} (predict with `kmnist-tune predict {export} IMAGES...`)")


@app.command("export")
def export_model(
    study_arg: StudyArg = None,
    folder: Annotated[Path | None, typer.Argument(metavar="DIR", help="a new folder for the model directory")] = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
) -> None:
    """Write the model `best --evaluate` kept on a study (the retrained winner) to a new folder DIR."""
    from ..recipe.export import fetch_model

    if folder is None and study is not None and study_arg is not None:  # `export --study NAME DIR`
        folder, study_arg = Path(study_arg), None
    if folder is None:
        raise UserError("give the folder to write: kmnist-tune export --study NAME DIR")
    out(f"model: {fetch_model(storage_url(storage), study_name(study_arg, study), folder)}")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="a model directory (best --evaluate --export)")],
    inputs: Annotated[
        list[Path],
        typer.Argument(metavar="INPUTS...", help="pictures (any size), folders of them, .npz/idx files of 28x28 images"),
    ],
    top: Annotated[int, typer.Option("--top", metavar="K", help="the K most likely classes of each input", min=1)] = 1,
    dest: Annotated[Path | None, typer.Option("--out", metavar="FILE", help="write .csv or .json instead of printing")] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", metavar="FILE", help="true labels (.npz/idx) of an array input: print the score")
    ] = None,
    device: Annotated[str, typer.Option("--device", metavar="cpu|cuda|auto", help="where to run")] = "cpu",
    max_images: Annotated[
        int,
        typer.Option("--max-images", metavar="N", help="the most images (or labels) read from one .npz/idx file", min=1),
    ] = 100_000,  # data.DEFAULT_MAX_IMAGES, written out so that loading the CLI does not import numpy
) -> None:
    """Classify Kuzushiji characters with an exported model: index, character and probability."""
    from ..training.devices import resolve_device
    from ..training.inference import run_predict, write_predictions

    # A file's header is checked against max_images before its body is read.
    result = run_predict(model_dir, inputs, device=resolve_device(device), top=top, labels=labels, max_images=max_images)
    if dest is not None:
        write_predictions(result.predictions, dest)
        out(f"{len(result.predictions)} predictions: {dest}")
    else:
        for p in result.predictions:
            out(p.name + "\t" + "\t".join(f"{i}\t{c}\t{prob:.4f}" for i, c, prob in p.top))
    if result.value is not None:
        out(f"{result.metric} on {len(result.predictions)} labelled images: {result.value:.4f}")


@app.command("lr-find")
def lr_find(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    stored: Annotated[bool, typer.Option("--stored", help="only show the stored prior; do not run the finder")] = False,
    png: Annotated[Path | None, typer.Option("--out", help="PNG of the curve (default lr-find-STUDY.png)")] = None,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="re-run it on a study that has trials (their lr range is re-centred after them)")
    ] = False,
) -> None:
    """Run (or re-run) fastai's LR finder for a study, store the curve and suggestions, print them, plot a PNG.

    The study's spec must search lr with `lr: {distribution: lr_finder}`.
    """
    from ..observe.plots import image_path, plot_prior

    name, url = study_name(study_arg, study), storage_url(storage)
    path = image_path(png or Path(f"lr-find-{name}.png"), "--out")  # before minutes of work, not after
    if stored:
        from ..service.studies import read_prior

        prior = read_prior(url, name)
    else:
        from ..recipe.lr_prior import rerun_prior

        use_threads(threads)
        prior, old = rerun_prior(url, name, data_dir=data_dir, mirror=mirror, device=device, force=force)
        if old is not None and (old.low, old.high) != (prior.low, prior.high):
            say(f"lr range re-centred: {old.low:.4g} .. {old.high:.4g} -> {prior.low:.4g} .. {prior.high:.4g} (later trials)")
    for suggestion, lr in prior.suggestions.items():
        out(f"{suggestion}: {lr:.4g}" + ("  <- centre" if suggestion == prior.suggestion else ""))
    out(f"search range: {prior.low:.4g} .. {prior.high:.4g} ({prior.width:g} decades), study key {prior.key}")
    out(f"plot: {plot_prior(prior, path, title=f'{name}: LR finder ({prior.key})')}")


@app.command()
def schema(
    storage: StorageOpt = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune", help="instead: remove the artifact rows no study owns and the claim tickets no worker holds (PostgreSQL)"
        ),
    ] = False,
) -> None:
    """Create the storage's tables (Optuna's and the artifact table), or migrate them after an Optuna
    upgrade. Run it once as the database owner (compose's `schema` service does)."""
    if prune:
        from ..service.artifacts import prune_artifacts
        from ..service.claims import prune_tickets
        from ..service.storage import open_storage

        opened = open_storage(storage_url(storage))
        artifacts = prune_artifacts(opened)  # refuses a SQLite storage in one line, before anything else
        out(f"pruned {artifacts} artifact(s) that no study owns and {prune_tickets(opened)} claim ticket(s) no worker holds")
        return
    from ..service.schema import init_schema

    out(f"{init_schema(storage_url(storage))}: ready")


@app.command("storage-proxy")
def storage_proxy(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback unless you mean to expose it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on", min=1, max=65535)] = 13000,
) -> None:
    """Serve Optuna's gRPC storage proxy in front of PostgreSQL, for hundreds of workers.

    Workers then use --storage grpc://HOST:PORT and hold no database connection of their own.
    """
    from ..service.proxy import serve_proxy

    serve_proxy(storage_url(storage), host, port, announce=say)
