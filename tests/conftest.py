"""Shared test helpers: the real-image fixture, tiny specs, the CLI as a subprocess (and in this process,
where the process is not what a test checks), PostgreSQL databases, and Optuna's schema made once per run
(a template database, a ready SQLite file)."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
import yaml

# Session- and module-scoped scenarios several test modules share (imported here so pytest registers them).
from shared_studies import *  # noqa: F403
from shared_trained import *  # noqa: F403

# In-process tests train real trials too: keep W&B off unless a test asks for it in its spec.
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "kmnist-mini"
K49_FIXTURE = REPO / "tests" / "fixtures" / "k49-mini"
PG_ADMIN = os.environ.get("KMNIST_TUNE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
# PgBouncer in front of that server, transaction pooling (scripts/pgbouncer-local starts it).
PGBOUNCER = os.environ.get("KMNIST_TUNE_TEST_PGBOUNCER", "postgresql://postgres@127.0.0.1:6432")


# tiny_spec's data override for a test about halving or accuracy: all of the fixture's images.
WHOLE_FIXTURE: dict[str, Any] = {"train_size": None, "valid_size": None}


def tiny_spec(name: str = "tiny", **over: Any) -> dict[str, Any]:
    """A spec sized for tests: resnet18, 288 of the fixture's training images and 120 for validation,
    1 epoch, a few seconds a trial. Nine batches of 32 are fewer than the halving rule's warm-up (10),
    so only a non-finite loss halves a test's trial (the rule has tests of its own), and a trial ends
    near chance. A test about halving, or that its trials learned, asks for data=WHOLE_FIXTURE
    (960 training images: 0.25-0.5 after one epoch)."""
    spec: dict[str, Any] = {
        "name": name,
        "data": {"dataset": "kmnist", "valid_fraction": 0.2, "train_size": 288, "valid_size": 120},
        "parameters": {
            "arch": {"value": "resnet18"},
            "epochs": {"value": 1},
            "batch_size": {"value": 32},
            "lr": {"distribution": "log_uniform_values", "min": 2e-3, "max": 1e-2},
        },
        "pruner": "none",
        "budget": {"n_trials": 2},
        "seed": 0,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(spec.get(k), dict):
            spec[k] = {**spec[k], **v}
        else:
            spec[k] = v
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def created_study(tmp_path: Path, name: str) -> str:
    """A study made by `kmnist-tune study create` in tmp_path/ok.db (no trial yet); its storage URL."""
    url = f"sqlite:///{tmp_path / 'ok.db'}"
    cli_here("study", "create", str(write_spec(tmp_path / f"{name}.yaml", tiny_spec(name))), "--storage", url)
    return url


def cli_env(**extra: str) -> dict[str, str]:
    # The CLI decides which warnings to show (PYTHONWARNINGS would override it): see deprecation_free.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMNIST_TUNE_") and k != "PYTHONWARNINGS"}
    env.update(
        {
            "KMNIST_TUNE_DATA": str(FIXTURE),
            "KMNIST_TUNE_MIRROR": "http://127.0.0.1:9/nowhere",
            "WANDB_MODE": "disabled",
        }
    )
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `kmnist-tune ARGS` as a real process (python -m, so no install step is assumed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kmnist_tune", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kmnist-tune {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    deprecation_free(proc.stderr)
    return proc


def deprecation_free(stderr: str) -> None:
    """Every CLI run of the suite: no deprecation warning about Optuna's or this package's APIs (the
    CLI shows those and hides other libraries' chatter), so a deprecated call fails the tests."""
    for category in ("FutureWarning", "DeprecationWarning"):
        assert category not in stderr, f"a {category} from kmnist-tune's own calls:\n{stderr[-3000:]}"


def spawn_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kmnist_tune", *args],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_here(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`kmnist-tune ARGS` through the console entry point's own `main`, in this process: the same
    parsing, the same one-line errors and exit statuses, without a process start (and its imports).

    For checks where the process itself is not what is tested (help text, usage errors, what a
    command prints). The environment is exactly `env` (cli_env() by default) while it runs, the
    working directory `cwd` or an empty folder (so no `.env` of the checkout is read), and what
    `main` changes for a whole process (sys.argv, warning filters, log filters) is put back after."""
    from click.testing import CliRunner

    from kmnist_tune.cli import main

    env = cli_env() if env is None else env
    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    loggers = [logging.getLogger(n) for n in ("", "optuna", "sqlalchemy")]
    kept = [(lg, list(lg.filters), [(h, list(h.filters)) for h in lg.handlers]) for lg in loggers]
    argv = sys.argv[:]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # `run`/`worker` set their own
    torch = sys.modules.get("torch")  # `run`/`worker` set the thread count to their share
    threads = torch.get_num_threads() if torch is not None else None
    with contextlib.ExitStack() as stack:
        where = cwd or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kt-cli-")))
        stdout, stderr, _ = stack.enter_context(CliRunner().isolation(env=overrides))
        stack.enter_context(warnings.catch_warnings())
        stack.enter_context(contextlib.chdir(where))
        try:
            rc = main(list(args))
        except SystemExit as e:  # shell completion exits as click's commands do
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.argv[:] = argv
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if threads is not None:
                torch.set_num_threads(threads)  # type: ignore[union-attr]
            for lg, filters, log_handlers in kept:
                lg.filters[:] = filters
                for h, hf in log_handlers:
                    h.filters[:] = hf
        out, err = stdout.getvalue().decode(), stderr.getvalue().decode()
    proc = subprocess.CompletedProcess(["kmnist-tune", *args], rc, out, err)
    if check and rc != 0:
        raise AssertionError(f"kmnist-tune {' '.join(args)} exited {rc} (in process)\nstdout:\n{out}\nstderr:\n{err}")
    return proc


def command_paths() -> list[list[str]]:
    """Every command and group of the CLI, as the words that name it (the root is [])."""
    import typer

    from kmnist_tune.cli import app

    paths: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            if not getattr(sub, "hidden", False):
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The CLI's failure contract: non-zero exit, exactly one stderr line starting 'error:', no traceback."""
    assert proc.returncode != 0, f"expected failure, got 0; stdout={proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def pg_admin() -> psycopg.Connection[Any]:
    """An autocommit connection to the machine's PostgreSQL as its superuser.

    Fails (never skips) when the server cannot be reached: CI must not go green without it."""
    try:
        return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN} is not reachable ({e}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )


PG_BASE = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")


@contextlib.contextmanager
def scratch_database(prefix: str = "kt_test", template: str | None = None) -> Iterator[str]:
    """A new database on the machine's server (a copy of `template` when given), dropped afterwards
    with its connections; its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def copy_database(url: str) -> contextlib.AbstractContextManager[str]:
    """A copy of the test-owned database at `url` (CREATE DATABASE ... TEMPLATE), dropped afterwards.

    PostgreSQL copies only a database nobody is connected to: the idle connections left in this
    process's pools (which reconnect when used again: pool_pre_ping) are closed first. Every process
    using the database (a dashboard, a worker) must have ended."""
    source = url.rsplit("/", 1)[1]
    with pg_admin() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (source,),
        )
    return scratch_database("kt_copy", template=source)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's server, dropped afterwards."""
    with scratch_database() as url:
        yield url


@pytest.fixture(scope="session")
def pg_schema_template() -> Iterator[str]:
    """A database holding the tables `kmnist-tune schema` makes (Optuna's and the artifact table),
    made once per run by that command, so that it is exactly what the product creates."""
    with scratch_database("kt_schema_template") as url:
        assert "ready" in run_cli("schema", "--storage", url).stdout
        yield url


@pytest.fixture
def pg_schema_url(pg_schema_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database whose tables are already there (a copy of the template), for tests
    whose subject is not the schema's creation; dropped afterwards."""
    with copy_database(pg_schema_template) as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_schema_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file holding the tables `kmnist-tune schema` makes, made once per run."""
    path = tmp_path_factory.mktemp("schema") / "schema.db"
    assert "ready" in run_cli("schema", "--storage", f"sqlite:///{path}").stdout
    return path


@pytest.fixture
def sqlite_schema_url(sqlite_schema_file: Path, tmp_path: Path) -> str:
    """A SQLite storage in tmp_path whose tables are already there (a copy of the ready file)."""
    return sqlite_copy(sqlite_schema_file, tmp_path / "study.db")


def sqlite_copy(src: Path, dest: Path) -> str:
    """A copy of a SQLite storage and of the artifact folder kept beside it; the copy's URL."""
    from kmnist_tune.service.artifacts import FOLDER

    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    if (src.parent / FOLDER).is_dir():
        shutil.copytree(src.parent / FOLDER, dest.parent / FOLDER, dirs_exist_ok=True)
    return f"sqlite:///{dest}"


@pytest.fixture
def cluster() -> Iterator[Any]:
    """Databases and roles on the machine's PostgreSQL, dropped after the test (pg_cluster.Cluster)."""
    from pg_cluster import Cluster

    c = Cluster(pg_admin())
    try:
        yield c
    finally:
        c.drop()


@pytest.fixture
def pooled_pg_url(pg_url: str) -> str:
    """The same fresh database, reached through PgBouncer (transaction pooling). Fails, never skips,
    when PgBouncer is not running: CI must not go green without it."""
    pooled = f"{PGBOUNCER.replace('postgresql://', 'postgresql+psycopg://')}/{pg_url.rsplit('/', 1)[1]}"
    try:
        psycopg.connect(pooled.replace("+psycopg", ""), connect_timeout=5).close()
    except psycopg.OperationalError as e:
        pytest.fail(f"PgBouncer at {PGBOUNCER} is not reachable ({e}); start it with `sudo scripts/pgbouncer-local`")
    return pooled


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


_BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--virtual-time-budget=15000",
]


def browse(page: str, shot: Path) -> str:
    """Render `page` in headless Chromium: a screenshot into `shot`, and the DOM after its scripts ran."""
    assert Path(CHROMIUM).exists(), "chromium is not installed; scripts/ci-deps installs Debian's chromium"
    shot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, *_BROWSER_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000", f"--screenshot={shot}", page],
            capture_output=True,
            timeout=120,
            check=True,
        )
    return render(page)[0]


def render(page: str) -> tuple[str, list[str]]:
    """`page` in headless Chromium: the DOM after its scripts ran, and the messages of its console (a
    Content-Security-Policy violation is one), as Chromium logs them."""
    assert Path(CHROMIUM).exists(), "chromium is not installed; scripts/ci-deps installs Debian's chromium"
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [CHROMIUM, *_BROWSER_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", page],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


# -- parallel runs: `pytest -n 2` (pytest-xdist), as scripts/test runs the suite ---------------------
# One pytest process leaves a core idle while the process it started imports torch or waits on a
# server; two fill it. Tests that share a fixture built once per file (module scope) or one of the
# expensive trained studies (session scope) run in the same pytest process, so it is built once;
# every other test goes wherever a process is free. A test marked `alone` holds the machine to
# itself (a shared/exclusive flock).
EXPENSIVE_SHARED = frozenset(
    {"evaluated_study", "ensembled_study", "lr_prior_study", "sigterm_scenario", "killed_scenario", "pg_workers_scenario"}
)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
# Handed out first, longest first: a long group handed out last runs alone at the end while the other
# process idles (longest-processing-time-first). Wall seconds beside the other process (`--durations`,
# benchmarks/RESULTS.md): the containers' ~350, the trained studies of test_attacks' group 80-220, the
# workers' scenarios 60-100, the dashboard's 70, doctor's 40-55. Then larger groups, single tests last.
LONGEST_FIRST = (
    "tests/test_container.py::deployment",
    "lr_prior_study",
    "pg_workers_scenario",
    "killed_scenario",
    "tests/test_watch.py::dashboard",
    "sigterm_scenario",
    "tests/test_doctor.py::runs",
)


def _shared_fixtures(item: pytest.Item) -> list[str]:
    """What `item` shares with other tests that is costly to build twice: its module- and
    class-scoped fixtures (per file) and the expensive session fixtures (by name)."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's own record of the test's fixture closure
    if info is None:  # not a Python test function: keep its file together
        return [item.nodeid.split("::")[0]]
    file = item.nodeid.split("::")[0]
    keys = [name for name in info.names_closure if name in EXPENSIVE_SHARED]
    for name, defs in info.name2fixturedefs.items():
        if defs and defs[-1].scope in ("module", "class", "package") and name not in EXPENSIVE_SHARED:
            keys.append(f"{file}::{name}")
    return keys


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    """Each test's xdist group: the union (a union-find) of what it shares with other tests; a test
    that shares nothing costly has none. After xdist's own hook has written the groups into the test
    ids, every grouped test must carry its group: pytest 9.2 ignores what xdist 3.8 writes
    (pytest-dev/pytest-xdist#1386), the groups would silently be lost and each trained study built in
    both processes (hence pytest<9.2 in the dev extra)."""
    if not XDIST_WORKER:
        return (yield)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    shared = {item.nodeid: _shared_fixtures(item) for item in items}
    for keys in shared.values():
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
    grouped = [item for item in items if shared[item.nodeid]]
    for item in grouped:
        item.add_marker(pytest.mark.xdist_group(find(shared[item.nodeid][0]).replace("/", ".").replace("::", ".")))
    # xdist hands groups out in the order of the collection (scripts/test: --no-loadscope-reorder).
    roots = {item.nodeid: find(shared[item.nodeid][0]) for item in grouped}
    size = collections.Counter(roots.values())
    rank = {root: len(LONGEST_FIRST) for root in size}
    for key, root in ((k, find(k)) for keys in shared.values() for k in keys):
        if key in LONGEST_FIRST:
            rank[root] = min(rank[root], LONGEST_FIRST.index(key))
    unranked = (len(LONGEST_FIRST), 0)
    items.sort(key=lambda i: (rank[roots[i.nodeid]], -size[roots[i.nodeid]]) if i.nodeid in roots else unranked)
    result = yield
    if config.getvalue("loadgroup") and any("@" not in item.nodeid for item in grouped):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} drops pytest-xdist's test groups (pytest-xdist#1386): "
            "install the dev extra's pytest (pip install -e '.[dev]'), or run with -n 0"
        )
    return result


@pytest.fixture(scope="session", autouse=True)
def _one_trainer_per_pytest_worker() -> Iterator[None]:
    """In a parallel run each pytest process trains on one thread and counts as a trainer in the
    host's registry (service/cpu_share.py), so the workers and runs it starts take their share of the
    cores too: two OpenMP teams of 2 threads on 2 cores spin against each other (a 4 s test took 42 s)."""
    if not XDIST_WORKER:
        yield
        return
    import torch

    from kmnist_tune.service.cpu_share import CpuShare

    torch.set_num_threads(1)
    with CpuShare():  # the same registration a worker makes (none when KMNIST_TUNE_THREADS fixes the count)
        yield


@functools.cache
def _run_lock(run: str) -> IO[str]:
    """The run's lock file, opened once per pytest process and held for its life."""
    return open(Path(tempfile.gettempdir()) / f"kt-xdist-{run}.lock", "a")  # noqa: SIM115


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    """Tests marked `alone` hold the run's lock exclusively, the others share it: an `alone` test
    waits for the other process's test to end and keeps the machine to itself."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        yield
        return
    import fcntl

    fh = _run_lock(run)
    fcntl.flock(fh, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
