"""The image built and its containers run, as docker-compose.yml runs them.

scripts/build-image builds the images here, where no registry is reachable: a Debian base from
debootstrap, torch and the project's packages from this machine's wheels; Docker's layer cache keeps
them between runs. Each container's `docker run` is made from docker-compose.yml as a real Compose
implementation resolves it (`docker-compose config` with a .env of this test's values): its image,
command, environment, init, read-only root, tmpfs, user, capabilities, ulimits and volumes. What a
host network changes is the only difference: dockerd runs here with --bridge=none, so containers use
--network host, the service names (postgres, pgbouncer) become 127.0.0.1 and a free port, and nothing
is published. What cannot run here is validated, not run (test_deploy.py): the GPU reservation (the
worker trains on the CPU: KMNIST_TUNE_GPUS=none) and the official postgres image (this machine's
PostgreSQL stands in, its roles made by storage/initdb as on that image's first start).

Besides what compose runs: a trial compiled with torch.compile in the worker image (its compiler), a write
the dashboard's read-only login may not make (a 403), and, last, no container's log holding an ERROR line
or a traceback (every cache and control folder in the tmpfs /tmp). `run_in_image` runs any other command
in the worker image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import FIXTURE, REPO, browse, pg_admin, tiny_spec
from helpers import free_port, wait_until
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from pg_cluster import PG_HOST, PG_PORT, PG_SUPERUSER, Cluster, pg_url, run_init_scripts
from secret_dir import SecretDir

from kmnist_tune.contract.records import TrialRecord
from kmnist_tune.service.storage import open_storage, release

pytestmark = pytest.mark.postgres
STUDY = "boxed"


def docker(
    *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        said = f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        raise AssertionError(f"docker {' '.join(args[:3])} ...: exit {out.returncode}\n{said}")
    return out


@pytest.fixture(scope="session")
def images() -> str:
    """scripts/build-image's images (the project's, tagged as compose names it, and PgBouncer's): built
    once per machine, then from Docker's cache. Fails, never skips, without a Docker engine."""
    t0 = time.monotonic()
    out = subprocess.run([str(REPO / "scripts" / "build-image")], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, f"scripts/build-image failed:\n{out.stderr[-3000:]}"
    print(f"\nscripts/build-image: {time.monotonic() - t0:.1f} s\n{out.stderr}{out.stdout}")
    return "kmnist-tune:latest"


@dataclass
class Deployment:
    """docker-compose.yml resolved with this test's .env, and what its containers need here."""

    env_file: Path
    project: str
    services: dict[str, Any]
    secret_files: dict[str, str]  # secret -> its file here, as compose resolved $KMNIST_TUNE_SECRETS
    secrets: SecretDir
    values: dict[str, str]
    sweeps: Path  # the folder mounted where compose mounts ./sweeps
    ports: dict[str, int]  # service -> the port it listens on here (pgbouncer, dashboard)
    containers: list[str] = field(default_factory=list)
    said: dict[str, str] = field(default_factory=dict)  # container -> its log, for those run with --rm (gone after)

    @property
    def owner_url(self) -> str:
        return pg_url(PG_SUPERUSER, self.secrets.values["postgres_password"], self.values["POSTGRES_DB"])

    @cached_property
    def storage(self) -> BaseStorage:
        """One storage for the test's reads, opened as the product opens one: a storage per poll kept a
        pooled connection each until the garbage collector came, and PostgreSQL ran out of connections
        (100) beside the other tests."""
        return open_storage(self.owner_url)

    def host(self, value: str) -> str:
        """A service's own name and port, as compose's network resolves them, as they are here."""
        value = value.replace("@postgres:5432/", f"@{PG_HOST}:{PG_PORT}/")
        return value.replace("@pgbouncer:6432/", f"@127.0.0.1:{self.ports['pgbouncer']}/")

    def run_argv(
        self, service: str, *, detach: bool = False, command: list[str] | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """`docker run` of one service as compose would start it (`command` in place of its own, as
        `docker compose run SERVICE ARGS...` gives it), and the environment its values come from
        (`--env NAME` takes the value from the client's environment: no password in any argv)."""
        svc = self.services[service]
        name = f"{self.project}-{service}-{uuid.uuid4().hex[:4]}"
        self.containers.append(name)
        argv = ["run", "--name", name, "--network", "host", "--detach" if detach else "--rm"]
        argv += ["--init"] if svc.get("init") else []
        argv += ["--read-only"] if svc.get("read_only") else []
        for mount in svc.get("tmpfs", []):
            argv += ["--tmpfs", mount]
        argv += ["--user", str(svc["user"])] if "user" in svc else []
        for cap in svc.get("cap_drop", []):
            argv += ["--cap-drop", cap]
        for opt in svc.get("security_opt", []):
            argv += ["--security-opt", opt]
        for limit, value in svc.get("ulimits", {}).items():
            argv += ["--ulimit", f"{limit}={value}" if isinstance(value, int) else f"{limit}={value['soft']}:{value['hard']}"]
        argv += ["--shm-size", str(svc["shm_size"])] if "shm_size" in svc else []
        argv += ["--stop-signal", svc["stop_signal"]] if "stop_signal" in svc else []
        for volume in svc.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source == str(REPO / "sweeps"):
                source = str(self.sweeps)  # this test's spec, where compose mounts the repository's sweeps/
            elif not source.startswith("/"):
                source = f"{self.project}_{source}"  # a named volume, named as compose names it
            argv += ["--volume", ":".join([source, target, *mode])]
        for secret in svc.get("secrets", []):  # compose's file secrets: bind mounts at /run/secrets/NAME, read-only
            name = secret if isinstance(secret, str) else secret["source"]
            argv += ["--volume", f"{self.secret_files[name]}:/run/secrets/{name}:ro"]
        env = {k: self.host(str(v)) for k, v in (svc.get("environment") or {}).items()}
        if os.environ.get("PYTEST_XDIST_WORKER") and service != "pgbouncer":
            # A container counts trainers in a registry of its own (its /tmp): in a parallel run it would
            # take both cores beside the two pytest processes' trainers, OpenMP teams spinning on each other.
            env["KMNIST_TUNE_THREADS"] = "1"  # and a compile in one process (training/compiling.py)
        if service == "pgbouncer":
            env |= {"KMNIST_TUNE_DB_HOST": PG_HOST, "KMNIST_TUNE_DB_PORT": str(PG_PORT)}
            env |= {"PGBOUNCER_LISTEN_ADDR": "127.0.0.1", "PGBOUNCER_LISTEN_PORT": str(self.ports["pgbouncer"])}
        for key in env:
            argv += ["--env", key]
        argv += [svc["image"], *(svc.get("command") or [] if command is None else command)]
        return argv, {**os.environ, **env}

    def run(
        self, service: str, command: list[str] | None = None, *, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """One container of `service` run to its end (`docker compose run --rm SERVICE [COMMAND]`), its log
        kept for the check that no container logged an error."""
        argv, env = self.run_argv(service, command=command)
        out = docker(*argv, env=env, timeout=timeout, check=check)
        self.said[argv[argv.index("--name") + 1]] = out.stdout + out.stderr
        return out

    def logs(self) -> dict[str, str]:
        """What every container this test ran said: those still there from `docker logs`."""
        return {name: self.said.get(name) or _logs(name) for name in self.containers}


def _logs(name: str) -> str:
    out = docker("logs", name, check=False)
    return out.stdout + out.stderr


def run_in_image(d: Deployment, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`kmnist-tune ARGS` in the worker image, as compose's worker service runs it (its login, secrets,
    volumes, read-only root): the hook for commands that check the image itself (`kmnist-tune doctor`)."""
    return d.run("worker", list(args), timeout=timeout, check=check)


@pytest.fixture(scope="module")
def deployment(images: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    cluster = Cluster(pg_admin())
    project = f"kt{uuid.uuid4().hex[:8]}"
    # Folders a container's user (10001) reads: not under pytest's tmp_path, which only root may enter.
    shared = Path(tempfile.mkdtemp(prefix="kt-container-"))
    shared.chmod(0o755)
    sweeps = shared / "sweeps"
    sweeps.mkdir(mode=0o755)
    spec = tiny_spec(STUDY, budget={"n_trials": 2})
    spec["parameters"]["epochs"] = {"value": 4}  # a trial lasts long enough to be stopped in its middle
    spec["workers"] = {"heartbeat_interval": 1, "grace_period": 3, "max_retry": 3}
    # One checkpoint a trial, after its second epoch of four: the stopped trial hands back a signed one, and
    # its retry runs the last two only (each checkpoint goes through PgBouncer into PostgreSQL: few of them).
    spec["checkpoints"] = {"min_interval_s": 0, "every": 2}
    (sweeps / "boxed.yaml").write_text(yaml.safe_dump(spec))
    (sweeps / "boxed.yaml").chmod(0o644)
    # The secret files compose mounts (a signing key among them: the study is signed end to end).
    secret_dir = SecretDir()
    values = {
        "KMNIST_TUNE_SECRETS": str(secret_dir.path),
        "POSTGRES_USER": PG_SUPERUSER,  # this server's superuser is the owner, as POSTGRES_USER is in the image
        "POSTGRES_DB": cluster.database(),
        "KMNIST_TUNE_WORKER_USER": cluster.role_name(),
        "KMNIST_TUNE_DASHBOARD_USER": cluster.role_name(),
        "KMNIST_TUNE_PGBOUNCER_USER": cluster.role_name(),
        "KMNIST_TUNE_SPEC": "boxed.yaml",
        "KMNIST_TUNE_STUDY": STUDY,
        "KMNIST_TUNE_GPUS": "none",  # no GPU here: the worker trains on the CPU
        "KMNIST_TUNE_IMAGE": images,
        "KMNIST_TUNE_MIRROR": "http://127.0.0.1:9/nowhere",  # the data volume holds the fixture: nothing is downloaded
        "KMNIST_TUNE_DASHBOARD_WORKERS": "2",
    }
    ports = {"pgbouncer": free_port(), "dashboard": free_port()}
    values["KMNIST_TUNE_DASHBOARD_PORT"] = str(ports["dashboard"])
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env_file.chmod(0o600)
    d = None
    try:
        config = subprocess.run(
            ["docker-compose", "--env-file", str(env_file), "-f", str(REPO / "docker-compose.yml"), "-p", project, "config"],
            capture_output=True,
            text=True,
            check=True,
        )
        resolved = yaml.safe_load(config.stdout)
        files = {name: spec["file"] for name, spec in resolved["secrets"].items()}
        assert {Path(f).parent for f in files.values()} == {secret_dir.path}
        d = Deployment(env_file, project, resolved["services"], files, secret_dir, values, sweeps, ports)
        # The postgres image's first start, with its service's environment and secret files.
        pg_env = {
            k: str(v).replace("/run/secrets/", f"{secret_dir.path}/")
            for k, v in resolved["services"]["postgres"]["environment"].items()
        }
        inits = run_init_scripts(REPO / "storage" / "initdb", pg_env)
        assert all(p.returncode == 0 for p in inits), [p.stderr for p in inits]
        # The data volume, holding the fixture's images as a volume that downloaded them would.
        docker("volume", "create", f"{project}_data")
        docker("volume", "create", f"{project}_artifacts")
        volumes = ["-v", f"{project}_data:/data", "-v", f"{FIXTURE}:/fixture:ro"]
        docker("run", "--rm", "--network", "none", "--entrypoint", "cp", *volumes, images, "-r", "/fixture/.", "/data/")
        argv, env = d.run_argv("pgbouncer", detach=True)
        docker(*argv, env=env)
        wait_until(lambda: port_open(ports["pgbouncer"]), 30, "PgBouncer's container to listen")
        # compose's one-shots: `schema` as the owner, straight to PostgreSQL; `create` as the worker role.
        schema = d.run("schema", timeout=180)
        assert schema.stdout.rstrip().endswith(": ready"), schema.stdout + schema.stderr
        created = d.run("create", timeout=180)
        assert STUDY in created.stdout, created.stdout + created.stderr
        yield d
    finally:
        if d is not None:
            for name in d.containers:
                docker("rm", "-f", name, check=False)
            if "storage" in d.__dict__:
                release(d.storage)
        docker("volume", "rm", "-f", f"{project}_data", f"{project}_artifacts", check=False)
        cluster.drop()
        secret_dir.remove()
        subprocess.run(["rm", "-rf", str(shared)], check=False)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def trials(d: Deployment) -> list[optuna.trial.FrozenTrial]:
    return sorted(optuna.load_study(study_name=STUDY, storage=d.storage).trials, key=lambda t: t.number)


def test_a_worker_container_works_the_study_through_pgbouncer_and_hands_back_its_trial_on_sigterm(
    deployment: Deployment,
) -> None:
    d = deployment
    # The worker, detached, as `docker compose up -d worker` runs it; stopped in its first trial's middle.
    argv, env = d.run_argv("worker", detach=True)
    worker = docker(*argv, env=env).stdout.strip()
    wait_until(
        lambda: any(t.state == TrialState.RUNNING and TrialRecord.of(t).checkpoint for t in trials(d)),
        300,
        "the worker container's checkpoint",
    )
    grace = int(re.fullmatch(r"(\d+)m", d.services["worker"]["stop_grace_period"]).group(1)) * 60  # type: ignore[union-attr]
    docker("stop", "--time", str(grace), worker, timeout=grace + 30)  # SIGTERM, as `docker compose stop` sends it
    assert docker("inspect", "--format", "{{.State.ExitCode}}", worker).stdout.strip() == "0"
    logs = docker("logs", worker).stderr
    (stopped,) = [t for t in trials(d) if t.state == TrialState.FAIL]
    assert TrialRecord.of(stopped).interrupted == "SIGTERM", logs[-2000:]
    (queued,) = [t for t in trials(d) if t.state == TrialState.WAITING]
    assert queued.params == stopped.params
    # Another worker container finishes the study: the trial handed back, then the rest of the budget.
    again = d.run("worker", timeout=600)
    assert "worker ran 2 trial(s)" in again.stdout, again.stdout + again.stderr[-2000:]
    after = trials(d)
    finished = [t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and {t.state for t in after} <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    (retry,) = [t for t in finished if t.user_attrs.get("retry_of") == stopped.number]
    # Signed end to end: the first container signed its checkpoint with the key from its secret file, and
    # the second, with the same file, checked that signature and resumed from it.
    checkpoint = TrialRecord.of(stopped).checkpoint
    assert checkpoint is not None and any(v for k, v in checkpoint.items() if k.startswith("signature")), checkpoint
    assert TrialRecord.of(retry).resumed_from is not None, retry.user_attrs
    # ... logged in through PgBouncer's container, as the worker role.
    bouncer = next(c for c in d.containers if "-pgbouncer-" in c)
    role, db = d.values["KMNIST_TUNE_WORKER_USER"], d.values["POSTGRES_DB"]
    assert f"login attempt: db={db} user={role}" in docker("logs", bouncer).stderr
    # No container shows a password or key: `docker inspect` of each (its environment, its arguments) holds
    # none of the secrets, only where their files are.
    seen = 0
    for name in d.containers:  # the detached ones are still there (PgBouncer, the first worker)
        inspected = docker("inspect", name, check=False).stdout
        seen += "/run/secrets/" in inspected
        for secret, value in d.secrets.values.items():
            assert not value or value not in inspected, f"{name}: docker inspect shows {secret}"
    assert seen >= 2
    # The image's user, not root; compose's worker runs it read-only with a tmpfs /tmp (exec: compiled kernels).
    assert docker("image", "inspect", "--format", "{{.Config.User}}", d.services["worker"]["image"]).stdout.strip() == "kmnist"
    assert d.services["worker"]["read_only"] is True and d.services["worker"]["tmpfs"] == ["/tmp:exec"]


def test_the_dashboard_container_serves_the_study_with_gunicorn(deployment: Deployment, tmp_path: Path) -> None:
    d = deployment
    port = d.ports["dashboard"]
    argv, env = d.run_argv("dashboard", detach=True)
    # compose publishes the container's 8080 on 127.0.0.1: on the host's network it listens there itself.
    i = argv.index("--host")
    argv[i + 1] = "127.0.0.1"
    argv[argv.index("--port", i) + 1] = str(port)
    name = docker(*argv, env=env).stdout.strip()
    base = f"http://127.0.0.1:{port}"

    def listed() -> list[str]:
        with urllib.request.urlopen(f"{base}/api/studies", timeout=10) as r:
            return [s["study_name"] for s in yaml.safe_load(r.read())["study_summaries"]]

    def answers() -> bool:
        try:
            return STUDY in listed()
        except OSError:
            return False

    wait_until(answers, 90, "the dashboard container to list the study")
    said = docker("logs", name).stderr
    assert f"(gunicorn, {d.values['KMNIST_TUNE_DASHBOARD_WORKERS']} worker(s);" in said, said
    # gunicorn's master and its workers (beside docker-init, compose's init: true).
    top = docker("top", name, "-o", "pid,args").stdout
    served = re.findall(r"python \S+kmnist-tune dashboard", top)
    assert len(served) == 1 + int(d.values["KMNIST_TUNE_DASHBOARD_WORKERS"]), top
    # As the image's user, on a read-only root with a writable tmpfs /tmp (compose's read_only, tmpfs).
    assert docker("exec", name, "id", "-u").stdout.strip() == "10001"
    wrote = docker("exec", name, "touch", "/app/x", check=False)
    assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote
    assert docker("exec", name, "touch", "/tmp/x", check=False).returncode == 0
    sid = optuna.load_study(study_name=STUDY, storage=d.storage)._study_id
    # A change its read-only login may not make: a 403 with the reason its UI shows, one line in its log.
    note = json.dumps({"version": 1, "body": "mine"}).encode()
    put = urllib.request.Request(
        f"{base}/api/studies/{sid}/note", data=note, method="PUT", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(put, timeout=30)
    assert refused.value.code == 403 and "may only read" in json.loads(refused.value.read())["reason"]
    wait_until(lambda: f"PUT /api/studies/{sid}/note refused by the database" in _logs(name), 10, "the refusal's log line")
    # The page, rendered in headless Chromium from the host.
    dom = browse(f"{base}/dashboard/studies/{sid}", tmp_path / "dashboard.png")
    assert STUDY in dom and "History" in dom
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000


def test_a_worker_container_compiles_its_trial_on_the_cpu(deployment: Deployment) -> None:
    """torch.compile in the image: inductor's C++ kernels need g++ and Python.h, which the Dockerfile adds
    to whatever base it is built on. Without them every trial of `compile: true` failed in the container
    (InductorError: InvalidCxxCompiler). Kept cheap: 64 training images, one validation batch, 1 epoch."""
    d = deployment
    spec = tiny_spec("compiled", budget={"n_trials": 1}, performance={"compile": True})
    spec["data"] |= {"train_size": 64, "valid_size": 32}
    (d.sweeps / "compiled.yaml").write_text(yaml.safe_dump(spec))
    (d.sweeps / "compiled.yaml").chmod(0o644)
    created = d.run("create", ["study", "create", "/app/sweeps/compiled.yaml"], timeout=180)
    assert "compiled" in created.stdout, created.stdout + created.stderr
    worked = run_in_image(d, "worker", "--study", "compiled", "--gpus", "none", timeout=600)
    assert "worker ran 1 trial(s)" in worked.stdout, worked.stdout + worked.stderr[-3000:]
    (trial,) = optuna.load_study(study_name="compiled", storage=d.storage).trials
    assert trial.state == TrialState.COMPLETE, (trial.state, worked.stderr[-3000:])
    # "compiled", not "fell back: ..." (a trial that fell back to eager completes too)
    assert trial.user_attrs["compile"] == "compiled", (trial.user_attrs, worked.stderr[-3000:])


DOCTOR_ROW = re.compile(r"^(\S+(?: \d+| kmnist)?)\s+(ok|warn|FAIL|skip)\s+(.*)$")


def test_doctor_in_the_worker_image_says_a_worker_would_work_there(deployment: Deployment) -> None:
    """`kmnist-tune doctor` as a user runs it in the image before attaching workers: with the worker's
    login through PgBouncer and its signing key, on the read-only root, a real tiny compile with the
    image's own compilers."""
    done = run_in_image(deployment, "doctor", timeout=400, check=False)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = {m[1]: (m[2], m[3]) for line in done.stdout.splitlines() if (m := DOCTOR_ROW.match(line))}
    for name in ("python", "torch", "fastai", "compiler", "compile", "storage", "signing"):
        assert rows[name][0] == "ok", (name, done.stdout)
    assert "works on cpu" in rows["compile"][1] and "g++" in rows["compiler"][1]
    assert "(current)" in rows["storage"][1] and "***" in rows["storage"][1]  # the login's password masked
    assert done.stdout.splitlines()[-1].startswith("a worker would work here")


def test_no_container_logged_an_error_or_a_traceback(deployment: Deployment) -> None:
    """Every container run above, on its read-only root: nothing failed to write a cache or control
    folder (they all point into the tmpfs /tmp), W&B kept its own log to itself, and the dashboard's
    refused writes are one line each. Runs last: it reads what the tests before it ran."""
    said = deployment.logs()
    assert said, "no container ran"
    for name, log in said.items():
        bad = [line for line in log.splitlines() if re.search(r"\bERROR\b|Traceback \(most recent call last\)", line)]
        assert not bad, f"{name} logged:\n" + "\n".join(bad[:20]) + f"\n--- its log's end ---\n{log[-3000:]}"


def test_compose_file_is_read_by_a_real_compose_implementation(tmp_path: Path) -> None:
    """Debian's docker-compose reads the file with the .env a user copies: every secret a file in
    $KMNIST_TUNE_SECRETS, none in any service's environment; and it refuses the file, naming the fix, when
    a required setting is missing."""
    example = (REPO / ".env.example").read_text()
    (tmp_path / ".env").write_text(example)
    argv = ["docker-compose", "--env-file", str(tmp_path / ".env"), "-f", str(REPO / "docker-compose.yml"), "config"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    services = resolved["services"]
    assert {"postgres", "pgbouncer", "schema", "dashboard", "worker"} <= set(services)
    assert {Path(spec["file"]).parent for spec in resolved["secrets"].values()} == {REPO / "secrets"}
    for name, svc in services.items():
        for key in svc.get("environment") or {}:
            assert not re.search(r"PASSWORD|SIGNING_KEY|API_KEY", key) or key.endswith("_FILE"), (name, key)
    (tmp_path / ".env").write_text(re.sub(r"^KMNIST_TUNE_STUDY=.*\n", "", example, flags=re.M))
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "set KMNIST_TUNE_STUDY in .env" in out.stderr, out.stderr
