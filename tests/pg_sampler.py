"""Counts the PostgreSQL connections each kmnist-tune process holds while workers run, and all the
server's connections to the database (PgBouncer's included). Shared by the worker and claim tests
and benchmarks/bench_storage.py, bench_scale.py."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


class ConnectionSampler(threading.Thread):
    """Samples pg_stat_activity every 50 ms: the most connections any one worker process held, and
    the most the server had open to the database at once (`max_total`). Processes are told apart by
    the application name kmnist-tune gives its connections ("kmnist-tune <pid>"); through PgBouncer
    the server's connections are PgBouncer's, and only `max_total` means something."""

    def __init__(self, dbname: str, admin: str = ADMIN):
        super().__init__(daemon=True)
        self.dbname, self.admin = dbname, admin
        self.max_per_process, self.max_total, self.samples = 0, 0, 0
        self.per_process: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            while not self._halt.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY 1", (self.dbname,)
                ).fetchall()
                for app, n in rows:
                    if app.startswith("kmnist-tune "):
                        self.per_process[app] = max(self.per_process.get(app, 0), n)
                        self.max_per_process = max(self.max_per_process, n)
                self.max_total = max(self.max_total, sum(n for _, n in rows))
                self.samples += 1
                time.sleep(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


@contextmanager
def scratch_database(prefix: str, admin: str = ADMIN) -> Iterator[str]:
    """A new database on the server, dropped afterwards (its connections closed first); its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
