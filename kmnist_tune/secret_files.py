"""Secrets read from files, so that a container's environment holds only where they are.

`docker inspect` (and anyone who may run it) shows a container's environment, and so do Kubernetes'
pod specs: compose's and Kubernetes' secrets are files instead (/run/secrets/NAME). The CLI calls
`load_secret_files` once, first: each `NAME_FILE` of `FILE_SECRETS` becomes `NAME` in this process's
environment (where signing.py, W&B and the slot processes read it), and
`KMNIST_TUNE_STORAGE_PASSWORD_FILE` becomes the password of the password-less `KMNIST_TUNE_STORAGE`
URL. The `_FILE` variables are then removed, so the slot processes, which inherit the result, do not
read them again. Imports nothing heavy: every command starts here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import MutableMapping
from pathlib import Path

from .errors import UserError

# NAME_FILE -> NAME, and whether an empty file means "not set" (W&B: offline runs) or is a mistake.
FILE_SECRETS = {
    "KMNIST_TUNE_SIGNING_KEY_FILE": ("KMNIST_TUNE_SIGNING_KEY", False),
    "WANDB_API_KEY_FILE": ("WANDB_API_KEY", True),
}
STORAGE_ENV = "KMNIST_TUNE_STORAGE"
STORAGE_PASSWORD_FILE = "KMNIST_TUNE_STORAGE_PASSWORD_FILE"
MAX_BYTES = 64 * 1024  # a key or a password, never a file someone pointed us at by mistake


def load_secret_files(environ: MutableMapping[str, str] = os.environ) -> None:
    """Read every `*_FILE` secret named in `environ` into it (see the module's text); a file that
    cannot be read, is empty, or is set beside the variable it stands for is one UserError."""
    for file_var, (var, empty_is_unset) in FILE_SECRETS.items():
        path = environ.pop(file_var, "")
        if not path:
            continue
        if environ.get(var):
            raise UserError(f"both {var} and {file_var} are set; set one")
        value = read_secret(file_var, path, empty_ok=empty_is_unset)
        if value:
            environ[var] = value
    path = environ.pop(STORAGE_PASSWORD_FILE, "")
    if path:
        environ[STORAGE_ENV] = with_password(environ.get(STORAGE_ENV, ""), read_secret(STORAGE_PASSWORD_FILE, path))


def read_secret(var: str, path: str, *, empty_ok: bool = False) -> str:
    """The content of the secret file `path` (named by `var`), without its final line break."""
    p = Path(path)
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{var}={path} is not a file; it must name the file that holds the secret")
        if st.st_size > MAX_BYTES:
            raise UserError(f"{var}={path} is {st.st_size} bytes, too large for a secret; it must name the file that holds it")
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{var}={path}: cannot read it ({e.strerror}); check that it exists and this user may read it") from None
    except UnicodeDecodeError:
        raise UserError(f"{var}={path} is not UTF-8 text; it must hold the secret as one line") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if "\n" in value or "\r" in value:
        raise UserError(f"{var}={path} holds more than one line; it must hold the secret alone")
    if not value and not empty_ok:
        raise UserError(f"{var}={path} is empty; put the secret in it")
    return value


def with_password(url: str, password: str) -> str:
    """`url` (a PostgreSQL URL without a password) with `password` in it."""
    from sqlalchemy.engine import make_url

    if not url:
        raise UserError(f"{STORAGE_PASSWORD_FILE} is set but {STORAGE_ENV} is not: set {STORAGE_ENV} to the URL it is for")
    try:
        parsed = make_url(url)
    except Exception:  # the URL's own check (resolve_url) names what is wrong with it, masked
        raise UserError(f"{STORAGE_ENV} is not a storage URL, so {STORAGE_PASSWORD_FILE} cannot be its password") from None
    if parsed.get_backend_name() != "postgresql" or not parsed.username:
        raise UserError(
            f"{STORAGE_PASSWORD_FILE} is the password of a PostgreSQL user: {STORAGE_ENV} must name one (postgresql://USER@HOST/DB)"
        )
    if parsed.password is not None:
        raise UserError(f"{STORAGE_ENV} holds a password and {STORAGE_PASSWORD_FILE} is set too; give the password once")
    return parsed.set(password=password).render_as_string(hide_password=False)
