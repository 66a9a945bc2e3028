"""deploy/: the Kubernetes manifests, rendered with kustomize (scripts/ci-deps fetches a pinned build)
and validated against the OpenAPI schemas of a pinned Kubernetes version (kubernetes-validate), plus
the rules a schema cannot see: restricted pod security, credentials only from Secrets, GPU limits
and a grace period for the SIGTERM hand-back, a ClusterIP dashboard, and NetworkPolicies that let
only kmnist-tune's own pods reach the database."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, cli_env, run_cli

KUSTOMIZE = REPO / ".cache" / "kustomize" / "kustomize"
KUBERNETES = "1.33.0"  # the Kubernetes version whose API the manifests are checked against
OVERLAYS = ("in-cluster", "external")
POD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob"}


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUSTOMIZE.is_file(), f"{KUSTOMIZE} is missing: run ./scripts/ci-deps"
    out = subprocess.run(
        [str(KUSTOMIZE), "build", "--load-restrictor", "LoadRestrictionsNone", str(REPO / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, the workload, its pod spec) of every workload."""
    return [(f"{d['kind']}/{d['metadata']['name']}", d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in POD_KINDS]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_for_the_pinned_kubernetes_version(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Job", "Deployment", "Service", "NetworkPolicy"} <= kinds
    assert ("StatefulSet" in kinds) == (overlay == "in-cluster")
    for d in docs:
        kubernetes_validate.validate(d, KUBERNETES, strict=True)  # raises on an unknown or misplaced field
        assert d["kind"] == "Namespace" or d["metadata"]["namespace"] == "kmnist-tune"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    docs = render(overlay)
    labels = one(docs, "Namespace", "kmnist-tune")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for where, _, pod in pod_specs(docs):
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, where
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where  # no pod talks to the API server
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], where
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged"), (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert "limits" in c["resources"] and "requests" in c["resources"], (where, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_secrets(overlay: str) -> None:
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret in the manifests: create it with kubectl instead"
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"://[^/\s@]*:[^/\s@]*@", text), "a URL with a password in it"
    owner_users = set()
    for where, _, pod in pod_specs(docs):
        for c in containers(pod):
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], (where, e["name"])
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("name") == "kmnist-tune-owner":
                    owner_users.add(where)
    # The owner's credentials reach the database itself and the schema Job, nothing else.
    expected = {"Job/kmnist-tune-schema"} | ({"StatefulSet/postgres"} if overlay == "in-cluster" else set())
    assert owner_users == expected


def test_workers_get_a_gpu_a_grace_period_and_bounded_restarts() -> None:
    docs = render("in-cluster")
    job = one(docs, "Job", "kmnist-tune-workers")
    pod = job["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][:3] == ["worker", "--study", "$(KMNIST_TUNE_STUDY)"] and "--per-gpu" in worker["args"]
    # SIGTERM: the worker finishes its batch, waits for a checkpoint upload and hands the trial back.
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert pod["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] <= 10
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == job["spec"]["completions"]
    assert {m["mountPath"] for m in worker["volumeMounts"]} >= {"/tmp", "/data", "/dev/shm"}  # writable where it writes


def test_only_kmnist_tune_pods_reach_the_database_and_the_dashboard_stays_inside() -> None:
    docs = render("in-cluster")
    deny = one(docs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    db = one(docs, "NetworkPolicy", "postgres-from-kmnist-tune-only")["spec"]
    assert db["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "postgres"}
    (rule,) = db["ingress"]
    (source,) = rule["from"]
    client = source["podSelector"]["matchLabels"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]
    for where, workload, pod_spec in pod_specs(docs):
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        uses_db = any(e["name"] == "KMNIST_TUNE_STORAGE" for c in containers(pod_spec) for e in c.get("env", []))
        is_client = all(template_labels.get(k) == v for k, v in client.items())
        assert uses_db == is_client or where == "StatefulSet/postgres", where
    service = one(docs, "Service", "kmnist-tune-dashboard")["spec"]
    assert service["type"] == "ClusterIP" and service["ports"][0]["port"] == 8080


def test_the_database_is_initialised_from_the_files_compose_uses() -> None:
    docs = render("in-cluster")
    initdb = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kmnist-tune-initdb"))
    for path in (REPO / "storage" / "initdb").iterdir():
        assert initdb["data"][path.name] == path.read_text(), path.name
    conf = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kmnist-tune-postgresql-conf"))
    assert conf["data"]["postgresql.conf"] == (REPO / "storage" / "postgresql.conf").read_text()
    pg = one(docs, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pg["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pg["volumes"]}
    assert volumes[mounts["/docker-entrypoint-initdb.d"]]["configMap"]["name"] == initdb["metadata"]["name"]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's env value."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


@pytest.mark.postgres
def test_the_storage_url_the_pods_build_opens_a_real_database(pg_url: str, tmp_path: Path) -> None:
    """The URL a worker pod assembles (user from its Secret, host, port and database from the settings,
    the password in libpq's PGPASSWORD) is one kmnist-tune opens; the named commands exist."""
    from sqlalchemy.engine import make_url

    real = make_url(pg_url)
    docs = render("external")
    settings = dict(one(docs, "ConfigMap", "kmnist-tune-settings")["data"])
    settings.update(KMNIST_TUNE_DB_HOST=str(real.host), KMNIST_TUNE_DB_PORT=str(real.port))
    settings["KMNIST_TUNE_DB_NAME"] = str(real.database)
    settings["PGSSLMODE"] = "disable"  # the test server has no TLS
    secrets = {"username": str(real.username), "password": "the-password", "api-key": ""}
    job = one(docs, "Job", "kmnist-tune-workers")["spec"]["template"]["spec"]
    (worker,) = job["containers"]
    env = dict(settings)
    for e in worker["env"]:
        env[e["name"]] = secrets[e["valueFrom"]["secretKeyRef"]["key"]] if "valueFrom" in e else expand(e["value"], env)
    env.pop("WANDB_API_KEY", None)
    url = env["KMNIST_TUNE_STORAGE"]
    assert make_url(url).password is None and url.startswith("postgresql+psycopg://")
    keep = {k: v for k, v in env.items() if k.startswith(("KMNIST_TUNE_STORAGE", "PG"))}
    listed = run_cli("study", "list", env=cli_env(**keep), cwd=tmp_path)
    assert listed.returncode == 0 and "the-password" not in listed.stdout + listed.stderr
    for _, _, pod in pod_specs(docs):
        for c in [c for c in containers(pod) if c["image"].startswith("kmnist-tune")]:
            words = c.get("args", [])[:1] if "command" not in c else re.findall(r"kmnist-tune (\w+(?: \w+)?)", c["args"][0])
            for word in words:
                assert run_cli(*word.split(), "--help", env=cli_env()).returncode == 0, word
