"""How long the commands that only read a study take, as a user runs them: a fresh process each
time (median of N cold runs), on a study of the quickstart's size, for this tree and for a baseline
revision measured in the same run.

The study is the real quickstart (`sweeps/quickstart.yaml`: resnet18, 10,000 official KMNIST
training images, LR-finder prior, 6 trials), run once into a SQLite file unless `--db` names one
that already holds it. The baseline is `git archive REV kmnist_tune` unpacked into a temporary
folder and run with the same interpreter and libraries. `dashboard` is timed from the start of
the process to its first answer on /api/studies.

    .venv/bin/python benchmarks/bench_cli.py [--baseline 3ee917d] [--runs 5] [--db /tmp/qs.db] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STUDY = "kmnist-quickstart"
LIMIT_S = 1.5  # issue 10: each read-only command within this on this machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(url: str, out: Path) -> dict[str, list[str]]:
    return {
        "study list": ["study", "list", "--storage", url],
        "study show": ["study", "show", STUDY, "--storage", url],
        "best": ["best", "--study", STUDY, "--storage", url],
        "report": ["report", "--study", STUDY, "--out", str(out / "report"), "--storage", url],
        "lr-find --stored": ["lr-find", "--study", STUDY, "--stored", "--out", str(out / "lr.png"), "--storage", url],
        "dashboard": ["dashboard", "--storage", url, "--port", "{port}"],
    }


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds from spawning `python -m kmnist_tune ARGV` to its exit (a server: to its first answer)."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    cmd = [sys.executable, "-m", "kmnist_tune", *argv]
    t0 = time.perf_counter()
    if argv[0] != "dashboard":
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(argv)}` failed in {cwd}:\n{proc.stderr[-2000:]}")
        return took
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    r.read()
                return time.perf_counter() - t0
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"the dashboard exited: {proc.stderr.read()[-2000:]}") from None
                if time.perf_counter() - t0 > 120:
                    raise SystemExit("the dashboard did not answer within 120 s") from None
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(10)


def make_study(db: Path, data_dir: Path, env: dict[str, str]) -> None:
    print(f"running the quickstart into {db} (a few minutes on 2 cores) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kmnist_tune", "run", str(REPO / "sweeps" / "quickstart.yaml"), "--storage", f"sqlite:///{db}"],
        cwd=REPO,
        env={**env, "KMNIST_TUNE_DATA": str(data_dir)},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the quickstart failed:\n{proc.stderr[-3000:]}")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def baseline_tree(rev: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "kmnist_tune"], cwd=REPO, capture_output=True, check=True).stdout
    tar = dest / "baseline.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(dest / "tree", filter="data")
    return dest / "tree"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="3ee917d", help="git revision to compare with (default: before issue 10)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--db", type=Path, default=None, help="SQLite file holding the quickstart study (made if missing)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("KMNIST_TUNE_DATA", REPO.parent / "shared/data/kmnist")))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("KMNIST_TUNE_")}
    env.update({"PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled", "KMNIST_TUNE_MIRROR": "http://127.0.0.1:9/offline"})
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp_s:
        tmp = Path(tmp_s)
        db = args.db or tmp / "quickstart.db"
        if not db.exists():
            make_study(db.resolve(), args.data_dir.resolve(), env)
        url = f"sqlite:///{db.resolve()}"
        old_cwd = baseline_tree(args.baseline, tmp)
        trees = {"before": old_cwd, "now": REPO}
        rows = []
        print(f"{'command':<18} {'before s':>9} {'now s':>7} {'speed-up':>9}  now <= {LIMIT_S} s")
        for name in commands(url, tmp):
            runs: dict[str, list[float]] = {"before": [], "now": []}
            for i in range(args.runs):
                # Alternate which tree goes first, so neither always meets a warm page cache.
                for label in ("before", "now") if i % 2 == 0 else ("now", "before"):
                    out = tmp / label / name.replace(" ", "_") / str(i)
                    out.mkdir(parents=True)
                    runs[label].append(timed(commands(url, out)[name], trees[label], env))
            before, now = statistics.median(runs["before"]), statistics.median(runs["now"])
            ok = now <= LIMIT_S
            rows.append({"command": name, "before_s": before, "now_s": now, "speedup": before / now, "ok": ok, "runs": runs})
            print(f"{name:<18} {before:>9.2f} {now:>7.2f} {before / now:>8.1f}x  {'yes' if ok else 'NO'}", flush=True)
        print(f"all within {LIMIT_S} s: {'yes' if all(r['ok'] for r in rows) else 'NO'}")
    if args.json:
        meta: dict[str, Any] = {"baseline": args.baseline, "runs": args.runs, "load": os.getloadavg(), "rows": rows}
        args.json.write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
