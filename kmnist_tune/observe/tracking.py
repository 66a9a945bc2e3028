"""One W&B run per trial, grouped by study: a listener on the trial's events.

Tracking is best effort by design: a W&B outage or a bad API key is reported once and then
ignored; it never fails a trial.

Where the runs go is the worker's to decide, not the study's: the stored spec is written by anyone who
shares the study database, and W&B logs with this worker's own API key. The folder, the mode and the
account (entity) come from the worker's environment (W&B's own WANDB_DIR, WANDB_MODE, WANDB_ENTITY,
WANDB_PROJECT; `run` sets them from the spec file it was given, which is the user's own). A stored spec
may only narrow them: a mode less online, a subfolder of the worker's W&B folder, the same entity.
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..contract.events import Listener, TrialEnd, TrialStart
from ..contract.records import FINISHED_STATES, EpochRecord, HalvingEvent
from ..contract.spec import WandbSpec
from ..errors import one_line


def has_wandb_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """auto: WANDB_MODE of `env` (this process's environment by default) if set, else online when
    logged in to W&B, else offline (sync later with `wandb sync`)."""
    if env is None:
        if os.environ.get("WANDB_MODE") == "":
            del os.environ["WANDB_MODE"]  # W&B itself rejects an empty WANDB_MODE
        env = os.environ
    if mode == "auto":
        given = env.get("WANDB_MODE", "").lower()
        if given in ("online", "offline", "disabled"):
            return given
        return "online" if has_wandb_login() else "offline"
    return mode


_ONLINE = {"disabled": 0, "offline": 1, "online": 2}
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class WandbTarget:
    """Where this worker's W&B runs go."""

    mode: str  # online | offline | disabled
    dir: Path
    entity: str | None
    project: str


def wandb_target(cfg: WandbSpec, study: str, env: Mapping[str, str] | None = None) -> tuple[WandbTarget, list[str]]:
    """The worker's own W&B settings, narrowed (never widened) by the study's spec; and a line for
    each setting of the spec that was not followed."""
    own_mode = resolve_mode("auto", env)
    env = os.environ if env is None else env
    notes = []
    mode = own_mode if cfg.mode in ("auto", "online") else min(own_mode, cfg.mode, key=_ONLINE.__getitem__)
    if cfg.mode == "online" and own_mode != "online":
        notes.append(f"the study's spec asks for W&B mode online; this worker logs {own_mode} (its own WANDB_MODE or login)")
    base = Path(env.get("WANDB_DIR") or ".").expanduser()
    folder = base
    if cfg.dir:
        sub = PurePosixPath(cfg.dir)
        if Path(cfg.dir).expanduser().resolve() == base.resolve():
            pass
        elif not sub.is_absolute() and ".." not in sub.parts and not cfg.dir.startswith("~") and "\\" not in cfg.dir:
            folder = base / sub
        else:
            notes.append(
                f"the study's spec asks W&B to write to {cfg.dir}; this worker writes under its own W&B folder "
                f"{base} (set WANDB_DIR to choose another)"
            )
    entity = env.get("WANDB_ENTITY") or None
    if cfg.entity and cfg.entity != entity:
        notes.append(
            f"the study's spec asks for W&B entity {cfg.entity}; this worker logs to "
            f"{entity or 'its own default entity'} (set WANDB_ENTITY={cfg.entity} to follow it)"
        )
    project = env.get("WANDB_PROJECT") or ""
    if not project:
        project = cfg.project if cfg.project and _PROJECT.fullmatch(cfg.project) else study
    return WandbTarget(mode, folder, entity, project), notes


# The one-cycle schedule's rate at the end of each epoch, in a run's history.
SCHEDULED_LR = "scheduled_lr"


def metric_key(metric: str) -> str:
    """This project's name for the study's metric in a run's history: valid_accuracy, valid_loss."""
    return metric if metric.startswith("valid_") else f"valid_{metric}"


class WandbListener(Listener):
    """Starts a W&B run when a trial starts, logs its epochs and halvings, and finishes it with a
    summary (state, value, halving events, batch size used) when the trial ends."""

    def __init__(self, cfg: WandbSpec, say: Callable[[str], None]):
        self.cfg, self.say = cfg, say
        self.target: WandbTarget | None = None  # decided at the first trial, when the study's name is known
        self.run: Any = None
        self.metric = "metric"
        self.metric_name: str | None = None

    @property
    def mode(self) -> str:
        return self.target.mode if self.target is not None else resolve_mode("auto")

    def trial_started(self, start: TrialStart) -> None:
        self.run, self.metric, self.metric_name = None, start.metric, self.cfg.metric_name
        if self.target is None:
            self.target, notes = wandb_target(self.cfg, start.study)
            for note in notes:
                self.say(note)
        target = self.target
        if target.mode == "disabled":
            return
        try:
            import wandb

            target.dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=target.project,
                entity=target.entity,
                group=start.study,
                job_type="trial",
                name=f"{start.study}-trial-{start.number}",
                config={**self.named(start.params), "trial": start.number, "device": start.device},
                mode=target.mode,
                dir=str(target.dir),
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # W&B must never fail a trial
            self.say(f"W&B run not started ({type(e).__name__}: {one_line(e, 160)}); training goes on")

    def _safe(self, fn: Callable[[], None]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            self.say(f"W&B logging failed ({type(e).__name__}); training goes on")
            self.run = None

    def named(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's parameters under the sweep file's names (`learning_rate`, not `lr`): the config the
        user's panels and filters were written for. The config's lr is the trial's peak rate."""
        names = self.cfg.param_names or {}
        return {names.get(k, k): v for k, v in params.items()}

    def epoch(self, number: int, rec: EpochRecord) -> None:
        data = {
            "epoch": rec.epoch + 1,  # counted from 1, as every line of this project counts epochs
            "train_loss": rec.train_loss,
            "valid_loss": rec.valid_loss,
            metric_key(self.metric): rec.metric,
            "images_per_s": rec.images_per_s,
            "epoch_seconds": rec.seconds,
        }
        if self.metric_name and self.metric_name not in data:
            data[self.metric_name] = rec.metric  # the name the sweep file gave its metric
        if rec.lr is not None:
            data[SCHEDULED_LR] = rec.lr  # not `lr`: the config's lr is the peak, this is where the schedule is
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
            self.run.finish(exit_code=0 if end.state in FINISHED_STATES else 1)

        self._safe(done)
        self.run = None
