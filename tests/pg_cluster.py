"""Databases and roles made on the machine's PostgreSQL for one test, as a deployment makes them: the
server's superuser as the owner, and storage/initdb's scripts run as the postgres image runs them on a
first start (test_deploy.py, test_container.py)."""

from __future__ import annotations

import os
import subprocess
import uuid
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


def run_init_scripts(initdb: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """What the postgres image does with /docker-entrypoint-initdb.d on a first start: in name
    order, execute an executable *.sh, source any other *.sh, feed *.sql to psql, ignore the rest."""
    done = []
    full_env = {**os.environ, **env, "PGHOST": PG_HOST, "PGPORT": str(PG_PORT)}
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
