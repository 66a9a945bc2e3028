"""A trial's checkpoints in the study's artifact store, and the one a retry resumes from.

Each checkpoint is two artifacts (fastai's weights-and-optimizer file and its JSON description, see
training/checkpoint.py), named after the trial and epoch and referenced from the trial's record
(`checkpoint`). The worker removes a trial's checkpoints when it ends for good (service/worker.py);
`study delete` removes whatever is left.

What a retry resumes from is read as data from a database others can write, so:
- the trial it retries comes from Optuna's own retry bookkeeping (its system attributes, which the
  dashboard cannot set), not from user attributes that any client can set;
- the checkpoint is the one recorded on that trial (finished, so its record no longer changes), and
  its artifact ids must be checkpoint names of a trial in the retry chain;
- with KMNIST_TUNE_SIGNING_KEY, its record's signature names the study, the trial that saved it and
  that trial's retry chain (so a record moved to another study, or to a trial that does not retry the
  one that saved it, is refused), its epoch and batch size, and each file's id and sha256; the
  description names the configuration it trained, which must be this trial's (signing.py);
- it is downloaded to fixed names in this process's own private folder (mode 0700), hashed as it is
  copied, bounded in size, and deleted when it fails its checksum or signature;
- the weights load with `weights_only` (fastai's load), the description is JSON.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
from fastai.learner import Learner
from optuna.storages import RetryHeartbeatStaleTrialCallback

from ..contract.records import TrialRecord
from ..contract.spec import SweepSpec
from ..errors import UserError, one_line
from ..masking import printable
from ..optuna_internals import study_id, trial_id
from ..service.artifacts import artifact_store, checkpoint_base, checkpoint_ids, download_checked, remove_artifacts
from ..signing import ENV_KEY, json_value, signer
from ..training.checkpoint import EpochCheckpoints, read_meta, save_checkpoint
from ..training.inference import sha256

# What a retry downloads, at most (resnet152's weights with Adam's state are about 700 MB; its JSON a
# few kB): a bigger artifact is not a checkpoint of ours, and is not let fill the disk.
MAX_WEIGHTS_BYTES = 4 << 30
MAX_META_BYTES = 1 << 20
RESUME_FILES = {"model": ("resume.pth", MAX_WEIGHTS_BYTES), "meta": ("resume.json", MAX_META_BYTES)}
MAX_RETRY_CHAIN = 1000  # a retry history longer than any max_retry is not Optuna's
_SIGNED_AS = "checkpoint"


class BadCheckpoint(UserError):
    pass


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
        self.signer = signer()
        self.trial_id = trial_id(trial)
        self.study_name = trial.study.study_name
        # The trials this one retries, oldest first (Optuna's retry bookkeeping), and the checkpoint
        # recorded on the newest of them.
        self.retried = _retry_chain(trial)
        self.parent: tuple[int, dict[str, Any]] | None = None
        if self.retried:
            number, parent_id = self.retried[-1]
            self.parent = (number, _checkpoint_of(trial.storage.get_trial(parent_id).user_attrs))
        inherited = self.parent[1] if self.parent else None
        self.saved: list[dict[str, Any]] = [inherited] if inherited else []
        self.last_size = 0  # bytes of the newest checkpoint saved here (benchmarks/bench_checkpoint.py)
        self._tmp = tempfile.TemporaryDirectory(prefix="kmnist-tune-ckpt-")  # mkdtemp: mode 0700
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
        meta["config"] = _config(params)  # what it trains: a retry with another configuration does not resume it
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
            self.say(
                f"trial {self.trial.number}: a checkpoint could not be stored ({one_line(e, 160)}); the previous one is kept"
            )

    def _upload(self, staging: tempfile.TemporaryDirectory, weights: Path, info: Path, epoch: int, bs: int) -> None:
        base = checkpoint_base(self.trial_id, epoch)
        ids = (f"{base}.pth", f"{base}.json")
        try:
            digests = {ids[0]: sha256(weights), ids[1]: sha256(info)}
            record: dict[str, Any] = {
                "trial": self.trial.number,  # which trial saved it: a retry may resume its parent's inherited one
                "epoch": epoch,
                "batch_size": bs,
                "model": ids[0],
                "meta": ids[1],
                "sha256": digests,
            }
            signature = self.signer.sign_record(_SIGNED_AS, self.study_name, {**record, "retries": self._numbers()})
            if signature is not None:
                record["signature"] = signature
            for path, artifact_id in zip((weights, info), ids, strict=True):
                with open(path, "rb") as fh:
                    self.store.write(artifact_id, fh)
        finally:
            staging.cleanup()
        try:
            TrialRecord.write(self.trial, checkpoint=record)
        except Exception:
            # The trial is gone (its study deleted) or finished: nothing will ever name these files.
            in_use = {r.get(k) for r in self.saved for k in ("model", "meta")}
            remove_artifacts(self.store, [i for i in ids if i not in in_use])
            raise
        self.saved.append(record)
        mine = [self.trial_id, *(tid for _, tid in self.retried)]
        while len(self.saved) > self.spec.checkpoints.keep:
            old = self.saved.pop(0)
            # A restart at a halved batch size saves its epochs under the same names: keep those.
            in_use = {r[k] for r in self.saved for k in ("model", "meta")}
            remove_artifacts(self.store, [i for i in checkpoint_ids(old, mine) if i not in in_use])

    def _numbers(self) -> list[int]:
        """The numbers of the trials this one retries, oldest first."""
        return [n for n, _ in self.retried]

    # -- resuming --------------------------------------------------------------------------------
    def resume_point(self, params: dict[str, Any]) -> Resume | None:
        """The checkpoint of the trial this one retries, fetched and checked; None to start afresh
        (with one line when there was one that does not fit or load)."""
        if self.parent is None or not self.parent[1]:
            return None
        number, ckpt = self.parent
        folder = Path(self._tmp.name)
        try:
            files = self._fetch(ckpt, folder)
            info = read_meta(files["meta"])
            missing = {"epoch", "n_epochs", "batch_size", "loader_epoch", "rng", "seed"} - set(info)
            if missing:
                raise BadCheckpoint(f"its description lacks {', '.join(sorted(missing))}")
            mismatch = [k for k in ("arch", "stem") if info.get(k) != params[k]]
            # The whole configuration, where the description names it (this version's do, and what is
            # signed with the key is of this version): a checkpoint of another trial's is no resume.
            if "config" in info and info["config"] != json_value(_config(params)):
                mismatch.append("parameters")
            if mismatch or info.get("n_epochs") != int(params["epochs"]):
                raise BadCheckpoint(f"it is of another configuration ({', '.join(mismatch) or 'epochs'})")
            if info.get("epoch") != ckpt["epoch"] or info.get("batch_size") != ckpt.get("batch_size"):
                raise BadCheckpoint("its description is not of the epoch its trial recorded")
        except Exception as e:
            for path in folder.iterdir():  # nothing that failed a check stays on this host
                path.unlink(missing_ok=True)
            why = printable(one_line(e, 160)) or type(e).__name__  # it may quote what others stored: no control characters
            self.say(
                f"trial {self.trial.number}: the checkpoint of trial {number} (epoch {ckpt.get('epoch', '?')}) "
                f"does not load ({why}); starting from scratch"
            )
            return None
        return Resume(number, int(info["epoch"]), int(info["batch_size"]), files["model"], info)

    def _fetch(self, ckpt: dict[str, Any], folder: Path) -> dict[str, Path]:
        """Both files of a checkpoint into `folder` under fixed names, each checked as it is copied."""
        retried = [tid for _, tid in self.retried]
        epoch = ckpt.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise BadCheckpoint("its record names no epoch")
        digests = ckpt.get("sha256") if isinstance(ckpt.get("sha256"), dict) else {}
        # Signed by the trial that saved it, with its own retry chain: the numbers before it in ours.
        saver, numbers = ckpt.get("trial"), self._numbers()
        retries = numbers[: numbers.index(saver)] if type(saver) is int and saver in numbers else None
        why = self.signer.record_refusal(_SIGNED_AS, self.study_name, {**ckpt, "retries": retries})
        if why is not None:
            raise BadCheckpoint(
                f"its record is unsigned or not signed with this worker's {ENV_KEY} for a trial it retries "
                f"in study {self.study_name!r} ({why})"
            )
        out = {}
        for key, (local, limit) in RESUME_FILES.items():
            artifact_id = ckpt.get(key)
            ext = "pth" if key == "model" else "json"
            if not any(artifact_id == f"{checkpoint_base(t, epoch)}.{ext}" for t in retried):
                raise BadCheckpoint(
                    f"its record names {printable(repr(artifact_id))[:80]}, not a checkpoint of the trials it retries"
                )
            digest = digests.get(artifact_id)
            target = folder / local
            download_checked(self.store, artifact_id, target, digest, limit)  # hashed as it is copied
            out[key] = target
        return out


def _retry_chain(trial: optuna.Trial) -> list[tuple[int, int]]:
    """(number, id) of the trials `trial` retries, oldest first, from Optuna's retry bookkeeping."""
    storage = trial.storage
    system = SimpleNamespace(system_attrs=storage.get_trial_system_attrs(trial_id(trial)))
    history = RetryHeartbeatStaleTrialCallback.retry_history(system)  # type: ignore[arg-type]
    if not isinstance(history, list):
        return []
    numbers = [n for n in history if isinstance(n, int) and not isinstance(n, bool) and 0 <= n < trial.number]
    if not numbers:
        return []
    sid = study_id(trial.study)  # no lookup by name: the trial's study knows its id
    chain = []
    for n in numbers[-MAX_RETRY_CHAIN:]:
        try:
            chain.append((n, storage.get_trial_id_from_study_id_trial_number(sid, n)))
        except KeyError:
            continue
    return chain


def _config(params: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint trained, as its description names it: every parameter but the batch size
    (halving changes it within a trial; the record has its own)."""
    return {k: v for k, v in params.items() if k != "batch_size"}


def _checkpoint_of(user_attrs: dict[str, Any]) -> dict[str, Any] | None:
    ckpt = TrialRecord.of(user_attrs).checkpoint
    return ckpt if isinstance(ckpt, dict) else None
