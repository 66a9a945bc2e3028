"""Worker slots: which GPUs a worker uses, and one trial process per slot, each pinned with
CUDA_VISIBLE_DEVICES, supervised by the `run` and `worker` commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..errors import UserError
from ..masking import mask
from .mps import share_gpus


@dataclass(frozen=True)
class Slot:
    index: int
    gpu: int | None  # None: CPU

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}/{self.index}" if self.gpu is not None else f"cpu/{self.index}"


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
            if not n_gpus:  # `all` is an error here too: only the CPU is left
                raise UserError(f"--gpus {text!r}: GPU {gid} does not exist (this machine has no GPU); use --gpus none")
            raise UserError(
                f"--gpus {text!r}: GPU {gid} does not exist (this machine has GPUs 0-{n_gpus - 1}); "
                "use --gpus all, none, or existing indices"
            )
        if gid in ids:
            raise UserError(f"--gpus {text!r}: GPU {gid} is listed twice; use --per-gpu K for several trials per GPU")
        ids.append(gid)
    return ids


def make_slots(gpus: list[int | None], per_gpu: int) -> list[Slot]:
    if per_gpu < 1:
        raise UserError(f"--per-gpu {per_gpu}: must be at least 1")
    return [Slot(i, g) for i, (g, _) in enumerate((g, k) for g in gpus for k in range(per_gpu))]


def in_this_process(slots: list[Slot]) -> bool:
    """One CPU slot works in the calling process; anything else gets a process per slot."""
    return len(slots) == 1 and slots[0].gpu is None


def worker_args(study: str, **options: Any) -> list[str]:
    """The command line of one slot's `kmnist-tune worker` process: the study, then every option the
    user gave (None: not given; names as keyword arguments, `data_dir` -> `--data-dir`)."""
    args = ["worker", "--study", study, "--in-process"]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def run_slots(url: str, slots: list[Slot], child_args: list[str], board: Board) -> None:
    """Work the study with one `kmnist-tune worker` process per slot (their lines shown on `board`);
    a UserError if any of them failed."""

    def log(m: str) -> None:
        print(mask(m), file=sys.stderr, flush=True)

    gpus = sorted({s.gpu for s in slots if s.gpu is not None})
    per_gpu = max((sum(s.gpu == g for s in slots) for g in gpus), default=0)
    mps = share_gpus(gpus, per_gpu, log)  # K processes on a GPU side by side, not taking turns
    env = dict(os.environ, KMNIST_TUNE_STORAGE=url)  # the URL (and its password) stays out of `ps`
    env.update(mps.env if mps is not None else {})
    try:
        rc = supervise(child_args, slots, env, log, board)
    finally:
        if mps is not None:
            mps.stop(log)
    if rc > 128:
        raise Stopped(signal.Signals(rc - 128).name, rc)
    if rc:
        raise UserError(f"a worker process failed (exit status {rc}); see its lines above")


def slot_env(slot: Slot, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # Pinning by environment: the child sees exactly one GPU (as cuda:0), or none.
    env["CUDA_VISIBLE_DEVICES"] = "" if slot.gpu is None else str(slot.gpu)
    env["KMNIST_TUNE_SLOT"] = str(slot.index)
    env["KMNIST_TUNE_ENV_FILE"] = ""  # the supervisor read it; set and empty: the slot reads none
    if slot.gpu is not None:
        # K processes share one GPU: let each grow its memory as needed instead of
        # fragmenting it, so that K small ResNets fit side by side.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


class Stopped(UserError):
    """The work was stopped by a signal before the study's budget was used (exit 128 + the signal)."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(f"stopped by {signal_name} before the study's budget was used; run it again to go on")
        self.exit_code = exit_code


class Board(Protocol):
    """What the supervisor shows its slots' lines on (observe.progress.SlotBoard)."""

    child_env: dict[str, str]  # set in each slot process: how it should write its lines

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> None: ...

    def feed(self, label: str, raw: str) -> None: ...

    def follow(self, label: str, pipe: IO[str]) -> threading.Thread: ...


def supervise(child_args: list[str], slots: list[Slot], env: dict[str, str], log: Any, board: Board) -> int:
    """Start one `kmnist-tune worker` process per slot and wait for all of them.

    The first SIGINT/SIGTERM is passed on (each child ends its trial cleanly); a second kills them.
    Returns 0 if every child succeeded, else the first non-zero exit status.
    """
    procs: list[tuple[Slot, subprocess.Popen[str]]] = []
    pumps = []
    board.__enter__()
    for slot in slots:
        # -P (safe path): `python -m` would put the working directory first on sys.path, and a `typer.py`
        # (or any module we import) in the folder the command runs in would run in every slot, with its
        # secrets. The environment is the supervisor's: a `.env` cannot add Python's or the loader's
        # settings to it (cli/env_file.py), and the slot reads no `.env` of its own.
        cmd = [sys.executable, "-P", "-m", "kmnist_tune", *child_args]
        proc = subprocess.Popen(cmd, env={**slot_env(slot, env), **board.child_env}, stderr=subprocess.PIPE, text=True, bufsize=1)
        procs.append((slot, proc))
        pumps.append(board.follow(slot.label, proc.stderr))  # type: ignore[arg-type]
        board.feed(slot.label, f"started worker process {proc.pid}")
    signals_seen = {"n": 0, "first": 0}

    def forward(signum: int, frame: Any) -> None:
        signals_seen["n"] += 1
        signals_seen["first"] = signals_seen["first"] or signum
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
    failed = next((rc for rc in rcs if rc), 0)
    # Stopped by a signal before the work was done: say so in the exit status, as a shell would.
    return failed or (128 + signals_seen["first"] if signals_seen["first"] else 0)
