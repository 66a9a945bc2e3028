"""Many workers on one study, with real processes and a real PostgreSQL: an exact budget, kills,
signals, a database restart, bounded connections, and the gRPC storage proxy."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import cli_env, deprecation_free, run_cli, spawn_cli, tiny_spec, write_spec
from optuna.trial import TrialState
from pg_sampler import ConnectionSampler
from tcp_proxy import TcpProxy

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.service.storage import open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def wait_until(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def finish(procs: list[subprocess.Popen[str]], timeout: float = 900) -> list[tuple[str, str]]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"worker exited {p.returncode}\n{err}"
        deprecation_free(err)
        outs.append((out, err))
    return outs


def fast_spec(name: str, n_trials: int, epochs: int = 1, heartbeat: int = 1) -> dict:
    spec = tiny_spec(name, budget={"n_trials": n_trials})
    spec["parameters"]["epochs"] = {"value": epochs}
    spec["parameters"]["batch_size"] = {"value": 64}
    spec["workers"] = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat, "max_retry": 3}
    return spec


def worker_env() -> dict[str, str]:
    # Four training processes on two cores: one thread each keeps them from thrashing.
    return cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_four_workers_staggered_finish_exactly_the_budget(tmp_path: Path, pg_url: str) -> None:
    n = 6
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("four", n))), "--storage", pg_url)
    sampler = ConnectionSampler(pg_url.rsplit("/", 1)[1])
    sampler.start()
    env = worker_env()
    procs = [spawn_cli("worker", "--study", "four", "--storage", pg_url, "--gpus", "none", env=env) for _ in range(2)]
    time.sleep(4)  # two more join a study already running
    procs += [spawn_cli("worker", "--study", "four", "--storage", pg_url, "--gpus", "none", env=env) for _ in range(2)]
    outs = finish(procs)
    sampler.stop()
    study = load(pg_url, "four")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert sum(t.state in FINISHED for t in study.trials) == n, states(study)
    assert states(study).get("RUNNING", 0) == 0
    ran = sum(int(re.search(r"worker ran (\d+) trial", out).group(1)) for out, _ in outs)  # type: ignore[union-attr]
    assert ran == len(study.trials) == n
    # Each worker process holds at most 2 connections (pool of 1 + 1 overflow), measured.
    assert sampler.samples > 20 and len(sampler.per_process) >= 4, sampler.per_process
    assert sampler.max_per_process <= 2, sampler.per_process
    print(f"\nconnections per worker process (max seen): {sampler.per_process}")
    shown = run_cli("study", "show", "four", "--storage", pg_url).stdout
    assert re.search(r"workers \(host gpu", shown) and " cpu: running -;" in shown


def test_kill_9_mid_trial_is_retried_by_another_worker(tmp_path: Path, pooled_pg_url: str) -> None:
    # Through PgBouncer (transaction pooling): heartbeats, the stale-trial check and the retry hold there too.
    pg_url = pooled_pg_url
    n = 3
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("killed", n, epochs=3))), "--storage", pg_url)
    victim = spawn_cli("worker", "--study", "killed", "--storage", pg_url, "--gpus", "none")
    wait_until(lambda: states(load(pg_url, "killed")).get("RUNNING", 0) == 1, 120, "a running trial")
    time.sleep(2)  # well inside its training
    victim.kill()  # SIGKILL: no chance to clean up
    victim.wait(10)
    killed_at = time.time()
    doomed = [t for t in load(pg_url, "killed").trials if t.state == TrialState.RUNNING][0]
    survivor = spawn_cli("worker", "--study", "killed", "--storage", pg_url, "--gpus", "none")
    out, err = finish([survivor])[0]
    study = load(pg_url, "killed")
    assert sum(t.state in FINISHED for t in study.trials) == n, states(study)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [doomed.number]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == doomed.number]
    assert retry.params == doomed.params and retry.state in FINISHED
    delay = retry.datetime_start.timestamp() - killed_at
    print(f"\nkilled trial {doomed.number} retried as trial {retry.number} {delay:.1f} s after the kill")
    assert "retried: trial" in run_cli("study", "show", "killed", "--storage", pg_url).stdout


def test_sigterm_hands_the_trial_back_and_exits_promptly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    n = 2
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("term", n, epochs=3))), "--storage", url)
    proc = spawn_cli("worker", "--study", "term", "--storage", url, "--gpus", "none")
    wait_until(lambda: states(load(url, "term")).get("RUNNING", 0) == 1, 120, "a running trial")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 0, err
    assert took < 30, f"worker took {took:.1f} s to stop"
    print(f"\nSIGTERM to exit: {took:.1f} s")
    study = load(url, "term")
    (stopped,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert stopped.user_attrs["interrupted"] == "SIGTERM"
    (queued,) = [t for t in study.trials if t.state == TrialState.WAITING]
    assert queued.params == stopped.params
    finish([spawn_cli("worker", "--study", "term", "--storage", url, "--gpus", "none")])
    study = load(url, "term")
    assert sum(t.state in FINISHED for t in study.trials) == n
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == stopped.number]
    assert retry.state in FINISHED
    # Optuna copies the original's attributes into the retry; how the original ended is not kept.
    record = TrialRecord.of(retry)
    assert record.interrupted is None and record.error is None and record.epoch_seconds


# -- a database restart, on a throwaway cluster this test owns -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_cluster() -> Iterator[tuple[str, Callable[[], None]]]:
    """initdb + pg_ctl in a temp dir on its own port (never the machine's shared server).
    Yields (url, restart)."""
    bindir = Path("/usr/lib/postgresql") / sorted(os.listdir("/usr/lib/postgresql"))[-1] / "bin"
    root = Path(tempfile.mkdtemp(prefix="kt-pg-", dir="/tmp"))
    shutil.chown(root, "postgres", "postgres")
    port = _free_port()

    def as_pg(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    as_pg(str(bindir / "initdb"), "-D", str(root / "data"), "--auth=trust", "-U", "postgres")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    as_pg(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-o", opts, "-l", str(root / "log"), "-w", "start")
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE kt")

    def restart() -> None:
        as_pg(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop")
        time.sleep(3)  # the database is really gone for a while
        as_pg(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-o", opts, "-l", str(root / "log"), "-w", "start")

    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/kt", restart
    finally:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_workers_survive_a_database_restart(tmp_path: Path, own_cluster) -> None:
    url, restart = own_cluster
    n = 4
    run_cli(
        "study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("restart", n, epochs=2, heartbeat=2))), "--storage", url
    )
    env = worker_env()
    procs = [spawn_cli("worker", "--study", "restart", "--storage", url, "--gpus", "none", env=env) for _ in range(2)]
    wait_until(lambda: states(load(url, "restart")).get("COMPLETE", 0) >= 1, 300, "a first finished trial")
    t0 = time.monotonic()
    restart()
    print(f"\ndatabase down for {time.monotonic() - t0:.1f} s")
    outs = finish(procs)
    study = load(url, "restart")
    assert sum(t.state in FINISHED for t in study.trials) == n, states(study)
    assert states(study).get("RUNNING", 0) == 0
    stalls = [float(m.group(1)) for out, _ in outs for m in [re.search(r"waited ([\d.]+) s for the storage", out)] if m]
    print(f"workers stalled by the restart: {stalls} s")
    assert stalls, "no worker noticed the restart: " + " | ".join(e[-300:] for _, e in outs)


# -- the gRPC storage proxy -------------------------------------------------------------------


def test_a_study_worked_through_the_grpc_proxy_completes(tmp_path: Path, pg_url: str) -> None:
    port = _free_port()
    proxy = spawn_cli("storage-proxy", "--storage", pg_url, "--port", str(port))
    try:
        grpc_url = f"grpc://127.0.0.1:{port}"
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60, "the proxy to listen")
        run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("proxied", 2))), "--storage", grpc_url)
        ((out, _),) = finish([spawn_cli("worker", "--study", "proxied", "--storage", grpc_url, "--gpus", "none")])
        assert "worker ran 2 trial(s)" in out
    finally:
        # SIGTERM, not SIGINT: a test run started as a background job hands its children SIGINT ignored.
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(20) == 128 + signal.SIGTERM  # it stops at once, whatever its handler threads do
    study = load(pg_url, "proxied")  # the trials are in PostgreSQL, behind the proxy
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2


# -- a network partition between one worker and PostgreSQL -----------------------------------------


def test_a_worker_cut_off_past_the_grace_period_drops_its_stale_trial_and_goes_on(tmp_path: Path, pg_url: str) -> None:
    """Worker A reaches PostgreSQL through a loopback proxy that is cut, while worker B runs, for longer
    than the grace period: B fails A's trial as stale and retries it; A, back, discards its result."""
    n = 4
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", fast_spec("partition", n, heartbeat=1))), "--storage", pg_url)
    proxy = TcpProxy(5432)
    try:
        via_proxy = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        env = worker_env()
        a = spawn_cli("worker", "--study", "partition", "--storage", via_proxy, "--gpus", "none", env=env)
        wait_until(lambda: any(t.user_attrs.get("worker", {}).get("pid") == a.pid for t in running(pg_url)), 120, "A's trial")
        (a_trial,) = [t for t in running(pg_url) if t.user_attrs["worker"]["pid"] == a.pid]
        b = spawn_cli("worker", "--study", "partition", "--storage", pg_url, "--gpus", "none", env=env)
        proxy.cut()
        wait_until(
            lambda: load(pg_url, "partition").trials[a_trial.number].state == TrialState.FAIL, 120, "A's trial failed as stale"
        )
        time.sleep(2)
        proxy.mend()
        (out_a, err_a), (out_b, err_b) = finish([a, b], timeout=600)
    finally:
        proxy.close()
    assert "Traceback" not in err_a + err_b
    assert f"trial {a_trial.number} was failed as stale while this worker was unreachable; its result is discarded" in err_a
    study = load(pg_url, "partition")
    assert sum(t.state in FINISHED for t in study.trials) == n, states(study)
    assert states(study).get("RUNNING", 0) == 0
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == a_trial.number]
    assert retry.state in FINISHED and retry.params == a_trial.params
    ran = sum(int(re.search(r"worker ran (\d+) trial", out).group(1)) for out in (out_a, out_b))  # type: ignore[union-attr]
    assert ran == n  # the discarded trial is not counted
    print(f"\nA: {err_a.strip().splitlines()[-1]}")


def running(url: str) -> list[optuna.trial.FrozenTrial]:
    return [t for t in load(url, "partition").trials if t.state == TrialState.RUNNING]
