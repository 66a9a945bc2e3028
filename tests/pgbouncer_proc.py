"""PgBouncer's image run without Docker: its entry point (storage/pgbouncer/entrypoint.sh) and the
machine's own PgBouncer 1.18 (Debian's package, the one the image installs), with a container's
environment as compose or a pod spec gives it.

What a container gives it is given here too: a memory-only run folder (a fresh folder in /dev/shm,
a tmpfs, for the compose tmpfs or the pod's in-memory emptyDir), a non-root user (postgres: PgBouncer
refuses root) and, when the tests run as root, a read-only root filesystem (a private mount namespace
whose / is remounted read-only, as `read_only: true` / `readOnlyRootFilesystem` do).

The image's files (the entry point, pool.ini) are copied out of the checkout first, into a folder every
user may read, as the image holds them: the postgres user cannot read a checkout that only its owner
may enter (a clone in a home of mode 0700)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO
from helpers import free_port, wait_until

IMAGE = REPO / "storage" / "pgbouncer"
DOCKERFILE = IMAGE / "Dockerfile"
MEMORY = Path("/dev/shm")  # a tmpfs on Linux, as the container's run folder is


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instr, _, args = pending.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        pending = ""
    return out


def image_files() -> dict[str, Path]:
    """Path in the image -> the file of storage/pgbouncer/ that the Dockerfile COPYs there."""
    out = {}
    for instr, args in dockerfile_instructions():
        if instr == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            (src, dest) = words
            out[dest] = IMAGE / src
    return out


def entrypoint() -> Path:
    (args,) = [a for i, a in dockerfile_instructions() if i == "ENTRYPOINT"]
    (inside,) = json.loads(args)
    return image_files()[inside]


def default_pool_ini() -> str:
    """Where the entry point reads pool.ini unless PGBOUNCER_POOL_INI says otherwise."""
    m = re.search(r"PGBOUNCER_POOL_INI:-([^}]+)\}", entrypoint().read_text())
    assert m, "the entry point has no default for PGBOUNCER_POOL_INI"
    return m.group(1)


@dataclass
class PgBouncer:
    proc: subprocess.Popen[bytes]
    port: int
    run_dir: Path
    log: Path
    read_only_root: bool
    env: dict[str, str] = field(repr=False)
    image_dir: Path | None = None  # the copies of the image's files it runs from

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT, the image's STOPSIGNAL: PgBouncer's safe shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.image_dir is not None:
            shutil.rmtree(self.image_dir, ignore_errors=True)
        return int(self.proc.returncode)


def image_copy(pool_ini: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """The image's files (the Dockerfile's COPYs; pool.ini replaced by `pool_ini` when given) copied
    into a fresh folder that every user may read (a memory-backed one: pytest's and the checkout's
    folders may be closed to other users). Returns the folder and path in the image -> copy."""
    folder = Path(tempfile.mkdtemp(prefix="kt-pgbouncer-image-", dir=MEMORY))
    folder.chmod(0o755)
    copies: dict[str, Path] = {}
    for inside, source in image_files().items():
        if pool_ini is not None and source.name == "pool.ini":
            source = pool_ini
        copy = folder / source.name
        shutil.copyfile(source, copy)
        copy.chmod(0o755 if os.access(source, os.X_OK) else 0o644)
        copies[inside] = copy
    return folder, copies


def start_pgbouncer(container_env: dict[str, str], log: Path, *, pool_ini: Path | None = None) -> PgBouncer:
    """Run the image's entry point with `container_env` (the service's or pod's environment, the
    database's host and port already this machine's); it listens on 127.0.0.1 on a free port. The
    pool.ini the image holds (the Dockerfile's COPY) is read from storage/pgbouncer/ unless given."""
    image_dir, files = image_copy(pool_ini)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **container_env}
    inside_ini = env.get("PGBOUNCER_POOL_INI", default_pool_ini())
    if pool_ini is not None:
        env["PGBOUNCER_POOL_INI"] = str(next(c for c in files.values() if c.name == pool_ini.name))
    else:
        env["PGBOUNCER_POOL_INI"] = str(files.get(inside_ini) or inside_ini)
    run_dir = Path(tempfile.mkdtemp(prefix="kt-pgbouncer-", dir=MEMORY))
    env["PGBOUNCER_RUN_DIR"] = str(run_dir)
    port = free_port()
    env.update(PGBOUNCER_LISTEN_ADDR="127.0.0.1", PGBOUNCER_LISTEN_PORT=str(port))
    (inside_script,) = json.loads(next(a for i, a in dockerfile_instructions() if i == "ENTRYPOINT"))
    script = str(files[inside_script])
    read_only_root = os.geteuid() == 0
    if read_only_root:
        # PgBouncer refuses root: the postgres user, as scripts/pgbouncer-local does. setpriv execs in
        # place, so the process the test holds is the entry point and then PgBouncer itself.
        shutil.chown(run_dir, "postgres", "postgres")
        argv = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount -o remount,bind,ro / && exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$0"',
            script,
        ]
    else:
        argv = [script]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT)
    bouncer = PgBouncer(proc, port, run_dir, log, read_only_root, env, image_dir)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 30, f"PgBouncer to listen on 127.0.0.1:{port}", [proc], every=0.1)
    except AssertionError as e:
        bouncer.stop()
        raise AssertionError(f"{e}; the entry point's output:\n{bouncer.output()}") from None
    return bouncer
