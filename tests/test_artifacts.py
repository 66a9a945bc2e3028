"""Artifacts every host sees: kept in the study's PostgreSQL database (chunked rows, streamed), shown
by a dashboard started anywhere, and gone with their study."""

from __future__ import annotations

import io
import json
import os
import urllib.request
from pathlib import Path

import optuna
import psycopg
import pytest
from conftest import REPO, browse, cli_env, run_cli, spawn_cli, tiny_spec, write_spec
from optuna.artifacts.exceptions import ArtifactNotFound
from sqlalchemy.engine import make_url

from kmnist_tune.service.artifacts import CHUNK, TABLE, PostgresArtifactStore, artifact_store, checkpoint_base
from kmnist_tune.service.storage import open_storage

pytestmark = pytest.mark.postgres


def rows(pg_url: str, artifact_id: str | None = None) -> int:
    url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        if artifact_id is None:
            return conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]  # type: ignore[index]
        return conn.execute(f"SELECT count(*) FROM {TABLE} WHERE artifact_id = %s", (artifact_id,)).fetchone()[0]  # type: ignore[index]


def test_the_postgresql_store_round_trips_in_chunks(pg_url: str) -> None:
    storage = open_storage(pg_url, create=True)  # `study create` and `schema` make the table
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


def test_a_dashboard_elsewhere_shows_the_plot_a_worker_uploaded_and_delete_clears_it(tmp_path: Path, pg_url: str) -> None:
    spec = tiny_spec("shared", budget={"n_trials": 1})
    spec["parameters"]["lr"] = {"distribution": "lr_finder", "width": 1}
    run_cli("study", "create", str(write_spec(tmp_path / "s.yaml", spec)), "--storage", pg_url)
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    host_a.mkdir()
    host_b.mkdir()
    # Two "hosts": different working directories, no shared folder, no KMNIST_TUNE_ARTIFACTS.
    run_cli("worker", "--study", "shared", "--storage", pg_url, "--gpus", "none", cwd=host_a)
    assert not any(host_a.rglob("*.png")) and rows(pg_url) > 0
    port = _free_port()
    dash = spawn_cli("dashboard", "--storage", pg_url, "--port", str(port), cwd=host_b)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base, dash)
        sid = next(s["study_id"] for s in json.loads(_get(f"{base}/api/studies"))["study_summaries"])
        (art,) = [a for a in json.loads(_get(f"{base}/api/studies/{sid}"))["artifacts"] if a["filename"] == "lr-find.png"]
        png = _get(f"{base}/artifacts/{sid}/{art['artifact_id']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        # A real browser on the study page: the app lists the plot the other host uploaded.
        shot = REPO / "tests" / "artifacts-out" / "dashboard-shared-artifact.png"
        dom = browse(f"{base}/dashboard/studies/{sid}", shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"shared (id={sid})" in dom
        assert "lr-find.png" in dom
    finally:
        dash.terminate()
        dash.wait(10)
    study = optuna.load_study(study_name="shared", storage=open_storage(pg_url))
    assert len(optuna.artifacts.get_all_artifact_meta(study)) >= 1
    out = run_cli("study", "delete", "shared", "--yes", "--storage", pg_url, env=cli_env()).stdout
    assert "artifact(s)" in out
    assert rows(pg_url) == 0  # nothing of the deleted study is left in the artifact table


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(base: str, proc) -> None:  # type: ignore[no-untyped-def]
    import time

    for _ in range(300):
        try:
            _get(f"{base}/api/studies")
            return
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[1]) from None
            time.sleep(0.2)
    raise AssertionError("the dashboard did not answer")
