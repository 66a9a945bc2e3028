"""A training process's CPU threads: registered as a trainer on this host (service/cpu_share.py
counts them) and torch's threads set to its share of the cores. Inductor's pool of compile processes
follows torch's threads (training/compiling.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..service.cpu_share import CpuShare
from ..training.train import use_threads


@contextlib.contextmanager
def training_process() -> Iterator[CpuShare]:
    """This process trains while inside, on its share of the cores from now (callers ask `share()`
    again before each trial and epoch, as trainers come and go)."""
    with CpuShare() as cpu_share:
        use_threads(cpu_share.share().threads)
        yield cpu_share
