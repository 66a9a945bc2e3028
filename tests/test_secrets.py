"""Secrets stay in the process: a storage password given on the command line or in the environment
reaches no file, no record, no third-party library's files and no printed line; masking is linear."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import cli_env, cli_here, error_line, run_cli, tiny_spec, write_spec

from kmnist_tune.masking import mask

PASSWORD = "Hunter2-s3cr3t"  # trust authentication here: PostgreSQL ignores it, so the URL still works
# Typed into a shell within quotes, a password may hold spaces (masked up to the URL's last @).
SPACED = "Hunter2 s3cr3t"


def everything_written(root: Path, password: str = PASSWORD) -> list[Path]:
    """Files under root that hold the password (as typed, or %-encoded as a URL renders it)."""
    forms = {password.encode(), quote(password).encode(), password.replace(" ", "+").encode()}
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and any(form in path.read_bytes() for form in forms):
            hits.append(path)
    return hits


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["command line", "environment"])
def test_a_storage_password_reaches_no_file_record_or_line(how: str, tmp_path: Path, pg_url: str) -> None:
    password = SPACED if how == "command line" else PASSWORD
    url = pg_url.replace("://postgres@", f"://postgres:{password}@")
    home = tmp_path / "home"
    home.mkdir()
    # W&B offline, with its own files, caches and settings under tmp_path (HOME, TMPDIR) to be searched.
    # The worker's own W&B folder (a stored spec may not choose one outside it).
    env = cli_env(HOME=str(home), TMPDIR=str(tmp_path / "tmp"), WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"))
    (tmp_path / "tmp").mkdir()
    spec = tiny_spec("secret", budget={"n_trials": 1})
    spec["parameters"]["lr"] = {"distribution": "lr_finder", "width": 1, "iterations": 10}  # the fewest: it stores a prior
    spec["tracking"] = {"wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}}
    spec_path = write_spec(tmp_path / "s.yaml", spec)
    storage = ["--storage", url] if how == "command line" else []
    if how == "environment":
        env["KMNIST_TUNE_STORAGE"] = url
    printed = []
    # The worker (the LR finder, the trial, W&B's run, whose record holds the process arguments) is a
    # process of its own; the other commands run in this process, with the same env and lines.
    printed.append(cli_here("study", "create", str(spec_path), *storage, cwd=tmp_path, env=env).stdout)
    proc = run_cli("worker", "--study", "secret", *storage, cwd=tmp_path, env=env)
    printed.append(proc.stdout + proc.stderr)
    for args in (
        ["study", "show", "secret", *storage],
        ["study", "list", *storage],
        ["best", "--study", "secret", "--json", *storage],
        ["report", "--study", "secret", "--out", str(tmp_path / "report"), *storage],
        ["lr-find", "--study", "secret", "--stored", "--out", str(tmp_path / "lr.png"), *storage],
    ):
        proc = cli_here(*args, cwd=tmp_path, env=env)
        printed.append(proc.stdout + proc.stderr)
    assert "secret" in printed[2] and (tmp_path / "report").is_dir() and (tmp_path / "lr.png").is_file()  # they ran
    assert not any(form in "".join(printed) for form in (password, password.split()[-1], quote(password)))
    assert "***" in printed[0]  # the URL was shown, masked
    runs = list((tmp_path / "wb").rglob("*.wandb"))
    assert runs, "W&B wrote no offline run"
    assert everything_written(tmp_path, password) == []
    # Nor anything stored in the database: spec, attributes, notes, the artifact table.
    dump = subprocess.run(
        ["pg_dump", "--data-only", pg_url.replace("postgresql+psycopg", "postgresql")], capture_output=True, timeout=120
    )
    assert dump.returncode == 0 and b"secret" in dump.stdout  # the study is there...
    assert password.encode() not in dump.stdout and quote(password).encode() not in dump.stdout  # ...without the password


def test_the_attach_hint_keeps_the_password_out_of_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    out = cli_here("study", "create", str(write_spec(tmp_path / "s.yaml", tiny_spec("hint"))), "--storage", url).stdout
    assert f"kmnist-tune worker --study hint --storage '{url}'" in out  # nothing secret: shown as it is


def test_grpc_urls_with_credentials_are_refused_without_showing_them() -> None:
    line = error_line(run_cli("study", "list", "--storage", f"grpc://admin:{PASSWORD}@127.0.0.1:13000", check=False))
    assert "takes no credentials" in line and PASSWORD not in line
    line = error_line(cli_here("study", "list", "--storage", f"grpc://admin:{PASSWORD}@host", check=False))  # in process
    assert PASSWORD not in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),  # an unescaped @ in the password
        ("a postgresql://u:pw@h/d and mysql://v:pw2@h2 end", "a postgresql://u:***@h/d and mysql://v:***@h2 end"),
        ("url='postgresql+psycopg://u:pw@h:5432/d'", "url='postgresql+psycopg://u:***@h:5432/d'"),
        ("grpc://u:pw@host:13000", "grpc://u:***@host:13000"),
        ("no secret here: http://host/path?x=1", "no secret here: http://host/path?x=1"),
        ("dsn host=h password=pw user=u", "dsn host=h password=*** user=u"),
        # A password with spaces or quotes (typed within quotes), and libpq's quoted values.
        ("storage 'postgresql://u:pa ss@h/db' is down", "storage 'postgresql://u:***@h/db' is down"),
        ('postgresql://u:it\'s "x" y@h:5432/d', "postgresql://u:***@h:5432/d"),
        ("dsn host=h password='pa ss' user=u", "dsn host=h password=*** user=u"),
        ("dsn password = 'it''s' user=u", "dsn password = *** user=u"),
        ('dsn password="a \\" b" user=u', "dsn password=*** user=u"),
        # What only looks like a spaced password is masked too: never shown, at worst over-masked.
        ("grpc://host:13000 ask root@example.org", "grpc://host:***@example.org"),
        ("on http://127.0.0.1:8080/dashboard, by root@host", "on http://127.0.0.1:8080/dashboard, by root@host"),
    ],
)
def test_mask_cases(text: str, expected: str) -> None:
    assert mask(text) == expected


@pytest.mark.parametrize("shape", ["letters", "scheme-like", "colons", "ats"])
def test_masking_takes_linear_time(shape: str) -> None:
    """A long value is masked in time proportional to its length (the old regex took 14 s at 100 KB)."""
    unit = {"letters": "a", "scheme-like": "a+b.c-", "colons": "x://u:", "ats": "x://u:p@"}[shape]

    def seconds(n: int) -> float:
        text = unit * (n // len(unit))
        t0 = time.perf_counter()
        mask(text)
        return time.perf_counter() - t0

    small, big = seconds(20_000), seconds(200_000)
    assert big < 1.0, f"{shape}: 200 KB took {big:.2f} s"
    assert big < 30 * max(small, 1e-4), f"{shape}: 10x the input took {big / max(small, 1e-9):.0f}x the time"
