"""The `kmnist-tune` command line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import UserError
from .storage import install_log_masking, mask

app = typer.Typer(
    help="Tune fastai ResNets on the Kuzushiji data sets with Optuna.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
study_app = typer.Typer(help="Create, list, inspect and delete studies.", no_args_is_help=True)
data_app = typer.Typer(help="Download, verify and describe the data sets.", no_args_is_help=True)
app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage URL (env KMNIST_TUNE_STORAGE; default sqlite:///kmnist-tune.db in the working directory)",
    ),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="data folder (env KMNIST_TUNE_DATA; default ~/.cache/kmnist-tune)")
]
MirrorOpt = Annotated[
    str | None,
    typer.Option("--mirror", help="base URL to download from (env KMNIST_TUNE_MIRROR; default the official CODH site)"),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if present, else CPU), cpu, or cuda")]


def _out(text: str = "") -> None:
    print(mask(text), flush=True)


def _setup_quiet_libraries() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Libraries' deprecation chatter is not for our users; real problems surface as errors.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*ExperimentalWarning.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    install_log_masking()


def _device(requested: str):
    import torch

    from .model import pick_device

    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {requested!r} is not one of auto, cpu, cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return pick_device(requested)


def _storage(url: str | None, *, create: bool):
    from .storage import open_storage, resolve_url

    resolved = resolve_url(url)
    return resolved, open_storage(resolved, create=create)


def _load_splits(spec, data_dir: Path | None, mirror: str | None):
    from .data import resolve_data_dir
    from .train import load_splits

    # Once per process, before any trial is claimed: a data problem must not leave a trial behind.
    return load_splits(spec.data, resolve_data_dir(data_dir), mirror=mirror)


def _work(study, spec, splits, dev, url: str, *, label: str, max_trials: int | None = None, timeout: float | None = None) -> int:
    from .lr_prior import ensure_prior, uses_lr_finder
    from .objective import Objective
    from .progress import make_reporter
    from .worker import work

    with make_reporter(spec.budget.n_trials, label=label) as reporter:
        reporter.line(
            f"study {study.study_name}: {len(splits.y_train)} train / {len(splits.y_valid)} valid "
            f"images of {spec.data.dataset}, device {dev}"
        )
        lr_range = None
        if uses_lr_finder(spec):
            prior, computed = ensure_prior(study, url, spec, splits, dev, log=reporter.line)
            reporter.line(f"{prior.summary()} ({'computed here' if computed else 'read from the storage'})")
            lr_range = (prior.low, prior.high)
        objective = Objective(spec, splits, dev, reporter, lr_range=lr_range)
        return work(study, spec, objective, reporter, max_trials=max_trials, timeout=timeout)


def _print_best(study, spec) -> None:
    from .worker import counts

    c = counts(study)
    _out(f"study {study.study_name}: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed, {c['RUNNING']} running")
    try:
        best = study.best_trial
    except ValueError:
        _out("no completed trial yet")
        return
    _out(f"best trial: {best.number}  validation {spec.metric}: {best.value:.4f}")
    for k, v in best.params.items():
        _out(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")


@app.command()
def run(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")],
    storage: StorageOpt = None,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    device: DeviceOpt = "auto",
    n_trials: Annotated[int | None, typer.Option(help="override the spec's budget.n_trials", min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="override the spec's budget.timeout (seconds)", min=1)] = None,
) -> None:
    """Create the study for SPEC (or resume it) and work it in this process, then print the best trial."""
    from .spec import load_spec
    from .studies import create_study

    spec = _override_budget(load_spec(spec_path), n_trials, timeout)
    dev = _device(device)
    url, st = _storage(storage, create=True)
    splits = _load_splits(spec, data_dir, mirror)
    study, created = create_study(spec, st, resume=True, seed=spec.seed)
    print(f"{'created' if created else 'resuming'} study {spec.name} in {mask(url)}", file=sys.stderr)
    _work(study, spec, splits, dev, url, label="")
    _print_best(study, spec)


def _override_budget(spec, n_trials: int | None, timeout: float | None):
    if n_trials is None and timeout is None:
        return spec
    budget = spec.budget.model_copy(update={k: v for k, v in (("n_trials", n_trials), ("timeout", timeout)) if v is not None})
    return spec.model_copy(update={"budget": budget})


@app.command()
def worker(
    study: Annotated[str, typer.Option("--study", help="name of a study created by `run` or `study create`")],
    storage: StorageOpt = None,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    device: DeviceOpt = "auto",
    max_trials: Annotated[int | None, typer.Option(help="stop after this many trials in this process", min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds (default: the spec's)", min=1)] = None,
) -> None:
    """Attach to a study created elsewhere and work it until its budget is used.

    The spec is read back from the storage, so only the study name and the storage URL are needed.
    """
    from .studies import open_study

    dev = _device(device)
    url, st = _storage(storage, create=False)
    # Workers must not all sample the same points: seed each process differently.
    st_obj, spec = open_study(st, study, url=url, seed=None)
    splits = _load_splits(spec, data_dir, mirror)
    ran = _work(st_obj, spec, splits, dev, url, label=f"worker {os.getpid()}", max_trials=max_trials, timeout=timeout)
    _out(f"worker ran {ran} trial(s)")
    _print_best(st_obj, spec)


@app.command()
def best(
    study: Annotated[str, typer.Option("--study", help="study name")],
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
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Print the best trial's parameters and validation score; --evaluate scores it on the test split."""
    from .evaluate import TEST_ATTR, best_trial, evaluate_on_test
    from .studies import open_study

    url, st = _storage(storage, create=False)
    st_obj, spec = open_study(st, study, url=url)
    bt = best_trial(st_obj)
    out: dict[str, Any] = {
        "study": study,
        "trial": bt.number,
        "metric": spec.metric,
        "valid_value": bt.value,
        "params": bt.params,
        "config": bt.user_attrs.get("config"),
    }
    if evaluate:
        from .data import resolve_data_dir
        from .progress import make_reporter

        with make_reporter(label="evaluate") as reporter:
            out["test_evaluation"] = evaluate_on_test(
                st_obj, spec, resolve_data_dir(data_dir), _device(device), reporter, mirror=mirror, train_size=train_size
            )
    elif TEST_ATTR in st_obj.user_attrs:
        out["test_evaluation"] = st_obj.user_attrs[TEST_ATTR]
    if as_json:
        _out(json.dumps(out, indent=2, default=str))
        return
    _out(f"best trial {bt.number} of study {study}: validation {spec.metric} {bt.value:.4f}")
    for k, v in (out["config"] or bt.params).items():
        _out(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    ev = out.get("test_evaluation")
    if ev:
        _out(
            f"test {ev['metric']} (official test split, {ev['n_test']} images; retrained on {ev['n_train']} train "
            f"images): {ev['test_value']:.4f}"
        )


@app.command("lr-find")
def lr_find(
    study: Annotated[str, typer.Option("--study", help="study name (its spec must use lr: {distribution: lr_finder})")],
    storage: StorageOpt = None,
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
    device: DeviceOpt = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="PNG of the curve (default lr-find-STUDY.png)")] = None,
    stored: Annotated[bool, typer.Option("--stored", help="only show the stored prior; do not run the finder")] = False,
) -> None:
    """Run (or re-run) fastai's LR finder for a study, store the curve and suggestions, print them, plot a PNG."""
    from .lr_prior import ensure_prior, plot_prior, stored_prior, uses_lr_finder
    from .studies import open_study

    dev = _device(device)
    url, st = _storage(storage, create=False)
    st_obj, spec = open_study(st, study, url=url)
    if not uses_lr_finder(spec):
        raise UserError(
            f"study {study!r} does not search lr with the LR finder; set `lr: {{distribution: lr_finder}}` in its spec"
        )
    if stored:
        prior = stored_prior(st_obj)
        if prior is None:
            raise UserError(f"study {study!r} has no stored LR-finder prior yet; run `kmnist-tune lr-find --study {study}`")
    else:
        splits = _load_splits(spec, data_dir, mirror)
        prior, _ = ensure_prior(st_obj, url, spec, splits, dev, rerun=True, log=lambda m: print(m, file=sys.stderr, flush=True))
    for name, lr in prior.suggestions.items():
        _out(f"{name}: {lr:.4g}" + ("  <- centre" if name == prior.suggestion else ""))
    _out(f"search range: {prior.low:.4g} .. {prior.high:.4g} ({prior.width:g} decades), study key {prior.key}")
    png = plot_prior(prior, out or Path(f"lr-find-{study}.png"), title=f"{study}: LR finder ({prior.key})")
    _out(f"plot: {png}")


# -- study ------------------------------------------------------------------


@study_app.command("create")
def study_create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="sweep spec YAML")], storage: StorageOpt = None
) -> None:
    """Create a study from SPEC without running trials; attach workers with `kmnist-tune worker`."""
    from .spec import load_spec
    from .studies import create_study

    spec = load_spec(spec_path)
    url, st = _storage(storage, create=True)
    create_study(spec, st, resume=False)
    _out(f"created study {spec.name} in {url}")
    _out(f"attach workers with: kmnist-tune worker --study {spec.name} --storage '{url}'")


@study_app.command("list")
def study_list(storage: StorageOpt = None) -> None:
    """List the studies in the storage with their trial counts and best values."""
    url, st = _storage(storage, create=False)
    summaries = st.get_all_studies()
    if not summaries:
        _out(f"no studies in {url}")
        return
    import optuna

    for s in summaries:
        trials = st.get_all_trials(s._study_id, deepcopy=False)
        finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
        best_v = None
        with contextlib.suppress(ValueError):
            best_v = st.get_best_trial(s._study_id).value
        best_s = "-" if best_v is None else f"{best_v:.4f}"
        _out(f"{s.study_name}\t{finished}/{len(trials)} finished\tbest {best_s}")


@study_app.command("show")
def study_show(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a study: trial counts by state, the best trial, and its spec."""
    import yaml

    from .spec import spec_to_dict
    from .studies import open_study
    from .worker import counts

    url, st = _storage(storage, create=False)
    study, spec = open_study(st, name, url=url)
    c = counts(study)
    info: dict[str, Any] = {
        "study": name,
        "storage": url,
        "states": {k: v for k, v in c.items() if v},
        "budget": spec.budget.model_dump(exclude_none=True),
    }
    try:
        bt = study.best_trial
        info["best"] = {"trial": bt.number, "value": bt.value, "params": bt.params}
    except ValueError:
        info["best"] = None
    if as_json:
        info["spec"] = spec_to_dict(spec)
        _out(json.dumps(info, indent=2, default=str))
        return
    _out(f"study {name} in {url}")
    _out("trials: " + (", ".join(f"{v} {k.lower()}" for k, v in info["states"].items()) or "none yet"))
    if info["best"]:
        _out(f"best: trial {info['best']['trial']}, {spec.metric} {info['best']['value']:.4f}, params {info['best']['params']}")
    _out("spec:")
    _out(yaml.safe_dump(spec_to_dict(spec), sort_keys=False).rstrip())


@study_app.command("delete")
def study_delete(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    storage: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Delete a study and all its trials."""
    from .storage import require_study
    from .studies import delete_study

    url, st = _storage(storage, create=False)
    require_study(st, name, url)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"refusing to delete study {name!r} without confirmation; pass --yes")
        typer.confirm(f"delete study {name!r} and all its trials from {mask(url)}?", abort=True)
    delete_study(st, name, url)
    _out(f"deleted study {name}")


# -- data -------------------------------------------------------------------

DatasetOpt = Annotated[str, typer.Option("--dataset", help="kmnist or k49")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="npz or idx (default: every format the data set has)")]


@data_app.command("fetch")
def data_fetch(
    dataset: DatasetOpt = "kmnist",
    fmt: Annotated[str, typer.Option("--format", help="npz or idx")] = "npz",
    data_dir: DataDirOpt = None,
    mirror: MirrorOpt = None,
) -> None:
    """Download the official files that are missing or do not verify (md5)."""
    from .data import fetch, get_dataset, resolve_data_dir

    info = get_dataset(dataset)
    if fmt not in info.formats:
        raise UserError(f"--format {fmt!r}: {dataset} comes as {', '.join(info.formats)}")
    folder = resolve_data_dir(data_dir)
    last = {"name": ""}

    def progress(name: str, done: int, total: int | None) -> None:
        if name != last["name"]:
            last["name"] = name
            print(f"downloading {name}" + (f" ({total:,} bytes)" if total else ""), file=sys.stderr, flush=True)

    paths = fetch(dataset, folder, fmt=fmt, mirror=mirror, progress=progress)
    _out(f"{dataset} ({fmt}) verified in {folder}: {len(paths)} files")


@data_app.command("verify")
def data_verify(dataset: DatasetOpt = "kmnist", fmt: FormatOpt = None, data_dir: DataDirOpt = None) -> None:
    """Check the md5 of every file; exits non-zero if any is missing or corrupt."""
    from .data import get_dataset, resolve_data_dir, verify

    get_dataset(dataset)
    folder = resolve_data_dir(data_dir)
    statuses = verify(dataset, folder, fmt)
    for s in statuses:
        _out(f"{s.state:8s} {s.path.name}" + (f"  ({s.detail})" if s.detail else ""))
    bad = [s for s in statuses if s.state != "ok"]
    if bad:
        raise UserError(
            f"{len(bad)} of {len(statuses)} {dataset} files in {folder} are missing or do not verify; "
            f"run `kmnist-tune data fetch --dataset {dataset} --data-dir {folder}`"
        )


@data_app.command("info")
def data_info(dataset: DatasetOpt = "kmnist", data_dir: DataDirOpt = None) -> None:
    """Describe a data set and which of its files are present."""
    from .data import get_dataset, resolve_data_dir, resolve_mirror, verify

    info = get_dataset(dataset)
    folder = resolve_data_dir(data_dir)
    _out(f"{info.name}: {info.n_classes} classes, formats {', '.join(info.formats)}")
    _out(f"data dir: {folder}")
    _out(f"download from: {resolve_mirror(None)}/{info.name}/")
    for s in verify(dataset, folder):
        _out(f"{s.state:8s} {s.path.name}")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False) -> None:
    if version:
        _out(f"kmnist-tune {__version__}")
        raise typer.Exit()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every expected failure is one line on stderr and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _setup_quiet_libraries()
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="kmnist-tune", standalone_mode=False)
    except UserError as e:
        print(f"error: {mask(str(e))}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except typer.TyperException as e:  # usage errors: missing option, bad value
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "kmnist-tune"
        fmt = getattr(e, "format_message", None)
        print(f"error: {fmt() if fmt else e} (see `{where} --help`)", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
