"""`kmnist-tune study ...`: create, list, show and delete studies. Only `create` and `delete` write."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from ..errors import UserError
from ..masking import has_password, mask
from .apps import study_app
from .options import JsonOpt, StorageOpt, StudyArg, StudyOpt, out, out_json, out_lines, say, storage_url, study_name

if TYPE_CHECKING:  # the commands import what they use when they run
    import optuna

    from ..contract.spec import SweepSpec

T = TypeVar("T")


@study_app.command("create")
def study_create(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="sweep spec YAML")],
    storage: StorageOpt = None,
    warm: Annotated[
        str | None,
        typer.Option(
            "--warm-start", metavar="STUDY", help="queue the best configurations of this earlier study (same storage) first"
        ),
    ] = None,
    top: Annotated[
        int | None, typer.Option("--top", metavar="K", help="with --warm-start: how many of its best (default 5)", min=1)
    ] = None,
) -> None:
    """Create a study from SPEC without running trials; attach workers with `kmnist-tune worker`."""
    from ..contract.load import load_spec
    from ..service.studies import create_warm

    if top is not None and warm is None:
        raise UserError(f"--top {top} only applies with --warm-start STUDY; add --warm-start or leave --top out")
    top = 5 if top is None else top

    spec = load_spec(spec_path)
    for note in spec.notes:
        say(note)
    url = storage_url(storage)
    lines = create_warm(spec, url, warm, top)
    out(f"created study {spec.name} in {url}")
    out_lines(lines)
    if has_password(url):  # never print it, and keep it out of other users' `ps`: the environment
        out(f"attach workers with: KMNIST_TUNE_STORAGE='{mask(url)}' kmnist-tune worker --study {spec.name}")
        out("  (put the real password where *** stands, or export KMNIST_TUNE_STORAGE from a .env file)")
    else:
        out(f"attach workers with: kmnist-tune worker --study {spec.name} --storage '{url}'")


@study_app.command("list")
def study_list(storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """List the studies in the storage with their trial counts and best values."""
    from ..service.storage import NoStudies, open_storage
    from ..service.studies import list_studies

    url = storage_url(storage)
    try:
        studies = list_studies(open_storage(url))
    except NoStudies:
        studies = []
    if as_json:
        out_json([asdict(s) for s in studies])
    elif not studies:
        out(f"no studies in {url}")
    for s in [] if as_json else studies:
        problem = f"\t{s.problem}" if s.problem else ""  # a record of this study that does not read: said in its row
        out(f"{s.study}\t{listed_progress(s.finished, s.budget)}\tbest {'-' if s.best is None else f'{s.best:.4f}'}{problem}")


def listed_progress(finished: int, budget: dict | None) -> str:
    """`14/15 finished` against a trial budget; `14 finished (until stopped)` without one."""
    if budget is None:
        return f"{finished} finished"
    if budget["n_trials"] is not None:
        return f"{finished}/{budget['n_trials']} finished"
    return f"{finished} finished ({'until stopped' if budget['until_stopped'] else 'no trial limit'})"


@study_app.command("show")
def study_show(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
    as_wandb: Annotated[bool, typer.Option("--as-wandb", help="print the study's spec as a W&B sweep file")] = False,
) -> None:
    """Show a study: trial counts by state, the best trial, who runs what, and its spec."""
    import yaml

    from ..contract.spec import spec_to_dict
    from ..observe.summary import show_lines
    from ..service.studies import read_summary, wandb_sweep

    if as_wandb:
        config, notes = wandb_sweep(storage_url(storage), study_name(study_arg, study))
        if as_json:
            out_json({"sweep": config, "not_in_wandb": notes})
            return
        out(f"# W&B sweep file of kmnist-tune study {config['name']}: `kmnist-tune run` reads back its search")
        out("# (method, metric, parameters, early_terminate, run_cap, under the names the study was made with)")
        if notes:
            out("# W&B's sweep config has no key for these settings of the study; reading this file back")
            out("# gives each its default, so add them to the file (kmnist-tune's own keys) to keep them:")
            out_lines([f"#   {n}" for n in notes])
        out(yaml.safe_dump(config, sort_keys=False).rstrip())
        return
    summary, spec = read_summary(storage_url(storage), study_name(study_arg, study))
    for line in summary.withheld:  # on stderr: the JSON on stdout stays one document
        say(line)
    # The spec with the study's budget as it is now (`study extend` changes it; the stored spec keeps the first).
    shown = {**spec_to_dict(spec), "budget": {k: summary.budget[k] for k in ("n_trials", "timeout") if summary.budget[k]}}
    if as_json:
        out_json({**summary.as_json(), "spec": shown})
        return
    out_lines(show_lines(summary))
    out("spec:")
    out(yaml.safe_dump(shown, sort_keys=False).rstrip())


@study_app.command("delete")
def study_delete(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
) -> None:
    """Delete a study and all its trials."""
    from ..service.storage import describe, open_storage, require_study
    from ..service.studies import delete_study

    name = study_name(study_arg, study)
    st = open_storage(storage_url(storage))
    require_study(st, name)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"refusing to delete study {name!r} without confirmation; pass --yes")
        typer.confirm(f"delete study {name!r} and all its trials from {describe(st)}?", abort=True)
    removed = delete_study(st, name)
    out(f"deleted study {name}" + (f" and its {removed} artifact(s)" if removed else ""))


def _change(
    study_arg: str | None, study: str | None, storage: str | None, change: Callable[[optuna.Study, SweepSpec], T]
) -> tuple[str, T]:
    """Open the named study, apply `change(study, spec)`, and write its dashboard note again."""
    from ..observe.notes import refresh_study_note
    from ..service.studies import read_study

    name = study_name(study_arg, study)
    st, spec = read_study(storage_url(storage), name)
    result = change(st, spec)
    refresh_study_note(st)
    return name, result


@study_app.command("extend")
def study_extend(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    n_trials: Annotated[int | None, typer.Option("--n-trials", metavar="N", help="the new total of trials", min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="the new per-worker timeout, seconds", min=1)] = None,
) -> None:
    """Set a study's budget: the new total of trials (and/or the timeout). Running workers take it up
    before their next claim; `run SPEC` or `worker` work the new trials."""
    from ..service.studies import set_budget

    if n_trials is None and timeout is None:
        raise UserError("give the new total with --n-trials N (and/or --timeout S)")
    name, budget = _change(study_arg, study, storage, lambda st, spec: set_budget(st, spec, n_trials, timeout))
    out(f"study {name}: budget {budget.describe()}")


@study_app.command("stop")
def study_stop(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    storage: StorageOpt = None,
    now: Annotated[
        bool, typer.Option("--now", help="also hand running trials back (failed as interrupted, queued again)")
    ] = False,
) -> None:
    """Stop a study: workers on every host claim no more trials and exit; running trials finish (or,
    with --now, are handed back at their next heartbeat). `study resume` undoes it."""
    from ..service.studies import stop_study

    name, stopped = _change(study_arg, study, storage, lambda st, _: stop_study(st, now=now))
    out(f"study {name} {stopped.describe()}; workers claim no more trials" + ("; running ones are handed back" if now else ""))


@study_app.command("resume")
def study_resume(study_arg: StudyArg = None, study: StudyOpt = None, storage: StorageOpt = None) -> None:
    """Let workers claim a stopped study's trials again (start workers, or `run SPEC`, to work them)."""
    from ..service.studies import resume_study

    name, lifted = _change(study_arg, study, storage, lambda st, _: resume_study(st))
    out(f"study {name} resumed" + (f" (it was {lifted.describe()})" if lifted else " (it was not stopped)"))
