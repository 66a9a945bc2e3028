"""The command tree. Every module under cli/ adds its commands to these apps; nothing heavy is
imported here, so `--help` and the read-only commands start fast."""

from __future__ import annotations

import typer

# -h as well as --help; plain (click-style) help text, which shows boolean flags as flags.
_SETTINGS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Tune fastai ResNets on the Kuzushiji data sets with Optuna.",
    context_settings=_SETTINGS,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=True,
)
study_app = typer.Typer(help="Create, list, inspect and delete studies.", context_settings=_SETTINGS, rich_markup_mode=None)
data_app = typer.Typer(help="Download, verify and describe the data sets.", context_settings=_SETTINGS, rich_markup_mode=None)
db_app = typer.Typer(
    help="Manage who may use a PostgreSQL study database (as its owner).", context_settings=_SETTINGS, rich_markup_mode=None
)
app.add_typer(study_app, name="study")
app.add_typer(data_app, name="data")
app.add_typer(db_app, name="db")


def help_without_command(ctx: typer.Context) -> None:
    """A group called without a command prints its help and exits 0 (no empty error line)."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


study_app.callback(invoke_without_command=True)(help_without_command)
data_app.callback(invoke_without_command=True)(help_without_command)
db_app.callback(invoke_without_command=True)(help_without_command)
