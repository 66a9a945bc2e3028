"""The artifact store (LR-finder plots; later checkpoints and exported models) every worker and the
dashboard of one study storage share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .storage import sqlite_file

ENV_ARTIFACTS = "KMNIST_TUNE_ARTIFACTS"
FOLDER = "kmnist-tune-artifacts"


def artifact_dir(storage: Any, override: str | Path | None = None) -> Path:
    """--artifacts, else $KMNIST_TUNE_ARTIFACTS, else a folder beside the SQLite file (or in the
    working directory for a database server). In containers it is a shared volume."""
    chosen = override or os.environ.get(ENV_ARTIFACTS)
    if chosen:
        return Path(chosen).expanduser()
    db = sqlite_file(storage)
    base = db.resolve().parent if db is not None else Path.cwd()
    return base / FOLDER


def artifact_store(storage: Any, override: str | Path | None = None) -> Any:
    from optuna.artifacts import FileSystemArtifactStore

    path = artifact_dir(storage, override)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))
