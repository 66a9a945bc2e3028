"""The artifact store every worker and the dashboard of one study storage share: LR-finder plots,
checkpoints, the kept model.

- A PostgreSQL study storage keeps its artifacts in the same database (a table of chunked binary
  rows): every host and the dashboard reach them with the study's URL and credentials, and no volume
  has to be shared between hosts.
- A SQLite study keeps them in a folder beside its file.
- `--artifacts` / `KMNIST_TUNE_ARTIFACTS` chooses another: a folder, or `s3://bucket/prefix` (Optuna's
  Boto3ArtifactStore, for very large models; needs boto3 and the usual AWS settings).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, BinaryIO

import sqlalchemy

from ..errors import UserError
from .storage import backend, sqlite_file, unwrap

ENV_ARTIFACTS = "KMNIST_TUNE_ARTIFACTS"
FOLDER = "kmnist-tune-artifacts"
TABLE = "kmnist_tune_artifacts"
CHUNK = 1 << 20  # bytes per row: a checkpoint streams through in 1 MiB pieces, never whole in memory


def _chosen(override: str | Path | None) -> str | None:
    chosen = override or os.environ.get(ENV_ARTIFACTS)
    return str(chosen) if chosen else None


def artifact_dir(storage: Any, override: str | Path | None = None) -> Path | None:
    """The artifact folder, or None when the artifacts live in the database (or S3)."""
    chosen = _chosen(override)
    if chosen:
        return None if chosen.startswith("s3://") else Path(chosen).expanduser()
    if backend(storage) == "postgresql":
        return None
    db = sqlite_file(storage)
    base = db.resolve().parent if db is not None else Path.cwd()
    return base / FOLDER


def describe_store(storage: Any, override: str | Path | None = None) -> str:
    chosen = _chosen(override)
    if chosen and chosen.startswith("s3://"):
        return chosen
    folder = artifact_dir(storage, override)
    return str(folder) if folder is not None else f"the {TABLE} table of the study database"


def artifact_store(storage: Any, override: str | Path | None = None) -> Any:
    chosen = _chosen(override)
    if chosen and chosen.startswith("s3://"):
        return _s3_store(chosen)
    folder = artifact_dir(storage, override)
    if folder is None:
        return PostgresArtifactStore(unwrap(storage).engine)
    from optuna.artifacts import FileSystemArtifactStore

    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def _s3_store(url: str) -> Any:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    try:
        import boto3
    except ImportError:
        raise UserError(f"artifacts at {url} need boto3: pip install boto3 (and your AWS settings)") from None
    from optuna.artifacts import Boto3ArtifactStore

    class Prefixed(Boto3ArtifactStore):  # every artifact under the prefix, so one bucket serves many studies
        def open_reader(self, artifact_id: str) -> BinaryIO:
            return super().open_reader(f"{prefix}/{artifact_id}" if prefix else artifact_id)

        def write(self, artifact_id: str, content_body: BinaryIO) -> None:
            super().write(f"{prefix}/{artifact_id}" if prefix else artifact_id, content_body)

        def remove(self, artifact_id: str) -> None:
            super().remove(f"{prefix}/{artifact_id}" if prefix else artifact_id)

    return Prefixed(bucket, client=boto3.client("s3"))


# -- artifacts in PostgreSQL ----------------------------------------------------------------------


def _table() -> sqlalchemy.Table:
    meta = sqlalchemy.MetaData()
    return sqlalchemy.Table(
        TABLE,
        meta,
        sqlalchemy.Column("artifact_id", sqlalchemy.String(255), primary_key=True),
        sqlalchemy.Column("chunk", sqlalchemy.Integer, primary_key=True, autoincrement=False),
        sqlalchemy.Column("data", sqlalchemy.LargeBinary, nullable=False),
    )


ARTIFACTS = _table()


class PostgresArtifactStore:
    """Optuna's ArtifactStore protocol over the `kmnist_tune_artifacts` table: one row per MiB.

    Written inside one transaction (a reader never sees half an artifact) and read a chunk at a time.
    Optuna's own stores keep files or objects; none keeps them in the study's database, which is what
    lets workers on many hosts share artifacts with no service and no volume beyond PostgreSQL."""

    def __init__(self, engine: Any):
        self.engine = engine

    def _missing(self, artifact_id: str) -> Exception:
        from optuna.artifacts.exceptions import ArtifactNotFound

        return ArtifactNotFound(f"artifact {artifact_id} is not in {TABLE}")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        with self.engine.begin() as conn:
            conn.execute(ARTIFACTS.delete().where(ARTIFACTS.c.artifact_id == artifact_id))
            n = 0
            while True:
                data = content_body.read(CHUNK)
                if not data and n:
                    break
                conn.execute(ARTIFACTS.insert().values(artifact_id=artifact_id, chunk=n, data=bytes(data)))
                n += 1
                if not data:  # an empty artifact is one empty row
                    break

    def open_reader(self, artifact_id: str) -> BinaryIO:
        with self.engine.connect() as conn:
            count = conn.execute(
                sqlalchemy.select(sqlalchemy.func.count()).where(ARTIFACTS.c.artifact_id == artifact_id)
            ).scalar_one()
        if not count:
            raise self._missing(artifact_id)
        return io.BufferedReader(_ChunkReader(self.engine, artifact_id, count), buffer_size=CHUNK)  # type: ignore[return-value]

    def remove(self, artifact_id: str) -> None:
        with self.engine.begin() as conn:
            gone = conn.execute(ARTIFACTS.delete().where(ARTIFACTS.c.artifact_id == artifact_id)).rowcount
        if not gone:
            raise self._missing(artifact_id)


class _ChunkReader(io.RawIOBase):
    """Reads an artifact's rows one at a time, in order."""

    def __init__(self, engine: Any, artifact_id: str, chunks: int):
        self.engine, self.artifact_id, self.chunks = engine, artifact_id, chunks
        self.next_chunk, self.buffer = 0, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if not self.buffer:
            if self.next_chunk >= self.chunks:
                return 0
            # A pooled connection per chunk, handed back at once: no transaction stays open (and holds
            # one of PgBouncer's server connections) while whoever reads the stream works on a chunk.
            with self.engine.connect() as conn:
                data = conn.execute(
                    sqlalchemy.select(ARTIFACTS.c.data).where(
                        ARTIFACTS.c.artifact_id == self.artifact_id, ARTIFACTS.c.chunk == self.next_chunk
                    )
                ).scalar_one()
            self.buffer, self.next_chunk = memoryview(bytes(data)), self.next_chunk + 1
        n = min(len(b), len(self.buffer))
        b[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


def remove_artifacts(store: Any, artifact_ids: list[str]) -> None:
    """Remove artifacts that may already be gone (a retry and its original share a checkpoint)."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    for artifact_id in artifact_ids:
        with contextlib.suppress(ArtifactNotFound, FileNotFoundError):
            store.remove(artifact_id)


CHECKPOINT_PREFIX = "kmnist-tune-checkpoint-"


def checkpoint_base(trial_id: int, epoch: int) -> str:
    """The artifact name (without .pth/.json) of a trial's checkpoint after `epoch`."""
    return f"{CHECKPOINT_PREFIX}{trial_id}-{epoch}"


def remove_checkpoints(store: Any, trial_ids: list[int], n_epochs: int) -> None:
    """Every checkpoint of these trials, recorded or not: a worker killed between an upload and the
    trial's record of it leaves one that no record names."""
    if not trial_ids:
        return
    if isinstance(store, PostgresArtifactStore):
        with store.engine.begin() as conn:
            for trial_id in sorted(set(trial_ids)):
                prefix = f"{CHECKPOINT_PREFIX}{trial_id}-"
                conn.execute(ARTIFACTS.delete().where(ARTIFACTS.c.artifact_id.startswith(prefix, autoescape=True)))
        return
    # Optuna's folder and S3 stores have no listing in their protocol: try every name there can be.
    names = [checkpoint_base(t, e) for t in sorted(set(trial_ids)) for e in range(n_epochs)]
    remove_artifacts(store, [f"{n}.{ext}" for n in names for ext in ("pth", "json")])


def checkpoint_ids(record: Any) -> list[str]:
    """The artifacts of a trial record's newest checkpoint (a TrialRecord)."""
    ckpt = getattr(record, "checkpoint", None) or {}
    return [ckpt[k] for k in ("model", "meta") if k in ckpt]
