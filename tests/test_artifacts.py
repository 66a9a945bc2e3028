"""Artifacts every host sees: kept in the study's PostgreSQL database (chunked rows, streamed), shown
by a dashboard started anywhere, and gone with their study. The study a worker uploaded to is the
shared LR-prior study (shared_trained.py); its deletion works on a copy."""

from __future__ import annotations

import io
import json
import os
import urllib.request
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import REPO, browse, copy_database, run_cli, spawn_cli
from helpers import free_port, wait_until
from optuna.artifacts.exceptions import ArtifactNotFound
from shared_trained import LrPriorStudy
from sqlalchemy.engine import make_url

from kmnist_tune.service.artifacts import CHUNK, TABLE, PostgresArtifactStore, artifact_store, checkpoint_base
from kmnist_tune.service.storage import open_storage, release

pytestmark = pytest.mark.postgres


def rows(pg_url: str, artifact_id: str | None = None) -> int:
    url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        if artifact_id is None:
            return conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]  # type: ignore[index]
        return conn.execute(f"SELECT count(*) FROM {TABLE} WHERE artifact_id = %s", (artifact_id,)).fetchone()[0]  # type: ignore[index]


def test_the_postgresql_store_round_trips_in_chunks(pg_schema_url: str) -> None:
    pg_url = pg_schema_url
    storage = open_storage(pg_url)  # `study create` and `schema` make the table (here `schema`, once per run)
    store = artifact_store(storage)
    assert isinstance(store.inner, PostgresArtifactStore)
    # Every artifact has an owner: here the checkpoints of one trial.
    trial = optuna.create_study(storage=storage, study_name="chunks").ask()
    big, empty = (f"{checkpoint_base(trial._trial_id, e)}.pth" for e in (0, 1))
    blob = os.urandom(5 * CHUNK + 12345)
    store.write(big, io.BytesIO(blob))
    assert rows(pg_url, big) == 6
    reader = store.open_reader(big)
    assert reader.read(100) == blob[:100]  # streamed: the first rows before the rest
    assert reader.read() == blob[100:]
    store.write(big, io.BytesIO(b"smaller"))  # overwritten whole, not appended
    assert store.open_reader(big).read() == b"smaller" and rows(pg_url, big) == 1
    store.write(empty, io.BytesIO(b""))
    assert store.open_reader(empty).read() == b""
    store.remove(big)
    with pytest.raises(ArtifactNotFound):
        store.open_reader(big)
    with pytest.raises(ArtifactNotFound):
        store.remove(big)
    storage.engine.dispose()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _answers(url: str) -> bool:
    try:
        _get(url)
        return True
    except OSError:
        return False


def test_a_dashboard_elsewhere_shows_the_plot_a_worker_uploaded_and_delete_clears_it(
    tmp_path: Path, lr_prior_study: LrPriorStudy
) -> None:
    shared = lr_prior_study
    # Two "hosts": the workers ran in one working directory, the dashboard runs in another; no shared
    # folder, no KMNIST_TUNE_ARTIFACTS. The worker that ran the LR finder uploaded its plot.
    assert not any(shared.host.rglob("*.png")) and rows(shared.url) > 0
    host_b = tmp_path / "host-b"
    host_b.mkdir()
    port = free_port()
    dash = spawn_cli("dashboard", "--storage", shared.url, "--port", str(port), cwd=host_b)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{base}/api/studies"), 60, "the dashboard to answer", [dash])
        summaries = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
        sid = next(s["study_id"] for s in summaries if s["study_name"] == shared.name)
        (art,) = [a for a in json.loads(_get(f"{base}/api/studies/{sid}"))["artifacts"] if a["filename"] == "lr-find.png"]
        png = _get(f"{base}/artifacts/{sid}/{art['artifact_id']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        # A real browser on the study page: the app lists the plot the other host uploaded.
        shot = REPO / "tests" / "artifacts-out" / "dashboard-shared-artifact.png"
        dom = browse(f"{base}/dashboard/studies/{sid}", shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{shared.name} (id={sid})" in dom
        assert "lr-find.png" in dom
    finally:
        dash.terminate()
        dash.wait(10)
    # The delete on a copy of the database: the shared study stays as it is for the other tests.
    with copy_database(shared.url) as url:
        storage = open_storage(url)
        study = optuna.load_study(study_name=shared.name, storage=storage)
        assert len(optuna.artifacts.get_all_artifact_meta(study)) >= 1
        release(storage)
        out = run_cli("study", "delete", shared.name, "--yes", "--storage", url).stdout
        assert "artifact(s)" in out
        assert rows(url) == 0  # nothing of the deleted study is left in the artifact table
