"""Commands that show a study: the dashboard and the report. Neither imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .apps import app
from .options import StorageOpt, StudyArg, StudyOpt, out, say, storage_url, study_name


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback unless you mean to expose it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on", min=1, max=65535)] = 8080,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts",
            help="artifact folder or s3://bucket/prefix (env KMNIST_TUNE_ARTIFACTS; "
            "default: the study database, or beside the SQLite file)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve optuna-dashboard over the study storage (http://HOST:PORT/dashboard)."""
    from ..observe.dashboard import serve
    from ..service.artifacts import describe_store
    from ..service.storage import describe, open_storage

    st = open_storage(storage_url(storage))
    where = describe_store(st, artifacts)
    say(f"optuna-dashboard for {describe(st)} on http://{host}:{port}/dashboard (artifacts in {where}); Ctrl-C to stop")
    serve(st, host, port, artifacts)


@app.command()
def report(
    study_arg: StudyArg = None,
    study: StudyOpt = None,
    folder: Annotated[
        Path | None, typer.Option("--out", help="folder for the PNG plots and index.html (default report-STUDY)")
    ] = None,
    storage: StorageOpt = None,
) -> None:
    """Write PNG plots (history, importances, LR finder, top trials per epoch, batch halving) and an HTML page."""
    from ..observe.report import write_report
    from ..service.studies import read_study

    name = study_name(study_arg, study)
    index = write_report(*read_study(storage_url(storage), name), folder or Path(f"report-{name}"))
    out(f"report: {index}")
