"""Many workers on one study, with real processes and a real PostgreSQL: an exact budget, kills,
signals, a database restart, bounded connections, and the gRPC storage proxy.

The scenarios several modules check (four workers on one PostgreSQL study, SIGTERM's hand-back, a
kill through PgBouncer) are built once per run in shared_studies.py."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import WHOLE_FIXTURE, cli_env, cli_here, spawn_cli, tiny_spec, write_spec
from helpers import free_port, wait_until
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState
from shared_studies import FINISHED, KilledScenario, PgWorkersScenario, SigtermScenario, finish, ran
from tcp_proxy import TcpProxy

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.optuna_internals import trial_id
from kmnist_tune.service.artifacts import CHUNK, artifact_store, checkpoint_base, remove_checkpoints
from kmnist_tune.service.retry import open_worker_storage


def states(trials: list) -> dict[str, int]:  # type: ignore[type-arg]
    out: dict[str, int] = {}
    for t in trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def fast_spec(name: str, n_trials: int, epochs: int = 1, heartbeat: int = 1) -> dict:
    spec = tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["epochs"] = {"value": epochs}
    spec["parameters"]["batch_size"] = {"value": 64}
    spec["workers"] = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat, "max_retry": 3}
    return spec


def worker_env() -> dict[str, str]:
    # Several training processes on two cores: one thread each keeps them from thrashing.
    return cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# -- four workers, two of them joining a running study (shared_studies.pg_workers_scenario) ---------


@pytest.mark.postgres
def test_four_workers_staggered_finish_exactly_the_budget(pg_workers_scenario: PgWorkersScenario) -> None:
    s = pg_workers_scenario
    assert s.joined_running >= 1  # the last two joined a study already running
    numbers = [t.number for t in s.trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state in FINISHED for t in s.trials) == s.n_trials, states(s.trials)
    assert states(s.trials).get("RUNNING", 0) == 0
    assert sum(ran(out) for out, _ in s.outs) == len(s.trials) == s.n_trials
    assert re.search(r"workers \(host:pid gpu", s.shown) and " cpu: running -;" in s.shown
    # One row per worker process (four processes on this one host), each with its pid.
    rows = re.findall(r"^  \S+:(\d+) cpu: running -; (\d+) finished", s.shown, re.M)
    assert len({pid for pid, _ in rows}) == len(rows) == 4 and sum(int(n) for _, n in rows) == s.n_trials, s.shown


@pytest.mark.postgres
def test_each_worker_process_holds_at_most_two_connections(pg_workers_scenario: PgWorkersScenario) -> None:
    s = pg_workers_scenario
    workers = {app: n for app, n in s.per_process.items() if app != s.own}  # this process polled the study too
    # Each worker process holds at most 2 connections (its pool of 2, no overflow), measured.
    assert s.samples > 20 and len(workers) >= 4, workers
    assert max(workers.values()) <= 2, workers
    print(f"\nconnections per worker process (max seen): {workers}")


# -- kill -9 through PgBouncer (shared_studies.killed_scenario) --------------------------------------


@pytest.mark.postgres
def test_kill_9_mid_trial_is_retried_by_another_worker(killed_scenario: KilledScenario) -> None:
    # Through PgBouncer (transaction pooling): heartbeats, the stale-trial check and the retry hold there too.
    s = killed_scenario
    assert sum(t.state in FINISHED for t in s.after) == s.n_trials, states(s.after)
    failed = [t for t in s.after if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [s.doomed.number]
    (retry,) = [t for t in s.after if t.user_attrs.get("retry_of") == s.doomed.number]
    assert retry.params == s.doomed.params and "lr" in retry.params and retry.state in FINISHED
    delay = retry.datetime_start.timestamp() - s.killed_at
    print(f"\nkilled trial {s.doomed.number} retried as trial {retry.number} {delay:.1f} s after the kill")
    # Both states, so that the line cannot be read as if the killed trial had completed.
    said = f"retried: trial {retry.number} ({retry.state.name.lower()}) retries trial {s.doomed.number} (fail)"
    assert said in s.shown, s.shown
    assert re.search(r"^  \S+:\d+ \S+: running ", s.shown, re.M), s.shown  # one row per worker process, with its pid


# -- SIGTERM (shared_studies.sigterm_scenario) ------------------------------------------------------


def test_sigterm_hands_the_trial_back_and_exits_promptly(sigterm_scenario: SigtermScenario) -> None:
    s = sigterm_scenario
    assert s.stopped_rc == 0, s.stopped_err
    (stopped,) = [t for t in s.handed_back if t.state == TrialState.FAIL]
    assert stopped.user_attrs["interrupted"] == "SIGTERM"
    # Promptly: at its next batch, not after training its last epoch (it was in epoch 3 of 4).
    assert stopped.intermediate_values and max(stopped.intermediate_values) < 4, stopped.intermediate_values
    (queued,) = [t for t in s.handed_back if t.state == TrialState.WAITING]
    assert queued.params == stopped.params and "lr" in stopped.params
    assert states(s.handed_back) == {"FAIL": 1, "WAITING": 1}


def test_a_trial_handed_back_is_retried_by_the_next_worker(sigterm_scenario: SigtermScenario) -> None:
    s = sigterm_scenario
    (stopped,) = [t for t in s.handed_back if t.state == TrialState.FAIL]
    assert sum(t.state in FINISHED for t in s.after) == s.n_trials
    (retry,) = [t for t in s.after if t.user_attrs.get("retry_of") == stopped.number]
    assert retry.state in FINISHED and retry.params == stopped.params
    # Optuna copies the original's attributes into the retry; how the original ended is not kept.
    record = TrialRecord.of(retry)
    assert record.interrupted is None and record.error is None and record.epoch_seconds
    assert ran(s.resumed_out) == 1


# -- a database restart, on a throwaway cluster this test owns -------------------------------


@dataclass
class OwnCluster:
    url: str
    stop: Callable[[], None]
    start: Callable[[], None]

    def restart(self) -> None:
        self.stop()
        time.sleep(3)  # not a wait for anything: the outage itself, the database really gone for a while
        self.start()

    def down_for(self, seconds: float) -> threading.Timer:
        """Stop the server now and start it again `seconds` later, in the background."""
        self.stop()
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer


@pytest.fixture
def own_cluster() -> Iterator[OwnCluster]:
    """initdb + pg_ctl in a temp dir on its own port (never the machine's shared server)."""
    bindir = Path("/usr/lib/postgresql") / sorted(os.listdir("/usr/lib/postgresql"))[-1] / "bin"
    root = Path(tempfile.mkdtemp(prefix="kt-pg-", dir="/tmp"))
    shutil.chown(root, "postgres", "postgres")
    port = free_port()

    def as_pg(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    as_pg(str(bindir / "initdb"), "-D", str(root / "data"), "--auth=trust", "-U", "postgres")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"

    def start() -> None:
        as_pg(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-o", opts, "-l", str(root / "log"), "-w", "start")

    def stop() -> None:
        as_pg(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop")

    start()
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE kt")
    try:
        yield OwnCluster(f"postgresql+psycopg://postgres@127.0.0.1:{port}/kt", stop, start)
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_workers_survive_a_database_restart(tmp_path: Path, own_cluster: OwnCluster, watch) -> None:
    url = own_cluster.url
    n = 4
    spec = write_spec(tmp_path / "s.yaml", fast_spec("restart", n, epochs=2, heartbeat=2))
    cli_here("study", "create", str(spec), "--storage", url)
    env = worker_env()
    procs = [spawn_cli("worker", "--study", "restart", "--storage", url, "--gpus", "none", env=env) for _ in range(2)]
    w = watch(url, "restart")
    wait_until(lambda: w.count(TrialState.COMPLETE) >= 1, 300, "a first finished trial", procs=procs)
    t0 = time.monotonic()
    own_cluster.restart()
    print(f"\ndatabase down for {time.monotonic() - t0:.1f} s")
    outs = [finish(p, timeout=900) for p in procs]
    after = w.trials()  # its pooled connection is checked before use: a new one after the restart
    assert sum(t.state in FINISHED for t in after) == n, states(after)
    assert states(after).get("RUNNING", 0) == 0
    stalls = [float(m.group(1)) for out, _ in outs for m in [re.search(r"waited ([\d.]+) s for the storage", out)] if m]
    print(f"workers stalled by the restart: {stalls} s")
    assert stalls, "no worker noticed the restart: " + " | ".join(e[-300:] for _, e in outs)


def test_a_workers_artifacts_wait_out_a_database_restart(own_cluster: OwnCluster) -> None:
    """Checkpoints are written, read and removed in the artifact table straight through the worker's
    engine, not through Optuna's storage calls: each must ride out a restart as those do. (A CI run
    once lost a worker that removed its finished trial's checkpoints while the database restarted.)"""
    url = own_cluster.url
    cli_here("schema", "--storage", url)
    said: list[str] = []
    storage = open_worker_storage(url, patience=60, log=said.append)
    study = optuna.create_study(storage=storage, study_name="artifacts")
    kept, gone = (checkpoint_base(trial_id(study.ask()), 0) for _ in range(2))  # a checkpoint's trial must exist
    store = artifact_store(storage)
    body = os.urandom(CHUNK + 100)  # two chunks: the reader's second query comes after an outage
    name = str(uuid.uuid4())
    own_cluster.down_for(0.3)
    store.write(name, io.BytesIO(body))
    reader = store.open_reader(name)
    first = reader.read(10)
    own_cluster.down_for(0.3)
    assert first + reader.read() == body
    for base in (kept, gone):
        store.write(f"{base}.json", io.BytesIO(b"{}"))
    own_cluster.down_for(0.3)
    remove_checkpoints(store, [int(gone.rsplit("-", 2)[1])], n_epochs=1)
    with pytest.raises(ArtifactNotFound):
        store.open_reader(f"{gone}.json")
    own_cluster.down_for(0.3)
    store.remove(f"{kept}.json")
    retries = [line for line in said if line.startswith("storage unreachable")]
    assert len(retries) == 4, said


# -- the gRPC storage proxy -------------------------------------------------------------------


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_study_worked_through_the_grpc_proxy_completes(tmp_path: Path, pg_url: str, watch) -> None:
    port = free_port()
    proxy = spawn_cli("storage-proxy", "--storage", pg_url, "--port", str(port))
    try:
        grpc_url = f"grpc://127.0.0.1:{port}"
        wait_until(lambda: listening(port), 60, "the proxy to listen", procs=[proxy])
        cli_here("study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("proxied", 2))), "--storage", grpc_url)
        out, _ = finish(spawn_cli("worker", "--study", "proxied", "--storage", grpc_url, "--gpus", "none"))
        assert "worker ran 2 trial(s)" in out
    finally:
        # SIGTERM, not SIGINT: a test run started as a background job hands its children SIGINT ignored.
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(20) == 128 + signal.SIGTERM  # it stops at once, whatever its handler threads do
    # The trials are in PostgreSQL, behind the proxy.
    assert watch(pg_url, "proxied").count(TrialState.COMPLETE) == 2


# -- a network partition between one worker and PostgreSQL -----------------------------------------


def test_a_worker_cut_off_past_the_grace_period_drops_its_stale_trial_and_goes_on(tmp_path: Path, pg_url: str, watch) -> None:
    """Worker A reaches PostgreSQL through a loopback proxy that is cut, while worker B runs, for longer
    than the grace period: B fails A's trial as stale and retries it; A, back, discards its result.
    Two trials: B's retry of A's and one more, which A, once back, finds taken."""
    n = 2
    spec_dict = fast_spec("partition", n, epochs=2, heartbeat=1)
    # All of the fixture's images: A's second epoch must outlast the few tenths of a second between
    # seeing it start and cutting the proxy, or A would finish its trial before it is cut off.
    spec_dict["data"].update(WHOLE_FIXTURE)
    spec = write_spec(tmp_path / "s.yaml", spec_dict)
    cli_here("study", "create", str(spec), "--storage", pg_url)
    w = watch(pg_url, "partition")
    proxy = TcpProxy(5432)
    try:
        via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        env = worker_env()
        a = spawn_cli("worker", "--study", "partition", "--storage", via_proxy, "--gpus", "none", env=env)

        def a_training() -> list:  # type: ignore[type-arg]
            """A's trial once its first epoch is reported: A is training its second, not starting its trial."""
            mine = [t for t in w.trials(TrialState.RUNNING) if t.user_attrs.get("worker", {}).get("pid") == a.pid]
            return [t for t in mine if 1 in t.intermediate_values]

        wait_until(a_training, 180, "A's trial in its second epoch", procs=[a])
        (a_trial,) = a_training()
        b = spawn_cli("worker", "--study", "partition", "--storage", pg_url, "--gpus", "none", env=env)
        proxy.cut()
        wait_until(
            lambda: [t.state for t in w.trials() if t.number == a_trial.number] == [TrialState.FAIL],
            120,
            "A's trial failed as stale",
            procs=[b],
        )
        # A is let back once B has retried its trial to the end.
        wait_until(
            lambda: any(t.user_attrs.get("retry_of") == a_trial.number and t.state in FINISHED for t in w.trials()),
            120,
            "B's retry of A's trial to finish",
            procs=[b],
        )
        proxy.mend()
        (out_a, err_a), (out_b, err_b) = (finish(p) for p in (a, b))
    finally:
        proxy.close()
    assert "Traceback" not in err_a + err_b
    assert f"trial {a_trial.number} was failed as stale while this worker was unreachable; its result is discarded" in err_a
    after = w.trials()
    assert sum(t.state in FINISHED for t in after) == n, states(after)
    assert states(after).get("RUNNING", 0) == 0
    (retry,) = [t for t in after if t.user_attrs.get("retry_of") == a_trial.number]
    assert retry.state in FINISHED and retry.params == a_trial.params
    assert ran(out_a) + ran(out_b) == n  # the discarded trial is not counted
    print(f"\nA: {err_a.strip().splitlines()[-1]}")
