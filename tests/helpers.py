"""Small helpers several test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Sequence


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    cond: Callable[[], object],
    timeout: float,
    what: str,
    procs: Sequence[subprocess.Popen[str]] = (),
    every: float = 0.2,
) -> float:
    """Poll cond() until it is true; returns the seconds it took. Fails at the timeout, or at once
    when one of `procs` (which should still be running) has exited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if cond():
            return time.monotonic() - start
        for p in procs:
            assert p.poll() is None, f"{what}: the process exited {p.returncode}"
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
