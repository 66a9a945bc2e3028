"""One W&B run per trial, grouped by study: a listener on the trial's events.

Tracking is best effort by design: a W&B outage or a bad API key is reported once and then
ignored; it never fails a trial.
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..contract.events import Listener, TrialEnd, TrialStart
from ..contract.records import EpochRecord, HalvingEvent
from ..contract.spec import WandbSpec


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


class WandbListener(Listener):
    """Starts a W&B run when a trial starts, logs its epochs and halvings, and finishes it with a
    summary (state, value, halving events, batch size used) when the trial ends."""

    def __init__(self, cfg: WandbSpec, say: Callable[[str], None]):
        self.cfg, self.say = cfg, say
        self.mode = resolve_mode(cfg.mode)
        self.run: Any = None
        self.metric = "metric"

    def trial_started(self, start: TrialStart) -> None:
        self.run, self.metric = None, start.metric
        if self.mode == "disabled":
            return
        try:
            import wandb

            directory = Path(self.cfg.dir or os.environ.get("WANDB_DIR") or ".").expanduser()
            directory.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.cfg.project or start.study,
                entity=self.cfg.entity,
                group=start.study,
                job_type="trial",
                name=f"{start.study}-trial-{start.number}",
                config={**start.params, "trial": start.number, "device": start.device},
                mode=self.mode,
                dir=str(directory),
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # W&B must never fail a trial
            self.say(f"W&B run not started ({type(e).__name__}: {' '.join(str(e).split())[:160]}); training goes on")

    def _safe(self, fn: Callable[[], None]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            self.say(f"W&B logging failed ({type(e).__name__}); training goes on")
            self.run = None

    def epoch(self, number: int, rec: EpochRecord) -> None:
        data = {
            "epoch": rec.epoch,
            "train_loss": rec.train_loss,
            "valid_loss": rec.valid_loss,
            f"valid_{self.metric}": rec.metric,
            "images_per_s": rec.images_per_s,
            "epoch_seconds": rec.seconds,
        }
        if rec.lr is not None:
            data["lr"] = rec.lr
        self._safe(lambda: self.run.log(data))

    def halving(self, number: int, event: HalvingEvent) -> None:
        self._safe(lambda: self.run.log({"halving/from_bs": event.from_bs, "halving/to_bs": event.to_bs or 0}))

    def trial_finished(self, end: TrialEnd) -> None:
        rec = end.record
        summary = {
            "state": end.state,
            "final_value": end.value,
            "halving_events": [e.as_dict() for e in rec.halving_events],
            **{
                k: v
                for k, v in (("batch_size_used", rec.batch_size_used), ("attempts", rec.attempts), ("stopped", rec.stopped))
                if v is not None
            },
        }

        def done() -> None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=0 if end.state in ("COMPLETE", "PRUNED") else 1)

        self._safe(done)
        self.run = None
