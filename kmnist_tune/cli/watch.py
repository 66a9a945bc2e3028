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
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            help="another Host name it answers to, NAME or NAME:PORT (no port: any); repeatable "
            "(env KMNIST_TUNE_DASHBOARD_ALLOW_HOSTS, comma-separated). It always answers to --host:--port, "
            "and to localhost, 127.0.0.1 and [::1] on --port when bound to loopback or 0.0.0.0",
            metavar="NAME[:PORT]",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            envvar="KMNIST_TUNE_DASHBOARD_WORKERS",
            help="gunicorn worker processes, a few threads each (env KMNIST_TUNE_DASHBOARD_WORKERS); "
            "without gunicorn installed, Python's development server serves in this process",
            min=1,
            max=64,
        ),
    ] = 1,
) -> None:
    """Serve optuna-dashboard over the study storage (http://HOST:PORT/dashboard).

    It answers only requests whose Host header names this server (others get 403: no web page can
    reach it by DNS rebinding) and sends no CORS header. It has no login: whoever reaches the port may
    do what its database role may (the dashboard role of storage/initdb only reads), so put it behind
    an authenticating proxy whenever more than this host can reach it.
    """
    import os

    from ..observe.dashboard import ENV_ALLOW_HOSTS, hosts_line, serve, server_choice
    from ..service.artifacts import describe_store
    from ..service.storage import Timeouts, describe, open_storage

    names = [*(allow_host or []), *os.environ.get(ENV_ALLOW_HOSTS, "").split(",")]
    answers = hosts_line(host, port, names)  # a bad name stops it before the storage is opened
    url = storage_url(storage)
    # The dashboard never holds a transaction open on purpose: one left idle in it (a client gone
    # mid-request) is ended by the server after a minute, with the locks it held.
    timeouts = Timeouts.from_env(idle_in_transaction_s=60)
    st = open_storage(url, timeouts=timeouts)
    where = describe_store(st, artifacts)
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
    chosen = server_choice(workers)
    if chosen.note is not None:
        say(chosen.note)
    ready = (
        f"optuna-dashboard for {describe(st)} on http://{shown}:{port}/dashboard ({chosen.label}; artifacts in {where}; "
        f"Host {answers}); no login: behind an authenticating proxy if others can reach it; Ctrl-C to stop"
    )
    reopen = lambda: open_storage(url, timeouts=timeouts)  # noqa: E731  (each gunicorn worker's own)
    serve(st, host, port, artifacts, names, on_ready=lambda: say(ready), workers=workers, reopen=reopen)


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
