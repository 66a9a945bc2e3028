"""Where a trial's evidence goes besides Optuna: one W&B run per trial, and optuna-dashboard notes.

Tracking is best effort by design: a W&B outage or a bad API key is reported once and then
ignored; it never fails a trial.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

import optuna

from .halving import HalvingEvent
from .train import EpochRecord

log = logging.getLogger("kmnist_tune.tracking")


def has_wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str) -> str:
    """auto: $WANDB_MODE if set, else online when logged in to W&B, else offline (sync later with
    `wandb sync`)."""
    if os.environ.get("WANDB_MODE") == "":
        del os.environ["WANDB_MODE"]  # W&B itself rejects an empty WANDB_MODE
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").lower()
        if env in ("online", "offline", "disabled"):
            return env
        return "online" if has_wandb_login() else "offline"
    return mode


class WandbRun:
    """One W&B run for one trial, grouped by study. Every call swallows W&B failures."""

    def __init__(
        self, cfg: Any, study_name: str, trial_number: int, params: dict[str, Any], extra: dict[str, Any], say: Any = None
    ):
        self.run = None
        self.say = say or (lambda m: log.warning(m))
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return
        try:
            import wandb

            directory = Path(cfg.dir or os.environ.get("WANDB_DIR") or ".").expanduser()
            directory.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project or study_name,
                entity=cfg.entity,
                group=study_name,
                job_type="trial",
                name=f"{study_name}-trial-{trial_number}",
                config={**params, **extra},
                mode=mode,
                dir=str(directory),
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # W&B must never fail a trial
            self.say(f"W&B run not started ({type(e).__name__}: {' '.join(str(e).split())[:160]}); training goes on")
            self.run = None

    def _safe(self, fn: Any) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            self.say(f"W&B logging failed ({type(e).__name__}); training goes on")
            self.run = None

    def epoch(self, rec: EpochRecord, metric_name: str, lr: float | None) -> None:
        data = {
            "epoch": rec.epoch,
            "train_loss": rec.train_loss,
            "valid_loss": rec.valid_loss,
            f"valid_{metric_name}": rec.metric,
            "images_per_s": rec.images_per_s,
            "epoch_seconds": rec.seconds,
        }
        if lr is not None:
            data["lr"] = lr
        self._safe(lambda: self.run.log(data))

    def halving(self, event: HalvingEvent) -> None:
        self._safe(lambda: self.run.log({"halving/from_bs": event.from_bs, "halving/to_bs": event.to_bs or 0}))

    def finish(self, state: str, value: float | None, summary: dict[str, Any]) -> None:
        def done() -> None:
            self.run.summary.update({"state": state, "final_value": value, **summary})
            self.run.finish(exit_code=0 if state in ("COMPLETE", "PRUNED") else 1)

        self._safe(done)


def trial_note(trial_number: int, state: str, value: float | None, metric: str, attrs: dict[str, Any]) -> str:
    """The markdown note optuna-dashboard shows on a trial: the recipe's evidence at a glance."""
    lines = [f"### Trial {trial_number}: {state.lower()}" + (f", {metric} {value:.4f}" if value is not None else "")]
    bs0, bs = attrs.get("batch_size_initial"), attrs.get("batch_size_used")
    lines.append(f"- batch size: {bs0} → {bs} used ({attrs.get('attempts', 1)} attempt(s))")
    events = attrs.get("halving_events") or []
    if events:
        lines.append("- halvings:")
        for e in events:
            to = e["to_bs"] if e["to_bs"] else "stop (minimum reached)"
            where = f" at epoch {e['epoch']}, batch {e['batch']}" if e.get("epoch", -1) >= 0 else ""
            lines.append(f"  - {e['from_bs']} → {to}: {e['reason']}{where} — {e['detail']}")
    else:
        lines.append("- halvings: none")
    secs, ips = attrs.get("epoch_seconds") or [], attrs.get("train_images_per_s") or []
    if secs:
        lines.append(f"- seconds per epoch: {', '.join(f'{s:.1f}' for s in secs)}")
        lines.append(f"- training images/s: {', '.join(f'{i:,.0f}' for i in ips)}")
    if attrs.get("device"):
        lines.append(f"- device: {attrs['device']}")
    if attrs.get("retry_of") is not None:
        lines.append(f"- retry of trial {attrs['retry_of']}")
    if attrs.get("stopped"):
        lines.append(f"- stopped: {attrs['stopped']}")
    return "\n".join(lines)


def save_trial_note(trial: optuna.Trial, text: str, say: Any = None) -> None:
    try:
        from optuna_dashboard import save_note

        save_note(trial, text)
    except Exception as e:  # notes are evidence, not results: never fail a trial for one
        (say or log.warning)(f"could not save the dashboard note ({type(e).__name__})")


def _decades(width: float) -> str:
    return f"{width:g} decade" + ("" if width == 1 else "s")


def prior_note(prior: Any, study_name: str) -> str:
    rows = "\n".join(f"| {k} | {v:.3g}{' ← centre' if k == prior.suggestion else ''} |" for k, v in prior.suggestions.items())
    return (
        f"## LR finder ({prior.key})\n\nfastai `lr_find`, {len(prior.lrs)} iterations on the training split, "
        f"{prior.seconds:.1f} s on {prior.host} at {prior.computed_at}.\n\n| suggestion | lr |\n|---|---|\n{rows}\n\n"
        f"The learning rate of study **{study_name}** is searched log-uniformly over "
        f"**{prior.low:.3g} … {prior.high:.3g}** ({_decades(prior.width)} around the {prior.suggestion} suggestion); "
        "the suggestion itself was the first trial. The curve is attached as `lr-find.png`."
    )


def attach_prior(study: optuna.Study, storage: Any, prior: Any, artifact_store: Any, workdir: Path) -> None:
    """The LR-finder curve (PNG artifact) and a note with its suggestions, on the study."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    from .lr_prior import plot_prior

    png = plot_prior(prior, workdir / "lr-find.png", title=f"{study.study_name}: LR finder ({prior.key})")
    upload_artifact(
        artifact_store=artifact_store, file_path=str(png), study_or_trial=study, storage=storage, mimetype="image/png"
    )
    save_note(study, prior_note(prior, study.study_name))
