"""A trial's checkpoints in the study's artifact store, and the one a retry resumes from.

Each checkpoint is two artifacts (fastai's weights-and-optimizer file and its JSON description, see
training/checkpoint.py), named after the trial and epoch and referenced from the trial's record
(`checkpoint`). Optuna copies a failed trial's attributes into its retry, so the retry finds the
checkpoint of the trial it retries in its own record. The worker removes a trial's checkpoints when
it ends for good (service/worker.py); `study delete` removes whatever is left.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from fastai.learner import Learner

from ..contract.records import TrialRecord
from ..contract.spec import SweepSpec
from ..service.artifacts import artifact_store, checkpoint_base, remove_artifacts
from ..training.checkpoint import EpochCheckpoints, read_meta, save_checkpoint
from ..training.inference import sha256


@dataclass
class Resume:
    """A checkpoint fetched for a retry: load it into the first attempt's Learner."""

    from_trial: int
    epoch: int  # the last epoch it completed
    batch_size: int
    weights: Path
    info: dict[str, Any]
    used: bool = False


class TrialCheckpoints:
    def __init__(self, trial: optuna.Trial, spec: SweepSpec, say: Callable[[str], None]):
        self.trial, self.spec, self.say = trial, spec, say
        self.store = artifact_store(trial.storage)
        inherited = TrialRecord.of(trial.user_attrs).checkpoint
        self.saved: list[dict[str, Any]] = [inherited] if inherited else []
        self.last_size = 0  # bytes of the newest checkpoint saved here (benchmarks/bench_checkpoint.py)
        self._tmp = tempfile.TemporaryDirectory(prefix="kmnist-tune-ckpt-")
        # One background thread uploads checkpoints while training goes on (a 140 MB checkpoint takes
        # about 2 s into PostgreSQL on a small machine: 4% of a quickstart epoch if training waited).
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmnist-tune-checkpoint")
        self._pending: Future[None] | None = None

    def close(self) -> None:
        self.wait()  # a hand-back (SIGTERM) keeps the newest checkpoint: its upload finishes first
        self._uploader.shutdown()
        self._tmp.cleanup()

    # -- saving ----------------------------------------------------------------------------------
    def callback(self, learn: Learner, params: dict[str, Any], seed: int) -> EpochCheckpoints | None:
        if not self.spec.checkpoints.on_for(int(params["epochs"])):
            return None
        c = self.spec.checkpoints
        return EpochCheckpoints(c.every, lambda epoch: self.save(learn, epoch, params, seed), c.min_interval_s)

    def save(self, learn: Learner, epoch: int, params: dict[str, Any], seed: int) -> None:
        """Write the checkpoint to a local folder (training waits for this part only), then upload it
        to the store in the background while the next epoch trains. It is recorded on the trial once
        the upload is complete, so a retry never finds a half-written checkpoint."""
        self.wait()  # at most one upload in flight: two checkpoints never race for the record
        meta = {"trial": self.trial.number, "arch": params["arch"], "stem": params["stem"], "seed": seed}
        staging = tempfile.TemporaryDirectory(prefix="kmnist-tune-save-")
        try:
            weights, info = save_checkpoint(learn, Path(staging.name), epoch, meta)
        except BaseException:
            staging.cleanup()
            raise
        self.last_size = weights.stat().st_size + info.stat().st_size
        self._pending = self._uploader.submit(self._upload, staging, weights, info, epoch, learn.dls.train.bs)

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; a failed one is reported in one line."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as e:
            why = " ".join(str(e).split())[:160] or type(e).__name__
            self.say(f"trial {self.trial.number}: a checkpoint could not be stored ({why}); the previous one is kept")

    def _upload(self, staging: tempfile.TemporaryDirectory, weights: Path, info: Path, epoch: int, bs: int) -> None:
        try:
            base = checkpoint_base(self.trial._trial_id, epoch)  # Optuna's Trial has no public id
            record = {
                "epoch": epoch,
                "batch_size": bs,
                "model": f"{base}.pth",
                "meta": f"{base}.json",
                "sha256": {f"{base}.pth": sha256(weights), f"{base}.json": sha256(info)},
            }
            for path, artifact_id in ((weights, record["model"]), (info, record["meta"])):
                with open(path, "rb") as fh:
                    self.store.write(artifact_id, fh)
        finally:
            staging.cleanup()
        TrialRecord.write(self.trial, checkpoint=record)
        self.saved.append(record)
        while len(self.saved) > self.spec.checkpoints.keep:
            old = self.saved.pop(0)
            # A restart at a halved batch size saves its epochs under the same names: keep those.
            in_use = {r[k] for r in self.saved for k in ("model", "meta")}
            remove_artifacts(self.store, [old[k] for k in ("model", "meta") if old[k] not in in_use])

    # -- resuming --------------------------------------------------------------------------------
    def resume_point(self, params: dict[str, Any]) -> Resume | None:
        """The checkpoint of the trial this one retries, fetched and checked; None to start afresh
        (with one line when there was one that does not fit or load)."""
        rec = TrialRecord.of(self.trial.user_attrs)
        ckpt = rec.checkpoint
        if rec.retry_of is None or not ckpt:
            return None
        folder = Path(self._tmp.name)
        try:
            for key in ("model", "meta"):
                digest = hashlib.sha256()  # hashed as it is copied: one pass over a checkpoint of tens of MB
                with self.store.open_reader(ckpt[key]) as src, open(folder / ckpt[key], "wb") as dst:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
                if digest.hexdigest() != (ckpt.get("sha256") or {}).get(ckpt[key]):
                    raise ValueError(f"{ckpt[key]} does not match the checksum its trial recorded")
            info = read_meta(folder / ckpt["meta"])
            missing = {"epoch", "n_epochs", "batch_size", "loader_epoch", "rng", "seed"} - set(info)
            if missing:
                raise ValueError(f"its description lacks {', '.join(sorted(missing))}")
            mismatch = [k for k in ("arch", "stem") if info.get(k) != params[k]]
            if mismatch or info.get("n_epochs") != int(params["epochs"]):
                raise ValueError(f"it is of another configuration ({', '.join(mismatch) or 'epochs'})")
        except Exception as e:
            why = " ".join(str(e).split())[:160] or type(e).__name__
            self.say(
                f"trial {self.trial.number}: the checkpoint of trial {rec.retry_of} (epoch {ckpt.get('epoch', '?')}) "
                f"does not load ({why}); starting from scratch"
            )
            return None
        return Resume(rec.retry_of, int(info["epoch"]), int(info["batch_size"]), folder / ckpt["model"], info)
