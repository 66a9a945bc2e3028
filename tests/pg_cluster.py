"""Databases and roles made on the machine's PostgreSQL for one test, as a deployment makes them: the
server's superuser as the owner, and storage/initdb's scripts run as the postgres image runs them on a
first start (test_deploy.py, test_container.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from conftest import PG_ADMIN

from kmnist_tune.service.users import users_group

ADMIN = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
PG_HOST, PG_PORT, PG_SUPERUSER = str(ADMIN.get("host", "127.0.0.1")), int(ADMIN.get("port", 5432)), str(ADMIN["user"])


class Cluster:
    """Databases and roles made on the machine's PostgreSQL for one test, all dropped after it."""

    def __init__(self, admin: psycopg.Connection[Any]):
        self.admin = admin
        self.databases: list[str] = []
        self.roles: list[str] = []

    def database(self) -> str:
        name = f"kt_deploy_{uuid.uuid4().hex[:10]}"
        self.databases.append(name)
        self.roles.append(users_group(name))  # storage/initdb's group of its users, when it runs for it
        self.admin.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop(self) -> None:
        """Drop what was made, and close the connection."""
        for db in self.databases:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for role in self.roles:
            self.admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        self.admin.close()

    def role_name(self) -> str:
        name = f"kt_worker_{uuid.uuid4().hex[:10]}"  # roles belong to the whole server: unique per run
        self.roles.append(name)
        return name


def run_init_scripts(
    initdb: Path, env: dict[str, str], host: str = PG_HOST, port: int = PG_PORT
) -> list[subprocess.CompletedProcess[str]]:
    """What the postgres image does with /docker-entrypoint-initdb.d on a first start: in name
    order, execute an executable *.sh, source any other *.sh, feed *.sql to psql, ignore the rest."""
    done = []
    full_env = {**os.environ, **env, "PGHOST": host, "PGPORT": str(port)}
    # The image's own file_env first: POSTGRES_PASSWORD_FILE (compose's secret) becomes POSTGRES_PASSWORD.
    for var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        if full_env.get(f"{var}_FILE"):
            full_env[var] = Path(full_env.pop(f"{var}_FILE")).read_text().rstrip("\n")
    for f in sorted(initdb.iterdir()):
        if f.suffix == ".sh":
            argv = [str(f)] if os.access(f, os.X_OK) else ["bash", "-c", 'set -Eeo pipefail; source "$1"', "init", str(f)]
        elif f.suffix == ".sql":
            argv = [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "--username",
                env["POSTGRES_USER"],
                "--dbname",
                env["POSTGRES_DB"],
                "-f",
                str(f),
            ]
        else:
            continue
        proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60)
        done.append(proc)
        if proc.returncode != 0:
            break
    return done


def pg_url(user: str, password: str, db: str) -> str:
    return f"postgresql+psycopg://{user}:{password}@{PG_HOST}:{PG_PORT}/{db}"


@contextlib.contextmanager
def scram_server(bindir: Path) -> Iterator[tuple[Path, int]]:
    """A private PostgreSQL server, as a deployment's: every TCP client proves its password with SCRAM
    (the machine's own server trusts loopback); its superuser `postgres` gets in through its socket only.
    Yields (the socket's folder, the TCP port on 127.0.0.1). In memory, gone afterwards."""
    from helpers import free_port

    home = Path(tempfile.mkdtemp(prefix="kt-scram-pg-", dir="/dev/shm"))
    home.chmod(0o755)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(home, "postgres", "postgres")
    port = free_port()
    data = home / "data"
    try:
        subprocess.run(
            [
                *as_postgres,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        try:
            yield home, port
        finally:
            subprocess.run(
                [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
