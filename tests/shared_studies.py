"""Scenarios (trained studies) that several test modules share, built once per run, and the one
storage a test polls through (`watch`).

- `sigterm_scenario` (test_workers.py, test_checkpoints.py): a worker process is sent SIGTERM in the
  third of four epochs and hands its trial back; a second worker process resumes it from the
  checkpoint. A copy of the handed-back study is kept for test_checkpoints' corrupt checkpoint.
- `killed_scenario` (test_workers.py, test_checkpoints.py): through PgBouncer, a worker process is
  killed (SIGKILL) in the third of four epochs; another worker fails its trial as stale and resumes
  it from the checkpoint in PostgreSQL, while an uninterrupted run of the same configuration gives
  the yardstick.
- `pg_workers_scenario` (test_workers.py, test_sweep.py): four worker processes, two of them joining
  a study already running, work one PostgreSQL study to its exact budget.

conftest.py imports this module (`from shared_studies import *`) before it has defined its own names,
so conftest is only looked up inside the fixtures, when they run."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import wait_until
from optuna.trial import FrozenTrial, TrialState

__all__ = ["_scenario_database", "killed_scenario", "pg_workers_scenario", "sigterm_scenario", "watch"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# -- one storage per test for polling ------------------------------------------------------------


class Watch:
    """A test's view of one study while processes work it: a single storage, opened once (when the
    database has Optuna's tables) and asked for the trials on every poll."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name = url, name
        self.storage: Any = None
        self.study_id: int | None = None
        self.not_yet: BaseException | None = None  # why the study could not be read yet

    def _study_row(self) -> bool:
        """Whether the study's row is there, read without opening a storage: an RDBStorage opened
        while another process is still making the database would write Optuna's version row into it."""
        import sqlalchemy

        if self.url.startswith("sqlite:///") and not Path(self.url.removeprefix("sqlite:///")).exists():
            return False  # and connecting must not make the file
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                query = sqlalchemy.text("SELECT count(*) FROM studies WHERE study_name = :n")
                return bool(conn.execute(query, {"n": self.name}).scalar_one())
        except sqlalchemy.exc.DBAPIError as e:  # no tables yet
            self.not_yet = e
            return False
        finally:
            engine.dispose()

    def _ready(self) -> bool:
        from kmnist_tune.service.storage import open_storage

        if self.storage is None:
            if not self._study_row():
                return False
            self.storage = open_storage(self.url)
        if self.study_id is None:
            try:
                self.study_id = self.storage.get_study_id_from_name(self.name)
            except KeyError:
                return False
        return True

    def trials(self, *states: TrialState) -> list[FrozenTrial]:
        """The study's trials now (in those states), by number; none while the study does not exist."""
        if not self._ready():
            return []
        found = self.storage.get_all_trials(self.study_id, deepcopy=False, states=states or None)
        return sorted(found, key=lambda t: t.number)

    def count(self, *states: TrialState) -> int:
        return len(self.trials(*states))

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials():
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out

    def close(self) -> None:
        engine = getattr(self.storage, "engine", None)
        if engine is not None:
            engine.dispose()


@pytest.fixture
def watch() -> Iterator[Callable[[str, str], Watch]]:
    """watch(url, study) -> the Watch of that study, closed after the test."""
    opened: list[Watch] = []

    def open_watch(url: str, name: str) -> Watch:
        opened.append(Watch(url, name))
        return opened[-1]

    yield open_watch
    for w in opened:
        w.close()


def checkpointed(w: Watch, epoch: int) -> FrozenTrial | None:
    """The running trial whose record names a checkpoint of `epoch` (0-based) or later, if any."""
    from kmnist_tune.contract.records import TrialRecord

    for t in w.trials(TrialState.RUNNING):
        ckpt = TrialRecord.of(t).checkpoint
        if ckpt and ckpt["epoch"] >= epoch:
            return t
    return None


def four_epochs(name: str, n_trials: int = 1, **params: Any) -> dict[str, Any]:
    """Four one-second epochs with a checkpoint after each, heartbeats every second."""
    import conftest

    spec = conftest.tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["epochs"] = {"value": 4}
    spec["parameters"].update(params)
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    spec["checkpoints"] = {"min_interval_s": 0}  # the fixture's epochs last seconds: save after each one
    return spec


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[str, str]:
    """A worker process's stdout and stderr once it exited 0, with no deprecation warning."""
    import conftest

    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker exited {proc.returncode}\n{err}"
    conftest.deprecation_free(err)
    return out, err


def reap(procs: list[subprocess.Popen[str]]) -> None:
    """Processes a scenario started and that still run (it failed half-way): killed, not left behind."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)


def in_process_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """A command that trains (`run`, `worker`), run by the CLI's own main in this process: the same
    parsing, study calls and training, without an interpreter to start and torch to import. Its
    stdout and stderr; it must exit 0. The signal handlers and torch threads a worker sets are put back."""
    import conftest
    import torch

    from kmnist_tune.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        rc = main([*args, "--data-dir", str(conftest.FIXTURE), "--mirror", "http://127.0.0.1:9/nowhere", "--gpus", "none"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == 0, f"kmnist-tune {' '.join(args)} exited {rc}\n{err}"
    return out, err


@dataclass
class PgDatabase:
    direct: str  # postgresql+psycopg:// on the server
    pooled: str  # the same database through PgBouncer (transaction pooling)
    name: str


@pytest.fixture(scope="session")
def _scenario_database() -> Iterator[Callable[[], PgDatabase]]:
    """Fresh PostgreSQL databases for session-scoped scenarios, dropped at the end of the run."""
    import conftest

    made: list[str] = []

    def new() -> PgDatabase:
        name = f"kt_shared_{uuid.uuid4().hex[:10]}"
        with conftest.pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        base = conftest.PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        pooled = f"{conftest.PGBOUNCER.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
        return PgDatabase(f"{base}/{name}", pooled, name)

    yield new
    for name in made:
        with psycopg.connect(conftest.PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- SIGTERM: the trial handed back, and resumed ---------------------------------------------------


@dataclass
class SigtermScenario:
    url: str
    folder: Path  # the database's folder (its artifacts beside it)
    stopped_rc: int  # the SIGTERM'd worker's exit status
    stopped_err: str
    stop_took: float  # seconds from SIGTERM to its exit (printed, never asserted)
    handed_back: list[FrozenTrial]  # the study right after the hand-back
    resumed_out: str  # the second worker's stdout and stderr
    resumed_err: str
    after: list[FrozenTrial]  # the study once the second worker is done
    damaged_copy: Path  # a copy of the database folder as it was after the hand-back
    n_trials: int = 1


@pytest.fixture(scope="session")
def sigterm_scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigtermScenario]:
    import conftest
    from sim_worker import create

    folder = tmp_path_factory.mktemp("sigterm")
    url = f"sqlite:///{folder / 't.db'}"
    create(url, four_epochs("term"))  # lr searched: the hand-back must keep the sampled value
    w = Watch(url, "term")
    procs: list[subprocess.Popen[str]] = []
    try:
        worker = conftest.spawn_cli("worker", "--study", "term", "--storage", url, "--gpus", "none")
        procs.append(worker)
        # Epochs 1 and 2 done and saved: it trains epoch 3 of 4.
        wait_until(lambda: checkpointed(w, 1), 180, "a checkpoint of epoch 2", procs=[worker])
        worker.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = worker.communicate(timeout=120)
        took = time.monotonic() - t0
        print(f"\nSIGTERM to exit: {took:.1f} s")
        handed_back = w.trials()
        damaged = tmp_path_factory.mktemp("damaged")
        shutil.copy2(folder / "t.db", damaged / "t.db")
        shutil.copytree(folder / "kmnist-tune-artifacts", damaged / "kmnist-tune-artifacts")
        procs.append(conftest.spawn_cli("worker", "--study", "term", "--storage", url, "--gpus", "none"))
        out, err2 = finish(procs[-1])
        yield SigtermScenario(url, folder, worker.returncode, err, took, handed_back, out, err2, w.trials(), damaged)
    finally:
        reap(procs)
        w.close()


# -- SIGKILL through PgBouncer: the stale trial retried, and resumed ------------------------------


@dataclass
class KilledScenario:
    db: PgDatabase
    doomed: FrozenTrial  # the trial that was running when its worker was killed
    killed_at: float  # time.time() of the kill
    survivor_out: str
    survivor_err: str
    after: list[FrozenTrial]
    reference: FrozenTrial  # the same configuration and seed, never interrupted
    shown: str  # `study show killed` afterwards
    n_trials: int = 1


@pytest.fixture(scope="session")
def killed_scenario(
    _scenario_database: Callable[[], PgDatabase], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KilledScenario]:
    import conftest
    from sim_worker import create

    db = _scenario_database()
    try:
        psycopg.connect(db.pooled.replace("+psycopg", ""), connect_timeout=5).close()
    except psycopg.OperationalError as e:
        pytest.fail(f"PgBouncer at {conftest.PGBOUNCER} is not reachable ({e}); start it with `sudo scripts/pgbouncer-local`")
    folder = tmp_path_factory.mktemp("killed")
    create(db.pooled, four_epochs("killed"))
    w = Watch(db.direct, "killed")  # polled on the server: the workers' pool is theirs
    ref = Watch(db.direct, "uninterrupted")
    # One CPU thread in every process: the resumed trial is compared with the uninterrupted one, and
    # the victim, the survivor and the reference would otherwise each get the share of the moment,
    # and with another thread count other float sums (0.80 against 0.84, once).
    env = conftest.cli_env(KMNIST_TUNE_THREADS="1")
    procs: list[subprocess.Popen[str]] = []
    try:
        victim = conftest.spawn_cli("worker", "--study", "killed", "--storage", db.pooled, "--gpus", "none", env=env)
        procs.append(victim)
        sampled = lambda: [t for t in w.trials(TrialState.RUNNING) if "lr" in t.params]  # noqa: E731
        wait_until(sampled, 180, "the victim's trial to sample its lr", procs=[victim])
        (doomed,) = sampled()
        # The yardstick, trained beside the victim and then the survivor: the doomed trial's
        # configuration (its sampled lr, fixed) and seed (it is trial 0 of its study too), never interrupted.
        ref_spec = conftest.write_spec(folder / "ref.yaml", four_epochs("uninterrupted", lr={"value": doomed.params["lr"]}))
        reference_run = conftest.spawn_cli("run", str(ref_spec), "--storage", db.direct, "--gpus", "none", env=env)
        procs.append(reference_run)
        wait_until(lambda: checkpointed(w, 1), 180, "a checkpoint of epoch 2", procs=[victim])
        victim.kill()  # SIGKILL: no chance to clean up
        victim.wait(10)
        killed_at = time.time()
        (doomed,) = w.trials(TrialState.RUNNING)  # as the kill left it
        survivor = conftest.spawn_cli("worker", "--study", "killed", "--storage", db.pooled, "--gpus", "none", env=env)
        procs.append(survivor)
        out, err = finish(survivor)
        finish(reference_run)
        (reference,) = ref.trials()
        shown = conftest.run_cli("study", "show", "killed", "--storage", db.pooled).stdout
        yield KilledScenario(db, doomed, killed_at, out, err, w.trials(), reference, shown)
    finally:
        reap(procs)
        w.close()
        ref.close()


# -- four worker processes on one PostgreSQL study -------------------------------------------------


@dataclass
class PgWorkersScenario:
    db: PgDatabase
    name: str
    n_trials: int
    created_out: str  # `study create`'s stdout
    outs: list[tuple[str, str]]  # each worker's stdout and stderr
    trials: list[FrozenTrial]
    per_process: dict[str, int]  # the most connections each kmnist-tune process held (pg_stat_activity)
    samples: int
    own: str  # this test process's application name (its polling storage), not a worker's
    shown: str  # `study show`
    listed: str  # `study list`
    joined_running: int = 0  # trials running when the last two workers joined


@pytest.fixture(scope="session")
def pg_workers_scenario(
    _scenario_database: Callable[[], PgDatabase], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgWorkersScenario]:
    """Created by `study create`, worked by two `worker --gpus none` processes and then, once a trial
    runs, by two more with the default --gpus: workers need only the study name and the storage URL."""
    import os

    import conftest
    from pg_sampler import ConnectionSampler

    db = _scenario_database()
    folder = tmp_path_factory.mktemp("pg-workers")
    name, n = "shared-pg", 6
    spec = conftest.tiny_spec(name, budget={"n_trials": n}, data=conftest.WHOLE_FIXTURE)  # test_sweep: its trials learn
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    created = conftest.cli_here("study", "create", str(conftest.write_spec(folder / "s.yaml", spec)), "--storage", db.direct)
    sampler = ConnectionSampler(db.name)
    sampler.start()
    # Four training processes on two cores: one thread each keeps them from thrashing.
    env = conftest.cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    w = Watch(db.direct, name)
    procs: list[subprocess.Popen[str]] = []
    seen: list[int] = []

    def running() -> int:
        seen.append(w.count(TrialState.RUNNING))
        return seen[-1]

    try:
        args = ("worker", "--study", name, "--storage", db.direct)
        procs += [conftest.spawn_cli(*args, "--gpus", "none", cwd=folder, env=env) for _ in range(2)]
        wait_until(running, 180, "a running trial", procs=procs)
        procs += [conftest.spawn_cli(*args, cwd=folder, env=env) for _ in range(2)]  # they join a running study
        outs = [finish(p, timeout=900) for p in procs]
    finally:
        sampler.stop()
        reap(procs)
    try:
        shown = conftest.run_cli("study", "show", name, "--storage", db.direct).stdout
        listed = conftest.run_cli("study", "list", "--storage", db.direct).stdout
        yield PgWorkersScenario(
            db,
            name,
            n,
            created.stdout,
            outs,
            w.trials(),
            dict(sampler.per_process),
            sampler.samples,
            f"kmnist-tune {os.getpid()}",
            shown,
            listed,
            seen[-1],
        )
    finally:
        w.close()


def ran(out: str) -> int:
    """The trials a worker process says it ran ("worker ran N trial(s)")."""
    m = re.search(r"worker ran (\d+) trial", out)
    assert m, out
    return int(m.group(1))
