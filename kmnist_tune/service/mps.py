"""NVIDIA's Multi-Process Service for `--per-gpu K > 1`: the K trial processes on a GPU run their
kernels side by side instead of taking turns.

Without MPS, CUDA time-slices the processes that share a GPU: each gets the whole GPU for a slice,
so K small ResNets that each leave most of an H200 idle still run one at a time (bench_packing
measured K = 4 at 1.19x the trials/hour of one). With an MPS control daemon, their kernels share the
GPU's streaming multiprocessors at once.

The supervisor joins a daemon that is already there (the user's: `CUDA_MPS_PIPE_DIRECTORY`, or the
system one at /tmp/nvidia-mps), or else starts one of its own in a private pipe directory, which only
its own worker processes connect to (other users' processes on the GPU are not moved onto it), and
stops it when the work ends. Where NVIDIA's `nvidia-cuda-mps-control` is not installed, or the daemon
does not start, it says so in one line and the processes are time-sliced as before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
SYSTEM_PIPE_DIR = "/tmp/nvidia-mps"  # where NVIDIA's daemon listens by default


@dataclass
class Mps:
    """An MPS control daemon the worker processes connect to; `env` is what they need to find it."""

    pipe_dir: str
    started: bool  # by us: stopped by us
    env: dict[str, str] = field(default_factory=dict)
    _dirs: list[str] = field(default_factory=list)

    def stop(self, say: Callable[[str], None]) -> None:
        if not self.started:
            return
        done = _control("quit", self.env)
        if done is None:
            say(f"the MPS control daemon at {self.pipe_dir} did not answer `quit`; stop it with: echo quit | {CONTROL}")
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.started = False


def _control(command: str, env: dict[str, str], timeout: float = 10.0) -> str | None:
    """One command to a control daemon (`nvidia-cuda-mps-control` reads commands on stdin); its
    answer, or None when there is no daemon there or it does not answer."""
    try:
        done = subprocess.run(
            [CONTROL], input=command + "\n", env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _running(pipe_dir: str) -> bool:
    if not (Path(pipe_dir) / "control").exists():
        return False
    return _control("get_server_list", {"CUDA_MPS_PIPE_DIRECTORY": pipe_dir}) is not None


def running_daemon() -> str | None:
    """The pipe directory of an MPS control daemon that answers (the user's, else the system one), or None."""
    for pipe_dir in filter(None, (os.environ.get("CUDA_MPS_PIPE_DIRECTORY"), SYSTEM_PIPE_DIR)):
        if _running(pipe_dir):
            return pipe_dir
    return None


def share_gpus(gpus: list[int], per_gpu: int, say: Callable[[str], None]) -> Mps | None:
    """For `per_gpu > 1` slots on `gpus`: the MPS daemon they will share each GPU through (joined or
    started, said in one line), or None (time-slicing, said in one line; or nothing to share)."""
    if per_gpu < 2 or not gpus:
        return None
    if shutil.which(CONTROL) is None:
        say(f"--per-gpu {per_gpu}: NVIDIA's MPS ({CONTROL}) is not installed; the {per_gpu} processes on each GPU take turns")
        return None
    pipe_dir = running_daemon()
    if pipe_dir is not None:
        say(f"--per-gpu {per_gpu}: the worker processes share each GPU through the MPS daemon at {pipe_dir}")
        return Mps(pipe_dir, started=False, env={"CUDA_MPS_PIPE_DIRECTORY": pipe_dir})
    pipe_dir, log_dir = tempfile.mkdtemp(prefix="kt-mps-pipe-"), tempfile.mkdtemp(prefix="kt-mps-log-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": log_dir}
    try:
        # All GPUs stay visible to the daemon: each worker process pins its own with CUDA_VISIBLE_DEVICES.
        started = subprocess.run([CONTROL, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
        ok = started.returncode == 0
        why = " ".join((started.stderr or started.stdout).split())[:160]
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, why = False, type(e).__name__
    if not ok:
        shutil.rmtree(pipe_dir, ignore_errors=True)
        shutil.rmtree(log_dir, ignore_errors=True)
        say(f"--per-gpu {per_gpu}: the MPS control daemon did not start ({why or 'no reason given'}); the processes take turns")
        return None
    listed = ",".join(map(str, gpus))
    say(f"--per-gpu {per_gpu}: started an MPS control daemon for GPUs {listed} (stopped when the work ends)")
    return Mps(pipe_dir, started=True, env=env, _dirs=[pipe_dir, log_dir])
