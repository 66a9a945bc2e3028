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
GpusOpt = Annotated[
    str,
    typer.Option(
        "--gpus",
        help="all, none, auto (all if any), or indices like 0,2: one worker "
        "process per GPU slot, pinned with CUDA_VISIBLE_DEVICES",
    ),
]
PerGpuOpt = Annotated[
    int, typer.Option("--per-gpu", help="trial processes per GPU (small ResNets leave a GPU mostly idle)", min=1)
]


def _out(text: str = "") -> None:
    print(mask(text), flush=True)


def _setup_quiet_libraries() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
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


def _work(
    study, storage, spec, splits, dev, url: str, *, label: str, max_trials: int | None = None, timeout: float | None = None
) -> int:
    """Work the study in this process: the LR prior first (once per study), then the trial loop."""
    from .lr_prior import ensure_prior, uses_lr_finder
    from .objective import Objective
    from .progress import make_reporter
    from .worker import StopFlag, work

    with make_reporter(spec.budget.n_trials, label=label) as reporter:
        stop = StopFlag(log=reporter.line)
        stop.install()
        reporter.line(
            f"study {study.study_name}: {len(splits.y_train)} train / {len(splits.y_valid)} valid "
            f"images of {spec.data.dataset}, device {dev}"
        )
        lr_range = None
        if uses_lr_finder(spec):
            prior, computed = ensure_prior(study, storage, url, spec, splits, dev, log=reporter.line)
            reporter.line(f"{prior.summary()} ({'computed here' if computed else 'read from the storage'})")
            if computed:
                _attach_prior(study, storage, url, prior, reporter.line)
            lr_range = (prior.low, prior.high)
        objective = Objective(spec, splits, dev, reporter, lr_range=lr_range, stop_requested=lambda: stop.requested)
        ran = work(
            study,
            spec,
            objective,
            reporter,
            storage=storage,
            url=url,
            stop=stop,
            max_trials=max_trials,
            timeout=timeout,
            max_retry=spec.workers.max_retry,
        )
        if stop.requested:
            reporter.line(f"stopped by {stop.reason}")
        return ran


def _attach_prior(study, storage, url: str, prior, say) -> None:
    """The LR-finder evidence on the study for optuna-dashboard: the curve and a note."""
    import tempfile

    from .dashboard import artifact_store
    from .tracking import attach_prior

    try:
        with tempfile.TemporaryDirectory() as tmp:
            attach_prior(study, storage, prior, artifact_store(url), Path(tmp))
    except Exception as e:  # evidence, not results: the sweep goes on without it
        say(f"could not attach the LR-finder plot to the study ({type(e).__name__}: {' '.join(str(e).split())[:120]})")


def _open_for_work(url: str, name: str, *, log=None):
    """The worker's storage (heartbeats, retries) and the study with its spec."""
    from .storage import open_storage, open_worker_storage
    from .studies import open_study, stored_spec

    probe = open_storage(url, create=False)
    spec = stored_spec(name, probe.get_study_user_attrs(require_study_id(probe, name, url)))
    if hasattr(probe, "engine"):
        probe.engine.dispose()  # its pooled connection would be a third one held by this worker
    storage = open_worker_storage(
        url,
        heartbeat_interval=spec.workers.heartbeat_interval,
        grace_period=spec.workers.grace_period,
        max_retry=spec.workers.max_retry,
        log=log,
    )
    # Workers must not all sample the same points: each process seeds its sampler differently.
    study, spec = open_study(storage, name, url=url, seed=None)
    return storage, study, spec


def require_study_id(storage, name: str, url: str) -> int:
    from .storage import require_study

    return require_study(storage, name, url)


def _slots(gpus: str, per_gpu: int):
    from .slots import make_slots, parse_gpus, visible_gpu_count

    return make_slots(parse_gpus(gpus, visible_gpu_count()), per_gpu)


def _supervise_slots(name: str, url: str, slots, passthrough: list[str]) -> int:
    from .slots import supervise

    def log(m: str) -> None:
        print(mask(m), file=sys.stderr, flush=True)

    env = dict(os.environ, KMNIST_TUNE_STORAGE=url)  # the URL (and its password) stays out of `ps`
    args = ["worker", "--study", name, "--in-process", *passthrough]
    return supervise(args, slots, env, log)


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
    gpus: GpusOpt = "auto",
    per_gpu: PerGpuOpt = 1,
    n_trials: Annotated[int | None, typer.Option(help="override the spec's budget.n_trials", min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="override the spec's budget.timeout (seconds)", min=1)] = None,
) -> None:
    """Create the study for SPEC (or resume it), work it with local workers, then print the best trial.

    One CPU slot works in this process; GPU slots (--gpus, --per-gpu) each get a pinned worker process.
    """
    from .spec import load_spec
    from .studies import create_study

    slots = _slots(gpus, per_gpu)
    spec = _override_budget(load_spec(spec_path), n_trials, timeout)
    url, st = _storage(storage, create=True)
    splits = _load_splits(spec, data_dir, mirror)
    study, created = create_study(spec, st, resume=True, seed=spec.seed)
    print(f"{'created' if created else 'resuming'} study {spec.name} in {mask(url)}", file=sys.stderr)
    if len(slots) == 1 and slots[0].gpu is None:
        storage_w, study, spec = _open_for_work(url, spec.name)
        _work(study, storage_w, spec, splits, _device("cpu"), url, label="")
    else:
        passthrough = [*(["--data-dir", str(data_dir)] if data_dir else []), *(["--mirror", mirror] if mirror else [])]
        rc = _supervise_slots(spec.name, url, slots, passthrough)
        if rc:
            raise UserError(f"a worker process failed (exit status {rc}); see its lines above")
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
    gpus: GpusOpt = "auto",
    per_gpu: PerGpuOpt = 1,
    max_trials: Annotated[int | None, typer.Option(help="stop after this many trials in each process", min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds (default: the spec's)", min=1)] = None,
    in_process: Annotated[bool, typer.Option("--in-process", hidden=True, help="be one slot (used by the supervisor)")] = False,
) -> None:
    """Attach to a study created elsewhere and work it until its budget is used.

    The spec is read back from the storage, so only the study name and the storage URL are needed.
    One process per GPU slot, pinned with CUDA_VISIBLE_DEVICES; --gpus none trains on the CPU.
    """
    url = _resolve(storage)
    if not in_process:
        slots = _slots(gpus, per_gpu)
        if len(slots) > 1 or slots[0].gpu is not None:
            _open_for_work(url, study)  # fail here, once, on an unknown study or a bad URL
            passthrough = [
                *(["--data-dir", str(data_dir)] if data_dir else []),
                *(["--mirror", mirror] if mirror else []),
                *(["--max-trials", str(max_trials)] if max_trials else []),
                *(["--timeout", str(timeout)] if timeout else []),
            ]
            rc = _supervise_slots(study, url, slots, passthrough)
            if rc:
                raise UserError(f"a worker process failed (exit status {rc}); see its lines above")
            return
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    from .worker import WorkerIdentity

    ident = WorkerIdentity()
    label = f"{ident.host}:{ident.pid} {ident.gpu}"
    storage_w, st_obj, spec = _open_for_work(url, study, log=lambda m: print(f"[{label}] {mask(m)}", file=sys.stderr))
    splits = _load_splits(spec, data_dir, mirror)
    ran = _work(st_obj, storage_w, spec, splits, dev, url, label=label, max_trials=max_trials, timeout=timeout)
    stalled = getattr(storage_w, "stalled_s", 0.0)
    _out(
        f"worker ran {ran} trial(s)"
        + (f"; waited {stalled:.1f} s for the storage" if stalled else "")
        + (f" [{label}]" if in_process else "")
    )
    if not in_process:  # under a supervisor, the supervisor prints the study's summary once
        _print_best(st_obj, spec)


def _resolve(storage: str | None) -> str:
    from .storage import resolve_url

    return resolve_url(storage)


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
        prior, _ = ensure_prior(
            st_obj, st, url, spec, splits, dev, rerun=True, log=lambda m: print(m, file=sys.stderr, flush=True)
        )
    if not stored:
        _attach_prior(st_obj, st, url, prior, lambda m: print(m, file=sys.stderr))
    for name, lr in prior.suggestions.items():
        _out(f"{name}: {lr:.4g}" + ("  <- centre" if name == prior.suggestion else ""))
    _out(f"search range: {prior.low:.4g} .. {prior.high:.4g} ({prior.width:g} decades), study key {prior.key}")
    png = plot_prior(prior, out or Path(f"lr-find-{study}.png"), title=f"{study}: LR finder ({prior.key})")
    _out(f"plot: {png}")


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback unless you mean to expose it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on", min=1, max=65535)] = 8080,
    artifacts: Annotated[
        Path | None,
        typer.Option("--artifacts", help="artifact folder (env KMNIST_TUNE_ARTIFACTS; default: beside the SQLite file)"),
    ] = None,
) -> None:
    """Serve optuna-dashboard over the study storage (http://HOST:PORT/dashboard)."""
    from .dashboard import artifact_dir, serve

    url, st = _storage(storage, create=False)
    print(
        f"optuna-dashboard for {mask(url)} on http://{host}:{port}/dashboard (artifacts in {artifact_dir(url, artifacts)}); "
        "Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    serve(st, url, host, port, artifacts)


@app.command()
def report(
    study: Annotated[str, typer.Option("--study", help="study name")],
    out: Annotated[Path, typer.Option("--out", help="folder for the PNG plots and index.html")],
    storage: StorageOpt = None,
) -> None:
    """Write PNG plots (history, importances, LR finder, top trials per epoch, batch halving) and an HTML page."""
    from .report import write_report
    from .studies import open_study

    url, st = _storage(storage, create=False)
    st_obj, spec = open_study(st, study, url=url)
    index = write_report(st_obj, spec, out)
    _out(f"report: {index}")


@app.command("storage-proxy")
def storage_proxy(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback unless you mean to expose it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on", min=1, max=65535)] = 13000,
) -> None:
    """Serve Optuna's gRPC storage proxy in front of PostgreSQL, for hundreds of workers.

    Workers then use --storage grpc://HOST:PORT and hold no database connection of their own.
    """
    import optuna

    from .storage import is_grpc

    url, st = _storage(storage, create=True)
    if is_grpc(url):
        raise UserError("--storage for the proxy must be a database URL, not grpc://")
    print(f"storage proxy for {mask(url)} on grpc://{host}:{port} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    optuna.storages.run_grpc_proxy_server(st, host=host, port=port)


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
    info["workers"], info["retried"] = _by_worker(study)
    if as_json:
        info["spec"] = spec_to_dict(spec)
        _out(json.dumps(info, indent=2, default=str))
        return
    _out(f"study {name} in {url}")
    _out("trials: " + (", ".join(f"{v} {k.lower()}" for k, v in info["states"].items()) or "none yet"))
    if info["best"]:
        _out(f"best: trial {info['best']['trial']}, {spec.metric} {info['best']['value']:.4f}, params {info['best']['params']}")
    if info["workers"]:
        _out("workers (host gpu: running trials; finished, failed):")
        for w in info["workers"]:
            running = ", ".join(str(n) for n in w["running"]) or "-"
            _out(f"  {w['host']} {w['gpu']}: running {running}; {w['finished']} finished, {w['failed']} failed")
    for r in info["retried"]:
        _out(f"retried: trial {r['trial']} is a retry of trial {r['retry_of']} ({r['state'].lower()})")
    _out("spec:")
    _out(yaml.safe_dump(spec_to_dict(spec), sort_keys=False).rstrip())


def _by_worker(study) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Trials grouped by the worker host and GPU that ran them, and the retried ones."""
    from optuna.trial import TrialState

    groups: dict[tuple[str, str], dict[str, Any]] = {}
    retried = []
    for t in study.get_trials(deepcopy=False):
        w = t.user_attrs.get("worker")
        if w:
            g = groups.setdefault(
                (w["host"], str(w["gpu"])), {"host": w["host"], "gpu": str(w["gpu"]), "running": [], "finished": 0, "failed": 0}
            )
            if t.state == TrialState.RUNNING:
                g["running"].append(t.number)
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                g["finished"] += 1
            elif t.state == TrialState.FAIL:
                g["failed"] += 1
        if "retry_of" in t.user_attrs and t.user_attrs.get("worker"):
            retried.append({"trial": t.number, "retry_of": t.user_attrs["retry_of"], "state": t.state.name})
    return sorted(groups.values(), key=lambda g: (g["host"], g["gpu"])), retried


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
