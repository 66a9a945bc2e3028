"""`kmnist-tune doctor`'s checks that need no torch: the storage, the C compiler, NVIDIA's MPS, W&B, the
signing key, free disk. Each is one Check row (contract/checks.py); none prints a secret (the storage
URL is masked, the W&B key and the signing key are said to be set or not), and none waits unbounded
(the database connection has its connect_timeout, every program asked for its version a time limit).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from ..contract.checks import FAIL, OK, SKIP, WARN, Check
from ..errors import UserError, one_line
from ..masking import mask
from ..service import mps
from ..service import storage as st
from ..service.tables import ARTIFACTS, CLAIMS
from ..signing import ENV_KEY, signer
from .tracking import has_wandb_login, resolve_mode

VERSION_S = 10.0
GIB = 1 << 30
DISK_WARN, DISK_FAIL = 2 * GIB, GIB // 4


# -- storage ---------------------------------------------------------------------------------------


def storage_check(given: str | None) -> Check:
    """The study database a worker would attach to: reachable, made by Optuna, its schema current.
    Nothing is written: a database without Optuna's tables is reported, not made."""
    name = "storage"
    if not given and not os.environ.get(st.ENV_STORAGE):
        return Check(name, SKIP, f"none given (--storage URL or {st.ENV_STORAGE}); a worker needs the study's")
    try:
        url = st.resolve_url(given)
    except UserError as e:
        return Check(name, FAIL, str(e))
    shown = mask(url)
    data = {"url": shown}
    if st.is_grpc(url):
        try:
            st.open_grpc(url)
        except UserError as e:
            return Check(name, FAIL, str(e), data)
        return Check(name, OK, f"{shown}: the storage proxy answers (its database's schema is the proxy's to check)", data)
    if st.is_sqlite(url):
        path = st.sqlite_path(url)
        if path is not None and not path.exists():
            if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
                return Check(name, FAIL, f"{shown}: the folder {path.parent} does not exist or may not be written", data)
            return Check(name, WARN, f"{shown} does not exist yet: `kmnist-tune run` or `study create` makes it", data)
    try:
        storage = st.open_storage(url)
    except st.NoStudies:
        return Check(name, WARN, f"{shown} is reachable, no Optuna tables yet: run `kmnist-tune schema --storage URL`", data)
    except UserError as e:
        return Check(name, FAIL, str(e), data)
    try:
        version = storage.get_current_version()
        studies = st.study_names(storage)
        missing = _missing_tables(url) if st.backend(storage) == "postgresql" else []
    except Exception as e:  # a statement refused after the connection was made (permissions, a lock past its bound)
        return Check(name, FAIL, f"{shown}: reachable, but reading it failed: {one_line(e, 200)}", data)
    finally:
        st.release(storage)
    data.update(schema=version, studies=len(studies))
    detail = f"{shown}: reachable, Optuna schema {version} (current), {len(studies)} studies"
    if missing:
        return Check(name, WARN, f"{detail}; its tables {', '.join(missing)} are missing: run `kmnist-tune schema`", data)
    return Check(name, OK, detail, data)


def _missing_tables(url: str) -> list[str]:
    import sqlalchemy

    with st.short_engine(url) as eng, eng.connect() as conn:
        have = set(sqlalchemy.inspect(conn).get_table_names())
    return [t.name for t in (ARTIFACTS, CLAIMS) if t.name not in have]


# -- the C and C++ compilers torch.compile builds with ------------------------------------------------


def _version(exe: str) -> str | None:
    try:
        done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=VERSION_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def _find(env: str, names: tuple[str, ...]) -> tuple[str, str | None, str | None]:
    """(what was asked for, its path, its version): $env if set, else the first of `names` on the PATH."""
    asked = os.environ.get(env, "").strip()
    if asked:
        exe = shutil.which(asked)
        return f"{env}={asked}", exe, _version(exe) if exe else None
    for n in names:
        exe = shutil.which(n)
        if exe:
            return n, exe, _version(exe)
    return "/".join(names), None, None


def compiler_check() -> Check:
    """Triton builds its launcher with $CC (else gcc, clang); inductor's CPU kernels with $CXX (else
    g++). Without them torch.compile fails, and a worker trains uncompiled."""
    rows = {"c": _find("CC", ("gcc", "clang", "cc")), "c++": _find("CXX", ("g++", "clang++", "c++"))}
    data = {k: {"asked": a, "path": p, "version": v} for k, (a, p, v) in rows.items()}
    parts, missing = [], []
    for kind, (asked, path, version) in rows.items():
        if path and version:
            parts.append(f"{kind}: {version} ({path})")
        else:
            missing.append(kind)
            parts.append(f"{kind}: {asked} {'does not run' if path else 'not found'}")
    detail = "; ".join(parts)
    if missing:
        return Check("compiler", WARN, f"{detail}: torch.compile cannot build kernels, workers train uncompiled", data)
    return Check("compiler", OK, detail, data)


# -- NVIDIA's MPS, W&B, the signing key, disk ---------------------------------------------------------


def mps_check(gpus: int) -> Check:
    if gpus == 0:
        return Check("mps", SKIP, "no GPU")
    if shutil.which(mps.CONTROL) is None:
        return Check("mps", WARN, f"{mps.CONTROL} not installed: with --per-gpu K > 1 the K processes on a GPU take turns")
    daemon = mps.running_daemon()
    if daemon is not None:
        return Check("mps", OK, f"a control daemon answers at {daemon}: --per-gpu K > 1 shares each GPU through it")
    return Check("mps", OK, f"{mps.CONTROL} installed: a worker with --per-gpu K > 1 starts its own daemon")


def wandb_check() -> Check:
    given = os.environ.get("WANDB_MODE", "")
    key = bool(os.environ.get("WANDB_API_KEY"))
    installed = importlib.util.find_spec("wandb") is not None
    data = {"mode": None, "wandb_mode": given or None, "api_key_set": key, "installed": installed}
    if given and given.lower() not in ("online", "offline", "disabled"):
        return Check("wandb", WARN, f"WANDB_MODE={given!r} is not online, offline or disabled; W&B refuses it", data)
    mode = resolve_mode("auto")
    data["mode"] = mode
    if not data["installed"] and mode != "disabled":
        return Check("wandb", WARN, "wandb is not installed: trials are not tracked", data)
    login = "yes" if key else "no" + (" (a ~/.netrc login)" if has_wandb_login() else "")
    where = f": runs wait in {os.environ.get('WANDB_DIR') or './wandb'} for `wandb sync`" if mode == "offline" else ""
    return Check("wandb", OK, f"mode {mode} (WANDB_MODE {given or 'unset'}, API key set: {login}){where}", data)


def signing_check(storage: str | None) -> Check:
    """Whether KMNIST_TUNE_SIGNING_KEY is set (never what it is). Without it a shared database's
    checkpoints and records are trusted as they are: a warning where the storage is shared."""
    try:
        on = signer().on
    except UserError as e:
        return Check("signing", FAIL, str(e), {"set": True})
    if on:
        return Check("signing", OK, f"{ENV_KEY} set: workers sign what they store and refuse what is unsigned", {"set": True})
    try:
        url = st.resolve_url(storage) if storage or os.environ.get(st.ENV_STORAGE) else ""
    except UserError:
        url = ""  # the storage row says what is wrong with it
    shared = bool(url) and not st.is_sqlite(url)  # PostgreSQL or the proxy: others write there too
    detail = f"{ENV_KEY} not set: what workers store is unsigned"
    if shared:
        detail += ", and anyone who can write the shared database can change it (README: Security)"
        return Check("signing", WARN, detail, {"set": False})
    return Check("signing", OK, detail, {"set": False})


def disk_check(folder: Path) -> Check:
    """Free space where the data files and the worker's downloads go (its nearest existing folder)."""
    where = folder
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        return Check("disk", FAIL, f"cannot read the free space of {where}: {one_line(e)}")
    data = {"folder": str(folder), "free_gib": round(free / GIB, 1)}
    detail = f"{data['free_gib']} GiB free for {folder}"
    if free < DISK_FAIL:
        return Check("disk", FAIL, detail + f"; a worker needs at least {DISK_FAIL >> 20} MiB for data and checkpoints", data)
    if free < DISK_WARN:
        return Check("disk", WARN, detail + "; Kuzushiji-49 and checkpoints may not fit", data)
    return Check("disk", OK, detail, data)
