"""Accuracy at full size: one configuration of a shipped spec (sweeps/kmnist-best.yaml by default),
trained on all of its tuning images (54,000 for KMNIST: the official train split less its validation
part) and scored once on the official test split, through the same parts a trial and `predict` use
(build_learner, fit, the Classifier's probabilities).

The configuration: the spec's fixed values, its searched ones set to CONFIG below (each checked to lie
in the spec's search space, so it is a point the sweep can reach), and the learning rate from fastai's
LR finder as the spec's prior computes it (its suggestion is the sweep's first trial), unless --lr.
--set KEY=VALUE overrides one more, for the CPU above all: the small stem trains at about 60 images/s
on two cores (2.5 hours for 10 epochs), so the CPU figure uses `--set stem=imagenet` and says so.

    .venv/bin/python benchmarks/bench_accuracy.py --data-dir ../shared/data/kmnist --set stem=imagenet
    python benchmarks/bench_accuracy.py --device cuda --data-dir DIR      # the spec as it is

It prints each epoch, the validation and test scores, the wall time and the configuration, and with
--json writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_tune.contract.load import load_spec  # noqa: E402
from kmnist_tune.contract.records import EpochRecord  # noqa: E402
from kmnist_tune.contract.space import fit_into  # noqa: E402
from kmnist_tune.contract.spec import ParamSpec  # noqa: E402
from kmnist_tune.observe.progress import make_reporter  # noqa: E402
from kmnist_tune.recipe.lr_prior import compute_prior  # noqa: E402
from kmnist_tune.training.devices import resolve_device  # noqa: E402
from kmnist_tune.training.inference import Classifier, network_score  # noqa: E402
from kmnist_tune.training.splits import load_splits  # noqa: E402
from kmnist_tune.training.train import EpochLog, build_learner, fit  # noqa: E402

# The searched parameters' values: label smoothing on, no MixUp (it pays off over longer schedules
# than 10 epochs), Adam, fastai's default weight decay, a middling dropout.
CONFIG: dict[str, Any] = {
    "epochs": 10,
    "optimizer": "adam",
    "weight_decay": 0.01,
    "dropout": 0.25,
    "label_smoothing": 0.1,
    "mixup": 0.0,
}


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=REPO / "sweeps" / "kmnist-best.yaml")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "kmnist")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    ap.add_argument("--lr", type=float, default=None, help="skip the LR finder and train at this rate")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one more parameter's value")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    device = resolve_device(args.device)
    params = spec.fixed_params()
    overrides = dict(CONFIG)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    outside = []
    for key, value in overrides.items():
        p = spec.parameters.get(key)
        searched_and_fits = p is not None and p.searched and fit_into(key, p, value) == (value, "")
        if not searched_and_fits:
            outside.append(f"{key}={value}")  # not a point the sweep would reach (the CPU's stem)
        params[key] = value
    if outside:
        print(f"note: not in the spec's search space: {', '.join(outside)}", flush=True)

    t_start = time.perf_counter()
    splits = load_splits(spec.data, args.data_dir, with_test=True)
    assert splits.x_test is not None and splits.y_test is not None
    print(
        f"{spec.name}: {len(splits.y_train)} train / {len(splits.y_valid)} valid / {len(splits.y_test)} test images "
        f"of {spec.data.dataset}, device {device}, {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    finder_s = 0.0
    if args.lr is not None:
        params["lr"] = args.lr
    elif spec.lr_finder is not None:
        # The finder runs with this configuration's network and optimizer (recipe/lr_prior.prior_config).
        prior_spec = spec.model_copy(update={"parameters": {**spec.parameters}})
        for key in ("arch", "stem", "optimizer"):
            if key in overrides and key in prior_spec.parameters:
                prior_spec.parameters[key] = ParamSpec(value=overrides[key])
        with make_reporter(label="lr-find") as reporter:
            prior = compute_prior(prior_spec, splits, device, reporter)
        params["lr"], finder_s = prior.centre, prior.seconds
        print(f"LR finder: {prior.suggestion} {prior.centre:.3g} ({prior.seconds:.0f} s)", flush=True)

    learn, metric_name = build_learner(
        splits, params, device, spec.metric, seed=spec.seed, augment=spec.augment, performance=spec.performance
    )

    def on_epoch(r: EpochRecord) -> bool:
        print(
            f"epoch {r.epoch + 1}/{params['epochs']}: train_loss {r.train_loss:.4f} valid_loss {r.valid_loss:.4f} "
            f"valid {spec.metric} {r.metric:.4f} ({r.seconds:.0f} s, {r.images_per_s:.0f} images/s)",
            flush=True,
        )
        return True

    log = EpochLog(metric_name, on_epoch)
    t0 = time.perf_counter()
    result = fit(learn, params, log)
    train_s = time.perf_counter() - t0
    mean, std = splits.mean_std
    net = Classifier(getattr(learn.model, "_orig_mod", learn.model), mean, std).to(device).eval()
    test = network_score(net, splits.x_test, splits.y_test, spec.metric, device)
    wall = time.perf_counter() - t_start
    out = {
        "spec": str(args.spec.relative_to(REPO) if args.spec.is_relative_to(REPO) else args.spec),
        "params": params,
        "augment": spec.augment.model_dump(),
        "n_train": int(len(splits.y_train)),
        "n_test": int(len(splits.y_test)),
        "valid": result.final_metric,
        "test": test,
        "metric": spec.metric,
        "lr_finder_s": round(finder_s, 1),
        "train_s": round(train_s, 1),
        "wall_s": round(wall, 1),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(
        f"test {spec.metric} {test:.4f} on {out['n_test']} official test images (valid {result.final_metric:.4f}); "
        f"training {train_s / 60:.1f} min, wall {wall / 60:.1f} min",
        flush=True,
    )
    print("params: " + ", ".join(f"{k}={v}" for k, v in params.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
