"""The artifact store every worker and the dashboard of one study storage share: LR-finder plots,
checkpoints, the kept model.

- A PostgreSQL study storage keeps its artifacts in the same database (a table of chunked binary
  rows): every host and the dashboard reach them with the study's URL and credentials, and no volume
  has to be shared between hosts.
- A SQLite study keeps them in a folder beside its file.
- `--artifacts` / `KMNIST_TUNE_ARTIFACTS` chooses another: a folder, or `s3://bucket/prefix` (Optuna's
  Boto3ArtifactStore, for very large models; needs boto3 and the usual AWS settings).

Artifact ids come from the study database, which everyone who shares it can write: every store is
wrapped in `CheckedArtifactStore`, which accepts only the two forms of id this project (and Optuna's
`upload_artifact`) writes, so no id ever names a path (`../../x.pth`) in a folder or bucket store.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import sqlalchemy
from optuna.storages import BaseStorage

from ..errors import UserError
from ..masking import printable
from ..optuna_internals import ALL_TRIAL_IDS, LOCK_STUDY_OF_TRIAL, RECORDED_ARTIFACT_KEYS
from .lock import storage_lock
from .storage import backend, engine, retried, sqlite_file
from .tables import ARTIFACTS
from .tables import ARTIFACTS_TABLE as TABLE

ENV_ARTIFACTS = "KMNIST_TUNE_ARTIFACTS"
FOLDER = "kmnist-tune-artifacts"
CHUNK = 1 << 20  # bytes per row: a checkpoint streams through in 1 MiB pieces, never whole in memory


def _chosen(override: str | Path | None) -> str | None:
    chosen = override or os.environ.get(ENV_ARTIFACTS)
    return str(chosen) if chosen else None


def artifact_dir(storage: BaseStorage, override: str | Path | None = None) -> Path | None:
    """The artifact folder, or None when the artifacts live in the database (or S3)."""
    chosen = _chosen(override)
    if chosen:
        return None if chosen.startswith("s3://") else Path(chosen).expanduser()
    if backend(storage) == "postgresql":
        return None
    db = sqlite_file(storage)
    base = db.resolve().parent if db is not None else Path.cwd()
    return base / FOLDER


def describe_store(storage: BaseStorage, override: str | Path | None = None) -> str:
    chosen = _chosen(override)
    if chosen and chosen.startswith("s3://"):
        return chosen
    folder = artifact_dir(storage, override)
    return str(folder) if folder is not None else f"the {TABLE} table of the study database"


def artifact_store(storage: BaseStorage, override: str | Path | None = None) -> CheckedArtifactStore:
    return CheckedArtifactStore(_raw_store(storage, override))


def _raw_store(storage: BaseStorage, override: str | Path | None) -> Any:
    chosen = _chosen(override)
    if chosen and chosen.startswith("s3://"):
        return _s3_store(chosen)
    folder = artifact_dir(storage, override)
    if folder is None:
        return PostgresArtifactStore(engine(storage), functools.partial(retried, storage))
    from optuna.artifacts import FileSystemArtifactStore

    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


# -- the ids this project accepts -----------------------------------------------------------------

CHECKPOINT_PREFIX = "kmnist-tune-checkpoint-"
# Optuna's upload_artifact names an artifact str(uuid.uuid4()); a checkpoint is named after its
# trial's id and epoch (checkpoint_base). Nothing else is ever written, so nothing else is read.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CHECKPOINT = re.compile(re.escape(CHECKPOINT_PREFIX) + r"([1-9][0-9]{0,17}|0)-([1-9][0-9]{0,5}|0)\.(pth|json)")


class UntrustedArtifact(UserError):
    """An artifact id from storage that is not one of the forms this project writes."""


@dataclass(frozen=True)
class ArtifactName:
    artifact_id: str
    trial_id: int | None = None  # a checkpoint's trial (None: an uploaded file, named by a uuid)
    epoch: int | None = None
    ext: str | None = None


def parse_artifact_id(artifact_id: Any) -> ArtifactName:
    """The artifact id, checked against the two forms this project writes; UntrustedArtifact else."""
    if isinstance(artifact_id, str):
        if _UUID.fullmatch(artifact_id):
            return ArtifactName(artifact_id)
        m = _CHECKPOINT.fullmatch(artifact_id)
        if m:
            return ArtifactName(artifact_id, int(m[1]), int(m[2]), m[3])
    shown = printable(repr(artifact_id))[:80]
    raise UntrustedArtifact(
        f"artifact id {shown} from the study storage is not one kmnist-tune writes; refused "
        "(someone wrote it into the shared database: `kmnist-tune schema --prune` removes such rows)"
    )


class CheckedArtifactStore:
    """Optuna's ArtifactStore protocol in front of any store: every id is checked first (storage is data,
    never a path). Optuna's own stores join the id to their folder or bucket prefix as it is."""

    def __init__(self, inner: Any):
        self.inner = inner

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self.inner.open_reader(parse_artifact_id(artifact_id).artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self.inner.write(parse_artifact_id(artifact_id).artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.inner.remove(parse_artifact_id(artifact_id).artifact_id)


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


class PostgresArtifactStore:
    """Optuna's ArtifactStore protocol over the `kmnist_tune_artifacts` table: one row per MiB.

    Written inside one transaction (a reader never sees half an artifact) and read a chunk at a time.
    Optuna's own stores keep files or objects; none keeps them in the study's database, which is what
    lets workers on many hosts share artifacts with no service and no volume beyond PostgreSQL.

    A checkpoint's write stores nothing once its trial is gone: its transaction holds the trial's study
    row (FOR KEY SHARE) until it commits, so `study delete` (whose DELETE of that row waits for it)
    removes whatever it wrote, and a write that starts after the delete finds no trial. Uploaded files
    (uuid ids) are kept orphan-free by `upload_file`'s lock instead: Optuna's `upload_artifact` records
    an upload on its study before the write in some releases and after it in others (5.1)."""

    def __init__(self, engine: sqlalchemy.Engine, retry: Callable[[Callable[[], Any]], Any] | None = None):
        self.engine = engine
        # A worker's store rides out a database restart as its storage does (retry.py): a checkpoint
        # removed after a trial must not kill the worker. Each try is its own transaction.
        self.retry = retry or (lambda fn: fn())

    def _missing(self, artifact_id: str) -> Exception:
        from optuna.artifacts.exceptions import ArtifactNotFound

        return ArtifactNotFound(f"artifact {artifact_id} is not in {TABLE}")

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        name = parse_artifact_id(artifact_id)
        start = content_body.tell() if content_body.seekable() else None

        def attempt() -> None:
            if start is not None:
                content_body.seek(start)  # a retry writes the whole body again
            with self.engine.begin() as conn:
                _lock_owner(conn, name)
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

        if start is None:
            attempt()  # a body that cannot be rewound is written once: a retry would store its tail only
        else:
            self.retry(attempt)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        def count() -> int:
            with self.engine.connect() as conn:
                return conn.execute(
                    sqlalchemy.select(sqlalchemy.func.count()).where(ARTIFACTS.c.artifact_id == artifact_id)
                ).scalar_one()

        chunks = self.retry(count)
        if not chunks:
            raise self._missing(artifact_id)
        reader = _ChunkReader(self.engine, artifact_id, chunks, self.retry)
        return io.BufferedReader(reader, buffer_size=CHUNK)  # type: ignore[return-value]

    def remove(self, artifact_id: str) -> None:
        def delete() -> int:
            with self.engine.begin() as conn:
                return conn.execute(ARTIFACTS.delete().where(ARTIFACTS.c.artifact_id == artifact_id)).rowcount

        gone = self.retry(delete)
        if not gone:
            raise self._missing(artifact_id)


class OwnerGone(UserError):
    """An artifact was to be written for a trial or study that is gone (its study deleted)."""


def _lock_owner(conn: Any, name: ArtifactName) -> None:
    # The study of a checkpoint's trial (its id is in the name), its row locked against DELETE until the write commits.
    if name.trial_id is not None and conn.execute(LOCK_STUDY_OF_TRIAL, {"tid": name.trial_id}).first() is None:
        raise OwnerGone(f"artifact {name.artifact_id} was not stored: its trial is gone (its study was deleted)")


class _ChunkReader(io.RawIOBase):
    """Reads an artifact's rows in order, at most CHUNK bytes per query. We write rows of CHUNK bytes,
    but anyone sharing the database can write one of any size, and a row fetched whole would be held
    whole in memory before a download's size cap could count it."""

    def __init__(self, engine: sqlalchemy.Engine, artifact_id: str, chunks: int, retry: Callable[[Callable[[], Any]], Any]):
        self.engine, self.artifact_id, self.chunks, self.retry = engine, artifact_id, chunks, retry
        self.next_chunk, self.offset, self.buffer = 0, 0, memoryview(b"")

    def readable(self) -> bool:
        return True

    def _piece(self) -> tuple[bytes, int]:
        """The next piece of the current row, and the row's length."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sqlalchemy.select(
                    sqlalchemy.func.substring(ARTIFACTS.c.data, self.offset + 1, CHUNK),
                    sqlalchemy.func.octet_length(ARTIFACTS.c.data),
                ).where(ARTIFACTS.c.artifact_id == self.artifact_id, ARTIFACTS.c.chunk == self.next_chunk)
            ).one()
        return bytes(row[0]), int(row[1])

    def readinto(self, b: Any) -> int:
        while not self.buffer:
            if self.next_chunk >= self.chunks:
                return 0
            # A pooled connection per piece, handed back at once: no transaction stays open (and holds
            # one of PgBouncer's server connections) while whoever reads the stream works on a piece.
            data, length = self.retry(self._piece)
            self.offset += len(data)
            if self.offset >= length or not data:
                self.next_chunk, self.offset = self.next_chunk + 1, 0
            self.buffer = memoryview(data)
        n = min(len(b), len(self.buffer))
        b[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


def remove_artifacts(store: CheckedArtifactStore, artifact_ids: list[str]) -> None:
    """Remove artifacts that may already be gone (a retry and its original share a checkpoint). An id of
    no form this project writes names nothing it wrote: it is skipped, never joined to a path."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    for artifact_id in artifact_ids:
        with contextlib.suppress(ArtifactNotFound, FileNotFoundError, UntrustedArtifact):
            store.remove(artifact_id)


def checkpoint_base(trial_id: int, epoch: int) -> str:
    """The artifact name (without .pth/.json) of a trial's checkpoint after `epoch`."""
    return f"{CHECKPOINT_PREFIX}{trial_id}-{epoch}"


def remove_checkpoints(store: CheckedArtifactStore, trial_ids: list[int], n_epochs: int) -> None:
    """Every checkpoint of these trials, recorded or not: a worker killed between an upload and the
    trial's record of it leaves one that no record names."""
    if not trial_ids:
        return
    inner = store.inner
    if isinstance(inner, PostgresArtifactStore):

        def delete() -> None:
            with inner.engine.begin() as conn:
                for trial_id in sorted(set(trial_ids)):
                    prefix = f"{CHECKPOINT_PREFIX}{trial_id}-"
                    conn.execute(ARTIFACTS.delete().where(ARTIFACTS.c.artifact_id.startswith(prefix, autoescape=True)))

        inner.retry(delete)
        return
    # Optuna's folder and S3 stores have no listing in their protocol: try every name there can be.
    names = [checkpoint_base(t, e) for t in sorted(set(trial_ids)) for e in range(n_epochs)]
    remove_artifacts(store, [f"{n}.{ext}" for n in names for ext in ("pth", "json")])


def checkpoint_ids(ckpt: Any, trial_ids: list[int]) -> list[str]:
    """The artifacts of a checkpoint record (a TrialRecord's `checkpoint`), where they are checkpoints
    of these trials: a record names what its own trial (or the ones it retries) saved, and anything
    else in it was written by someone else, to make a worker remove another study's files."""
    if not isinstance(ckpt, dict):
        return []
    out = []
    for key in ("model", "meta"):
        with contextlib.suppress(UntrustedArtifact):
            name = parse_artifact_id(ckpt.get(key))
            if name.trial_id is not None and name.trial_id in trial_ids:
                out.append(name.artifact_id)
    return out


def artifacts_lock(study_name: str) -> str:
    """The storage lock (lock.py) that `upload_file` and `study delete` take for one study."""
    return f"kmnist-tune/artifacts/{study_name}"


def upload_file(storage: BaseStorage, study: optuna.Study, path: Path, mimetype: str | None = None) -> str:
    """Optuna's `upload_artifact` of a file onto a study, under the study's artifacts lock: `study delete`
    takes the same lock around listing, deleting and removing, so an upload is either listed and
    removed with the study, or finds the study gone and stores nothing."""
    from optuna.artifacts import upload_artifact

    with storage_lock(storage, artifacts_lock(study.study_name)):
        try:
            storage.get_study_id_from_name(study.study_name)
        except KeyError:
            raise OwnerGone(f"{path.name} was not stored: study {study.study_name!r} was deleted") from None
        return upload_artifact(
            artifact_store=artifact_store(storage), file_path=str(path), study_or_trial=study, storage=storage, mimetype=mimetype
        )


def prune_artifacts(storage: BaseStorage) -> int:
    """`kmnist-tune schema --prune`: remove the rows of the artifact table that no study owns (ids of no
    form this project writes, checkpoints of trials that are gone, uploads no study or trial records).
    Returns how many artifacts went. Only the PostgreSQL table: a folder or bucket may be shared with
    other studies (or hold other files), and its listing is not this database's to judge."""
    if backend(storage) != "postgresql":
        raise UserError(
            "--prune works on a PostgreSQL study database (its kmnist_tune_artifacts table); "
            "a SQLite study keeps its artifacts as files beside it"
        )
    eng = engine(storage)
    with eng.connect() as conn:
        if not sqlalchemy.inspect(conn).has_table(TABLE):
            return 0
        stored = [r[0] for r in conn.execute(sqlalchemy.select(ARTIFACTS.c.artifact_id).distinct())]
        recorded = {str(r[0]).removeprefix("artifacts:") for r in conn.execute(RECORDED_ARTIFACT_KEYS)}
        trials = {int(r[0]) for r in conn.execute(ALL_TRIAL_IDS)}
    orphans = []
    for artifact_id in stored:
        try:
            name = parse_artifact_id(artifact_id)
        except UntrustedArtifact:
            orphans.append(artifact_id)
            continue
        owned = name.trial_id in trials if name.trial_id is not None else name.artifact_id in recorded
        if not owned:
            orphans.append(artifact_id)
    if orphans:
        with eng.begin() as conn:
            conn.execute(ARTIFACTS.delete().where(ARTIFACTS.c.artifact_id.in_(orphans)))
    return len(orphans)


class BadDownload(UserError):
    """A downloaded artifact that is larger than allowed or does not match its recorded sha256."""


def download_checked(store: CheckedArtifactStore, artifact_id: str, target: Path, sha256: Any, limit: int) -> None:
    """The artifact into `target` (a fixed local name the caller chose, created anew), hashed as it is
    copied and at most `limit` bytes; on any failure the file is deleted, so nothing unchecked stays."""
    h, size = hashlib.sha256(), 0
    target.unlink(missing_ok=True)
    try:
        with store.open_reader(artifact_id) as src, open(target, "xb") as dst:
            while block := src.read(CHUNK):
                size += len(block)
                if size > limit:
                    raise BadDownload(f"{artifact_id} is larger than {limit >> 20} MiB")
                h.update(block)
                dst.write(block)
        if h.hexdigest() != sha256:
            raise BadDownload(f"{artifact_id} does not match the checksum recorded with it")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
