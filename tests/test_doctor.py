"""`kmnist-tune doctor` run as a user runs it (a real process) against a SQLite file and the machine's
PostgreSQL, with the fixture's KMNIST files: the table's rows, --json, a password that never shows, and
the broken cases (a storage nobody answers on, a corrupt data file, no C++ compiler for the compile).
Three runs in all, made once for the module; one of them compiles for real (seconds on a CPU)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fastai
import pytest
from conftest import FIXTURE, cli_env, copy_database, run_cli, sqlite_copy
from helpers import free_port

ROWS = ["python", "torch", "fastai", "cuda", "mps", "compiler", "compile", "storage", "data kmnist", "wandb", "signing", "disk"]
PASSWORD = "Doctor-s3cret-pw"
# name (one space at most: `data kmnist`), status, detail: columns two or more spaces apart
ROW = re.compile(r"^(?P<name>\S+(?: \S+)?) {2,}(?P<status>ok|warn|FAIL|skip) {2,}(?P<detail>\S.*)$")


def rows(stdout: str) -> dict[str, tuple[str, str]]:
    """name -> (status, detail) of the table; the last line is the verdict."""
    out = {}
    for line in stdout.splitlines()[:-1]:
        m = ROW.match(line)
        assert m, f"not a row: {line!r}"
        out[m["name"]] = (m["status"], m["detail"])
    return out


def with_password(url: str) -> str:
    """The same database through a login with a password (the suite's server trusts 127.0.0.1: any
    password is accepted, so it travels the whole way as a real one would)."""
    return url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{PASSWORD}@")


@pytest.fixture(scope="module")
def runs(pg_schema_template: str, sqlite_schema_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("doctor")
    sqlite = sqlite_copy(sqlite_schema_file, tmp / "study.db")
    corrupt = tmp / "data"
    shutil.copytree(FIXTURE, corrupt)
    imgs = corrupt / "kmnist-train-imgs.npz"
    raw = bytearray(imgs.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    imgs.write_bytes(bytes(raw))
    closed = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{free_port()}/nowhere"

    def doctor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_cli("doctor", *args, env=cli_env(**env), check=False, timeout=600)

    with copy_database(pg_schema_template) as pg, ThreadPoolExecutor(2) as pool:
        # Two at a time (two cores): each run spends much of its time importing torch and waiting for its compile.
        started = {
            "sqlite": pool.submit(doctor, "--storage", sqlite),  # the one real compile
            # PostgreSQL through a password, as JSON, with no C++ compiler for the compile
            "pg_json": pool.submit(doctor, "--storage", with_password(pg), "--json", CXX="/nonexistent"),
            "broken": pool.submit(doctor, "--storage", closed, "--no-compile", KMNIST_TUNE_DATA=str(corrupt)),
        }
        done = {k: f.result() for k, f in started.items()}
    yield done


def test_sqlite_host_passes_with_every_row_and_a_real_compile(runs: dict) -> None:
    proc = runs["sqlite"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    table = rows(proc.stdout)
    assert [n for n in table if not n.startswith("gpu ")] == ROWS  # and a row per GPU where there are some
    assert proc.stdout.splitlines()[-1].startswith("a worker would work here")
    assert table["storage"][0] == "ok" and "Optuna schema" in table["storage"][1] and "(current)" in table["storage"][1]
    assert table["compile"][0] == "ok" and "works on cpu" in table["compile"][1], table["compile"]
    assert table["compiler"][0] == "ok" and "g++" in table["compiler"][1]
    assert table["fastai"] == ("ok", f"{fastai.__version__}: the fast loop's overrides fit it")
    assert table["data kmnist"][0] == "ok" and "MD5SUMS" in table["data kmnist"][1]
    assert table["cuda"][0] in ("ok", "warn")  # no GPU here is a warning, not a failure
    assert table["wandb"] == ("ok", table["wandb"][1]) and "mode disabled" in table["wandb"][1]
    assert table["signing"][0] == "ok" and "not set" in table["signing"][1]


def test_json_on_postgresql_parses_and_never_shows_the_password(runs: dict) -> None:
    proc = runs["pg_json"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"ok", "verdict", "checks"} and report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert [n for n in checks if not n.startswith("gpu ")] == ROWS
    assert all({"name", "status", "detail"} <= set(c) and c["status"] in ("ok", "warn", "FAIL", "skip") for c in checks.values())
    storage = checks["storage"]
    assert storage["status"] == "ok" and storage["data"]["url"].startswith("postgresql+psycopg://postgres:***@")
    assert storage["data"]["studies"] == 0
    # a shared database without a signing key: said, as a warning
    assert checks["signing"]["status"] == "warn"
    if "gpu 0" in checks:  # on a GPU machine
        assert {"name", "memory_gib", "busy_gib", "capability", "bf16"} <= set(checks["gpu 0"]["data"])
    for key in ("pg_json", "broken"):
        both = runs[key].stdout + runs[key].stderr
        assert PASSWORD not in both and "***@" in both, key


def test_compile_without_a_cxx_compiler_is_a_warning_with_its_reason(runs: dict) -> None:
    proc = runs["pg_json"]
    assert proc.returncode == 0, proc.stdout + proc.stderr  # workers fall back to training uncompiled
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    compiled = checks["compile"]
    assert compiled["status"] == "warn" and compiled["data"]["ok"] is False and compiled["data"]["eager"] is True
    detail = compiled["detail"]
    assert detail.startswith("fails on cpu:") and "InvalidCxxCompiler" in detail and "\n" not in detail, detail
    assert "workers train uncompiled" in detail
    assert checks["compiler"]["status"] == "warn" and "CXX=/nonexistent not found" in checks["compiler"]["detail"]


def test_broken_host_fails_with_the_failing_rows_first(runs: dict) -> None:
    proc = runs["broken"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    first, second = lines[0], lines[1]
    assert first.startswith("storage") and "FAIL" in first and "cannot reach storage" in first, first
    assert second.startswith("data kmnist") and "FAIL" in second, second
    assert "kmnist-train-imgs.npz" in second and "corrupt" in second and "md5" in second
    assert not any(" FAIL " in ln for ln in lines[2:-1])
    assert lines[-1].startswith("a worker would not work here") and "storage, data kmnist" in lines[-1]
