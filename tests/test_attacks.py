"""The study database is shared, not trusted: each attack of the security review (issue 21), tried for real.

The attacker holds only the worker role that storage/initdb sets up for everyone who shares the study
database (or is handed a model directory). Each attack must have no effect: no file is written outside
the project's own folders, no code runs, no worker stops, and each command ends in success or one line.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import secrets
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import psycopg
import pytest
from conftest import (
    FIXTURE,
    PG_ADMIN,
    REPO,
    cli_env,
    cli_here,
    created_study,
    error_line,
    pg_admin,
    run_cli,
    spawn_cli,
    tiny_spec,
    write_spec,
)
from helpers import free_port, wait_until
from numpy.lib import format as npy
from optuna.trial import TrialState, create_trial
from PIL import Image
from sqlalchemy.engine import make_url

from kmnist_tune.contract.records import MODEL_ATTR, SPEC_ATTR, STOP_ATTR, TrialRecord
from kmnist_tune.errors import UserError
from kmnist_tune.service.artifacts import TABLE, artifact_store, checkpoint_base
from kmnist_tune.service.storage import open_storage
from kmnist_tune.service.users import add_user, users_group
from kmnist_tune.training import data as data_files
from kmnist_tune.training.inputs import image_to_28

pytestmark = pytest.mark.postgres

ADMIN = make_url(PG_ADMIN)
VERSION_TABLES = ("alembic_version", "version_info")
WRITES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
KEY = "k" * 32  # a signing key for the tests that use one


@dataclass
class Shared:
    """A study database set up as storage/initdb and `kmnist-tune schema` set it up: its roles and their
    passwords; `viewed` is a study with one trial and one artifact (what the dashboard shows)."""

    db: str
    owner: str
    roles: dict[str, tuple[str, str]]  # "worker" / "dashboard" / "alice" / "bob" -> (role, password)
    init_env: dict[str, str]
    viewed: dict[str, Any]

    def url(self, who: str) -> str:
        if who == "owner":
            return f"postgresql+psycopg://{self.owner}@{ADMIN.host}:{ADMIN.port}/{self.db}"
        role, password = self.roles[who]
        return f"postgresql+psycopg://{role}:{password}@{ADMIN.host}:{ADMIN.port}/{self.db}"

    def connect(self, who: str) -> psycopg.Connection[Any]:
        role, password = self.roles[who] if who != "owner" else (self.owner, "")
        return psycopg.connect(host=ADMIN.host, port=ADMIN.port, user=role, password=password, dbname=self.db, autocommit=True)

    @property
    def worker_url(self) -> str:
        return self.url("worker")

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement as the worker role (the attacker's own connection)."""
        with self.connect("worker") as conn:
            cur = conn.execute(query, params)
            return list(cur.fetchall()) if cur.description else []

    def storage(self) -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(self.worker_url, skip_table_creation=True)

    def create(self, tmp: Path, name: str, **over: Any) -> optuna.Study:
        """`study create` as the worker role (through the entry point's `main`, in this process)."""
        cli_here("study", "create", str(write_spec(tmp / f"{name}.yaml", tiny_spec(name, **over))), "--storage", self.worker_url)
        return optuna.load_study(study_name=name, storage=self.storage())

    def plant(self, artifact_id: str, data: bytes) -> None:
        """An artifact row written straight into the table, as anyone with the worker role can."""
        self.sql(f"INSERT INTO {TABLE} (artifact_id, chunk, data) VALUES (%s, 0, %s)", (artifact_id, data))

    def rows(self) -> set[str]:
        return {r[0] for r in self.sql(f"SELECT DISTINCT artifact_id FROM {TABLE}")}

    def init(self) -> subprocess.CompletedProcess[str]:
        """storage/initdb's script, run as its comment says (PGHOST/PGPORT: this machine's server)."""
        return subprocess.run(
            [str(REPO / "storage" / "initdb" / "10-kmnist-roles.sh")],
            env=self.init_env,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    admin = pg_admin()  # fails, never skips, when PostgreSQL is down
    tag = uuid.uuid4().hex[:10]
    db = f"kt_attack_{tag}"
    roles = {
        "worker": (f"kt_attacker_{tag}", secrets.token_hex(16)),
        "dashboard": (f"kt_attack_dash_{tag}", secrets.token_hex(16)),
        # Two people, each with a login of their own in the users group (`kmnist-tune db add-user`).
        "alice": (f"kt_alice_{tag}", secrets.token_hex(16)),
        "bob": (f"kt_bob_{tag}", secrets.token_hex(16)),
    }
    admin.execute(f'CREATE DATABASE "{db}"')
    init_env = {
        **os.environ,
        "PGHOST": str(ADMIN.host),
        "PGPORT": str(ADMIN.port),
        "POSTGRES_USER": str(ADMIN.username),
        "POSTGRES_DB": db,
        "POSTGRES_PASSWORD": secrets.token_hex(8),
        "KMNIST_TUNE_WORKER_USER": roles["worker"][0],
        "KMNIST_TUNE_WORKER_PASSWORD": roles["worker"][1],
        "KMNIST_TUNE_DASHBOARD_USER": roles["dashboard"][0],
        "KMNIST_TUNE_DASHBOARD_PASSWORD": roles["dashboard"][1],
    }
    try:
        s = Shared(db, str(ADMIN.username), roles, init_env, {})
        init = s.init()
        assert init.returncode == 0, init.stderr
        made = cli_here("schema", "--storage", s.url("owner"))  # the owner's tables, as compose's `schema` service makes them
        assert "ready" in made.stdout
        for who in ("alice", "bob"):
            add_user(s.url("owner"), *roles[who])
        # A study alice made with her own login, for bob's worker to work (before any test plants records).
        alices = write_spec(tmp_path_factory.mktemp("alice") / "alices.yaml", tiny_spec("alices", budget={"n_trials": 1}))
        cli_here("study", "create", str(alices), "--storage", s.url("alice"))
        # A study the worker role made, one finished trial and one artifact of it: what the dashboard shows.
        storage = open_storage(s.url("worker"))
        study = optuna.create_study(study_name="viewed", storage=storage, direction="maximize")
        trial = study.ask()
        content = b"the-artifact-" + secrets.token_bytes(8).hex().encode()
        path = tmp_path_factory.mktemp("artifact") / "note.txt"
        path.write_bytes(content)
        aid = optuna.artifacts.upload_artifact(
            artifact_store=artifact_store(storage), file_path=str(path), study_or_trial=trial, mimetype="text/plain"
        )
        study.tell(trial, 0.5)
        sid = storage.get_study_id_from_name("viewed")
        s.viewed = {"study_id": sid, "trial_id": study.trials[0]._trial_id, "artifact_id": aid, "content": content}
        yield s
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for role in [r for r, _ in roles.values()] + [users_group(db)]:
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a name from the database becomes a local path ------------------------------------------------


@pytest.fixture(scope="module")
def poisoned_run(shared: Shared, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A study whose next trial is planted as a retry of a failed one whose checkpoint "artifacts" are
    named by absolute paths outside every folder of the project, and whose stored spec points W&B at
    another folder, mode and account; then one worker works it."""
    tmp = tmp_path_factory.mktemp("poisoned")
    outside = tmp / "outside"  # stands for site-packages: a folder that exists, where a `.pth` file runs code
    outside.mkdir()
    study = shared.create(tmp, "poisoned", budget={"n_trials": 1})
    payload, meta = b"import os; os.system('touch pwned')\n", b'{"format": 1}'
    planted = {"model": str(outside / "evil.pth"), "meta": str(outside / "site.json")}
    for artifact_id, data in ((planted["model"], payload), (planted["meta"], meta)):
        shared.plant(artifact_id, data)
    record = {"epoch": 0, "batch_size": 32, **planted, "sha256": {planted["model"]: sha(payload), planted["meta"]: sha(meta)}}
    # Trial 0 failed with that checkpoint; trial 1 is its retry, in Optuna's bookkeeping and in the user
    # attributes any client (or the dashboard) can set.
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"checkpoint": record}))
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            user_attrs={"checkpoint": record, "retry_of": 0},
            system_attrs={"failed_trial": 0, "retry_history": [0]},
        )
    )
    spec = study.user_attrs[SPEC_ATTR]
    spec["tracking"] = {"wandb": {"mode": "online", "dir": str(tmp / "elsewhere"), "entity": "attacker", "project": "exfil"}}
    study.set_user_attr(SPEC_ATTR, spec)
    own = tmp / "own-wandb"
    proc = run_cli(
        "worker", "--study", "poisoned", "--storage", shared.worker_url, "--gpus", "none",
        env=cli_env(WANDB_MODE="offline", WANDB_DIR=str(own)), cwd=tmp,
    )  # fmt: skip
    trials = optuna.load_study(study_name="poisoned", storage=shared.storage()).trials
    return {"tmp": tmp, "outside": outside, "own": own, "proc": proc, "trials": trials}


def test_a_checkpoint_named_by_a_path_is_never_written_there(poisoned_run: dict[str, Any]) -> None:
    assert list(poisoned_run["outside"].iterdir()) == []  # nothing was written where the names pointed
    retry = poisoned_run["trials"][1]
    assert retry.state == TrialState.COMPLETE and TrialRecord.of(retry).resumed_from is None
    err = poisoned_run["proc"].stderr
    assert "not a checkpoint of the trials it retries" in err and "starting from scratch" in err and "Traceback" not in err


def test_the_stored_spec_does_not_choose_where_wandb_writes_or_logs(poisoned_run: dict[str, Any]) -> None:
    tmp, err = poisoned_run["tmp"], poisoned_run["proc"].stderr
    assert not (tmp / "elsewhere").exists()
    runs = list(poisoned_run["own"].rglob("offline-run-*"))  # the worker's own folder and mode (offline)
    assert runs and not list((poisoned_run["own"] / "wandb").glob("run-*"))  # no online run
    assert "asks for W&B entity attacker" in err and "asks W&B to write to" in err and "asks for W&B mode online" in err


def test_the_worker_settings_come_from_the_environment_it_is_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """wandb_target reads every one of its settings, the mode included, from the mapping passed in."""
    from kmnist_tune.contract.spec import WandbSpec
    from kmnist_tune.observe.tracking import wandb_target

    monkeypatch.setenv("WANDB_MODE", "online")  # this process's own, which must not be read
    given = {"WANDB_MODE": "disabled", "WANDB_DIR": str(tmp_path), "WANDB_ENTITY": "team", "WANDB_PROJECT": "mine"}
    target, notes = wandb_target(WandbSpec(mode="online", entity="attacker"), "study", given)
    assert (target.mode, target.dir, target.entity, target.project) == ("disabled", tmp_path, "team", "mine")
    assert any("asks for W&B mode online; this worker logs disabled" in n for n in notes)
    assert any("asks for W&B entity attacker" in n for n in notes)


def test_export_writes_only_the_model_files_and_only_into_the_destination(shared: Shared, tmp_path: Path) -> None:
    study = shared.create(tmp_path, "swapped")
    absolute = tmp_path / "absolute" / "written.txt"
    absolute.parent.mkdir()
    files = {"../../escaped.txt": b"written outside", "model.json": b"{}", str(absolute): b"x"}
    ids = {name: str(uuid.uuid4()) for name in files}
    for name, data in files.items():
        shared.plant(ids[name], data)
    study.set_user_attr(MODEL_ATTR, {"trial": 0, "at": "now", "artifacts": ids, "sha256": {n: sha(d) for n, d in files.items()}})
    parent = tmp_path / "a" / "b"
    parent.mkdir(parents=True)
    line = error_line(
        cli_here("export", "--study", "swapped", str(parent / "model"), "--storage", shared.worker_url, check=False)
    )
    assert "a model directory does not have" in line
    assert list(parent.iterdir()) == [] and not absolute.exists()  # nothing written, anywhere


def test_a_checkpoint_that_fails_its_check_is_deleted(shared: Shared, tmp_path: Path) -> None:
    """A retry's checkpoint whose bytes do not match the checksum its trial recorded: refused, and no
    byte of it stays on the worker's disk while the retry trains from scratch."""
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.recipe.checkpoints import TrialCheckpoints

    study = shared.create(tmp_path, "mismatch")
    first = study.ask()
    base = checkpoint_base(first._trial_id, 0)
    store = artifact_store(shared.storage())
    for ext in ("pth", "json"):
        store.write(f"{base}.{ext}", io.BytesIO(b"tampered after it was recorded"))
    sums = {f"{base}.pth": sha(b"the weights it saved"), f"{base}.json": sha(b"{}")}
    first.set_user_attr(
        "checkpoint", {"epoch": 0, "batch_size": 32, "model": f"{base}.pth", "meta": f"{base}.json", "sha256": sums}
    )
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.tell(first, state=TrialState.FAIL))
    retry = study.ask()
    retry.set_user_attr("retry_of", first.number)  # as the worker records it
    lines: list[str] = []
    ckpts = TrialCheckpoints(retry, parse_spec(tiny_spec("mismatch")), lines.append)
    try:
        assert ckpts.resume_point({"arch": "resnet18", "stem": "imagenet", "epochs": 1}) is None
        assert "does not match the checksum" in lines[0] and "starting from scratch" in lines[0]
        assert list(Path(ckpts._tmp.name).iterdir()) == []  # the download is gone while the retry trains
    finally:
        ckpts.close()


# -- signatures -----------------------------------------------------------------------------------


def test_with_a_signing_key_an_unsigned_kept_model_is_refused(shared: Shared, tmp_path: Path) -> None:
    study = shared.create(tmp_path, "unsigned")
    good = {"weights.safetensors": b"w", "classes.csv": b"c", "model.json": b"{}"}
    ids = {name: str(uuid.uuid4()) for name in good}
    for name, data in good.items():
        shared.plant(ids[name], data)
    record = {"trial": 0, "at": "now", "artifacts": ids, "sha256": {n: sha(d) for n, d in good.items()}}
    study.set_user_attr(MODEL_ATTR, record)
    env = cli_env(KMNIST_TUNE_SIGNING_KEY=KEY)
    args = ("export", "--study", "unsigned", str(tmp_path / "u"), "--storage", shared.worker_url)
    assert "unsigned or not signed" in error_line(cli_here(*args, env=env, check=False))
    # Signed with another key: refused too.
    from kmnist_tune.signing import Signer

    other = Signer("o" * 32)
    record["signatures"] = {n: other.sign("model-file", n, ids[n], sha(d)) for n, d in good.items()}
    study.set_user_attr(MODEL_ATTR, record)
    assert "unsigned or not signed" in error_line(cli_here(*args, env=env, check=False))
    # Signed with the team's key: fetched. Without the key, today's behaviour (the checksum alone).
    mine = Signer(KEY)
    record["signatures"] = {n: mine.sign("model-file", n, ids[n], sha(d)) for n, d in good.items()}
    study.set_user_attr(MODEL_ATTR, record)
    cli_here(*args, env=env)
    assert (tmp_path / "u" / "classes.csv").read_bytes() == b"c"
    cli_here("export", "--study", "unsigned", str(tmp_path / "plain"), "--storage", shared.worker_url)


def test_with_a_signing_key_a_checkpoint_resumes_only_when_signed_by_it(
    shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's checkpoint round trip, signed; one an attacker uploaded with the right checksum but no
    signature is refused and the retry starts from scratch."""
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.recipe.checkpoints import TrialCheckpoints

    monkeypatch.setenv("KMNIST_TUNE_SIGNING_KEY", KEY)
    spec_dict = tiny_spec("signed", budget={"n_trials": 4})
    study = shared.create(tmp_path, "signed", budget={"n_trials": 4})
    spec = parse_spec(spec_dict)
    params = {"arch": "resnet18", "stem": "imagenet", "epochs": 1}
    info = {
        "format": 1,
        "epoch": 0,
        "n_epochs": 1,
        "batch_size": 32,
        "loader_epoch": 1,
        "rng": {},
        "seed": 0,
        "arch": "resnet18",
        "stem": "imagenet",
    }

    def upload(trial: optuna.Trial) -> None:
        import tempfile

        ck = TrialCheckpoints(trial, spec, lambda m: None)
        staging = tempfile.TemporaryDirectory()
        weights, meta = Path(staging.name) / "w.pth", Path(staging.name) / "m.json"
        weights.write_bytes(b"weights")
        meta.write_text(json.dumps(info))
        ck._upload(staging, weights, meta, 0, 32)
        ck.close()

    def retry_of(trial: optuna.Trial) -> tuple[list[str], Any]:
        frozen = study.tell(trial, state=TrialState.FAIL)
        optuna.storages.RetryHeartbeatStaleTrialCallback()(study, frozen)
        retry = study.ask()
        lines: list[str] = []
        ck = TrialCheckpoints(retry, spec, lines.append)
        try:
            return lines, ck.resume_point(params)
        finally:
            ck.close()
            study.tell(retry, state=TrialState.FAIL)

    first = study.ask()
    upload(first)
    lines, resume = retry_of(first)
    assert resume is not None and resume.epoch == 0 and not lines  # signed by this key: resumed
    # The attacker's own checkpoint under the right name, with a matching checksum and no signature.
    second = study.ask()
    base = checkpoint_base(second._trial_id, 0)
    store = artifact_store(shared.storage())
    blob = json.dumps(info).encode()
    for ext, data in (("pth", b"attacker weights"), ("json", blob)):
        store.write(f"{base}.{ext}", io.BytesIO(data))
    sums = {f"{base}.pth": sha(b"attacker weights"), f"{base}.json": sha(blob)}
    second.set_user_attr(
        "checkpoint", {"epoch": 0, "batch_size": 32, "model": f"{base}.pth", "meta": f"{base}.json", "sha256": sums}
    )
    lines, resume = retry_of(second)
    assert (
        resume is None
        and "not signed with this worker's KMNIST_TUNE_SIGNING_KEY" in lines[0]
        and "starting from scratch" in lines[0]
    )


# -- a model file runs code -----------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _pickled_pt2(path: Path, marker: Path) -> None:
    """A torch.export archive whose weight payloads are marked `use_pickle` and hold a pickle that runs a
    shell command: what `torch.export.load` runs as it loads."""
    import torch
    from torch import nn

    program = torch.export.export(nn.Linear(4, 2).eval(), (torch.zeros(1, 4),))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            elif "/data/weights/weight_" in info.filename:
                data = pickle.dumps(_Payload(marker))
            dst.writestr(info.filename, data)


def crafted_model_dir(folder: Path, marker: Path, *, classes: list[str] | None = None) -> Path:
    """A model directory as `export` writes it (real resnet18 weights, untrained), with a model.pt2 that
    runs a command when PyTorch loads it, and class names carrying terminal escapes."""
    from kmnist_tune.training.inference import save_weights
    from kmnist_tune.training.model import build_model

    folder.mkdir(parents=True)
    save_weights(build_model("resnet18", 10, "imagenet", 0.5), 0.19, 0.35, folder / "weights.safetensors")
    _pickled_pt2(folder / "model.pt2", marker)
    chars = classes or [f"\x1b]0;owned\x07\x1b[2Jc{i}" for i in range(10)]
    (folder / "classes.csv").write_text(
        "index,codepoint,char\n" + "".join(f"{i},U+0000,{c}\n" for i, c in enumerate(chars)), encoding="utf-8"
    )
    card = {
        "format": "kmnist-tune model directory",
        "model": {
            "weights": "weights.safetensors",
            "program": "model.pt2",
            "constructor": {"arch": "resnet18", "stem": "imagenet", "n_classes": 10, "dropout": 0.5},
            "normalisation": {"mean": 0.19, "std": 0.35},
        },
        "metrics": {"metric": "accuracy"},
        "files": {n: sha((folder / n).read_bytes()) for n in ("weights.safetensors", "model.pt2", "classes.csv")},
    }
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    return folder


def test_predict_runs_no_code_from_a_model_directory_and_prints_no_escapes(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = crafted_model_dir(tmp_path / "handed-over", marker)
    proc = run_cli("predict", str(folder), str(FIXTURE / "kmnist-test-imgs.npz"), "--top", "2")
    assert not marker.exists()  # model.pt2 was never unpickled
    assert len(proc.stdout.splitlines()) >= 300 and "c" in proc.stdout
    assert "\x1b" not in proc.stdout + proc.stderr and "\x07" not in proc.stdout
    # The same archive does run its command in PyTorch's own loader: the attack is real.
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.export.load({str(folder / 'model.pt2')!r})"],
        capture_output=True,
        timeout=120,
    )
    assert marker.exists()


def test_with_a_signing_key_predict_refuses_an_unsigned_model_directory(tmp_path: Path) -> None:
    folder = crafted_model_dir(tmp_path / "m", tmp_path / "pwned", classes=[str(i) for i in range(10)])
    args = ("predict", str(folder), str(FIXTURE / "kmnist-test-imgs.npz"))
    assert "unsigned or not signed" in error_line(cli_here(*args, env=cli_env(KMNIST_TUNE_SIGNING_KEY=KEY), check=False))
    from kmnist_tune.signing import Signer

    card = json.loads((folder / "model.json").read_text())
    import kmnist_tune.training.inference as inference

    card["signature"] = Signer(KEY).sign("model-card", inference._canonical(card))
    (folder / "model.json").write_text(json.dumps(card))
    cli_here(*args, env=cli_env(KMNIST_TUNE_SIGNING_KEY=KEY))


# -- one statement stops everyone: least privilege ---------------------------------------------------


def refused_sql(conn: psycopg.Connection[Any], sql: str, error: type[Exception] = psycopg.errors.InsufficientPrivilege) -> None:
    with pytest.raises(error):
        conn.execute(sql)
        pytest.fail(f"allowed: {sql}")


VERSION_WRITES = (
    "UPDATE version_info SET library_version = '99.0.0', schema_version = 99",
    "UPDATE alembic_version SET version_num = 'v99'",
    "DELETE FROM version_info",
    "DELETE FROM alembic_version",
    "TRUNCATE version_info",
    "TRUNCATE alembic_version",
    "INSERT INTO version_info (version_info_id, schema_version, library_version) VALUES (2, 99, '99.0.0')",
    "INSERT INTO alembic_version (version_num) VALUES ('v99')",
)


def version_write_grantees(s: Shared) -> list[tuple[str, str, str]]:
    """(role or PUBLIC, table, privilege) of every write on the version tables but the owner's."""
    with s.connect("owner") as conn:
        rows = conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, c.relname, a.privilege_type"
            " FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a"
            " WHERE c.relname = ANY(%s) AND pg_table_is_visible(c.oid)"
            " AND a.privilege_type = ANY(%s) AND a.grantee <> c.relowner",
            (list(VERSION_TABLES), list(WRITES)),
        ).fetchall()
    return [tuple(r) for r in rows]


def test_the_worker_role_cannot_write_optunas_version_tables_and_still_works_studies(
    shared: Shared, poisoned_run: dict[str, Any]
) -> None:
    before = {}
    with shared.connect("owner") as conn:
        for t in VERSION_TABLES:
            before[t] = conn.execute(f"SELECT * FROM {t}").fetchall()
    for attempt in ("after `schema`", "after the init script ran again"):  # a re-run re-grants ALL TABLES: it must revoke too
        with shared.connect("worker") as w:
            for sql in VERSION_WRITES:
                refused_sql(w, sql)
            for t in VERSION_TABLES:  # Optuna reads them on every open
                assert w.execute(f"SELECT * FROM {t}").fetchall() == before[t], attempt
        assert version_write_grantees(shared) == [], attempt
        if attempt.startswith("after `schema`"):
            again = shared.init()
            assert again.returncode == 0, again.stderr

    # The worker role still creates a study (the storage opened with create=True) and works it: the
    # poisoned run's worker, a real `kmnist-tune worker` as that role, finished its trial.
    assert poisoned_run["trials"][1].state == optuna.trial.TrialState.COMPLETE
    with shared.connect("owner") as conn:  # and nothing it did touched them
        assert {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in VERSION_TABLES} == before


def test_the_dashboard_role_reads_and_cannot_write(shared: Shared) -> None:
    sid = shared.viewed["study_id"]
    with shared.connect("dashboard") as d:
        for table in ("studies", "trials", "trial_values", "version_info", "alembic_version", TABLE, "kmnist_tune_claims"):
            d.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert d.execute("SELECT study_name FROM studies WHERE study_id = %s", (sid,)).fetchone() == ("viewed",)
        writes = (
            "INSERT INTO studies (study_name) VALUES ('by-the-dashboard')",
            f"UPDATE studies SET study_name = 'renamed' WHERE study_id = {sid}",
            f"DELETE FROM studies WHERE study_id = {sid}",
            "UPDATE trial_user_attributes SET value_json = '1'",
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) SELECT trial_id, 'x', '1' FROM trials",
            f"DELETE FROM {TABLE}",
            "INSERT INTO kmnist_tune_claims (study_id) VALUES (1)",
            "UPDATE version_info SET library_version = '99.0.0'",
        )
        # Its transactions are read-only by default (a second guard)...
        for sql in writes:
            refused_sql(d, sql, psycopg.errors.ReadOnlySqlTransaction)
        # ... which a client may turn off: the grants are the boundary.
        d.execute("SET default_transaction_read_only = off")
        for sql in (*writes, "TRUNCATE trials", "CREATE TABLE sneaky (id int)", "CREATE TEMP TABLE sneaky (id int)"):
            refused_sql(d, sql)
        refused_sql(d, "SELECT nextval(pg_get_serial_sequence('studies', 'study_id'))")


# -- the dashboard is open to the host ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def ask(port: int, path: str, host: str | None, method: str = "GET", body: Any = None, **headers: str) -> Reply:
    """One request to 127.0.0.1:port with exactly this Host header (None: none at all). Every reply is
    checked for a CORS header: the dashboard must send none, to anyone."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        data = json.dumps(body).encode() if body is not None else b""
        if body is not None:
            conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        for k, v in headers.items():
            conn.putheader(k.replace("_", "-"), v)
        conn.endheaders(data)
        resp = conn.getresponse()
        reply = Reply(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()
    cors = [(k, v) for k, v in reply.headers if k.lower().startswith("access-control-")]
    assert not cors, f"{method} {path} (Host {host}) answered with CORS headers {cors}"
    return reply


@pytest.fixture(scope="module")
def dashboard(shared: Shared) -> Iterator[int]:
    """`kmnist-tune dashboard` on loopback as the dashboard role, two more names allowed (flag and env)."""
    port = free_port()
    env = cli_env(KMNIST_TUNE_STORAGE=shared.url("dashboard"), KMNIST_TUNE_DASHBOARD_ALLOW_HOSTS=" proxy.example:8443 ,")
    proc = spawn_cli("dashboard", "--port", str(port), "--allow-host", "dash.example", env=env)

    def answers() -> bool:
        try:
            return ask(port, "/api/studies", f"127.0.0.1:{port}").status == 200
        except OSError:
            return False

    try:
        wait_until(answers, 90, "the dashboard to answer on loopback", [proc])
        yield port
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert shared.roles["dashboard"][1] not in err  # its password: never printed


def studies(reply: Reply) -> list[str]:
    assert reply.status == 200, (reply.status, reply.body[:300])
    return [s["study_name"] for s in json.loads(reply.body)["study_summaries"]]


def test_the_dashboard_serves_the_studies_with_the_read_only_role_and_its_writes_fail(shared: Shared, dashboard: int) -> None:
    here = f"127.0.0.1:{dashboard}"
    sid, tid = shared.viewed["study_id"], shared.viewed["trial_id"]
    assert "viewed" in studies(ask(dashboard, "/api/studies", here))
    detail = ask(dashboard, f"/api/studies/{sid}", here)
    assert detail.status == 200 and [t["trial_id"] for t in json.loads(detail.body)["trials"]] == [tid]
    # optuna-dashboard's own write endpoints, from its own origin: they reach the database, which refuses.
    same_origin = {"Origin": f"http://{here}"}
    assert ask(dashboard, f"/api/studies/{sid}", here, "DELETE", {}, **same_origin).status >= 500
    assert (
        ask(dashboard, f"/api/trials/{tid}/user-attrs", here, "POST", {"user_attrs": {"owned": 1}}, **same_origin).status >= 500
    )
    assert ask(dashboard, f"/api/studies/{sid}/rename", here, "POST", {"study_name": "gone"}).status >= 500
    study = optuna.load_study(study_name="viewed", storage=shared.url("owner"))
    assert "owned" not in study.trials[0].user_attrs and study._study_id == sid
    with shared.connect("owner") as conn:  # the artifact that a delete would have removed first
        assert conn.execute(
            f"SELECT count(*) FROM {TABLE} WHERE artifact_id = %s", (shared.viewed["artifact_id"],)
        ).fetchone() == (1,)


def test_the_dashboard_answers_only_its_own_host_names_and_sends_no_cors_header(shared: Shared, dashboard: int) -> None:
    port, v = dashboard, shared.viewed
    artifact = f"/artifacts/{v['study_id']}/{v['trial_id']}/{v['artifact_id']}"
    # A page at evil.example that rebinds its name to 127.0.0.1 sends its own name as Host: refused.
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}", "", None):
        for path in ("/api/studies", artifact, "/dashboard"):
            r = ask(port, path, host)
            assert r.status == 403 and dict(r.headers)["Content-Type"].startswith("text/plain"), (host, path, r.status)
            assert b"viewed" not in r.body and v["content"] not in r.body and len(r.body) < 300, r.body
    assert b"--allow-host" in ask(port, "/api/studies", f"evil.example:{port}").body
    # The names it is known by: the bound address and loopback's on its port, --allow-host's bare name on
    # any port, the environment's NAME:PORT on that port only.
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        f"LocalHost:{port}",
        "dash.example:1234",
        "proxy.example:8443",
    ):
        assert "viewed" in studies(ask(port, "/api/studies", host)), host
    assert ask(port, "/api/studies", "proxy.example:8444").status == 403
    # The artifact (optuna-dashboard sends it with Access-Control-Allow-Origin: *; `ask` checks none came).
    got = ask(port, artifact, f"localhost:{port}")
    assert got.status == 200 and got.body == v["content"]
    # A write that a page of another origin sends to a right Host (a form: CSRF) stops before the database.
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port}.evil.example"):
        r = ask(port, f"/api/studies/{v['study_id']}", f"127.0.0.1:{port}", "DELETE", {}, Origin=origin)
        assert r.status == 403 and b"origin" in r.body, origin
    # A bad --allow-host: one line, before anything is opened or bound.
    line = error_line(
        cli_here("dashboard", "--allow-host", "http://evil.example/", "--storage", shared.url("dashboard"), check=False)
    )
    assert "--allow-host 'http://evil.example/' is not a host name" in line


# -- printed text carries terminal escapes ---------------------------------------------------------


def test_text_from_the_database_is_printed_without_control_characters(shared: Shared, tmp_path: Path) -> None:
    study = shared.create(tmp_path, "escapes")
    study.set_user_attr(STOP_ATTR, {"at": "\x1b]0;pwned\x07now", "by": "\x1b[2J\x1b[31mroot\r\x9b1m", "now": False})
    trial = study.ask()
    trial.set_user_attr("error", "\x1b[8mhidden\x1b[0m")
    study.tell(trial, state=TrialState.FAIL)
    for args in (("study", "show", "escapes"), ("study", "list")):
        proc = cli_here(*args, "--storage", shared.worker_url)
        printed = proc.stdout + proc.stderr
        assert "stopped" in printed or "escapes" in printed
        assert not any(c in printed for c in "\x1b\x07\r\x9b"), repr(printed[:400])


# -- orphans --------------------------------------------------------------------------------------


class _SlowBody(io.RawIOBase):
    """A checkpoint's bytes that arrive only once `go` is set: an upload held in flight."""

    def __init__(self, go: threading.Event):
        self.go, self.sent = go, 0
        self.started = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self.started.set()
        if self.sent == 0:
            self.go.wait(120)
        if self.sent >= 3 << 20:
            return 0
        n = min(len(b), 1 << 20)
        b[:n] = b"\x01" * n
        self.sent += n
        return n


def test_study_delete_leaves_no_row_behind_even_of_an_upload_in_flight(shared: Shared, tmp_path: Path) -> None:
    study = shared.create(tmp_path, "inflight")
    trial = study.ask()
    store = artifact_store(shared.storage())
    go = threading.Event()
    body = _SlowBody(go)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            store.write(f"{checkpoint_base(trial._trial_id, 0)}.pth", body)
        except BaseException as e:  # noqa: BLE001  (the test looks at it)
            errors.append(e)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert body.started.wait(60)
    delete = spawn_cli("study", "delete", "inflight", "--yes", "--storage", shared.worker_url)
    # Until the delete waits on the upload's lock (or, without one, has finished), the upload is held.
    with shared.connect("worker") as conn:

        def delete_waits_or_ended() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name = %s",
                (f"kmnist-tune {delete.pid}",),
            ).fetchone()
            return delete.poll() is not None or bool(row and row[0])

        wait_until(delete_waits_or_ended, 120, "the delete to wait on the upload's lock", every=0.05)
    go.set()
    uploader.join(60)
    out, err = delete.communicate(timeout=120)
    assert delete.returncode == 0, err
    assert not any(r.startswith(f"{checkpoint_base(trial._trial_id, 0)}") for r in shared.rows())
    # A write for the deleted study that starts now stores nothing.
    from kmnist_tune.service.artifacts import OwnerGone

    with pytest.raises(OwnerGone):
        store.write(f"{checkpoint_base(trial._trial_id, 1)}.pth", io.BytesIO(b"late"))
    assert not any(r.startswith(f"{checkpoint_base(trial._trial_id, 0)}") for r in shared.rows())


def test_schema_prune_removes_rows_no_study_owns(shared: Shared, tmp_path: Path) -> None:
    study = shared.create(tmp_path, "prune")
    trial = study.ask()
    kept = f"{checkpoint_base(trial._trial_id, 0)}.pth"
    artifact_store(shared.storage()).write(kept, io.BytesIO(b"a live trial's checkpoint"))
    junk = ["../../etc/passwd", f"{checkpoint_base(10**9, 0)}.pth", str(uuid.uuid4())]
    for artifact_id in junk:
        shared.plant(artifact_id, b"orphan")
    before = shared.rows()  # other tests of the module planted orphans too
    out = cli_here("schema", "--prune", "--storage", shared.worker_url).stdout
    rows = shared.rows()
    assert f"pruned {len(before) - len(rows)} artifact(s)" in out and len(before) - len(rows) >= 3
    assert kept in rows and not rows & set(junk)
    assert "pruned 0 artifact(s)" in cli_here("schema", "--prune", "--storage", shared.worker_url).stdout


# -- .env ------------------------------------------------------------------------------------------


def test_dotenv_is_read_never_over_the_environment_and_warned_about_when_readable(shared: Shared, tmp_path: Path) -> None:
    shared.create(tmp_path, "from-dotenv")
    work = tmp_path / "work"
    work.mkdir()
    dotenv = work / ".env"
    dotenv.write_text(f"KMNIST_TUNE_STORAGE={shared.worker_url}\n")
    dotenv.chmod(0o600)
    proc = cli_here("study", "list", cwd=work)
    assert "from-dotenv" in proc.stdout and not proc.stderr.strip()  # the shared study, not a SQLite default
    assert not (work / "kmnist-tune.db").exists()
    dotenv.chmod(0o644)
    proc = cli_here("study", "list", cwd=work)
    assert "can be read by other users" in proc.stderr and "from-dotenv" in proc.stdout
    dotenv.chmod(0o600)
    # The real environment wins over the file.
    local = f"sqlite:///{tmp_path / 'local.db'}"
    cli_here("study", "create", str(write_spec(tmp_path / "l.yaml", tiny_spec("local-only"))), "--storage", local)
    proc = cli_here("study", "list", cwd=work, env=cli_env(KMNIST_TUNE_STORAGE=local))
    assert "local-only" in proc.stdout and "from-dotenv" not in proc.stdout


# == unbounded input: every input is bounded before it is believed ================================
# Small files that claim huge contents, specs that ask for huge work or nest deeply: refused with one
# line and exit status 2, without allocating what they claim.

CLAIMED = 255_000  # the review's count: 200 MB of images (400 MB with the old copy) from a 194 KB file
PEAK_BYTES = 16 << 20  # what refusing any of these may allocate at most: the claimed contents are >= 200 MB


def peak_of(fn: Callable[[], Any]) -> tuple[BaseException | None, int]:
    """(what fn raised, the most memory Python and numpy held at once while it ran)."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except Exception as e:
        raised = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return raised, peak


def refused(fn: Callable[[], Any], *words: str) -> str:
    """fn raises a UserError naming every word, having allocated little."""
    raised, peak = peak_of(fn)
    assert isinstance(raised, UserError), f"expected a refusal, got {raised!r}"
    message = str(raised)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert peak < PEAK_BYTES, f"{peak:,} bytes allocated before refusing"
    return message


def idx_images(path: Path, claimed: int, present: int | None = None, extra: bytes = b"", gz: bool = True) -> Path:
    """An idx3 file whose header claims `claimed` 28x28 images and whose body holds `present` (zeros),
    written in pieces so that making it costs no memory."""
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(struct.pack(">4I", 2051, claimed, 28, 28))
        todo = (claimed if present is None else present) * 784
        block = bytes(1 << 20)
        while todo:
            fh.write(block[: min(todo, len(block))])
            todo -= min(todo, len(block))
        fh.write(extra)
    return path


def npz_images(path: Path, shape: tuple[int, ...], dtype: str = "u1", compress: bool = True) -> Path:
    """An npz whose arr_0 has `shape` (zeros), compressed, written in pieces like np.savez_compressed would."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf, zf.open("arr_0.npy", "w", force_zip64=True) as fh:
        npy.write_array_header_1_0(fh, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        todo = int(np.prod(shape)) * np.dtype(dtype).itemsize
        block = bytes(1 << 20)
        while todo:
            fh.write(block[: min(todo, len(block))])
            todo -= min(todo, len(block))
    return path


def png_by_hand(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit greyscale PNG of width x height, all black, compressed row by row (no picture in memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------------- predict pictures


def test_a_118_byte_40000x1_png_is_refused_from_its_header(tmp_path: Path) -> None:
    png = tmp_path / "thin.png"
    Image.new("L", (40000, 1)).save(png)
    assert png.stat().st_size < 1024  # the review's 118 bytes, give or take Pillow's version
    refused(lambda: image_to_28(png), "40000x1", "8192", "crop or scale")


def test_a_13000x13000_png_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    png = png_by_hand(tmp_path / "square.png", 13000, 13000)
    assert png.stat().st_size < 1 << 20
    with pytest.warns(Image.DecompressionBombWarning), Image.open(png) as im:
        assert im.size == (13000, 13000)  # a real picture Pillow would decode after a warning: 169 MB of pixels
    refused(lambda: image_to_28(png), "8192 pixels a side", "36 M pixels", "crop or scale")
    # Below Pillow's own limit (89 M pixels), the caps here still hold.
    refused(lambda: image_to_28(png_by_hand(tmp_path / "page.png", 8000, 8000)), "8000x8000", "36 M pixels")


def test_a_long_side_alone_is_refused_and_a_long_scan_is_taken(tmp_path: Path) -> None:
    # 8193 x 1 is few pixels, but padded to a square it would be 67 MB: the side is capped.
    refused(lambda: image_to_28(png_by_hand(tmp_path / "long.png", 8193, 1)), "8193x1")
    assert image_to_28(png_by_hand(tmp_path / "ok.png", 8192, 8)).shape == (28, 28)


def test_pillows_decompression_bomb_warning_is_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png = tmp_path / "bomb.png"
    Image.new("L", (40, 40), 255).save(png)
    # Pillow warns between its limit and twice it, and only raises above: both must refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    refused(lambda: image_to_28(png), "decompression bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    refused(lambda: image_to_28(png), "decompression bomb")


# ------------------------------------------------------------------------------- predict array files


def test_a_194kb_gzip_idx_claiming_255000_images_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = idx_images(tmp_path / "bomb-images-idx3-ubyte.gz", CLAIMED)
    assert bomb.stat().st_size < 400 << 10
    refused(lambda: data_files.read_array_file(bomb, images=True), "255,000 images", "at most 100,000", "--max-images")
    # The header's claim is checked even when the body is not there at all.
    short = idx_images(tmp_path / "short-idx3-ubyte.gz", CLAIMED, present=1)
    refused(lambda: data_files.read_array_file(short, images=True), "255,000 images", "--max-images")


def test_an_npz_whose_arr_0_holds_255000_images_is_refused_from_its_npy_header(tmp_path: Path) -> None:
    bomb = npz_images(tmp_path / "bomb.npz", (CLAIMED, 28, 28))
    assert bomb.stat().st_size < 400 << 10
    refused(lambda: data_files.read_array_file(bomb, images=True), "255,000 images", "--max-images")
    labels = npz_images(tmp_path / "labels.npz", (CLAIMED * 100,), dtype="<i8")
    refused(lambda: data_files.read_array_file(labels, images=False), "25,500,000 labels", "--max-images")


def test_max_images_raises_the_cap_and_exactly_the_announced_bytes_are_read(tmp_path: Path) -> None:
    five = idx_images(tmp_path / "five-idx3-ubyte.gz", 5)
    plain = idx_images(tmp_path / "five-idx3-ubyte", 5, gz=False)
    five_npz = npz_images(tmp_path / "five.npz", (5, 28, 28))
    for path in (five, plain, five_npz):
        refused(
            lambda path=path: data_files.read_array_file(path, images=True, limit=4), "5 images", "at most 4", "--max-images 5"
        )
        assert data_files.read_array_file(path, images=True, limit=5).shape == (5, 28, 28)
    # The body is exactly header + n x 784 bytes: more or fewer is a malformed file.
    for bad, why in (
        (idx_images(tmp_path / "long-idx3-ubyte.gz", 5, extra=b"\0"), "more than 3920 bytes"),
        (idx_images(tmp_path / "cut-idx3-ubyte.gz", 5, present=4), "has 3136 bytes"),
        (idx_images(tmp_path / "long-idx3-ubyte", 5, extra=bytes(1 << 20), gz=False), "more than 3920 bytes"),
    ):
        refused(lambda bad=bad: data_files.read_array_file(bad, images=True), "malformed", why)


def test_an_npz_is_checked_by_its_header_before_its_data(tmp_path: Path) -> None:
    objects = tmp_path / "objects.npz"
    np.savez(objects, np.array([{"a": 1}, None], dtype=object))  # pickled: never loaded
    refused(lambda: data_files.read_array_file(objects, images=False), "Python objects")
    floats = npz_images(tmp_path / "floats.npz", (5, 28, 28), dtype="<f8")
    refused(lambda: data_files.read_array_file(floats, images=True), "float64", "expected uint8")
    wrong = npz_images(tmp_path / "wrong.npz", (5, 32, 32))
    refused(lambda: data_files.read_array_file(wrong, images=True), "expected (N, 28, 28)")
    # A header that claims more data than the member holds.
    short = tmp_path / "short.npz"
    with zipfile.ZipFile(short, "w") as zf, zf.open("arr_0.npy", "w") as fh:
        npy.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (5, 28, 28)})
        fh.write(bytes(784))
    refused(lambda: data_files.read_array_file(short, images=True), "malformed", "ends after 784 of 3920 bytes")


# ---------------------------------------------------------------------------------- data set files


def with_md5sums(folder: Path) -> None:
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.iterdir()) if p.name != "MD5SUMS"]
    (folder / "MD5SUMS").write_text("\n".join(lines) + "\n")


def test_a_data_set_file_that_verifies_but_claims_too_many_images_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(FIXTURE, folder)
    idx_images(folder / "t10k-images-idx3-ubyte.gz", CLAIMED)
    npz_images(folder / "kmnist-test-imgs.npz", (CLAIMED, 28, 28))
    with_md5sums(folder)  # the user's own subset: its md5 matches, its header still may not lie
    for fmt in ("idx", "npz"):
        refused(
            lambda fmt=fmt: data_files.load_split("kmnist", "test", folder, fmt=fmt, download=False),
            "255,000 images",
            "the kmnist test split has 10,000",
        )
    assert len(data_files.load_split("kmnist", "train", folder, fmt="idx", download=False)[0]) > 0  # the rest still loads


# ------------------------------------------------------------------------------------------- specs


def test_study_create_refuses_a_huge_n_ei_candidates(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("bomb", sampler={"name": "tpe", "options": {"n_ei_candidates": 2000000000}}))
    proc = cli_here("study", "create", str(spec), "--storage", url, check=False)
    line = error_line(proc)
    assert proc.returncode == 2 and "sampler.options: n_ei_candidates: 2000000000" in line and "1..10000" in line
    assert not (tmp_path / "o.db").exists() or "bomb" not in optuna.get_all_study_names(url)


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": {"name": "cmaes", "options": {"popsize": 10**9}}},
        {"pruner": {"name": "successive_halving", "options": {"min_early_stopping_rate": 10**6}}},
        {"pruner": {"name": "median", "options": {"n_warmup_steps": 10**12}}},
        {"sampler": {"name": "tpe", "options": {"prior_weight": float("inf")}}},
        {"sampler": {"name": "cmaes", "options": {"x0": {f"p{i}": 0.5 for i in range(1000)}}}},
        {"sampler": {"name": "cmaes", "options": {"restart_strategy": "i" * 10_000}}},
    ],
    ids=["popsize", "early-stopping-rate", "warmup", "infinite", "long-mapping", "long-string"],
)
def test_every_option_value_is_bounded(tmp_path: Path, options: dict[str, Any]) -> None:
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.contract.spec import SpecError

    with pytest.raises(SpecError) as err:
        parse_spec(tiny_spec("opts", **options))
    assert "options" in str(err.value) and "\n" not in str(err.value)


def nested(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = {"a": node}
    return node


def test_a_deeply_nested_spec_file_is_one_line(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text("name: deep\nbudget: {n_trials: 2}\ndescription: " + "[" * 30_000 + "]" * 30_000 + "\n")
    block = tmp_path / "block.yaml"
    block.write_text("name: deep\nbudget: {n_trials: 2}\ndescription:\n" + "".join("  " * i + "- \n" for i in range(1, 60)))
    for cli, path in ((run_cli, flow), (cli_here, block)):
        proc = cli("study", "create", str(path), "--storage", f"sqlite:///{tmp_path / 'o.db'}", check=False)
        assert proc.returncode == 2 and "nested more than 20 levels deep" in error_line(proc)
    # What the depth limit leaves: every real spec is a few levels deep.
    from kmnist_tune.contract.load import parse_spec

    parse_spec(tiny_spec("ok", sampler={"name": "cmaes", "options": {"x0": {"lr": 3e-3}}}))


def test_a_bad_spec_stored_by_anyone_sharing_the_database_is_one_line(tmp_path: Path) -> None:
    url = created_study(tmp_path, "shared")
    study = optuna.load_study(study_name="shared", storage=url)
    good = study.user_attrs[SPEC_ATTR]
    for cli, bad, words in (
        (
            run_cli,
            {**good, "sampler": {"name": "tpe", "options": {"n_ei_candidates": 2000000000}}},
            ["n_ei_candidates", "1..10000"],
        ),
        (cli_here, {**good, "description": nested(500)}, ["nested more than 20 levels deep"]),
    ):
        study.set_user_attr(SPEC_ATTR, json.loads(json.dumps(bad)))
        proc = cli("study", "show", "shared", "--storage", url, check=False)
        line = error_line(proc)
        assert proc.returncode == 2 and "spec stored in study 'shared'" in line, line
        assert all(w in line for w in words), line


# ------------------------------------------------------------------------- predict, end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory as `export` writes it, with untrained weights: predict reads it before its
    inputs, and what it predicts does not matter here."""
    tmp = tmp_path_factory.mktemp("model")
    return crafted_model_dir(tmp / "model", tmp / "pwned", classes=[str(c["char"]) for c in data_files.class_map("kmnist")])


def test_predict_refuses_the_attacks_with_one_line(model_dir: Path, tmp_path: Path) -> None:
    thin = tmp_path / "thin.png"
    Image.new("L", (40000, 1)).save(thin)
    bomb = idx_images(tmp_path / "bomb-idx3-ubyte.gz", CLAIMED)
    five = idx_images(tmp_path / "five-idx3-ubyte.gz", 5)
    for cli, args, words in (  # one real process, the others through the entry point's `main` here
        (run_cli, [str(thin)], ["40000x1", "8192"]),
        (cli_here, [str(bomb)], ["255,000 images", "--max-images 255000"]),
        (cli_here, [str(five), "--max-images", "4"], ["5 images", "at most 4"]),  # the option reaches the reader
    ):
        proc = cli("predict", str(model_dir), *args, check=False)
        line = error_line(proc)
        assert proc.returncode == 2 and all(w in line for w in words), line


def test_a_study_attribute_nested_beyond_any_decoder_is_one_line(shared: Shared, tmp_path: Path) -> None:
    """Written with SQL, so deep that Optuna's own JSON decoding recurses out before the spec is seen."""
    shared.create(tmp_path, "abyss")
    depth = 100_000
    shared.sql(
        "UPDATE study_user_attributes SET value_json = %s WHERE key = %s AND study_id = "
        "(SELECT study_id FROM studies WHERE study_name = 'abyss')",
        ("[" * depth + "]" * depth, SPEC_ATTR),
    )
    # A real process for `study show`, the worker through the entry point's `main` here.
    for cli, args in ((run_cli, ("study", "show", "abyss")), (cli_here, ("worker", "--study", "abyss", "--gpus", "none"))):
        proc = cli(*args, "--storage", shared.worker_url, check=False)
        assert proc.returncode == 2 and "nested too deeply" in error_line(proc)


def test_a_wandb_sweep_file_cannot_ask_for_an_unbounded_bracket_count(tmp_path: Path) -> None:
    sweep = {
        "method": "random",
        "metric": {"name": "valid_accuracy", "goal": "maximize"},
        "run_cap": 2,
        "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2}, "epochs": {"value": 1}},
        "early_terminate": {"type": "hyperband", "max_iter": 27, "s": 10**9, "eta": 3},
    }
    path = write_spec(tmp_path / "sweep.yaml", sweep)
    proc = cli_here("study", "create", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}", check=False)
    assert proc.returncode == 2 and "early_terminate.s" in error_line(proc)


# -- issue 34: one login per user ---------------------------------------------------------------------
# Everyone shared the worker login: one user could change its password or make it read-only for all, and
# end anyone's session. Now each user logs in as a role of their own in the group that holds the rights.


def test_a_user_cannot_change_another_users_password_or_settings(shared: Shared) -> None:
    bob, worker, group = shared.roles["bob"][0], shared.roles["worker"][0], users_group(shared.db)
    with shared.connect("alice") as alice:
        for victim in (bob, worker):  # another person's login, and the deployment's
            refused_sql(alice, f"ALTER ROLE \"{victim}\" PASSWORD 'locked-out-{victim}'")
            refused_sql(alice, f'ALTER ROLE "{victim}" SET default_transaction_read_only = on')
            refused_sql(alice, f'ALTER ROLE "{victim}" IN DATABASE "{shared.db}" SET statement_timeout = 1')
            refused_sql(alice, f'ALTER ROLE "{victim}" NOLOGIN')
            refused_sql(alice, f'GRANT "{victim}" TO "{shared.roles["alice"][0]}"')
        # Nor can she make anyone a member of the group (the dashboard would write), or make roles at all.
        refused_sql(alice, f'GRANT "{group}" TO "{shared.roles["dashboard"][0]}"')
        refused_sql(alice, f'CREATE ROLE "{bob}_x" LOGIN')
        # PostgreSQL 15 lets a member SET ROLE to the group: as the group she changes the group's own
        # settings, which no login uses (settings apply at login, to the login role), and cannot let it log in.
        alice.execute(f'SET ROLE "{group}"')
        alice.execute(f'ALTER ROLE "{group}" SET default_transaction_read_only = on')
        refused_sql(alice, f'ALTER ROLE "{group}" LOGIN')
        refused_sql(alice, f"ALTER ROLE \"{bob}\" PASSWORD 'x'")
    try:
        with shared.connect("bob") as b, shared.connect("worker") as w:
            for conn in (b, w):  # both still log in, write, and are not read-only
                assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
                conn.execute("INSERT INTO studies (study_name) VALUES (%s)", (f"by-{uuid.uuid4().hex[:6]}",))
    finally:
        assert shared.init().returncode == 0  # (the group's setting: a re-run of initdb resets it, next test)


def test_a_user_cannot_end_another_users_sessions(shared: Shared) -> None:
    with shared.connect("bob") as bob, shared.connect("worker") as worker, shared.connect("alice") as alice:
        for victim in (bob, worker):
            pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            for fn in ("pg_terminate_backend", "pg_cancel_backend"):
                refused_sql(alice, f"SELECT {fn}({pid})")
            assert victim.execute("SELECT 1").fetchone() == (1,)
        # Her own she may end: it is her own session to lose.
        own = alice.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        with shared.connect("alice") as alice2:
            assert alice2.execute("SELECT pg_terminate_backend(%s)", (own,)).fetchone() == (True,)


def test_initdb_undoes_every_setting_users_put_on_the_roles(shared: Shared) -> None:
    """A user may set their own role read-only (and whoever holds the deployment's password, that one's);
    re-running initdb (storage/README.md) puts every role it made, and every user, back."""
    worker, alice, group = shared.roles["worker"][0], shared.roles["alice"][0], users_group(shared.db)
    try:
        for who, role in (("worker", worker), ("alice", alice)):
            with shared.connect(who) as conn:
                conn.execute(f'ALTER ROLE "{role}" IN DATABASE "{shared.db}" SET statement_timeout = 1')
                conn.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
            with shared.connect(who) as conn:
                refused_sql(conn, "INSERT INTO studies (study_name) VALUES ('x')", psycopg.errors.ReadOnlySqlTransaction)
        with shared.connect("bob") as bob:
            bob.execute(f'SET ROLE "{group}"')
            bob.execute(f'ALTER ROLE "{group}" SET work_mem = 64')
    finally:
        again = shared.init()
    assert again.returncode == 0, again.stderr
    with shared.connect("owner") as conn:
        left = conn.execute(
            "SELECT r.rolname FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole WHERE r.rolname = ANY(%s)",
            ([worker, alice, group],),
        ).fetchall()
    assert left == []
    for who in ("worker", "alice"):
        with shared.connect(who) as conn:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
            conn.execute("INSERT INTO studies (study_name) VALUES (%s)", (f"after-{uuid.uuid4().hex[:6]}",))
    with shared.connect("dashboard") as conn:  # the dashboard's own guard is set again, not reset away
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)


def test_the_group_lets_every_user_work_every_study(shared: Shared, tmp_path: Path) -> None:
    """alice creates a study with her login; bob's worker works it with his (claims, heartbeats,
    checkpoints, the result); the dashboard's role reads it."""
    name = "alices"  # alice created it in the fixture, with `study create` and her own login
    ran = run_cli("worker", "--study", name, "--storage", shared.url("bob"), "--gpus", "none", cwd=tmp_path)
    assert "worker ran 1 trial(s)" in ran.stdout, ran.stderr[-2000:]
    (trial,) = optuna.load_study(study_name=name, storage=shared.url("dashboard")).trials
    assert trial.state == TrialState.COMPLETE
    with shared.connect("alice") as alice:  # and alice may stop or delete what bob's worker wrote
        assert alice.execute(
            "SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = %s", (name,)
        ).fetchone() == (1,)
    cli_here("study", "delete", name, "--yes", "--storage", shared.url("alice"))


def test_db_add_user_is_the_owners_and_takes_the_password_from_the_environment_only(shared: Shared) -> None:
    owner = shared.url("owner")
    password = "pw-" + secrets.token_hex(12)
    name = f"kt_carol_{uuid.uuid4().hex[:8]}"
    try:
        added = cli_here(
            "db",
            "add-user",
            name,
            "--storage",
            owner,
            "--address",
            "db-host:6432",
            env=cli_env(KMNIST_TUNE_NEW_PASSWORD=password),
        )
        assert (
            added.stdout.splitlines()[-1]
            == f"give them: postgresql+psycopg://{name}:***@db-host:6432/{shared.db} (and the password, apart)"
        )
        assert password not in added.stdout + added.stderr
        with shared.connect("owner") as conn:
            row = conn.execute(
                "SELECT rolcanlogin, rolsuper, rolcreaterole, pg_has_role(oid, %s, 'MEMBER'), rolpassword "
                "FROM pg_authid WHERE rolname = %s",
                (users_group(shared.db), name),
            ).fetchone()
        assert row is not None and row[:4] == (True, False, False, True) and row[4].startswith("SCRAM-SHA-256$")
        # One line each: a user (not the owner) adding one, no password (no terminal), a role that is no user.
        cases = {
            f"role {shared.roles['alice'][0]} may not create roles": (
                shared.url("alice"),
                name,
                {"KMNIST_TUNE_NEW_PASSWORD": password},
            ),
            "no password for": (owner, name, {}),
            "is not a user of this database": (owner, shared.roles["dashboard"][0], {"KMNIST_TUNE_NEW_PASSWORD": password}),
            "shorter than 12 characters": (owner, name, {"KMNIST_TUNE_NEW_PASSWORD": "short"}),
        }
        for why, (url, who, env) in cases.items():
            line = error_line(cli_here("db", "add-user", who, "--storage", url, env=cli_env(**env), check=False))
            assert why in line and password not in line, line
        # No way to give it on the command line.
        assert "--password" not in cli_here("db", "add-user", "--help").stdout
    finally:
        with shared.connect("owner") as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


# -- issue 34: PgBouncer hands a server connection from one client to the next -------------------------


def test_session_state_one_client_leaves_never_reaches_the_next_client_of_pgbouncer() -> None:
    """On the suite's PgBouncer (transaction pooling, storage/pgbouncer/pool.ini): client A leaves a
    session-level SET, a session advisory lock and a prepared statement on its server connection; client B,
    given that same server connection next, sees none of them (pool.ini's server_reset_query_always)."""
    from conftest import PGBOUNCER

    admin = pg_admin()
    db = f"kt_leak_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{db}"')  # a pool of its own, with nobody else's clients in it
    try:
        url = make_url(PGBOUNCER)
        dsn = {
            "host": url.host,
            "port": url.port,
            "user": url.username,
            "dbname": db,
            "autocommit": True,
            "prepare_threshold": None,
        }
        with psycopg.connect(**dsn) as a, psycopg.connect(**dsn) as b:  # type: ignore[arg-type]
            (pid,) = a.execute("SELECT pg_backend_pid()").fetchone()  # type: ignore[misc]
            a.execute("SET statement_timeout = '4242ms'")
            a.execute("SELECT set_config('kmnist.left', 'by-a', false)")
            a.execute("SELECT pg_advisory_lock(4242)")
            a.execute("PREPARE left_by_a AS SELECT 1")
            assert b.execute("SELECT pg_backend_pid()").fetchone() == (pid,), "B did not get A's server connection"
            state = b.execute(
                "SELECT current_setting('statement_timeout'), current_setting('kmnist.left', true),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242),"
                " (SELECT count(*) FROM pg_prepared_statements)"
            ).fetchone()
            fix = "the PgBouncer at 6432 runs an older pool.ini: `sudo scripts/pgbouncer-local` reloads it"
            assert state in (("0", "", 0, 0), ("0", None, 0, 0)), f"{state}: {fix}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


# -- issue 34: secrets from files (compose's and Kubernetes' secrets) -----------------------------------


def test_secret_files_become_the_secrets_and_leave_the_environment(tmp_path: Path) -> None:
    from kmnist_tune.secret_files import load_secret_files

    (tmp_path / "key").write_text(KEY + "\n")
    (tmp_path / "pw").write_text("p@ss word:/#\n")  # characters a URL must escape
    (tmp_path / "wandb").write_text("")
    env = {
        "KMNIST_TUNE_SIGNING_KEY_FILE": str(tmp_path / "key"),
        "WANDB_API_KEY_FILE": str(tmp_path / "wandb"),
        "KMNIST_TUNE_STORAGE": "postgresql+psycopg://kmnist_worker@pgbouncer:6432/kmnist",
        "KMNIST_TUNE_STORAGE_PASSWORD_FILE": str(tmp_path / "pw"),
    }
    load_secret_files(env)
    # an empty W&B key file: not set (offline runs); no *_FILE left for the slot processes to read again
    assert set(env) == {"KMNIST_TUNE_SIGNING_KEY", "KMNIST_TUNE_STORAGE"} and env["KMNIST_TUNE_SIGNING_KEY"] == KEY
    stored = make_url(env["KMNIST_TUNE_STORAGE"])
    assert (stored.username, stored.host, stored.port, stored.database) == ("kmnist_worker", "pgbouncer", 6432, "kmnist")
    assert make_url(env["KMNIST_TUNE_STORAGE"]).password == "p@ss word:/#"
    # One line each, the secret in none.
    (tmp_path / "two").write_text("a\nb\n")
    (tmp_path / "empty").write_text("")
    cases = {
        "both KMNIST_TUNE_SIGNING_KEY and KMNIST_TUNE_SIGNING_KEY_FILE are set": {
            "KMNIST_TUNE_SIGNING_KEY": KEY,
            "KMNIST_TUNE_SIGNING_KEY_FILE": str(tmp_path / "key"),
        },
        "cannot read it": {"KMNIST_TUNE_SIGNING_KEY_FILE": str(tmp_path / "none")},
        "is empty": {"KMNIST_TUNE_SIGNING_KEY_FILE": str(tmp_path / "empty")},
        "is not a file": {"KMNIST_TUNE_SIGNING_KEY_FILE": str(tmp_path)},
        "holds more than one line": {"KMNIST_TUNE_SIGNING_KEY_FILE": str(tmp_path / "two")},
        "KMNIST_TUNE_STORAGE is not": {"KMNIST_TUNE_STORAGE_PASSWORD_FILE": str(tmp_path / "pw")},
        "holds a password": {
            "KMNIST_TUNE_STORAGE": "postgresql://u:x@h/d",
            "KMNIST_TUNE_STORAGE_PASSWORD_FILE": str(tmp_path / "pw"),
        },
        "must name one": {"KMNIST_TUNE_STORAGE": "sqlite:///x.db", "KMNIST_TUNE_STORAGE_PASSWORD_FILE": str(tmp_path / "pw")},
    }
    for why, env in cases.items():
        line = error_line(cli_here("study", "list", env=cli_env(**env), check=False))
        assert why in line and "p@ss" not in line and KEY not in line, line


def test_a_signing_key_from_a_file_signs_and_refuses_as_the_variable_does(shared: Shared, tmp_path: Path) -> None:
    """compose's workers get KMNIST_TUNE_SIGNING_KEY_FILE: with it, an unsigned kept model is refused."""
    # (made with Optuna's API: `study create` reads every study's attributes, and a test above leaves one
    # that no decoder reads)
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.contract.spec import spec_to_dict

    name = f"unsigned-file-{uuid.uuid4().hex[:6]}"
    study = optuna.create_study(study_name=name, storage=shared.storage(), direction="maximize")
    study.set_user_attr(SPEC_ATTR, spec_to_dict(parse_spec(tiny_spec(name))))
    good = {"weights.safetensors": b"w", "classes.csv": b"c", "model.json": b"{}"}
    ids = {name: str(uuid.uuid4()) for name in good}
    for name, data in good.items():
        shared.plant(ids[name], data)
    study.set_user_attr(MODEL_ATTR, {"trial": 0, "at": "now", "artifacts": ids, "sha256": {n: sha(d) for n, d in good.items()}})
    (tmp_path / "key").write_text(KEY + "\n")
    env = cli_env(KMNIST_TUNE_SIGNING_KEY_FILE=str(tmp_path / "key"))
    args = ("export", "--study", study.study_name, str(tmp_path / "u"), "--storage", shared.worker_url)
    assert "unsigned or not signed" in error_line(cli_here(*args, env=env, check=False))
