"""optuna-dashboard over the study storage, showing files from the study's artifact store."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..service.artifacts import artifact_store


def serve(storage: Any, host: str, port: int, artifacts: str | Path | None = None) -> None:
    from optuna_dashboard import run_server

    store = artifact_store(storage, artifacts)
    try:
        run_server(storage, host=host, port=port, artifact_store=store)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; pick another with --port") from None
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror}; check --host and --port") from None
