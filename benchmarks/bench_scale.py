"""Many workers on one PostgreSQL: N simulated workers (the real worker loop with its own storage,
heartbeats, stale-trial checks and the budget claim; an objective that sleeps a few seconds; no
torch) against one study, connected directly and through PgBouncer (transaction pooling).

Prints, per N and route: finished trials against the budget, trials run twice, trials lost (failed,
left running or missing), workers that could not start, granted claims per second, p50/p99 claim
latency (the worker's whole claim: reading the budget, the claim ticket, making the trial; beside
it its two parts: the budget claim proper, i.e. reading the budget and taking and giving back the
ticket, and the making of the trial, claims.make_trial), measured once every worker has started (the p99 with the start-up ramp
too), how busy the machine's CPUs were meanwhile, and the most server connections PostgreSQL had
open to the study's database at once (pg_stat_activity). The direct route is the baseline measured
in the same run.

All N workers share this machine's cores, where each would have a host of its own: the trial
length must leave the simulation itself room (the `cpu busy` column says whether it did).

Needs PostgreSQL at 127.0.0.1:5432 and PgBouncer at 127.0.0.1:6432 (scripts/pgbouncer-local),
trust auth, as the tests do. Each worker is a process forked from the benchmark's (--per-proc puts
several in one as threads); they start at random times over --ramp seconds.

    python benchmarks/bench_scale.py [--workers 10 50 200] [--routes direct pgbouncer]
        [--trials-per-worker 2] [--rate 3 | --sleep MIN MAX] [--ramp S] [--heartbeat 30] [--per-proc 5]
        [--json out.json]

By default each N gets the same load: trials of N / --rate seconds on average (uniform over 0.5-1.5x
of that: 3.3 s at N = 10, 67 s at N = 200), so claims arrive at about --rate per second whatever N,
and workers join over N / 5 seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_sampler import ConnectionSampler, scratch_database  # noqa: E402  (shared with the tests)

PORTS = {"direct": 5432, "pgbouncer": 6432}


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("kmnist_tune").setLevel(logging.ERROR)  # "storage unreachable; retrying" lines


def _root_cause(e: BaseException) -> str:
    """The innermost cause's first line (Optuna wraps the driver's error in its own)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def proc_main(
    url: str, name: str, n_threads: int, sleep: tuple[float, float], ramp: float, seed: int, ready: Any, out: Any
) -> None:
    """One process hosting n_threads simulated workers; puts their logs on `out`."""
    from sim_worker import WorkLog, work

    _quiet()
    ready.wait()  # every process has imported what it needs: the ramp starts now, for all of them
    logs = [WorkLog() for _ in range(n_threads)]
    errors: list[str] = []

    def one(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        time.sleep(rng.uniform(0, ramp))  # workers join over the ramp, as pods of a Job get scheduled
        try:
            work(url, name, lambda: rng.uniform(*sleep), logs[i])
        except BaseException as e:  # noqa: BLE001  (a worker that could not start or stopped: counted)
            errors.append(_root_cause(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(
        {
            "claims": [c for log in logs for c in log.claims],
            "denied": sum(log.denied for log in logs),
            "ran": [n for log in logs for n in log.ran],
            "errors": errors,
        }
    )


def _ms(sorted_s: list[float], q: float) -> float:
    return 1000 * sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] if sorted_s else float("nan")


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _busy_share(a: tuple[int, int], b: tuple[int, int]) -> float:
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def measure(
    n_workers: int, route: str, per_worker: int, sleep: tuple[float, float], ramp: float, heartbeat: int, per_proc: int
) -> dict[str, Any]:
    from sim_worker import make_study

    from kmnist_tune.service.storage import open_storage

    with scratch_database("kt_scale") as dbname:
        direct = f"postgresql+psycopg://postgres@127.0.0.1:{PORTS['direct']}/{dbname}"
        url = f"postgresql+psycopg://postgres@127.0.0.1:{PORTS[route]}/{dbname}"
        budget = n_workers * per_worker
        # The spec's heartbeat settings (grace = 4 beats, the default ratio); --heartbeat 30 is the default.
        make_study(direct, "scale", budget, heartbeat_interval=heartbeat, grace_period=4 * heartbeat)
        n_procs = -(-n_workers // per_proc)
        split = [n_workers // n_procs + (1 if i < n_workers % n_procs else 0) for i in range(n_procs)]
        # Forked from this process, which has imported everything and holds no connection or thread
        # yet: the children share its pages (hundreds fit in memory) and start at once.
        import sim_worker  # noqa: F401  (imported before the fork, for the children)

        ctx = mp.get_context("fork")
        out = ctx.Queue()
        ready = ctx.Barrier(n_procs + 1)
        ps = [ctx.Process(target=proc_main, args=(url, "scale", k, sleep, ramp, i, ready, out)) for i, k in enumerate(split)]
        for p in ps:
            p.start()
        sampler = ConnectionSampler(dbname)
        sampler.start()
        ready.wait(timeout=600)
        t0, start = time.perf_counter(), time.time()
        time.sleep(ramp)
        busy_from = _cpu_ticks()  # the machine's CPU from the end of the ramp on
        results = [out.get(timeout=1800) for _ in ps]
        busy = _busy_share(busy_from, _cpu_ticks())
        for p in ps:
            p.join()
        wall = time.perf_counter() - t0
        sampler.stop()
        storage = open_storage(direct)
        study = optuna.load_study(study_name="scale", storage=storage)
        states = Counter(t.state.name for t in study.trials)
        storage.engine.dispose()
        claims = [c for r in results for c in r["claims"]]
        # Steady state: claims that began once every worker had started (the end of the ramp).
        steady = [c for c in claims if c[1] - c[0] >= start + ramp] if ramp else claims
        latencies = sorted(d for d, _, _ in steady)
        makes = sorted(a for _, _, a in steady)
        own = sorted(d - a for d, _, a in steady)  # the claim itself: budget read, ticket taken and given back
        ends = sorted(end for _, end, _ in steady)
        span = (ends[-1] - ends[0]) if len(ends) > 1 else float("nan")
        everything = sorted(d for d, _, _ in claims)
        ran = Counter(n for r in results for n in r["ran"])
        errors = [e for r in results for e in r["errors"]]
        finished = states["COMPLETE"] + states["PRUNED"]
        return {
            "workers": n_workers,
            "route": route,
            "budget": budget,
            "finished": finished,
            "run_twice": sum(1 for n in ran.values() if n > 1),
            "lost": budget - finished + states["FAIL"] + states["RUNNING"],
            "states": dict(states),
            "workers_failed": len(errors),
            "errors": sorted(Counter(errors).items(), key=lambda kv: -kv[1])[:3],
            "claims": len(claims),
            "steady_claims": len(steady),
            "claims_per_s": (len(ends) - 1) / span if span and span > 0 else float("nan"),
            "p50_ms": _ms(latencies, 0.50),
            "p99_ms": _ms(latencies, 0.99),
            "own_p50_ms": _ms(own, 0.50),
            "own_p99_ms": _ms(own, 0.99),
            "make_p50_ms": _ms(makes, 0.50),
            "make_p99_ms": _ms(makes, 0.99),
            "p99_ms_with_ramp": _ms(everything, 0.99),
            "cpu_busy": busy,
            "server_connections": sampler.max_total,
            "wall_s": wall,
            # Each steady claim as (s after the start when it ended, its ms, the ms of making its trial): when the slow ones came.
            "timeline": [(round(end - start, 2), round(1000 * d, 1), round(1000 * a, 1)) for d, end, a in steady],
        }


def main() -> None:
    _quiet()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--routes", nargs="+", default=["direct", "pgbouncer"], choices=sorted(PORTS))
    ap.add_argument("--trials-per-worker", type=int, default=2)
    ap.add_argument("--rate", type=float, default=3.0, help="trials per second the N workers finish together (sets the sleep)")
    ap.add_argument("--sleep", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="the objective's sleep, s")
    ap.add_argument("--ramp", type=float, default=None, help="workers start at random times over this many seconds (N / 5)")
    ap.add_argument("--heartbeat", type=int, default=30, help="the study's heartbeat interval, s")
    # One per process by default: a real worker has its interpreter to itself, and threads behind one
    # interpreter lock would hold their transactions open while they wait for it.
    ap.add_argument("--per-proc", type=int, default=1, help="simulated workers (threads) per process")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    head = (
        f"{'N':>4} {'route':>9} {'finished':>9} {'twice':>5} {'lost':>4} {'no start':>8} {'claims/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'ticket p50':>10} {'p99':>6} {'make p50':>8} {'p99':>6} "
        f"{'p99 w/ ramp':>11} {'cpu busy':>8} {'server conns':>12} {'wall s':>7}"
    )
    print(head, flush=True)
    rows = []
    for n in args.workers:
        for route in args.routes:
            mean = n / args.rate
            sleep = tuple(args.sleep) if args.sleep else (0.5 * mean, 1.5 * mean)
            ramp = args.ramp if args.ramp is not None else n / 5
            r = measure(n, route, args.trials_per_worker, sleep, ramp, args.heartbeat, args.per_proc)  # type: ignore[arg-type]
            rows.append(r)
            print(
                f"{n:>4} {route:>9} {r['finished']:>4}/{r['budget']:<4} {r['run_twice']:>5} {r['lost']:>4} "
                f"{r['workers_failed']:>8} {r['claims_per_s']:>8.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                f"{r['own_p50_ms']:>10.1f} {r['own_p99_ms']:>6.1f} {r['make_p50_ms']:>8.1f} {r['make_p99_ms']:>6.0f} "
                f"{r['p99_ms_with_ramp']:>11.0f} {r['cpu_busy']:>8.0%} "
                f"{r['server_connections']:>12} {r['wall_s']:>7.1f}",
                flush=True,
            )
            for err, count in r["errors"]:
                print(f"     {count} x {err}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
