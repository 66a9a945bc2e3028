"""The LR-finder prior: run fastai's `lr_find` once per study, keep the curve and its suggestions
in the study's storage, and centre the learning-rate search on the chosen suggestion.

The tutorial's rule: take the learning rate one order of magnitude below the minimum of the
smoothed loss curve, which is exactly fastai's `minimum` suggestion (`lr_at_min_loss / 10`).
"""

from __future__ import annotations

import datetime as dt
import math
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from fastai.callback.schedule import minimum, steep, valley

from .space import default_within
from .spec import SweepSpec
from .storage import storage_lock
from .train import Splits, build_learner

PRIOR_ATTR = "kmnist_tune.lr_prior"
FIRST_TRIAL_TAG = "kmnist_tune.enqueued"
NUM_IT = 100


@dataclass
class LRPrior:
    key: str
    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float]
    suggestion: str  # which one is the centre
    centre: float
    low: float
    high: float
    width: float
    computed_at: str
    seconds: float
    host: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LRPrior:
        return cls(**d)

    def summary(self) -> str:
        sugg = ", ".join(f"{k} {v:.3g}" for k, v in self.suggestions.items())
        return (
            f"LR finder ({self.key}): {sugg}; centre {self.centre:.3g} ({self.suggestion}), "
            f"search {self.low:.3g} .. {self.high:.3g} ({self.width:g} decades)"
        )


def prior_config(spec: SweepSpec) -> dict[str, Any]:
    """The configuration the finder runs with: fixed values, and for a searched arch, stem or
    batch size its first listed value (the study key says which)."""
    params = spec.fixed_params()
    for name in ("arch", "stem", "batch_size"):
        p = spec.parameters.get(name)
        if p is not None and p.searched and p.values:
            params[name] = p.values[0]
    return params


def study_key(spec: SweepSpec) -> str:
    c = prior_config(spec)
    return f"{spec.data.dataset}/{c['arch']}/{c['stem']}/bs{c['batch_size']}"


def uses_lr_finder(spec: SweepSpec) -> bool:
    p = spec.parameters.get("lr")
    return p is not None and p.kind() == "lr_finder"


def run_lr_find(spec: SweepSpec, splits: Splits, device: torch.device) -> LRPrior:
    """fastai's `lr_find` on the training split, with the study's fixed configuration."""
    lr_spec = spec.parameters["lr"]
    params = prior_config(spec)
    t0 = time.perf_counter()
    learn, _ = build_learner(
        splits, params, device, spec.metric or "accuracy", seed=spec.seed, augment=spec.augment, performance=spec.performance
    )
    found = learn.lr_find(num_it=NUM_IT, show_plot=False, suggest_funcs=(minimum, steep, valley))
    suggestions = {name: float(getattr(found, name)) for name in ("minimum", "steep", "valley")}
    lrs = [float(x) for x in learn.recorder.lrs]
    losses = [float(x) for x in learn.recorder.losses]
    chosen = lr_spec.suggestion or "minimum"
    centre = suggestions[chosen]
    if not (math.isfinite(centre) and centre > 0):
        raise RuntimeError(f"the LR finder's {chosen} suggestion is {centre}; the loss curve never fell")
    width = float(lr_spec.width or 2.0)
    half = 10 ** (width / 2)
    return LRPrior(
        key=study_key(spec),
        lrs=lrs,
        losses=losses,
        suggestions=suggestions,
        suggestion=chosen,
        centre=centre,
        low=centre / half,
        high=centre * half,
        width=width,
        computed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - t0, 2),
        host=socket.gethostname(),
    )


def stored_prior(study: optuna.Study) -> LRPrior | None:
    data = study.user_attrs.get(PRIOR_ATTR)
    return LRPrior.from_dict(data) if data else None


def ensure_prior(
    study: optuna.Study,
    storage: Any,
    url: str,
    spec: SweepSpec,
    splits: Splits,
    device: torch.device,
    *,
    rerun: bool = False,
    log: Any = None,
) -> tuple[LRPrior, bool]:
    """The study's prior, computed at most once however many workers start together.

    Returns (prior, computed_here). The first computation also enqueues the suggestion as a trial.
    """
    prior = stored_prior(study)
    if prior is not None and not rerun:
        return prior, False
    with storage_lock(storage, url, f"kmnist-tune/lr-find/{study.study_name}"):
        # Re-read under the lock: another worker may have finished while this one waited.
        prior = stored_prior(study)
        if prior is not None and not rerun:
            return prior, False
        if log is not None:
            log(f"running the LR finder for {study_key(spec)} ({NUM_IT} iterations)")
        first = prior is None
        prior = run_lr_find(spec, splits, device)
        study.set_user_attr(PRIOR_ATTR, prior.as_dict())
        if first:
            enqueue_suggestion(study, spec, prior)
        return prior, True


def enqueue_suggestion(study: optuna.Study, spec: SweepSpec, prior: LRPrior) -> None:
    """The suggestion itself is the study's first trial; the other searched parameters take their
    built-in defaults where the space holds them (else the sampler picks)."""
    params: dict[str, Any] = {"lr": prior.centre}
    for name, p in spec.searched_params().items():
        if name != "lr" and (d := default_within(name, p)) is not None:
            params[name] = d
    study.enqueue_trial(params, user_attrs={FIRST_TRIAL_TAG: f"LR finder {prior.suggestion} suggestion"}, skip_if_exists=True)


def plot_prior(prior: LRPrior, path: Path, title: str = "") -> Path:
    """A PNG of the smoothed loss against the learning rate, suggestions and search range marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(prior.lrs, prior.losses, color="#1f77b4", label="smoothed training loss")
    ax.set_xscale("log")
    ax.axvspan(prior.low, prior.high, color="#2ca02c", alpha=0.12, label=f"search range ({prior.width:g} decades)")
    colours = {"minimum": "#d62728", "steep": "#ff7f0e", "valley": "#9467bd"}
    for name, lr in prior.suggestions.items():
        style = "-" if name == prior.suggestion else ":"
        ax.axvline(lr, color=colours.get(name, "k"), linestyle=style, label=f"{name} {lr:.2g}")
    finite = [v for v in prior.losses if math.isfinite(v)]
    if finite:
        lo = min(finite)
        ax.set_ylim(lo - 0.1 * abs(lo), min(max(finite), lo * 4 + 1))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or f"LR finder: {prior.key}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
