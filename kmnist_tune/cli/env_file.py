"""Where settings and secrets come from besides the environment: a `.env` file, read only from a place
the user chose, and never allowed to quietly change what code runs or where data is sent.

A `.env` in the folder a command runs in may have come with that folder (a cloned sweep repository, an
unpacked archive). So it is read only when it is the user's own file that nobody else may write, and
even then it cannot set what Python or the dynamic loader import, W&B's or a download's endpoint,
proxies or certificate stores: those keys are left out with one line. A file the user names
(`--env-file FILE` or `KMNIST_TUNE_ENV_FILE=FILE`) is taken whole, and the keys of those kinds it sets
are named in one line. Where a file sets where studies, artifacts or data live, that is said too.
The real environment always wins (python-dotenv, override=False).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..masking import mask

ENV_FILE_VAR = "KMNIST_TUNE_ENV_FILE"  # a file to read instead of ./.env; set and empty: read none
DEFAULT_NAME = ".env"

# What code runs: Python's and the loader's import settings, compilers and the caches of compiled code
# that torch.compile loads, shell start-up files, matplotlib's configuration (its backend is a module).
_RUNS_CODE = re.compile(r"(PYTHON.*|LD_.*|DYLD_.*|PATH|CC|CXX|TORCHINDUCTOR_.*|TRITON_.*|BASH_ENV|ENV|MPLCONFIGDIR|MPLBACKEND)")
# Where data (and the W&B API key with it) is sent, whom TLS trusts on the way, and what files are read as secrets.
_SENDS_ELSEWHERE = re.compile(
    r"(WANDB_BASE_URL|WANDB_HOST|KMNIST_TUNE_MIRROR|(HTTPS?|ALL|NO)_PROXY|SSL_CERT_(FILE|DIR)|REQUESTS_CA_BUNDLE"
    r"|CURL_CA_BUNDLE|PG(HOST|HOSTADDR|PORT|SERVICE|SERVICEFILE|PASSFILE|SSL.*|SYSCONFDIR)"
    # A secret read from a file (secret_files.py): a folder's .env naming ~/.ssh/id_rsa as the storage
    # password, beside a storage URL of its own, would send that file's text to its server.
    r"|.*_FILE)",
    re.IGNORECASE,
)
# Where studies, artifacts, data and W&B runs live: taken from any file, and said.
_LOCATIONS = frozenset(
    {"KMNIST_TUNE_STORAGE", "KMNIST_TUNE_ARTIFACTS", "KMNIST_TUNE_DATA", "WANDB_DIR", "WANDB_ENTITY", "WANDB_PROJECT"}
)


def guarded(key: str) -> bool:
    """A key a `.env` in the working directory may not set: it chooses what code runs or where data goes."""
    return bool(_RUNS_CODE.fullmatch(key) or _SENDS_ELSEWHERE.fullmatch(key))


@dataclass
class EnvFileResult:
    """What reading a `.env` did: the file (None: none read) and the lines to print."""

    path: Path | None = None
    lines: list[str] = field(default_factory=list)


def _names(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys))


def choose(explicit: str | None) -> tuple[Path | None, bool]:
    """The file to read and whether the user named it: `explicit` (--env-file), else $KMNIST_TUNE_ENV_FILE
    (empty: none), else ./.env."""
    if explicit is None:
        explicit = os.environ.get(ENV_FILE_VAR)
        if explicit == "":
            return None, True
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(f"env file {explicit!r} does not exist or is not a file; give an existing file or leave it out")
        return path, True
    return Path(DEFAULT_NAME), False


def folder_file_problem(path: Path) -> str | None:
    """Why a `.env` found in the working directory is not the user's own to trust (None: it is)."""
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"it belongs to user id {st.st_uid}, not you"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        return f"other users may write it (mode {mode:o})"
    return None


def read_env_file(explicit: str | None = None) -> EnvFileResult:
    """Load the chosen `.env` into os.environ (never over what is set) and return what to tell the user."""
    path, named = choose(explicit)
    result = EnvFileResult()
    if path is None or not (named or path.is_file()):
        return result
    where = str(path.resolve())
    try:
        if not named:
            problem = folder_file_problem(path)
            if problem is not None:
                result.lines.append(
                    f"warning: {where} is not read: {problem}; `chmod go-w .env` if it is yours, or pass --env-file FILE"
                )
                return result
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o044:
            result.lines.append(f"warning: {where} can be read by other users (mode {mode:o}); `chmod 600 {path}`")
        from dotenv import dotenv_values

        values = {k: v for k, v in dotenv_values(path).items() if v is not None}
    except (OSError, UnicodeDecodeError) as e:
        result.lines.append(f"warning: {where} is not read ({type(e).__name__}); check its permissions and encoding")
        return result
    fresh = {k: v for k, v in values.items() if k not in os.environ}
    risky = {k for k in fresh if guarded(k)}
    if risky and not named:
        result.lines.append(
            f"warning: {_names(risky)} from {where} ignored: a .env in the folder a command runs in may have come with "
            "the folder, and these choose what code runs or where data goes; set them in your environment or pass "
            "--env-file FILE"
        )
        fresh = {k: v for k, v in fresh.items() if k not in risky}
    elif risky:
        result.lines.append(f"note: {where} sets {_names(risky)}")
    located = {k: v for k, v in fresh.items() if k in _LOCATIONS}
    if located and not named:
        result.lines.append(f"note: from {where}: " + ", ".join(f"{k}={mask(v)}" for k, v in sorted(located.items())))
    os.environ.update(fresh)
    result.path = path
    return result
