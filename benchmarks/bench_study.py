"""A study's fixed costs per trial: the seconds of each trial that are not training (issue 23).

One real `kmnist-tune run` in this process (`recipe.session.run_sweep`, one slot, a SQLite file in a
scratch folder) of --trials trials of a fixed configuration (the spec's default checkpoints, or one
after every epoch); the real calls are timed by wrappers, nothing is skipped. Per trial it reports:

- `training`: the fit's epochs (training and validation batches: what `EpochRecord.seconds` sums);
- `learner`: building the attempt's Learner (data to the device, the model, the optimizer; `compile`
  when the spec asks for it), and loading a checkpoint when a retry resumes;
- `checkpoint`: saving and storing the epoch checkpoints;
- `claim` (the claim ticket and Optuna's trial), `tell`, `records` (the trial's user attributes);
- `other`: the rest of the trial's wall time (the sampler, the heartbeat, the progress query, the
  end-of-trial event); what happens once per run (data loading, study creation) is shown apart.

    .venv/bin/python benchmarks/bench_study.py [--trials 6 --epochs 2 --train-size 2000] [--device cpu|cuda]
    python benchmarks/bench_study.py --device cuda --data ../shared/data/kmnist --train-size 54000 --epochs 10 --trials 8

The fraction `not training / wall` is the figure: on a GPU, fast epochs make the fixed costs the
pace-setter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "disabled")

import optuna  # noqa: E402
import torch  # noqa: E402

from kmnist_tune.contract import records  # noqa: E402
from kmnist_tune.contract.load import parse_spec  # noqa: E402
from kmnist_tune.recipe import checkpoints as ckpt_mod  # noqa: E402
from kmnist_tune.recipe import objective as objective_mod  # noqa: E402
from kmnist_tune.recipe import session  # noqa: E402
from kmnist_tune.service import worker as worker_mod  # noqa: E402
from kmnist_tune.service.slots import Slot  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "kmnist-mini"
PARTS = ("training", "learner", "checkpoint", "claim", "tell", "records", "other")


@contextlib.contextmanager
def timed(spent: dict[str, float], patches: list[tuple[Any, str, str]]) -> Iterator[None]:
    """Wraps each `owner.attr` so that its seconds add up under `part`; undone on exit."""
    originals = []
    for owner, attr, part in patches:
        fn = getattr(owner, attr)
        originals.append((owner, attr, fn))

        def wrapper(*args: Any, _fn: Callable[..., Any] = fn, _part: str = part, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_part] += time.perf_counter() - t0

        setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=FIXTURE, help="a folder with the official KMNIST files (default: the fixture)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=None, help="training images (default: all the data folder has)")
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument(
        "--checkpoint-every-epoch",
        action="store_true",
        help="a checkpoint after every epoch (default: the spec's defaults, after epochs of trials over 2 epochs, 30 s apart)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.data = args.data.resolve()  # the run works in a scratch folder
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data: dict[str, Any] = {"dataset": "kmnist", "valid_fraction": 0.1}
    if args.train_size:
        data["train_size"] = args.train_size
    spec = parse_spec(
        {
            "name": "fixed-costs",
            "data": data,
            "parameters": {"arch": "resnet18", "epochs": args.epochs, "batch_size": args.bs, "lr": {"values": [3e-3]}},
            "pruner": "none",
            "halving": {"trend_drop": 0},  # every trial the same work: no early halving
            **({"checkpoints": {"enabled": True, "min_interval_s": 0}} if args.checkpoint_every_epoch else {}),
            "budget": {"n_trials": args.trials},
            "seed": 0,
        }
    )
    spent: dict[str, float] = defaultdict(float)
    epochs: list[float] = []
    fit = objective_mod.fit

    def fit_and_note(*a: Any, **k: Any) -> Any:
        result = fit(*a, **k)
        epochs.extend(e.seconds for e in result.epochs)
        return result

    patches = [
        (objective_mod.Attempt, "learner", "learner"),
        (ckpt_mod.TrialCheckpoints, "save", "checkpoint"),
        (ckpt_mod.TrialCheckpoints, "wait", "checkpoint"),
        (worker_mod.Worker, "make_trial", "claim"),
        (worker_mod.Worker, "run_trial", "trial"),
        (worker_mod.Worker, "_tell", "tell"),
        (records.TrialRecord, "write", "records"),
    ]
    work_here = session.work_here
    if args.device == "cuda":  # run_sweep's one in-process slot trains on the CPU: this one on the GPU
        session.work_here = lambda *a, **k: work_here(*a, **{**k, "device": torch.device("cuda")})  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            objective_mod.fit = fit_and_note  # type: ignore[assignment]
            with timed(spent, patches), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                t0 = time.perf_counter()
                session.run_sweep(spec, f"sqlite:///{tmp}/study.db", [Slot(0, None)], session.DataOptions(args.data, None))
                wall = time.perf_counter() - t0
        finally:
            objective_mod.fit, session.work_here = fit, work_here  # type: ignore[assignment]
            os.chdir(cwd)
    n = args.trials
    per = {
        "training": sum(epochs) / n,
        "learner": spent["learner"] / n,
        "checkpoint": spent["checkpoint"] / n,
        "claim": spent["claim"] / n,
        "tell": spent["tell"] / n,
        "records": spent["records"] / n,
    }
    # A trial's wall: its claim, then run_trial (start, the objective, tell, clean-up, the event).
    trial_wall = (spent["trial"] + spent["claim"]) / n
    per["other"] = trial_wall - sum(per.values())
    fixed = trial_wall - per["training"]
    print(
        f"{n} trials of resnet18, {args.epochs} epoch(s), batch {args.bs}, on {args.device} "
        f"({torch.get_num_threads()} thread(s)), torch {torch.__version__}; seconds per trial"
    )
    for part in PARTS:
        print(f"{part:<11} {per[part]:8.3f}")
    print(f"{'trial wall':<11} {trial_wall:8.3f}  (claim to end-of-trial event)")
    print(f"{'once':<11} {wall - n * trial_wall:8.3f}  (the run's own start and end: data loading, study creation, summary)")
    print(f"not training: {fixed:.3f} s a trial = {fixed / trial_wall:.0%} of its wall time")
    if args.json:
        out = {"per_trial_s": per, "trial_wall_s": trial_wall, "run_wall_s": wall, "args": vars(args)}
        args.json.write_text(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
