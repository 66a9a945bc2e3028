"""The `kmnist-tune` command line: each command parses its options, calls one function of the
package, and prints. Everything behind a command is imported when it runs, so `--help` and the
commands that only read a study never load torch or fastai."""

from __future__ import annotations

import logging
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .. import __version__
from ..errors import UserError, one_line
from ..masking import install_log_masking, mask
from ..secret_files import load_secret_files
from . import data, study, sweep, users, watch  # noqa: F401  (each adds its commands to the apps)
from .apps import app
from .options import out


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
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


def _read_dotenv() -> None:
    """Settings and secrets from `.env` in the working directory (python-dotenv), as the README and
    compose promise; the real environment always wins. A `.env` that other users can read holds
    passwords they can read too: said, not refused (the user may share the machine with no one)."""
    path = Path(".env")
    try:
        if not path.is_file():
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o044:
            print(f"warning: {path.resolve()} can be read by other users (mode {mode:o}); `chmod 600 .env`", file=sys.stderr)
        from dotenv import load_dotenv

        load_dotenv(path, override=False)
    except (OSError, UnicodeDecodeError) as e:
        print(f"warning: {path.resolve()} is not read ({type(e).__name__}); check its permissions and encoding", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: every expected failure is one line on stderr and a non-zero exit."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    _read_dotenv()
    args = sys.argv[1:] if argv is None else list(argv)
    # The arguments are parsed as given; everything else that reads sys.argv (W&B records it in every
    # run's metadata) sees a `--storage` password masked.
    sys.argv[1:] = [mask(a) for a in sys.argv[1:]]
    command = typer.main.get_command(app)
    try:
        load_secret_files()  # compose's and Kubernetes' secret files (*_FILE) into this process's environment
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


def _unexpected(e: Exception) -> int:
    chain, cur = [], e  # Optuna wraps a database's error in its own (StorageInternalError)
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    db = next((c for c in reversed(chain) if type(c).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "psycopg")), None)
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
