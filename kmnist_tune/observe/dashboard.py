"""optuna-dashboard over the study storage, showing files from the study's artifact store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..service.artifacts import artifact_store


def serve(storage: Any, host: str, port: int, artifacts: str | Path | None = None) -> None:
    from optuna_dashboard import run_server

    run_server(storage, host=host, port=port, artifact_store=artifact_store(storage, artifacts))
