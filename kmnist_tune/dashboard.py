"""optuna-dashboard over the study storage, and the artifact store it shows files from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .storage import is_sqlite, sqlite_path

ENV_ARTIFACTS = "KMNIST_TUNE_ARTIFACTS"


def artifact_dir(url: str, override: str | Path | None = None) -> Path:
    """--artifacts, else $KMNIST_TUNE_ARTIFACTS, else a folder beside the SQLite file (or in the
    working directory for a database server). In containers it is a shared volume."""
    chosen = override or os.environ.get(ENV_ARTIFACTS)
    if chosen:
        return Path(chosen).expanduser()
    db = sqlite_path(url) if is_sqlite(url) else None
    base = db.resolve().parent if db is not None else Path.cwd()
    return base / "kmnist-tune-artifacts"


def artifact_store(url: str, override: str | Path | None = None) -> Any:
    from optuna.artifacts import FileSystemArtifactStore

    path = artifact_dir(url, override)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def serve(storage: Any, url: str, host: str, port: int, artifacts: str | Path | None = None) -> None:
    from optuna_dashboard import run_server

    run_server(storage, host=host, port=port, artifact_store=artifact_store(url, artifacts))
