"""Every bad input ends in one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
from conftest import FIXTURE, cli_env, created_study, error_line, run_cli, tiny_spec, write_spec


def make_study(tmp_path: Path) -> str:
    return created_study(tmp_path, "exists")


def test_unknown_study_names_the_ones_that_exist(tmp_path: Path) -> None:
    url = make_study(tmp_path)
    for args in (["worker", "--study", "nope"], ["best", "--study", "nope"], ["study", "show", "nope"]):
        line = error_line(run_cli(*args, "--storage", url, check=False))
        assert "no study named 'nope'" in line and "exists" in line


def test_unreachable_storage_is_one_line_without_the_password(tmp_path: Path) -> None:
    proc = run_cli("study", "list", "--storage", "postgresql+psycopg://kt:hunter2@127.0.0.1:1/db", check=False)
    line = error_line(proc)
    assert "cannot reach storage" in line and "127.0.0.1:1" in line
    assert "hunter2" not in proc.stderr + proc.stdout


def test_malformed_and_unsupported_storage_urls(tmp_path: Path) -> None:
    assert "malformed storage URL" in error_line(run_cli("study", "list", "--storage", "not a url", check=False))
    assert "unsupported storage" in error_line(run_cli("study", "list", "--storage", "mysql://u@h/db", check=False))


def test_missing_storage_file_is_not_created(tmp_path: Path) -> None:
    # Listing a storage that does not exist yet is an empty list, not an error; nothing is created.
    listed = run_cli("study", "list", cwd=tmp_path)
    assert listed.stdout.startswith("no studies in sqlite:///kmnist-tune.db"), listed.stdout
    assert run_cli("study", "list", "--json", cwd=tmp_path).stdout.strip() == "[]"
    line = error_line(run_cli("best", "--study", "x", cwd=tmp_path, check=False))
    assert "no studies in" in line and "create one" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_data_and_no_network(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("nodata"))
    empty = tmp_path / "empty"
    proc = run_cli(
        "run", str(spec), "--storage", f"sqlite:///{tmp_path / 'x.db'}", check=False, env=cli_env(KMNIST_TUNE_DATA=str(empty))
    )
    line = error_line(proc)
    assert "cannot download" in line and "127.0.0.1:9" in line
    # Data is loaded before the study is created: a failed start stores nothing.
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'x.db'}") == []


def test_corrupt_data_file_is_never_loaded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    blob = bytearray((data / "kmnist-train-imgs.npz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (data / "kmnist-train-imgs.npz").write_bytes(bytes(blob))
    (data / "train-images-idx3-ubyte.gz").unlink()  # no good second format to fall back on
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("corrupt"))
    proc = run_cli(
        "run", str(spec), "--storage", f"sqlite:///{tmp_path / 'x.db'}", check=False, env=cli_env(KMNIST_TUNE_DATA=str(data))
    )
    line = error_line(proc)
    assert "kmnist-train-imgs.npz" in line and "corrupt" in line
    verify = run_cli("data", "verify", "--data-dir", str(data), check=False)
    assert verify.returncode != 0 and "corrupt" in verify.stdout


def test_bad_spec_path_and_bad_spec(tmp_path: Path) -> None:
    line = error_line(run_cli("run", str(tmp_path / "nope.yaml"), check=False))
    assert "nope.yaml does not exist" in line
    bad = tiny_spec("typo")
    bad["parameters"]["lr"] = {"distribution": "log_uniform_values", "mni": 1e-3, "max": 1e-2}
    line = error_line(run_cli("run", str(write_spec(tmp_path / "b.yaml", bad)), cwd=tmp_path, check=False))
    assert "parameters.lr" in line and "'mni'" in line and "min" in line
    assert not (tmp_path / "kmnist-tune.db").exists()  # a bad spec writes nothing


def test_cli_usage_errors_and_guards(tmp_path: Path) -> None:
    url = make_study(tmp_path)
    assert "--study" in error_line(run_cli("worker", "--storage", url, check=False))
    assert "no CUDA GPU" in error_line(run_cli("worker", "--study", "exists", "--storage", url, "--gpus", "all", check=False))
    missing = run_cli("worker", "--study", "exists", "--storage", url, "--gpus", "3", check=False)
    assert "GPU 3 does not exist" in error_line(missing)
    assert "not a GPU index" in error_line(run_cli("run", "x.yaml", "--gpus", "a,0", check=False))
    assert "--yes" in error_line(run_cli("study", "delete", "exists", "--storage", url, check=False))
    assert "exists" in run_cli("study", "list", "--storage", url).stdout
    run_cli("study", "delete", "exists", "--storage", url, "--yes")
    assert "no studies" in run_cli("study", "list", "--storage", url).stdout


def test_every_command_has_help() -> None:
    for cmd in (
        ["run"],
        ["worker"],
        ["best"],
        ["study"],
        ["study", "create"],
        ["study", "list"],
        ["study", "show"],
        ["study", "delete"],
        ["data"],
        ["data", "fetch"],
        ["data", "verify"],
        ["data", "info"],
    ):
        out = run_cli(*cmd, "--help").stdout
        assert "Usage" in out, cmd


def test_data_info_and_verify_on_fixture() -> None:
    out = run_cli("data", "verify", "--data-dir", str(FIXTURE)).stdout
    assert out.count("ok") == 8
    info = run_cli("data", "info", "--data-dir", str(FIXTURE)).stdout
    assert "kmnist: 10 classes" in info


def test_help_as_a_user_expects_it() -> None:
    bare = run_cli()
    assert bare.stdout.startswith("Usage: kmnist-tune") and bare.stderr == ""  # help, and no empty error line
    assert run_cli("study").stdout.startswith("Usage: kmnist-tune study")
    short = run_cli("best", "-h").stdout
    assert short == run_cli("best", "--help").stdout
    # Boolean flags are shown as flags, not as options taking a value.
    assert "--evaluate " in short and "--json " in short and "<bool>" not in short
    assert "--study NAME" in short and "--storage URL" in short
    script = run_cli("--show-completion", "bash", env=cli_env(SHELL="/bin/bash")).stdout
    assert "_KMNIST_TUNE_COMPLETE" in script and "complete " in script
    # What that script asks the program when the user presses Tab after `kmnist-tune study s`:
    words = cli_env(COMP_WORDS="kmnist-tune study s", COMP_CWORD="2", _KMNIST_TUNE_COMPLETE="complete_bash")
    assert run_cli(env=words).stdout.split() == ["show", "stop"]


def test_a_study_is_named_the_same_way_in_every_command(tmp_path: Path) -> None:
    url = make_study(tmp_path)
    by_option = run_cli("study", "show", "--study", "exists", "--storage", url, "--json").stdout
    by_name = run_cli("study", "show", "exists", "--storage", url, "--json").stdout
    assert json.loads(by_option)["study"] == json.loads(by_name)["study"] == "exists"
    for cmd in (["best"], ["worker"], ["report"], ["lr-find"], ["study", "show"], ["study", "delete"]):
        line = error_line(run_cli(*cmd, "one", "--study", "other", "--storage", url, check=False))
        assert "two study names" in line, cmd
    listed = json.loads(run_cli("study", "list", "--storage", url, "--json").stdout)
    assert listed == [{"study": "exists", "finished": 0, "total": 0, "best": None}]
    info = json.loads(run_cli("data", "info", "--data-dir", str(FIXTURE), "--json").stdout)
    assert info["n_classes"] == 10 and {f["state"] for f in info["files"]} == {"ok"} and len(info["files"]) == 8
