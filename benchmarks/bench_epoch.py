"""Training throughput: kmnist-tune's data path and Learner vs the tutorial's fastai DataBlock path.

For every (arch, stem) it trains the same model (same init, batch size, device, learning rate) twice
with fastai's fit_one_cycle:

  ours      build_learner(): uint8 images resident on the device, batches sliced and normalised
            there; on CUDA bf16 autocast + channels-last + cuDNN benchmark (performance: auto).
  baseline  the tutorial's way: a DataBlock (ImageBlock(cls=PILImageBW), CategoryBlock) over the
            numpy arrays, per-item PIL/ToTensor work on the CPU in fastai's default worker
            processes, IntToFloatTensor + Normalize as batch transforms, fp32.

and reports training images/s (the first --warmup batches of a run excluded), seconds per epoch
(training phase; validation is skipped, it is not what is compared) and ours/baseline; `other` is the
most cores that other processes kept busy during the row's runs (on a shared machine, a row with
`other` well above 0 is noise, not a measurement).
It also times the data path alone: one epoch of normalised batches on the device, no model.

    .venv/bin/python benchmarks/bench_epoch.py                      # CPU sizes
    python benchmarks/bench_epoch.py --device cuda --json out.json  # GPU: full train split, bs 512
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastai.callback.core import Callback, CancelTrainException, CancelValidException  # noqa: E402
from fastai.callback.progress import ProgressCallback  # noqa: E402
from fastai.data.block import CategoryBlock, DataBlock  # noqa: E402
from fastai.data.transforms import IndexSplitter, Normalize  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.metrics import accuracy  # noqa: E402
from fastai.vision.core import PILImageBW  # noqa: E402
from fastai.vision.data import ImageBlock  # noqa: E402

from kmnist_tune.contract.spec import DataSpec  # noqa: E402
from kmnist_tune.training.devices import pick_device  # noqa: E402
from kmnist_tune.training.loader import TensorBatches, make_split  # noqa: E402
from kmnist_tune.training.model import build_model  # noqa: E402
from kmnist_tune.training.precision import resolve_performance  # noqa: E402
from kmnist_tune.training.splits import Splits, load_splits  # noqa: E402
from kmnist_tune.training.train import build_learner  # noqa: E402

LR = 2e-3


def default_data_dir() -> Path:
    env = os.environ.get("KMNIST_TUNE_DATA")
    if env:
        return Path(env)
    for cand in (REPO.parent / "shared" / "data" / "kmnist", REPO / "shared" / "data" / "kmnist"):
        if cand.is_dir():
            return cand
    return REPO.parent / "shared" / "data" / "kmnist"


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process and its reaped children), Linux only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:15]  # utime stime cutime cstime
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), (user + nice + system + irq + softirq + steal) / hz, sum(int(v) for v in own) / hz


def other_cores(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """Average number of cores kept busy by other processes between two snapshots (noise on a shared machine)."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the baseline: the tutorial's DataBlock ---------------------------------------------------------


def baseline_dls(splits: Splits, bs: int, device: torch.device, seed: int) -> Any:
    """fastai DataBlock over the arrays: PIL images per item on the CPU, fastai's default workers."""
    x = np.concatenate([splits.x_train, splits.x_valid])
    y = np.concatenate([splits.y_train, splits.y_valid])
    n_train = len(splits.x_train)
    mean, std = splits.mean_std
    dblock = DataBlock(
        blocks=(ImageBlock(cls=PILImageBW), CategoryBlock),
        get_x=lambda i: x[i],  # PILImageBW.create(ndarray) -> Image.fromarray
        get_y=lambda i: int(y[i]),
        splitter=IndexSplitter(list(range(n_train, len(x)))),
        batch_tfms=[Normalize.from_stats(mean, std, cuda=device.type == "cuda")],
    )
    torch.manual_seed(seed)
    return dblock.dataloaders(list(range(len(x))), bs=bs, device=device)


# -- timing -----------------------------------------------------------------------------------------


def time_batches(batches: Any, device: torch.device, warmup: int) -> dict[str, float]:
    """Iterate one epoch of batches; images/s over the batches after the first `warmup`."""
    seen, t0, t_start = 0, None, time.perf_counter()
    n_batches = 0
    for i, (xb, _yb) in enumerate(batches):
        n_batches += 1
        if i + 1 == warmup:
            sync(device)
            t0 = time.perf_counter()
        elif i + 1 > warmup:
            seen += int(xb.shape[0])
    sync(device)
    t1 = time.perf_counter()
    if t0 is None or seen == 0:
        raise SystemExit(f"too few batches ({n_batches}) for {warmup} warm-up batches; use a larger --train-size")
    return {"images_per_s": seen / (t1 - t0), "epoch_s": t1 - t_start, "batches": n_batches, "timed_images": seen}


class Timer(Callback):
    """Times the training phase: images/s after `warmup` batches, optionally stopping the phase after
    `max_seconds` (then seconds/epoch is extrapolated); validation is skipped."""

    order = 99

    def __init__(self, device: torch.device, warmup: int, max_seconds: float | None):
        self.device, self.warmup, self.max_seconds = device, warmup, max_seconds
        self.seen, self.timed_s, self.batches, self.capped = 0, 0.0, 0, False
        self.epoch_s: list[float] = []
        self.total_batches = 0

    def before_train(self) -> None:
        sync(self.device)
        self._t_start = time.perf_counter()
        self._t0: float | None = None if self.total_batches < self.warmup else self._t_start
        self._epoch_batches = 0

    def after_batch(self) -> None:
        if not self.training:
            return
        self.total_batches += 1
        self._epoch_batches += 1
        if self._t0 is None:
            if self.total_batches >= self.warmup:
                sync(self.device)
                self._t0 = time.perf_counter()
            return
        self.seen += int(self.xb[0].shape[0])
        self.batches += 1
        if self.max_seconds and time.perf_counter() - self._t0 > self.max_seconds:
            self.capped = True
            raise CancelTrainException()

    def after_train(self) -> None:
        sync(self.device)
        t1 = time.perf_counter()
        if self._t0 is not None:
            self.timed_s += t1 - self._t0
        self.epoch_s.append(t1 - self._t_start)

    def before_validate(self) -> None:
        raise CancelValidException()

    @property
    def images_per_s(self) -> float:
        return self.seen / self.timed_s if self.timed_s > 0 else float("nan")


def _fmt_other(*runs: dict[str, Any]) -> str:
    vals = [r["other_cores_busy"] for r in runs if r.get("other_cores_busy") is not None]
    return f"{max(vals):.1f}" if vals else "?"


def _learner_quiet(learn: Learner) -> Learner:
    learn.logger = lambda *a, **k: None
    if any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
    return learn


def train_run(
    path: str,
    splits: Splits,
    arch: str,
    stem: str,
    bs: int,
    epochs: int,
    device: torch.device,
    warmup: int,
    max_seconds: float | None,
    seed: int,
    base_dls: Any = None,
    performance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    params = {"arch": arch, "stem": stem, "batch_size": bs, "dropout": 0.5}
    if path == "ours":
        learn, _ = build_learner(splits, params, device, "accuracy", seed=seed, performance=performance)
        settings = learn.kt_performance.describe()
        n_epoch_images = (len(splits.x_train) // bs) * bs if len(splits.x_train) > bs else len(splits.x_train)
    else:
        torch.manual_seed(seed)
        model = build_model(arch, splits.n_classes, stem, 0.5).to(device)
        learn = Learner(base_dls, model, loss_func=CrossEntropyLossFlat(), metrics=[accuracy])
        settings = "fp32"
        n_epoch_images = len(base_dls.train) * bs
    _learner_quiet(learn)
    timer = Timer(device, warmup, max_seconds)
    snap0 = cpu_snapshot()
    t = time.perf_counter()
    learn.fit_one_cycle(epochs, LR, cbs=[timer])
    wall = time.perf_counter() - t
    other = other_cores(snap0, cpu_snapshot())
    ips = timer.images_per_s
    # Seconds per epoch of training: measured when every epoch ran to the end, else extrapolated.
    epoch_s = float(np.mean(timer.epoch_s)) if not timer.capped else n_epoch_images / ips
    out = {
        "path": path,
        "arch": arch,
        "stem": stem,
        "bs": bs,
        "settings": settings,
        "images_per_s": ips,
        "epoch_s": epoch_s,
        "epoch_s_estimated": timer.capped,
        "timed_batches": timer.batches,
        "timed_images": timer.seen,
        "wall_s": wall,
        "other_cores_busy": other,
    }
    del learn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(), help="folder with the official KMNIST files")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    ap.add_argument("--train-size", type=int, default=None, help="training images (default: 10000 on CPU, all on GPU)")
    ap.add_argument("--valid-size", type=int, default=1000, help="validation images (only built, never scored)")
    ap.add_argument("--bs", type=int, default=None, help="batch size (default: 128 on CPU, 512 on GPU)")
    ap.add_argument("--archs", default="resnet18,resnet34")
    ap.add_argument("--stems", default="imagenet,small")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3, help="batches excluded from the timing at the start of each run")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop a training run after this many timed seconds and extrapolate s/epoch (default: 30 on CPU, none on GPU)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per path and row, alternating; the best is reported")
    ap.add_argument("--skip-data", action="store_true", help="skip the data-path-alone measurement")
    ap.add_argument("--skip-train", action="store_true", help="skip the training runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--performance",
        type=json.loads,
        default=None,
        help='the spec\'s performance block for ours, as JSON (e.g. \'{"optimizer": "fastai"}\'); default: auto',
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    gpu = device.type == "cuda"
    train_size = args.train_size if args.train_size is not None else (None if gpu else 10000)
    bs = args.bs or (512 if gpu else 128)
    max_seconds = args.max_seconds if args.max_seconds is not None else (None if gpu else 30.0)
    if max_seconds is not None and max_seconds <= 0:
        max_seconds = None
    archs = [a for a in args.archs.split(",") if a]
    stems = [s for s in args.stems.split(",") if s]

    spec = DataSpec(dataset="kmnist", train_size=train_size, valid_size=args.valid_size)
    splits = load_splits(spec, args.data_dir, download=False)
    dev_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)"
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": dev_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "train_images": len(splits.x_train),
        "bs": bs,
        "epochs": args.epochs,
        "warmup_batches": args.warmup,
        "max_seconds": max_seconds,
        "repeat": args.repeat,
        "performance_ours": resolve_performance(args.performance, device).describe(),
        "loadavg_start": list(os.getloadavg()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(
        f"bench_epoch: {dev_name}, torch {torch.__version__}, {len(splits.x_train)} KMNIST training images, bs {bs}, "
        f"{args.epochs} epoch(s), warm-up {args.warmup} batches, cap {max_seconds or 'none'} s/run, best of {args.repeat}, "
        f"load average {meta['loadavg_start'][0]:.2f}",
        flush=True,
    )
    results: dict[str, Any] = {"meta": meta, "data": None, "train": []}

    base_dls = baseline_dls(splits, bs, device, args.seed)

    if not args.skip_data:
        mean, std = splits.mean_std
        train_split = make_split(splits.x_train, splits.y_train, device, mean, std, args.seed)
        ours_dl = TensorBatches(train_split, bs=bs, shuffle=True, drop_last=True, device=device)
        ours_all, base_all = [], []
        for _ in range(args.repeat):
            for dl, out in ((ours_dl, ours_all), (base_dls.train, base_all)):
                snap0 = cpu_snapshot()
                r = time_batches(dl, device, args.warmup)
                r["other_cores_busy"] = other_cores(snap0, cpu_snapshot())
                out.append(r)
        ours = max(ours_all, key=lambda r: r["images_per_s"])
        base = max(base_all, key=lambda r: r["images_per_s"])
        results["data"] = {"ours": ours, "baseline": base, "ratio": ours["images_per_s"] / base["images_per_s"]}
        print("\ndata path alone (one epoch of normalised batches on the device, no model)")
        print(f"{'loader':<12} {'images/s':>12} {'epoch s':>9} {'ratio':>9} {'other':>6}")
        print(
            f"{'kmnist-tune':<12} {ours['images_per_s']:>12,.0f} {ours['epoch_s']:>9.3f} {results['data']['ratio']:>8.1f}x "
            f"{_fmt_other(ours):>6}"
        )
        print(
            f"{'baseline':<12} {base['images_per_s']:>12,.0f} {base['epoch_s']:>9.3f} {1.0:>8.1f}x {_fmt_other(base):>6}",
            flush=True,
        )

    if not args.skip_train:
        print(f"\ntraining (fit_one_cycle, lr {LR:g}; images/s after warm-up; s/epoch = training phase, ~ = extrapolated)")
        header = (
            f"{'arch':<9} {'stem':<9} {'ours img/s':>11} {'base img/s':>11} {'ours s/ep':>10} {'base s/ep':>10} "
            f"{'ours/base':>9}  {'other':>5}  ours settings"
        )
        print(header)
        print("-" * len(header), flush=True)
        for arch in archs:
            for stem in stems:
                runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
                # Alternating (ours first in even rounds, baseline first in odd ones), so neither path always
                # runs first and a burst of load elsewhere tends to hit both alike.
                for r in range(args.repeat):
                    for path in ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours"):
                        runs[path].append(
                            train_run(
                                path,
                                splits,
                                arch,
                                stem,
                                bs,
                                args.epochs,
                                device,
                                args.warmup,
                                max_seconds,
                                args.seed,
                                base_dls,
                                args.performance,
                            )
                        )
                ours = max(runs["ours"], key=lambda r: r["images_per_s"])
                base = max(runs["baseline"], key=lambda r: r["images_per_s"])
                ratio = ours["images_per_s"] / base["images_per_s"]
                results["train"].append(
                    {"arch": arch, "stem": stem, "ours": ours, "baseline": base, "ratio": ratio, "all_runs": runs}
                )

                def s(r: dict[str, Any]) -> str:
                    return ("~" if r["epoch_s_estimated"] else "") + f"{r['epoch_s']:.1f}"

                print(
                    f"{arch:<9} {stem:<9} {ours['images_per_s']:>11,.0f} {base['images_per_s']:>11,.0f} {s(ours):>10} "
                    f"{s(base):>10} {ratio:>8.2f}x  {_fmt_other(ours, base):>5}  {ours['settings']}",
                    flush=True,
                )

    meta["loadavg_end"] = list(os.getloadavg())
    checks = []
    if results["data"] is not None:
        checks.append(("data path alone >= 20x baseline", results["data"]["ratio"] >= 20.0, f"{results['data']['ratio']:.1f}x"))
    for row in results["train"]:
        if row["arch"] == "resnet18":
            checks.append((f"resnet18/{row['stem']} training >= 1.0x baseline", row["ratio"] >= 1.0, f"{row['ratio']:.2f}x"))
    results["checks"] = [{"check": c, "pass": ok, "value": v} for c, ok, v in checks]
    if checks:
        print("\ntargets")
        for c, ok, v in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {c}: {v}")
    print(f"load average at the end: {meta['loadavg_end'][0]:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
