"""Every bad input ends in one clear line and a non-zero exit, never a traceback.

Most tests run at least one refusal as a real process (the entry point's contract, with whatever the
libraries print), a light command where one will do; the others go through the entry point's own
`main` in this process (`cli_here`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import optuna
import torch
from conftest import FIXTURE, REPO, cli_env, cli_here, command_paths, error_line, run_cli, tiny_spec, write_spec


def make_study(tmp_path: Path, url: str) -> str:
    """A study made by `kmnist-tune study create` (in this process) in a SQLite file that already holds
    the tables (conftest's sqlite_schema_url); its storage URL."""
    cli_here("study", "create", str(write_spec(tmp_path / "exists.yaml", tiny_spec("exists"))), "--storage", url)
    return url


def test_unknown_study_names_the_ones_that_exist(tmp_path: Path, sqlite_schema_url: str) -> None:
    url = make_study(tmp_path, sqlite_schema_url)
    for cli, args in (
        (cli_here, ["worker", "--study", "nope"]),
        (cli_here, ["best", "--study", "nope"]),
        (run_cli, ["study", "show", "nope"]),
    ):
        line = error_line(cli(*args, "--storage", url, check=False))
        assert "no study named 'nope'" in line and "exists" in line


def test_unreachable_storage_is_one_line_without_the_password(tmp_path: Path) -> None:
    proc = run_cli("study", "list", "--storage", "postgresql+psycopg://kt:hunter2@127.0.0.1:1/db", check=False)
    line = error_line(proc)
    assert "cannot reach storage" in line and "127.0.0.1:1" in line
    assert "hunter2" not in proc.stderr + proc.stdout


def test_malformed_and_unsupported_storage_urls(tmp_path: Path) -> None:
    assert "malformed storage URL" in error_line(run_cli("study", "list", "--storage", "not a url", check=False))
    assert "unsupported storage" in error_line(cli_here("study", "list", "--storage", "mysql://u@h/db", check=False))


def test_missing_storage_file_is_not_created(tmp_path: Path) -> None:
    # Listing a storage that does not exist yet is an empty list, not an error; nothing is created.
    listed = run_cli("study", "list", cwd=tmp_path)
    assert listed.stdout.startswith("no studies in sqlite:///kmnist-tune.db"), listed.stdout
    assert cli_here("study", "list", "--json", cwd=tmp_path).stdout.strip() == "[]"
    line = error_line(cli_here("best", "--study", "x", cwd=tmp_path, check=False))
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
    verify = cli_here("data", "verify", "--data-dir", str(data), check=False)
    assert verify.returncode != 0 and "corrupt" in verify.stdout


def test_bad_spec_path_and_bad_spec(tmp_path: Path) -> None:
    line = error_line(cli_here("run", str(tmp_path / "nope.yaml"), check=False))
    assert "nope.yaml does not exist" in line
    bad = tiny_spec("typo")
    bad["parameters"]["lr"] = {"distribution": "log_uniform_values", "mni": 1e-3, "max": 1e-2}
    line = error_line(cli_here("run", str(write_spec(tmp_path / "b.yaml", bad)), cwd=tmp_path, check=False))
    assert "parameters.lr" in line and "'mni'" in line and "min" in line
    assert not (tmp_path / "kmnist-tune.db").exists()  # a bad spec writes nothing


SUMMARY_KEYS = (
    "study",
    "storage",
    "metric",
    "direction",
    "states",
    "budget",
    "best",
    "test_evaluation",
    "ensemble_evaluation",
    "stopped",
    "workers",
    "retried",
)


def test_cli_usage_errors_and_guards(tmp_path: Path, sqlite_schema_url: str) -> None:
    url = make_study(tmp_path, sqlite_schema_url)
    assert "--study" in error_line(cli_here("worker", "--storage", url, check=False))
    assert "no CUDA GPU" in error_line(cli_here("worker", "--study", "exists", "--storage", url, "--gpus", "all", check=False))
    missing = error_line(cli_here("worker", "--study", "exists", "--storage", url, "--gpus", "3", check=False))
    assert "GPU 3 does not exist" in missing
    if not torch.cuda.is_available():  # issue 24: not `--gpus all`, an error of its own on this machine
        assert missing.endswith("(this machine has no GPU); use --gpus none") and "--gpus all" not in missing
    assert "not a GPU index" in error_line(cli_here("run", "x.yaml", "--gpus", "a,0", check=False))
    assert "--yes" in error_line(run_cli("study", "delete", "exists", "--storage", url, check=False))
    assert "exists" in cli_here("study", "list", "--storage", url).stdout
    cli_here("study", "delete", "exists", "--storage", url, "--yes")
    assert "no studies" in cli_here("study", "list", "--storage", url).stdout


def test_top_without_warm_start_is_refused(tmp_path: Path, sqlite_schema_url: str) -> None:
    """Issue 24: `--top K` means nothing without `--warm-start`; it was silently accepted."""
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("topless"))
    done = cli_here("study", "create", str(spec), "--storage", sqlite_schema_url, "--top", "3", check=False)
    assert done.returncode != 0
    assert error_line(done) == "error: --top 3 only applies with --warm-start STUDY; add --warm-start or leave --top out"
    assert "topless" not in cli_here("study", "list", "--storage", sqlite_schema_url).stdout  # nothing stored


def test_every_command_has_help() -> None:
    """Every command and group of the CLI, walked in this process; one real process as the smoke test."""
    paths = command_paths()
    named = {" ".join(p) for p in paths}
    assert {"run", "worker", "best", "study", "study create", "study list", "study show", "study delete"} <= named
    assert {"data", "data fetch", "data verify", "data info"} <= named
    for path in paths:
        for flag in ("--help", "-h"):
            proc = cli_here(*path, flag)
            assert proc.returncode == 0 and proc.stderr == "", (path, proc.stderr)
            assert proc.stdout.startswith(" ".join(["Usage: kmnist-tune", *path])), (path, proc.stdout[:200])
    # The real entry point prints the same help (wrapped to its own width): the same options.
    real = run_cli("best", "--help")
    assert real.stdout.startswith("Usage: kmnist-tune best") and real.stderr == ""
    options = re.compile(r"^\s+(-[-\w]+(?:, -[-\w]+)?)", re.M)
    assert options.findall(real.stdout) == options.findall(cli_here("best", "--help").stdout) != []


def test_data_info_and_verify_on_fixture() -> None:
    out = cli_here("data", "verify", "--data-dir", str(FIXTURE)).stdout
    assert out.count("ok") == 8
    info = cli_here("data", "info", "--data-dir", str(FIXTURE)).stdout
    assert "kmnist: 10 classes" in info


def test_help_as_a_user_expects_it() -> None:
    bare = run_cli()  # a real process: help, and no empty error line
    assert bare.stdout.startswith("Usage: kmnist-tune") and bare.stderr == ""
    assert cli_here("study").stdout.startswith("Usage: kmnist-tune study")
    short = cli_here("best", "-h").stdout
    assert short == cli_here("best", "--help").stdout
    # Boolean flags are shown as flags, not as options taking a value.
    assert "--evaluate " in short and "--json " in short and "<bool>" not in short
    assert "--study NAME" in short and "--storage URL" in short
    script = cli_here("--show-completion", "bash", env=cli_env(SHELL="/bin/bash")).stdout
    assert "_KMNIST_TUNE_COMPLETE" in script and "complete " in script
    # What that script asks the program when the user presses Tab after `kmnist-tune study s`:
    words = cli_env(COMP_WORDS="kmnist-tune study s", COMP_CWORD="2", _KMNIST_TUNE_COMPLETE="complete_bash")
    assert cli_here(env=words).stdout.split() == ["show", "stop"]


def test_a_study_is_named_the_same_way_in_every_command(tmp_path: Path, sqlite_schema_url: str) -> None:
    url = make_study(tmp_path, sqlite_schema_url)
    by_option = cli_here("study", "show", "--study", "exists", "--storage", url, "--json").stdout
    by_name = cli_here("study", "show", "exists", "--storage", url, "--json").stdout
    assert json.loads(by_option)["study"] == json.loads(by_name)["study"] == "exists"
    for cmd in (["best"], ["worker"], ["report"], ["lr-find"], ["study", "show"], ["study", "delete"]):
        cli = run_cli if cmd == ["best"] else cli_here
        line = error_line(cli(*cmd, "one", "--study", "other", "--storage", url, check=False))
        assert "two study names" in line, cmd
    # The JSON shapes the README documents: fixed keys, zeros and nulls included, one name for one thing.
    listed = json.loads(cli_here("study", "list", "--storage", url, "--json").stdout)
    no_trials = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    budget = listed[0]["budget"]
    assert {k: budget[k] for k in ("n_trials", "timeout", "until_stopped")} == {
        "n_trials": 2,
        "timeout": None,
        "until_stopped": False,
    }
    assert set(budget) == {"n_trials", "timeout", "until_stopped", "at", "by"} and "@" in budget["by"]  # who set it, when
    assert listed == [{"study": "exists", "finished": 0, "budget": budget, "states": no_trials, "best": None, "problem": None}]
    shown = json.loads(cli_here("study", "show", "exists", "--storage", url, "--json").stdout)
    assert set(shown) == {*SUMMARY_KEYS, "spec"} and shown["states"] == no_trials and shown["budget"] == budget
    assert (shown["best"], shown["test_evaluation"], shown["ensemble_evaluation"], shown["stopped"]) == (None,) * 4
    assert shown["workers"] == [] and shown["retried"] == []
    best_text, best_json = cli_here("best", "exists", "--storage", url), cli_here("best", "exists", "--storage", url, "--json")
    assert best_text.returncode == best_json.returncode == 0 and "no completed trial yet" in best_text.stdout
    assert json.loads(best_json.stdout) == {
        k: shown[k] for k in ("study", "storage", "metric", "direction", "best", "test_evaluation", "ensemble_evaluation")
    }
    info = json.loads(cli_here("data", "info", "--data-dir", str(FIXTURE), "--json").stdout)
    assert info["n_classes"] == 10 and {f["state"] for f in info["files"]} == {"ok"} and len(info["files"]) == 8


def readme_invocations() -> list[tuple[str, list[str]]]:
    """Every place the README names a command with options: inline code and code-block lines that
    start with a command (after `kmnist-tune ` where it is written), as (the text, its words)."""
    import re

    text = (REPO / "README.md").read_text()
    found: list[tuple[str, list[str]]] = []
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        spans += [line.split(" #")[0] for line in block.splitlines() if "kmnist-tune " in line]
    for span in spans:
        words = span.split("kmnist-tune ", 1)[-1].replace("\\|", "|").split()
        found.append((span, words))
    return found


def test_every_option_the_readme_names_exists() -> None:
    """The README matches the CLI: each command it names has each option it names with it."""
    import typer

    from kmnist_tune.cli import app

    root = typer.main.get_command(app)
    checked = 0
    wrong = []
    for span, words in readme_invocations():
        cmd = root
        used = 0
        for word in words:
            if word in getattr(cmd, "commands", {}):  # a group (typer's own click, not always `click`)
                cmd, used = cmd.commands[word], used + 1
            else:
                break
        if not used:
            continue  # not a command line (a key, a value, an option on its own)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
        for word in words[used:]:
            option = word.strip("[](),.;").split("=")[0]
            if option.startswith("--") and len(option) > 2:
                checked += 1
                if option not in known:
                    wrong.append(f"{span!r}: {' '.join(words[:used])} has no {option}")
    assert not wrong, wrong
    assert checked > 60, checked  # the CLI reference table alone names more
