"""CPU threads for training processes that share one machine.

Every process that trains (a `worker`, each slot of `run`/`worker --per-gpu K`) registers itself in a
host-local folder and takes its share of the machine's cores: cores // training processes alive on
this host, at least 1. Without this each process would assume it owns every core, and their torch
OpenMP threads would spin against each other (two workers on 2 cores got half the work done that one
got alone). `--threads N` (KMNIST_TUNE_THREADS) fixes the count instead.

Neither torch nor Optuna has a cross-process registry for this, hence the small one here: one file per
process, held under an exclusive flock for the process's life. A file whose lock can be taken belongs
to a process that is gone (killed ones too: the kernel drops their locks) and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import UserError

THREADS_ENV = "KMNIST_TUNE_THREADS"


def registry_dir() -> Path:
    """Per user and host: $XDG_RUNTIME_DIR (a tmpfs) where there is one, else the temp folder."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"kmnist-tune-{os.getuid()}" / "trainers"


def machine_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, a container's cpuset), capped by a
    cgroup v2 CPU quota (`docker run --cpus`, a Kubernetes CPU limit) when one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    return max(1, cores)


def fixed_threads(text: str | None = None, given_as: str = f"{THREADS_ENV}=") -> int | None:
    """`--threads N` (text) or else KMNIST_TUNE_THREADS, checked; None when not given or auto."""
    text = (os.environ.get(THREADS_ENV, "") if text is None else text).strip()
    if not text or text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{given_as}{text!r}: give a whole number of CPU threads >= 1, or auto")
    return int(text)


@dataclass(frozen=True)
class Share:
    threads: int
    why: str  # for the log line and the trial's record

    def line(self) -> str:
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} ({self.why})"


class CpuShare:
    """Registers this process as a trainer on this host while entered; `share()` is its current
    share of the cores (asked again before every epoch, so a worker that joins or leaves is felt)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or registry_dir()
        self.fixed = fixed_threads()
        self._held: IO[bytes] | None = None
        self._path: Path | None = None

    def __enter__(self) -> CpuShare:
        if self.fixed is None:
            self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held is not None:
            with contextlib.suppress(OSError):
                assert self._path is not None
                self._path.unlink()
            self._held.close()  # drops the lock
            self._held = None

    def _register(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Lock under a temporary name, then rename: a counter never sees an unlocked file of a
            # live process (which it would take for a dead one's and remove).
            fd, tmp = tempfile.mkstemp(prefix=".new-", dir=self.folder)
            held = os.fdopen(fd, "wb")
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = self.folder / str(os.getpid())
            os.replace(tmp, path)
        except OSError:
            return  # an unwritable temp folder: this process counts only itself
        self._held, self._path = held, path

    def trainers(self) -> int:
        """Training processes alive on this host, this one included."""
        alive = 0 if self._held is not None else 1  # unregistered: count this process anyway
        with contextlib.suppress(OSError):
            for path in self.folder.iterdir():
                if path.name.startswith("."):
                    continue
                if path == self._path:
                    alive += 1
                    continue
                try:
                    with open(path, "rb") as fh:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        path.unlink()  # we got the lock: its process is gone
                except BlockingIOError:
                    alive += 1
                except OSError:
                    continue  # removed meanwhile
        return max(1, alive)

    def share(self) -> Share:
        if self.fixed is not None:
            return Share(self.fixed, f"--threads {self.fixed}")
        cores, n = machine_cores(), self.trainers()
        if n == 1:
            return Share(cores, f"{cores} cores, the only training process on this host")
        return Share(max(1, cores // n), f"{cores} cores shared by {n} training processes on this host")
