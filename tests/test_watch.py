"""Watching a study: optuna-dashboard on loopback (its API and a real headless browser), one W&B
offline run per trial, and the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import REPO, WHOLE_FIXTURE, browse, cli_env, deprecation_free, render, run_cli, spawn_cli, tiny_spec, write_spec
from helpers import free_port, wait_until
from shared_trained import FINDER_STEPS
from wandb_records import read_run


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two real studies in one SQLite file: `prior` (LR finder, evidence on the study) and `halve`
    (a grid over an absurd and a sane learning rate, so one trial halves to the floor)."""
    tmp = tmp_path_factory.mktemp("watch")
    url = f"sqlite:///{tmp / 'w.db'}"
    env = cli_env(KMNIST_TUNE_ARTIFACTS=str(tmp / "artifacts"))
    env.pop("WANDB_MODE")  # each spec says its own mode
    prior = tiny_spec("prior", budget={"n_trials": 1})
    prior["parameters"]["lr"] = {"distribution": "lr_finder", "width": 1, "iterations": FINDER_STEPS}
    prior["tracking"] = {"wandb": {"mode": "disabled"}}
    # The two `run`s side by side in one new SQLite file, as two users' runs can be: one makes the
    # tables, the other waits for them; each takes its share of the cores (the registry in XDG_RUNTIME_DIR).
    env["XDG_RUNTIME_DIR"] = str(tmp / "run")
    first = spawn_cli("run", str(write_spec(tmp / "prior.yaml", prior)), "--storage", url, env=env)
    # All of the fixture's images: the sane trial runs past the halving rule's warm-up and trend check.
    halve = tiny_spec("halve", budget={"n_trials": 2}, sampler={"name": "grid"}, data=WHOLE_FIXTURE)
    halve["parameters"].update({"lr": {"values": [50.0, 5e-3]}, "epochs": {"value": 2}, "batch_size": {"initial": 64, "min": 32}})
    halve["tracking"] = {"wandb": {"mode": "offline", "project": "kt-test", "dir": str(tmp / "wb")}}
    second = spawn_cli("run", str(write_spec(tmp / "halve.yaml", halve)), "--storage", url, env=env)
    for proc in (first, second):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"run exited {proc.returncode}\n{out}\n{err}"
        deprecation_free(err)
    return {"tmp": tmp, "url": url, "env": env}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _answers(url: str) -> bool:
    try:
        _get(url)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def dashboard(watched: dict[str, Any]):
    port = free_port()
    proc = spawn_cli("dashboard", "--storage", watched["url"], "--port", str(port), env=watched["env"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/api/studies"), 60, "the dashboard to answer on loopback", procs=[proc], every=0.3)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"the dashboard did not answer: {proc.communicate()[1][-2000:]}") from None
    yield base
    proc.terminate()
    proc.wait(10)


def _study_id(base: str, name: str) -> int:
    studies = json.loads(_get(f"{base}/api/studies"))["study_summaries"]
    return next(s["study_id"] for s in studies if s["study_name"] == name)


def test_dashboard_binds_loopback_and_serves_the_studies(dashboard: str) -> None:
    names = {s["study_name"] for s in json.loads(_get(f"{dashboard}/api/studies"))["study_summaries"]}
    assert names == {"prior", "halve"}


def test_dashboard_shows_the_lr_finder_evidence_and_trial_notes(dashboard: str, watched: dict[str, Any]) -> None:
    sid = _study_id(dashboard, "prior")
    detail = json.loads(_get(f"{dashboard}/api/studies/{sid}"))
    assert "LR finder (kmnist/resnet18/imagenet/bs32)" in detail["note"]["body"]
    (art,) = [a for a in detail["artifacts"] if a["filename"] == "lr-find.png"]
    png = _get(f"{dashboard}/artifacts/{sid}/{art['artifact_id']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    hid = _study_id(dashboard, "halve")
    trials = json.loads(_get(f"{dashboard}/api/studies/{hid}"))["trials"]
    notes = {t["number"]: t["note"]["body"] for t in trials}
    stored = optuna.load_study(study_name="halve", storage=watched["url"]).trials
    absurd = next(t.number for t in stored if t.params["lr"] == 50.0)
    assert "64 → stop (minimum reached)" in notes[absurd] or "64 → 32" in notes[absurd]
    sane = 1 - absurd
    assert "halvings: none" in notes[sane] and "seconds per epoch" in notes[sane] and "images/s" in notes[sane]


def test_a_real_browser_renders_the_study_page(dashboard: str, watched: dict[str, Any]) -> None:
    sid = _study_id(dashboard, "prior")
    page = f"{dashboard}/dashboard/studies/{sid}"
    shot = REPO / "tests" / "artifacts-out" / "dashboard-study.png"
    shot.parent.mkdir(exist_ok=True)
    dom = browse(page, shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert f"prior (id={sid})" in dom  # the app rendered the study, not just its loading page
    assert "History" in dom


def test_the_dashboards_pages_render_under_its_content_security_policy(dashboard: str) -> None:
    """Every page optuna-dashboard's UI has (the list, a study's History, Analytics, Trials and Note) runs
    under the policy the dashboard sends, and the browser's console reports no violation of it."""
    sid = _study_id(dashboard, "prior")
    with urllib.request.urlopen(f"{dashboard}/dashboard/studies/{sid}", timeout=10) as r:
        policy = r.headers.get_all("Content-Security-Policy")
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
    assert len(policy) == 1 and "frame-ancestors 'none'" in policy[0], policy
    scripts = next(d for d in policy[0].split(";") if d.split()[0] == "script-src")
    assert "'unsafe-inline'" not in scripts and "data:" not in scripts and "*" not in scripts, scripts
    pages = {"/dashboard": "halve", f"/dashboard/studies/{sid}": "Study Artifacts"}
    pages |= {f"/dashboard/studies/{sid}/{tab}": f"prior (id={sid})" for tab in ("analytics", "trials", "note")}
    for path, shown in pages.items():
        dom, console = render(dashboard + path)
        assert shown in dom, f"{path} did not render"
        violations = [line for line in console if "Content Security Policy" in line or "Content-Security-Policy" in line]
        assert not violations, f"{path}: {violations}"


def test_one_offline_wandb_run_per_trial_with_epochs_and_halving(watched: dict[str, Any]) -> None:
    files = sorted((watched["tmp"] / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {r["name"]: r for r in map(read_run, files)}
    assert set(runs) == {"halve-trial-0", "halve-trial-1"}
    study = optuna.load_study(study_name="halve", storage=watched["url"])
    for t in study.trials:
        run = runs[f"halve-trial-{t.number}"]
        assert run["group"] == "halve"
        assert run["config"]["lr"] == t.params["lr"]
        assert run["summary"]["state"] == t.state.name
        if t.params["lr"] == 50.0:
            events = run["summary"]["halving_events"]
            assert [(e["from_bs"], e["to_bs"]) for e in events] == [(64, 32), (32, None)]
            assert t.state == optuna.trial.TrialState.PRUNED
        else:
            epochs = [h for h in run["history"] if "valid_accuracy" in h]
            assert [h["epoch"] for h in epochs] == [1, 2]  # counted from 1, as the CLI counts them
            assert all({"train_loss", "valid_loss", "scheduled_lr", "images_per_s"} <= h.keys() for h in epochs)
            assert epochs[-1]["valid_accuracy"] == pytest.approx(t.value)
            assert run["summary"]["halving_events"] == []


def test_report_writes_pngs_and_an_html_page_linking_them(watched: dict[str, Any], tmp_path: Path) -> None:
    for name in ("prior", "halve"):
        out = tmp_path / name
        run_cli("report", "--study", name, "--out", str(out), "--storage", watched["url"], env=watched["env"])
        page = (out / "index.html").read_text()
        pngs = sorted(out.glob("*.png"))
        assert {p.name for p in pngs} == {"history.png", "importances.png", "lr-finder.png", "top-trials.png", "halving.png"}
        for p in pngs:
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
            assert f'src="{p.name}"' in page and f'href="{p.name}"' in page
        assert f"Study {name}" in page
        # Read as text, not Python reprs: `budget 1 trials`, `parameters lr=0.005, ...`.
        assert "{" not in page.split("<body>")[1] and "&#x27;" not in page and "&#39;" not in page, page
        assert re.search(r"budget \d+ trials", page), page
    # The LR finder's curve (an artifact of the study) is drawn: a real plot, not the placeholder.
    assert (tmp_path / "prior" / "lr-finder.png").stat().st_size > 2 * (tmp_path / "halve" / "lr-finder.png").stat().st_size


READ_ONLY = {
    "study list": ["study", "list"],
    "study show": ["study", "show", "prior"],
    "best": ["best", "--study", "prior", "--json"],
    "report": ["report", "--study", "prior", "--out", "{tmp}/report"],
    "lr-find --stored": ["lr-find", "--study", "prior", "--stored", "--out", "{tmp}/lr.png"],
}
HEAVY = {"torch", "torchvision", "fastai"}


def loaded_after(body: str, env: dict[str, str]) -> set[str]:
    """Runs `body` (which calls the CLI's main) in a fresh interpreter; the top-level packages it loaded."""
    code = f"import json, sys\nfrom kmnist_tune.cli import main\n{body}\n"
    code += "print('MODULES ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})), flush=True)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.rsplit("MODULES ", 1)[1]))


@pytest.mark.parametrize("name", sorted(READ_ONLY))
def test_read_only_commands_never_load_torch_or_fastai(name: str, watched: dict[str, Any], tmp_path: Path) -> None:
    """Each command runs in full against the real study, then its interpreter's modules are looked at."""
    argv = [a.format(tmp=tmp_path) for a in READ_ONLY[name]] + ["--storage", watched["url"]]
    loaded = loaded_after(f"assert main({argv!r}) == 0", watched["env"])
    assert "optuna" in loaded
    assert not loaded & HEAVY, f"{name} loaded {sorted(loaded & HEAVY)}"


def test_the_dashboard_never_loads_torch_or_fastai(watched: dict[str, Any]) -> None:
    port = free_port()
    argv = ["dashboard", "--storage", watched["url"], "--port", str(port)]
    body = f"""import threading, time, urllib.request
threading.Thread(target=main, args=({argv!r},), daemon=True).start()
for _ in range(600):
    try:
        urllib.request.urlopen("http://127.0.0.1:{port}/api/studies", timeout=5).read()
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the dashboard did not answer")"""
    loaded = loaded_after(body, watched["env"])
    assert "optuna_dashboard" in loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_json_summaries_agree_with_the_study(watched: dict[str, Any]) -> None:
    study = optuna.load_study(study_name="halve", storage=watched["url"])
    shown = json.loads(run_cli("study", "show", "halve", "--json", "--storage", watched["url"], env=watched["env"]).stdout)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    assert {k: v for k, v in shown["states"].items() if v} == states and shown["best"]["trial"] == study.best_trial.number
    assert shown["spec"]["name"] == "halve" and shown["workers"][0]["finished"] == len(study.trials)
    best = json.loads(run_cli("best", "--study", "halve", "--json", "--storage", watched["url"], env=watched["env"]).stdout)
    assert best["best"]["trial"] == study.best_trial.number and best["best"]["value"] == study.best_value
    assert best["best"]["config"]["lr"] == study.best_trial.params["lr"] and best["best"]["config"]["batch_size"] == 64
    assert best["best"] == shown["best"]  # one name for one thing
    listed = json.loads(run_cli("study", "list", "--json", "--storage", watched["url"], env=watched["env"]).stdout)
    assert {s["study"]: (s["finished"], s["budget"]["n_trials"]) for s in listed} == {"prior": (1, 1), "halve": (2, 2)}


def test_the_dashboard_note_says_when_and_by_whom_a_study_was_stopped(dashboard: str, watched: dict[str, Any]) -> None:
    run_cli("study", "stop", "prior", "--storage", watched["url"], env=watched["env"])
    try:
        note = json.loads(_get(f"{dashboard}/api/studies/{_study_id(dashboard, 'prior')}"))["note"]["body"]
        assert re.search(r"\*\*stopped at \d{4}-\d\d-\d\dT[\d:]+\+00:00 by [^@\s]+@\S+\*\*", note), note
        assert "LR finder (kmnist/resnet18/imagenet/bs32)" in note  # the prior's evidence stays
    finally:
        run_cli("study", "resume", "prior", "--storage", watched["url"], env=watched["env"])
    note = json.loads(_get(f"{dashboard}/api/studies/{_study_id(dashboard, 'prior')}"))["note"]["body"]
    assert "stopped" not in note and "running: workers may claim trials" in note
