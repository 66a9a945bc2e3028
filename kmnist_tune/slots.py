"""Worker slots: which GPUs a worker uses, and one trial process per slot, each pinned with
CUDA_VISIBLE_DEVICES, supervised by the `worker` command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: int | None  # None: CPU

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}/{self.index}" if self.gpu is not None else f"cpu/{self.index}"


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(text: str, n_gpus: int) -> list[int | None]:
    """`all`, `none`, `auto` (all if any, else none) or a comma list of GPU indices like `0,2`."""
    text = text.strip().lower()
    if text in ("none", "cpu"):
        return [None]
    if text == "auto":
        return list(range(n_gpus)) if n_gpus else [None]
    if text == "all":
        if n_gpus == 0:
            raise UserError("--gpus all: no CUDA GPU is visible on this machine; use --gpus none to train on the CPU")
        return list(range(n_gpus))
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise UserError(f"--gpus {text!r}: {part!r} is not a GPU index; use all, none, or a list like 0,2")
        gid = int(part)
        if gid >= n_gpus:
            have = f"GPUs 0-{n_gpus - 1}" if n_gpus else "no GPU"
            raise UserError(
                f"--gpus {text!r}: GPU {gid} does not exist (this machine has {have}); use --gpus all, none, or existing indices"
            )
        if gid in ids:
            raise UserError(f"--gpus {text!r}: GPU {gid} is listed twice; use --per-gpu K for several trials per GPU")
        ids.append(gid)
    return ids


def make_slots(gpus: list[int | None], per_gpu: int) -> list[Slot]:
    if per_gpu < 1:
        raise UserError(f"--per-gpu {per_gpu}: must be at least 1")
    return [Slot(i, g) for i, (g, _) in enumerate((g, k) for g in gpus for k in range(per_gpu))]


def slot_env(slot: Slot, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # Pinning by environment: the child sees exactly one GPU (as cuda:0), or none.
    env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
    env["KMNIST_TUNE_SLOT"] = str(slot.index)
    if slot.gpu is not None:
        # K processes share one GPU: let each grow its memory as needed instead of
        # fragmenting it, so that K small ResNets fit side by side.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def supervise(child_args: list[str], slots: list[Slot], env: dict[str, str], log: Any) -> int:
    """Start one `kmnist-tune worker` process per slot and wait for all of them.

    The first SIGINT/SIGTERM is passed on (each child ends its trial cleanly); a second kills them.
    Returns 0 if every child succeeded, else the first non-zero exit status.
    """
    from .progress import STATUS_ENV, SlotBoard

    board = SlotBoard([s.label for s in slots])
    procs: list[tuple[Slot, subprocess.Popen[str]]] = []
    pumps = []
    board.__enter__()
    for slot in slots:
        cmd = [sys.executable, "-m", "kmnist_tune", *child_args]
        proc = subprocess.Popen(cmd, env={**slot_env(slot, env), STATUS_ENV: "1"}, stderr=subprocess.PIPE, text=True, bufsize=1)
        procs.append((slot, proc))
        pumps.append(board.follow(slot.label, proc.stderr))  # type: ignore[arg-type]
        board.feed(slot.label, f"started worker process {proc.pid}")
    signals_seen = {"n": 0}

    def forward(signum: int, frame: Any) -> None:
        signals_seen["n"] += 1
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL if signals_seen["n"] > 1 else signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(p.poll() is None for _, p in procs):
            time.sleep(0.2)
        for th in pumps:
            th.join(timeout=5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        board.__exit__(None, None, None)
    rcs = [p.returncode for _, p in procs]
    for (slot, p), rc in zip(procs, rcs, strict=True):
        if rc:
            log(f"slot {slot.label}: worker process {p.pid} exited with status {rc}")
    return next((rc for rc in rcs if rc), 0)
