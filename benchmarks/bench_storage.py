"""Orchestration overhead on PostgreSQL: an objective that returns at once, worked through
kmnist-tune's worker loop (budget claim under an advisory lock, heartbeats, retry wrapper)
versus a bare `study.optimize`, with 1, 2 and 4 processes.

Prints trials/s, the median milliseconds per trial, the most database connections any one
worker process held (sampled from pg_stat_activity), and the ratios ours/bare, measured in the
same run: of trials/s, which counts whole processes (their start-up, and for ours the wait of up
to 2 s at the end while another worker's last trial may still fail and come back), and of the
median time per trial, the loop's own overhead. Needs PostgreSQL at 127.0.0.1:5432 (trust auth), like the tests.

    python benchmarks/bench_storage.py [--trials 200] [--procs 1 2 4] [--json out.json]
    python benchmarks/bench_storage.py --breakdown [--trials 200]   # which guarantee costs what
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_sampler import ConnectionSampler, scratch_database  # noqa: E402  (shared with the worker tests)


def _spec(name: str, n_trials: int) -> Any:
    from kmnist_tune.contract.load import parse_spec

    return parse_spec(
        {
            "name": name,
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}},
            "pruner": "none",
            "sampler": "random",
            "budget": {"n_trials": n_trials},
            "workers": {"heartbeat_interval": 30},
        }
    )


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")


def _quick(trial: optuna.Trial) -> float:
    return trial.suggest_float("lr", 1e-4, 1e-1, log=True)


def bare_proc(url: str, name: str, n: int, out: Any) -> None:
    from kmnist_tune.service.storage import open_storage

    _quiet()
    study = optuna.load_study(study_name=name, storage=open_storage(url), sampler=optuna.samplers.RandomSampler())
    times: list[float] = []
    last = time.perf_counter()

    def tick(study: optuna.Study, trial: Any) -> None:
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now

    study.optimize(_quick, n_trials=n, callbacks=[tick])
    out.put(times)


def ours_proc(url: str, name: str, n_total: int, out: Any) -> None:
    import io

    from kmnist_tune.observe.progress import Reporter
    from kmnist_tune.service.retry import open_worker_storage
    from kmnist_tune.service.studies import open_study
    from kmnist_tune.service.worker import Worker

    _quiet()
    spec = _spec(name, n_total)
    storage = open_worker_storage(url, heartbeat_interval=30, grace_period=120, max_retry=3)
    study, spec = open_study(storage, name)
    times: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        return _quick(trial)

    reporter = Reporter(io.StringIO())
    worker = Worker(study, storage, spec, objective, reporter)
    original = worker.run_trial
    last = [time.perf_counter()]

    def timed(trial: optuna.Trial) -> Any:
        result = original(trial)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        return result

    worker.run_trial = timed  # type: ignore[method-assign]
    worker.run()
    out.put(times)


def measure(kind: str, procs: int, n_trials: int) -> dict[str, Any]:
    with scratch_database("kt_bench") as dbname:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
        from kmnist_tune.service.schema import create_storage
        from kmnist_tune.service.storage import open_storage
        from kmnist_tune.service.studies import create_study

        create_study(_spec("bench", n_trials), create_storage(url), resume=False)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        sampler = ConnectionSampler(dbname)
        sampler.start()
        per = [n_trials // procs + (1 if i < n_trials % procs else 0) for i in range(procs)]
        target = bare_proc if kind == "bare" else ours_proc
        ps = [ctx.Process(target=target, args=(url, "bench", per[i] if kind == "bare" else n_trials, out)) for i in range(procs)]
        t0 = time.perf_counter()
        for p in ps:
            p.start()
        times = [t for _ in ps for t in out.get(timeout=600)]
        for p in ps:
            p.join()
        wall = time.perf_counter() - t0
        sampler.stop()
        study = optuna.load_study(study_name="bench", storage=open_storage(url))
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        return {
            "kind": kind,
            "procs": procs,
            "trials": done,
            "trials_per_s": done / wall,
            "median_ms": 1000 * statistics.median(times[1:] or times),
            "max_connections_per_process": sampler.max_per_process,
            "wall_s": wall,
        }


# What each part of the worker loop is for, in the order a trial meets them (for --breakdown).
PIECES = [
    ("study_state", "read the budget and stop (study extend / stop while workers run)"),
    ("take_ticket", "claim ticket: the exact budget"),
    ("make_trial", "make the trial: Optuna's ask, without its whole-study read (claims.make_trial)"),
    ("drop_ticket", "claim ticket given back"),
    ("retry_check", "is this a retry? (resume from its original's checkpoint)"),
    ("record", "worker record on the trial (host, GPU, pid: study show, dashboard)"),
    ("heartbeat", "heartbeat start/stop (a dead worker's trial is retried)"),
    ("objective", "the objective (suggest + return; bare Optuna does the same)"),
    ("tell", "Optuna's tell (bare Optuna does the same)"),
    ("cleanup", "checkpoints of the trial and its retry chain removed"),
    ("progress", "finished count and best value for the progress line (one query)"),
    ("fail_stale", "stale-trial check (once per heartbeat interval)"),
]


ROUND = 25  # trials per turn in --breakdown


def breakdown(n_trials: int) -> None:
    """Time each part of the worker loop over n_trials instant trials (one process): which
    guarantee costs what. Wrappers time the real calls; nothing is skipped."""
    import io
    from collections import defaultdict

    from kmnist_tune.contract import records
    from kmnist_tune.observe.progress import Reporter
    from kmnist_tune.service import claims
    from kmnist_tune.service import worker as worker_mod
    from kmnist_tune.service.retry import open_worker_storage
    from kmnist_tune.service.schema import create_storage
    from kmnist_tune.service.storage import open_storage
    from kmnist_tune.service.studies import create_study, open_study

    spent: dict[str, float] = defaultdict(float)

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    with scratch_database("kt_bench") as dbname:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"
        for name in ("bench", "bare"):  # each starts empty: Optuna's ask slows as a study grows
            create_study(_spec(name, n_trials), create_storage(url), resume=False)
        # Bare Optuna on a study of its own: the baseline, measured here too.
        bare_study = optuna.load_study(study_name="bare", storage=open_storage(url), sampler=optuna.samplers.RandomSampler())
        storage = open_worker_storage(url, heartbeat_interval=30, grace_period=120, max_retry=3)
        study, spec = open_study(storage, "bench")
        worker = worker_mod.Worker(study, storage, spec, timed("objective", _quick), Reporter(io.StringIO()))
        for name, obj, attr in [
            ("study_state", worker, "study_state"),
            ("take_ticket", claims, "_take_ticket"),
            ("drop_ticket", claims, "_drop_ticket"),
            ("make_trial", worker, "make_trial"),
            ("tell", study, "tell"),
            ("retry_check", storage, "get_trial_system_attrs"),
            ("cleanup", worker, "remove_checkpoints"),
            ("progress", worker_mod, "finished_and_best"),
            ("fail_stale", worker, "fail_stale"),
        ]:
            setattr(obj, attr, timed(name, getattr(obj, attr)))
        write = records.TrialRecord.write
        records.TrialRecord.write = timed("record", write)  # type: ignore[method-assign]
        enter, leave = worker_mod._Heartbeat.__enter__, worker_mod._Heartbeat.__exit__
        worker_mod._Heartbeat.__enter__ = timed("heartbeat", enter)  # type: ignore[method-assign]
        worker_mod._Heartbeat.__exit__ = timed("heartbeat", leave)  # type: ignore[method-assign]
        try:
            # Bare and ours take turns, ROUND trials at a time: this machine's speed drifts by tens of
            # per cent over a minute, and both studies grow alike.
            bare = ours = 0.0
            for k in [ROUND] * (n_trials // ROUND) + ([n_trials % ROUND] if n_trials % ROUND else []):
                t0 = time.perf_counter()
                bare_study.optimize(_quick, n_trials=k)
                t1 = time.perf_counter()
                worker.run(max_trials=k)
                bare, ours = bare + (t1 - t0) / n_trials, ours + (time.perf_counter() - t1) / n_trials
        finally:
            records.TrialRecord.write = write  # type: ignore[method-assign]
            worker_mod._Heartbeat.__enter__, worker_mod._Heartbeat.__exit__ = enter, leave  # type: ignore[method-assign]
            storage.engine.dispose()
    print(f"{n_trials} instant trials, one process; ms per trial")
    print(f"{'part':<13} {'ms':>6}  what it is for")
    for name, what in PIECES:
        print(f"{name:<13} {1000 * spent[name] / n_trials:>6.2f}  {what}")
    other = ours - sum(spent.values()) / n_trials
    print(f"{'other':<13} {1000 * other:>6.2f}  the loop itself, the end-of-trial event")
    print(f"{'ours':<13} {1000 * ours:>6.2f}  per trial in all")
    print(f"{'bare':<13} {1000 * bare:>6.2f}  bare study.optimize, as many trials, on a study of its own")
    print(f"ratio ours/bare time per trial: {ours / bare:.2f}x")


def main() -> None:
    _quiet()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", default=None)
    ap.add_argument("--breakdown", action="store_true", help="time each part of the worker loop instead (one process)")
    args = ap.parse_args()
    if args.breakdown:
        breakdown(args.trials)
        return
    rows = []
    print(f"{'procs':>5} {'kind':>5} {'trials':>6} {'trials/s':>9} {'median ms':>10} {'conns/proc':>10}")
    for procs in args.procs:
        pair = {}
        for kind in ("bare", "ours"):
            r = measure(kind, procs, args.trials)
            pair[kind] = r
            rows.append(r)
            print(
                f"{procs:>5} {kind:>5} {r['trials']:>6} {r['trials_per_s']:>9.1f} {r['median_ms']:>10.1f} "
                f"{r['max_connections_per_process']:>10}"
            )
        ratio = pair["ours"]["trials_per_s"] / pair["bare"]["trials_per_s"]
        per_trial = pair["ours"]["median_ms"] / pair["bare"]["median_ms"]
        print(
            f"{procs:>5} ratio ours/bare trials/s: {ratio:.2f}x; time per trial (median): {per_trial:.2f}x; "
            f"exact budget: ours finished {pair['ours']['trials']} of {args.trials}, bare {pair['bare']['trials']}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
