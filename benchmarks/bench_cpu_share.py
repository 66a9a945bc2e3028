"""Workers sharing one machine's CPU: the same trials by one worker, by `run --gpus none --per-gpu 2`
(two CPU slots), and by two independent `worker` processes; each with its share of the cores
(service/cpu_share.py), and once more as before that existed (`--threads <all cores>` for each: every
process assumes it owns the machine). Wall time from launch to the last exit; the ratio is against
the one worker, measured in the same run.

Target (issue 15): two slots and two independent workers within 1.3x of the one worker.

    KMNIST_TUNE_DATA=../shared/data/kmnist python benchmarks/bench_cpu_share.py [--trials 4] [--train-size 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_tune.service.cpu_share import machine_cores  # noqa: E402


def spec(name: str, n_trials: int, train_size: int, epochs: int) -> dict:
    # Every trial the same work: fixed configuration, no pruning, no checkpoints, no W&B.
    return {
        "name": name,
        "data": {"dataset": "kmnist", "train_size": train_size, "valid_size": 500},
        "parameters": {"arch": "resnet18", "epochs": epochs, "batch_size": 64, "lr": {"values": [3e-3]}},
        "sampler": "random",
        "pruner": "none",
        "checkpoints": {"enabled": False},
        "tracking": {"wandb": {"mode": "disabled"}},
        "budget": {"n_trials": n_trials},
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kmnist_tune", *args]


def timed(procs_args: list[list[str]], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(a, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for a in procs_args]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(p.args)} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    cores = machine_cores()
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-share-"))
    env = {k: v for k, v in os.environ.items() if k != "KMNIST_TUNE_THREADS"}
    env.update(XDG_RUNTIME_DIR=str(work / "run"), WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    if "KMNIST_TUNE_DATA" not in env and (REPO.parent / "shared" / "data" / "kmnist").is_dir():
        env["KMNIST_TUNE_DATA"] = str(REPO.parent / "shared" / "data" / "kmnist")

    def study(name: str) -> str:
        url = f"sqlite:///{work / name}.db"
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec(name, a.trials, a.train_size, a.epochs)))
        subprocess.run(cli("study", "create", str(path), "--storage", url), env=env, check=True, capture_output=True)
        return url

    def worker(name: str, url: str, *extra: str) -> list[str]:
        return cli("worker", "--study", name, "--storage", url, "--gpus", "none", *extra)

    rows: list[tuple[str, float]] = []
    url = study("one")
    rows.append(("one worker", timed([worker("one", url)], env)))
    url = study("slots")
    rows.append(("--gpus none --per-gpu 2 (two slots)", timed([worker("slots", url, "--per-gpu", "2")], env)))
    url = study("two")
    rows.append(("two independent workers", timed([worker("two", url), worker("two", url)], env)))
    url = study("greedy")
    greedy = ["--threads", str(cores)]
    rows.append((f"two workers, --threads {cores} each (as before)", timed([worker("greedy", url, *greedy)] * 2, env)))

    base = rows[0][1]
    print(f"bench_cpu_share: {cores} cores, {a.trials} trials of {a.epochs} epoch(s), resnet18, {a.train_size} images, batch 64")
    print(f"{'how':<44} {'wall s':>8} {'vs one':>8}")
    for how, s in rows:
        print(f"{how:<44} {s:8.1f} {s / base:7.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"cores": cores, "rows": [{"how": h, "wall_s": s, "ratio": s / base} for h, s in rows]}))


if __name__ == "__main__":
    main()
