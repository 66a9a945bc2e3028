"""Checkpoint cost per epoch, and artifact-store throughput: PostgreSQL table vs a local folder.

1. Checkpoint cost (the quickstart's model and size: resnet18, 10,000 KMNIST training images,
   batch 128, Adam): one fastai run of --epochs epochs without checkpoints (the baseline), then the
   same run saving a checkpoint after every epoch through the real recipe code (TrialCheckpoints of
   a real trial) into each store, then the baseline again (the machine's run-to-run noise). Reports
   the median epoch time of each run (epochs after the first), the time each save held training up,
   and cost = (held-up time per save) / (baseline epoch time).
2. Throughput: one --mb MB object written to and read back from each store (MB/s), with the same
   Optuna ArtifactStore calls the product makes.

    KMNIST_TUNE_DATA=../shared/data/kmnist .venv/bin/python benchmarks/bench_checkpoint.py
    python benchmarks/bench_checkpoint.py --device cuda --no-postgres --json out.json   # GPU machine

The PostgreSQL rows need a server (--pg-admin, default postgresql://127.0.0.1:5432/postgres); the
script creates and drops its own database. --no-postgres measures the folder store alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
import torch  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402

from kmnist_tune.contract.load import parse_spec  # noqa: E402
from kmnist_tune.recipe.checkpoints import TrialCheckpoints  # noqa: E402
from kmnist_tune.service.artifacts import ARTIFACTS  # noqa: E402
from kmnist_tune.service.schema import create_storage, ensure_tables  # noqa: E402
from kmnist_tune.service.storage import open_storage  # noqa: E402
from kmnist_tune.training.devices import pick_device  # noqa: E402
from kmnist_tune.training.splits import load_splits  # noqa: E402
from kmnist_tune.training.train import EpochLog, build_learner, fit  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


class EpochTimes(Callback):
    order = 70  # after EpochCheckpoints (65): an epoch's time includes the save it waited for

    def before_epoch(self) -> None:
        self.t0 = time.perf_counter()

    def after_epoch(self) -> None:
        self.learn.kt_epoch_times.append(time.perf_counter() - self.t0)


def spec_for(args: argparse.Namespace) -> Any:
    return parse_spec(
        {
            "name": "bench-checkpoint",
            "data": {"dataset": "kmnist", "train_size": args.train_size, "valid_size": 2000},
            "parameters": {
                "arch": {"value": args.arch},
                "stem": {"value": "imagenet"},
                "epochs": {"value": args.epochs},
                "batch_size": {"value": args.bs},
                "lr": {"value": 2e-3},
            },
            "checkpoints": {"enabled": True, "every": 1, "keep": 1, "min_interval_s": args.min_interval},
            "performance": {"compile": False},  # what is compared is the epochs with and without checkpoints
            "budget": {"n_trials": 1},
        }
    )


def one_run(splits: Any, spec: Any, device: torch.device, url: str | None) -> dict[str, Any]:
    """One fit; with `url`, checkpoints after every epoch into that storage's artifact store."""
    params = spec.fixed_params()
    learn, name = build_learner(splits, params, device, "accuracy", seed=0, performance=spec.performance)
    learn.kt_epoch_times = []
    cbs: list[Callback] = [EpochTimes()]
    ckpt = saver = None
    if url is not None:
        storage = create_storage(url)
        study = optuna.create_study(storage=storage, study_name=f"bench-{uuid.uuid4().hex[:8]}")
        trial = study.ask()
        ckpt = TrialCheckpoints(trial, spec, print)
        saver = ckpt.callback(learn, params, 0)
        assert saver is not None
        save, save_s = saver.save, []

        def timed_save(*args: Any, **kwargs: Any) -> Any:  # the time each save takes, timed here
            t0 = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                save_s.append(time.perf_counter() - t0)

        saver.save = timed_save  # type: ignore[method-assign]
        cbs.insert(0, saver)
    fit(learn, params, EpochLog(name), cbs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    out: dict[str, Any] = {"epoch_s": learn.kt_epoch_times}
    if ckpt is not None and saver is not None:
        ckpt.close()
        out["save_s"] = save_s
        out["checkpoint_mb"] = ckpt.last_size / 1e6
    return out


def throughput(store: Any, artifact: str, mb: int) -> dict[str, float]:
    payload = os.urandom(mb * 1_000_000)
    t0 = time.perf_counter()
    store.write(artifact, io.BytesIO(payload))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    with store.open_reader(artifact) as fh:
        while block := fh.read(1 << 20):
            n += len(block)
    read_s = time.perf_counter() - t0
    assert n == len(payload)
    store.remove(artifact)
    return {"write_MBps": mb / write_s, "read_MBps": mb / read_s, "write_s": write_s, "read_s": read_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("KMNIST_TUNE_DATA", str(REPO.parent / "shared" / "data" / "kmnist")))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--bs", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--min-interval", type=float, default=0.0, help="checkpoints.min_interval_s (0: after every epoch)")
    ap.add_argument("--pg-admin", default="postgresql+psycopg://root@127.0.0.1:5432/postgres")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = pick_device(args.device)
    spec = spec_for(args)
    splits = load_splits(spec.data, Path(args.data_dir), download=False)
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    stores: dict[str, str] = {"folder": f"sqlite:///{work}/bench.db"}
    admin = db = None
    if not args.no_postgres:
        db = f"kt_bench_ckpt_{os.getpid()}"
        admin = sqlalchemy.create_engine(args.pg_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {db}")
        stores["postgresql"] = str(sqlalchemy.make_url(args.pg_admin).set(database=db).render_as_string(hide_password=False))
    rows: dict[str, Any] = {}
    try:
        print(f"device {device}, {args.arch}, {len(splits.y_train)} training images, bs {args.bs}, {args.epochs} epochs")
        base = one_run(splits, spec, device, None)
        epoch = statistics.median(base["epoch_s"][1:] or base["epoch_s"])
        rows["baseline"] = {"epoch_s": epoch, "epochs": base["epoch_s"]}
        print(f"baseline (no checkpoints): median epoch {epoch:.2f} s  (epochs {', '.join(f'{s:.2f}' for s in base['epoch_s'])})")
        for kind, url in stores.items():
            if kind == "postgresql":
                ensure_tables(sqlalchemy.create_engine(url), ARTIFACTS)
            run = one_run(splits, spec, device, url)
            save = statistics.median(run["save_s"])
            with_ckpt = statistics.median(run["epoch_s"][1:] or run["epoch_s"])
            tp = throughput(*_store_for(url, work), args.mb)
            rows[kind] = {
                "save_s": run["save_s"],
                "checkpoint_mb": run["checkpoint_mb"],
                "epoch_s": with_ckpt,
                "epochs": run["epoch_s"],
                "cost_of_epoch": save / epoch,
                "epoch_slowdown": with_ckpt / epoch - 1,
                **tp,
            }
            print(
                f"{kind:10s} checkpoint {run['checkpoint_mb']:.0f} MB: training held up {save:.3f} s per save = "
                f"{100 * save / epoch:.1f}% of an epoch; median epoch with saves {with_ckpt:.2f} s "
                f"({100 * (with_ckpt / epoch - 1):+.1f}% vs baseline); "
                f"{args.mb} MB object: write {tp['write_MBps']:.0f} MB/s, read {tp['read_MBps']:.0f} MB/s"
            )
        # The same run without checkpoints again: how far two identical runs differ on this machine.
        again = one_run(splits, spec, device, None)
        epoch2 = statistics.median(again["epoch_s"][1:] or again["epoch_s"])
        rows["baseline_again"] = {"epoch_s": epoch2, "epochs": again["epoch_s"]}
        noise = 100 * (epoch2 / epoch - 1)
        print(f"baseline again (no checkpoints): median epoch {epoch2:.2f} s ({noise:+.1f}% vs the first: noise)")
        if "postgresql" in rows:
            f, p = rows["folder"], rows["postgresql"]
            w, r = p["write_MBps"] / f["write_MBps"], p["read_MBps"] / f["read_MBps"]
            print(f"postgresql/folder throughput: write {w:.2f}x, read {r:.2f}x")
    finally:
        if admin is not None and db is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    if args.json:
        meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": str(device), "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))


def _store_for(url: str, work: Path) -> tuple[Any, str]:
    """The study storage's artifact store, and an artifact id it accepts: a checkpoint name of a trial
    that exists (every artifact has an owner, and only the forms kmnist-tune writes are accepted)."""
    from kmnist_tune.service.artifacts import artifact_store, checkpoint_base

    storage = open_storage(url)
    trial = optuna.create_study(storage=storage, study_name=f"bench-io-{uuid.uuid4().hex[:8]}").ask()
    return artifact_store(storage), f"{checkpoint_base(trial._trial_id, 0)}.pth"


if __name__ == "__main__":
    main()
