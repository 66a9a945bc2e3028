"""`kmnist-tune storage-proxy`: Optuna's gRPC storage proxy in front of a study database."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import optuna

from ..errors import UserError
from ..masking import mask
from .schema import create_storage
from .storage import is_grpc


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def serve_proxy(url: str, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Optuna's gRPC storage proxy in front of a database, until interrupted."""
    if is_grpc(url):
        raise UserError("--storage for the proxy must be a database URL, not grpc://")
    storage = create_storage(url)
    announce(f"storage proxy for {mask(url)} on grpc://{host}:{port} (Ctrl-C to stop)")
    if not is_loopback(host):
        # Optuna's proxy has no authentication or encryption: whoever reaches the port reads and writes
        # every study with this process's database login (README, "The storage proxy").
        announce(
            f"warning: the storage proxy has no login: anyone who can reach {host}:{port} may read and write "
            "every study in this database; publish it only on a private network you trust"
        )
    got: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    # SIGTERM (docker stop, kubectl delete) stops it as Ctrl-C does. A SIGINT that the parent had
    # ignored (a background job) stays ignored, as Python leaves it.
    signal.signal(signal.SIGTERM, stop)
    try:
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        # gRPC's handler threads are joined when the interpreter exits, and one still waiting on the
        # database would keep the process alive. The proxy keeps no state of its own, and a
        # worker's storage retries a call cut short, so it leaves at once.
        announce("storage proxy stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + (got[0] if got else signal.SIGINT))
