"""Trials per hour on one GPU with `kmnist-tune worker --per-gpu K` for K = 1, 2, 4 (GPU only).

Each K gets a fresh study on a local SQLite file with the same spec (resnet18, ImageNet stem,
batch 512, 10 epochs on the full KMNIST train split by default: a real trial, where process start-up
does not dominate as it did in 1-epoch trials; lr fixed so every trial is the same work) and 8
trials. The ratio is trials/hour at K over K=1, measured in the same run on the same GPU.

    python benchmarks/bench_packing.py --data-dir ../shared/data/kmnist [--trials 8] [--per-gpu 1 2 4]
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


def spec(name: str, n_trials: int, epochs: int, performance: dict | None = None) -> dict:
    return {
        **({"performance": performance} if performance else {}),
        "name": name,
        "data": {"dataset": "kmnist", "valid_fraction": 0.1},
        "parameters": {
            "arch": "resnet18",
            "stem": "imagenet",
            "epochs": epochs,
            "batch_size": {"initial": 512, "min": 64},
            "lr": {"values": [3e-3]},
            "weight_decay": 0.01,
        },
        "pruner": "none",
        "budget": {"n_trials": n_trials},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def run_k(k: int, n_trials: int, epochs: int, data_dir: str, gpu: str, work: Path, performance: dict | None = None) -> dict:
    url = f"sqlite:///{work / f'pack{k}.db'}"
    path = work / f"pack{k}.yaml"
    path.write_text(yaml.safe_dump(spec(f"pack{k}", n_trials, epochs, performance)))
    env = {**os.environ, "KMNIST_TUNE_DATA": data_dir, "WANDB_MODE": "disabled"}
    cli = [sys.executable, "-m", "kmnist_tune"]
    subprocess.run([*cli, "study", "create", str(path), "--storage", url], check=True, env=env, cwd=work, capture_output=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cli, "worker", "--study", f"pack{k}", "--storage", url, "--gpus", gpu, "--per-gpu", str(k)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"K={k}: worker failed:\n{proc.stderr[-2000:]}")
    return {"per_gpu": k, "trials": n_trials, "wall_s": wall, "trials_per_hour": n_trials * 3600 / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "kmnist"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--per-gpu", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--gpu", default="0")
    ap.add_argument("--performance", type=json.loads, default=None, help="the spec's performance block, as JSON (default: auto)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_packing needs a CUDA GPU (it measures several trial processes sharing one); none is visible")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.per_gpu:
            rows.append(run_k(k, args.trials, args.epochs, args.data_dir, args.gpu, Path(tmp), args.performance))
            r = rows[-1]
            print(
                f"per-gpu {k}: {r['trials']} trials in {r['wall_s']:.1f} s = {r['trials_per_hour']:.0f} trials/hour "
                f"({r['trials_per_hour'] / rows[0]['trials_per_hour']:.2f}x K={rows[0]['per_gpu']})",
                flush=True,
            )
    print(f"device: {torch.cuda.get_device_name(0)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
