"""The `kmnist-tune` command line: each command parses its options, calls one function of the
package, and prints. Everything behind a command is imported when it runs, so `--help` and the
commands that only read a study never load torch or fastai."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Annotated

import typer

from .. import __version__
from ..errors import UserError, one_line
from ..masking import install_log_masking, mask
from ..secret_files import load_secret_files
from . import data, doctor, study, sweep, users, watch  # noqa: F401  (each adds its commands to the apps)
from .apps import app
from .env_file import ENV_FILE_VAR, read_env_file
from .options import out


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
    env_file: Annotated[
        str | None,
        typer.Option(
            "--env-file",
            metavar="FILE",
            help=f"read settings and secrets from FILE instead of ./.env (also ${ENV_FILE_VAR}; set it empty to read none)",
        ),
    ] = None,
) -> None:
    # Before any command runs: the passwords, the storage URL and the signing key may come from it.
    for line in read_env_file(env_file).lines:
        print(mask(line), file=sys.stderr)
    load_secret_files()  # compose's and Kubernetes' secret files (*_FILE), after a .env that may name them
    if version:
        out(f"kmnist-tune {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:  # a bare `kmnist-tune`: its help, and no error line
        typer.echo(ctx.get_help())
        raise typer.Exit()


def _quiet_libraries() -> None:
    install_log_masking()
    if sys.warnoptions:  # -W or PYTHONWARNINGS: whoever runs us chose what to see
        return
    # Libraries' deprecation chatter about their own dependencies is not for our users...
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    # ...but a deprecated Optuna API that this package calls, or one of its own, is a bug to fix: it
    # is shown (Optuna warns with FutureWarning), and the tests fail on such a line.
    warnings.filterwarnings("default", category=FutureWarning, module=r"(optuna|kmnist_tune)(\.|$)")
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"kmnist_tune(\.|$)")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every expected failure is one line on stderr and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    args = sys.argv[1:] if argv is None else list(argv)
    # The arguments are parsed as given; everything else that reads sys.argv (W&B records it in every
    # run's metadata) sees a `--storage` password masked.
    sys.argv[1:] = [mask(a) for a in sys.argv[1:]]
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=args, prog_name="kmnist-tune", standalone_mode=False)
    except UserError as e:
        print(f"error: {mask(str(e))}", file=sys.stderr)
        return e.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except typer.TyperException as e:  # usage errors: missing option, bad value
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "kmnist-tune"
        fmt = getattr(e, "format_message", None)
        print(f"error: {mask(fmt() if fmt else str(e))} (see `{where} --help`)", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RecursionError:
        # Only data nests this deeply (a spec, or an attribute someone wrote into the shared database
        # by hand that Optuna's own JSON decoding recurses into): bad input, not a bug.
        print(
            "error: data nested too deeply to read (a spec file, or a study attribute written into the "
            "database by hand); fix or remove it",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # a user sees one line, never a traceback (KMNIST_TUNE_DEBUG=1 shows it)
        if os.environ.get("KMNIST_TUNE_DEBUG"):
            raise
        return _unexpected(e)
    return rc if isinstance(rc, int) else 0


# PostgreSQL's bounds on a wait (service/storage.py, Timeouts), by SQLSTATE: what to do about each.
_BUSY = {
    "55P03": "another session holds a lock on the study tables; try again, or ask the database owner "
    "(pg_locks shows who holds it)",
    "57014": "a statement ran past its time limit (KMNIST_TUNE_DB_STATEMENT_TIMEOUT, seconds); try again",
    "25P03": "a transaction stayed idle past its time limit; try again",
}


def _unexpected(e: Exception) -> int:
    chain, cur = [], e  # Optuna wraps a database's error in its own (StorageInternalError)
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    db = next((c for c in reversed(chain) if type(c).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "psycopg")), None)
    busy = next((c for c in chain if getattr(c, "sqlstate", None) in _BUSY), None)
    if busy is not None:
        print(f"error: the storage is busy: {_line(busy)}; {_BUSY[busy.sqlstate]}", file=sys.stderr)  # type: ignore[attr-defined]
        return 2
    if db is not None:
        text = _line(db)
        hint = "; check that the storage and its folder may be written" if "readonly" in text.replace("-", "") else ""
        print(f"error: the storage failed: {text}{hint}", file=sys.stderr)
        return 2
    print(f"error: unexpected {type(e).__name__}: {_line(e)} (a bug; KMNIST_TUNE_DEBUG=1 shows where)", file=sys.stderr)
    return 1


def _line(e: BaseException) -> str:
    # Masked whole, then cut: a URL cut before its password is masked would not be recognised.
    return mask(one_line(e, sys.maxsize))[:300]


if __name__ == "__main__":
    sys.exit(main())
