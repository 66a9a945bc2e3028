"""deploy/: the Kubernetes manifests, rendered with kustomize (scripts/ci-deps fetches a pinned build)
and validated against the OpenAPI schemas of a pinned Kubernetes version (kubernetes-validate), plus
the rules a schema cannot see: restricted pod security, credentials only from Secrets, GPU limits
and a grace period for the SIGTERM hand-back, a ClusterIP dashboard with the read-only role that
answers its probe's and Service's Host names only, PgBouncer with its pool.ini
from storage/ and its password only in memory, and NetworkPolicies that let only PgBouncer and the
schema Job reach the database and only the other kmnist-tune pods reach PgBouncer. PgBouncer's entry
point runs for real with the environment its pod spec gives it, in front of a real PostgreSQL."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, cli_env, cli_here, pg_admin, run_cli
from pg_cluster import PG_HOST, PG_PORT, PG_SUPERUSER, Cluster, run_init_scripts
from pgbouncer_proc import dockerfile_instructions, image_files, start_pgbouncer
from sqlalchemy.engine import make_url

from kmnist_tune.observe.dashboard import ENV_ALLOW_HOSTS, HostPolicy

KUSTOMIZE = REPO / ".cache" / "kustomize" / "kustomize"
KUBERNETES = "1.33.0"  # the Kubernetes version whose API the manifests are checked against
OVERLAYS = ("in-cluster", "external")
POD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob"}
PGBOUNCER = "kmnist-tune-pgbouncer"  # its Deployment, Service and ConfigMap
POOL_INI = REPO / "storage" / "pgbouncer" / "pool.ini"
POOLED = {"Job/kmnist-tune-workers", "Job/kmnist-tune-create", "Deployment/kmnist-tune-dashboard"}
DIRECT = {f"Deployment/{PGBOUNCER}", "Job/kmnist-tune-schema"}  # (and PostgreSQL itself)


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay as `kustomize build` renders it (each test gets its own parsed copy)."""
    return [d for d in yaml.safe_load_all(kustomize_build(overlay)) if d]


@functools.cache
def kustomize_build(overlay: str) -> str:
    """kustomize's output, run once per overlay (the files do not change while tests run). The load
    restrictor stays on, as in a stock `kubectl apply -k`, Argo CD or Flux: each kustomization reads
    files only in or below its own folder."""
    assert KUSTOMIZE.is_file(), f"{KUSTOMIZE} is missing: run ./scripts/ci-deps"
    out = subprocess.run(
        [str(KUSTOMIZE), "build", "--load-restrictor", "LoadRestrictionsRootOnly", str(REPO / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, the workload, its pod spec) of every workload."""
    return [(f"{d['kind']}/{d['metadata']['name']}", d, d["spec"]["template"]["spec"]) for d in docs if d["kind"] in POD_KINDS]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def generated(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The ConfigMap a configMapGenerator made (its name gets a hash of the content)."""
    (doc,) = [d for d in docs if d["kind"] == "ConfigMap" and re.fullmatch(rf"{name}-[a-z0-9]{{10}}", d["metadata"]["name"])]
    return doc


def container_env(c: dict[str, Any], settings: dict[str, str], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom the settings ConfigMap, then each
    env entry in order (a value with $(VAR) expanded from those before it, a ConfigMap or Secret key),
    an optional Secret that does not exist left out."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert source["configMapRef"]["name"] == "kmnist-tune-settings", source
        env.update(settings)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == "kmnist-tune-settings", ref
            env[e["name"]] = settings[ref["key"]]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            if ref["name"] in secrets:
                env[e["name"]] = secrets[ref["name"]][ref["key"]]
            else:
                assert ref.get("optional") is True, ref
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_for_the_pinned_kubernetes_version(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Job", "Deployment", "Service", "NetworkPolicy"} <= kinds
    assert one(docs, "Deployment", PGBOUNCER) and one(docs, "Service", PGBOUNCER)
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_dashboard_reads_as_its_own_role_and_answers_only_its_names(overlay: str) -> None:
    docs = render(overlay)
    pod = one(docs, "Deployment", "kmnist-tune-dashboard")["spec"]["template"]["spec"]
    (c,) = containers(pod)
    env = {e["name"]: e for e in c["env"]}
    # The read-only role of storage/initdb, from its own Secret; PgBouncer holds its password too.
    for var, key in (("KMNIST_TUNE_DB_USER", "username"), ("PGPASSWORD", "password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "kmnist-tune-dashboard", "key": key}
    assert "kmnist-tune-worker" not in yaml.safe_dump(c) and "kmnist-tune-signing" not in yaml.safe_dump(c)
    # Host names: its readiness probe's, kubectl port-forward's (any local port) and the Service's.
    args = c["args"]
    opts = dict(zip(args[1::2], args[2::2], strict=True))
    policy = HostPolicy.for_server(opts["--host"], int(opts["--port"]), env[ENV_ALLOW_HOSTS]["value"].split(","))
    probe = c["readinessProbe"]["httpGet"]
    (host,) = [h["value"] for h in probe["httpHeaders"] if h["name"] == "Host"]
    assert policy.allows(host) and probe["port"] == "http"
    assert policy.allows("localhost:8080") and policy.allows("127.0.0.1:18080") and policy.allows("[::1]:9000")
    service = one(docs, "Service", "kmnist-tune-dashboard")
    (port,) = service["spec"]["ports"]
    name, ns = service["metadata"]["name"], service["metadata"]["namespace"]
    for dns in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
        assert policy.allows(f"{dns}:{port['port']}"), dns
    assert not policy.allows("evil.example:8080") and not policy.allows(f"{name}:9999") and not policy.allows("10.1.2.3:8080")
    # gunicorn (the image has it) with the settings' worker count, which `dashboard` reads from its
    # environment; the pod's CPU limit holds that many processes.
    settings = one(docs, "ConfigMap", "kmnist-tune-settings")["data"]
    assert {"configMapRef": {"name": "kmnist-tune-settings"}} in c["envFrom"]
    workers = int(settings["KMNIST_TUNE_DASHBOARD_WORKERS"])
    assert 1 <= workers <= 2 * float(c["resources"]["limits"]["cpu"])
    assert "--workers" not in args and "KMNIST_TUNE_DASHBOARD_WORKERS" in cli_here("dashboard", "--help").stdout


def storage_hosts(docs: list[dict[str, Any]]) -> dict[str, str]:
    """kind/name -> the host of the storage URL its containers build (one per workload)."""
    out = {}
    for where, _, pod in pod_specs(docs):
        urls = {e["value"] for c in containers(pod) for e in c.get("env", []) if e["name"] == "KMNIST_TUNE_STORAGE"}
        if urls:
            (url,) = urls
            m = re.fullmatch(
                r"postgresql\+psycopg://\$\(KMNIST_TUNE_DB_USER\)@(\$\(\w+\)):\$\(\w+\)/\$\(KMNIST_TUNE_DB_NAME\)", url
            )
            assert m, f"{where}: {url}"
            out[where] = m.group(1)
    return out


def selects(policy_labels: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in policy_labels.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_pgbouncer_and_the_schema_job_reach_the_database_and_the_rest_only_pgbouncer(overlay: str) -> None:
    docs = render(overlay)
    deny = one(docs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    workloads = {where: w for where, w, _ in pod_specs(docs)}
    # Who connects where: the worker-role pods to PgBouncer's Service, the owner's schema Job to the server.
    hosts = storage_hosts(docs)
    assert {w for w, h in hosts.items() if h == "$(KMNIST_TUNE_POOL_HOST)"} == POOLED
    assert {w for w, h in hosts.items() if h == "$(KMNIST_TUNE_DB_HOST)"} == {"Job/kmnist-tune-schema"}
    settings = one(docs, "ConfigMap", "kmnist-tune-settings")["data"]
    service = one(docs, "Service", PGBOUNCER)["spec"]
    assert settings["KMNIST_TUNE_POOL_HOST"] == PGBOUNCER and service["type"] == "ClusterIP"
    assert [p["port"] for p in service["ports"]] == [int(settings["KMNIST_TUNE_POOL_PORT"])] == [6432]
    # PgBouncer admits only the pool clients, on its port.
    pool = one(docs, "NetworkPolicy", "pgbouncer-from-kmnist-tune-only")["spec"]
    assert selects(pool["podSelector"]["matchLabels"], workloads[f"Deployment/{PGBOUNCER}"])
    (rule,) = pool["ingress"]
    (source,) = rule["from"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6432}] and set(source) == {"podSelector"}
    assert {w for w, wl in workloads.items() if selects(source["podSelector"]["matchLabels"], wl)} == POOLED
    service = one(docs, "Service", "kmnist-tune-dashboard")["spec"]
    assert service["type"] == "ClusterIP" and service["ports"][0]["port"] == 8080

    if overlay == "in-cluster":
        # PostgreSQL admits PgBouncer and the schema Job only; PgBouncer reaches PostgreSQL (and DNS) only.
        db = one(docs, "NetworkPolicy", "postgres-from-kmnist-tune-only")["spec"]
        assert selects(db["podSelector"]["matchLabels"], workloads["StatefulSet/postgres"])
        (rule,) = db["ingress"]
        (source,) = rule["from"]
        assert rule["ports"] == [{"protocol": "TCP", "port": 5432}] and set(source) == {"podSelector"}
        assert {w for w, wl in workloads.items() if selects(source["podSelector"]["matchLabels"], wl)} == DIRECT
        out = one(docs, "NetworkPolicy", "pgbouncer-to-postgres-only")["spec"]
        dns, to_db = out["egress"]
        assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
        (target,) = to_db["to"]
        assert selects(target["podSelector"]["matchLabels"], workloads["StatefulSet/postgres"])
        assert to_db["ports"] == [{"protocol": "TCP", "port": 5432}]
    else:
        # No ingress policy guards a server outside the cluster: egress ones do. PgBouncer reaches its
        # address (the overlay's patch, not the placeholder) and DNS only; the pool clients go anywhere
        # but there, the address copied from PgBouncer's policy.
        out = one(docs, "NetworkPolicy", "pgbouncer-to-database-only")["spec"]
        assert selects(out["podSelector"]["matchLabels"], workloads[f"Deployment/{PGBOUNCER}"])
        assert out["policyTypes"] == ["Egress"]
        dns, to_db = out["egress"]
        assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
        (target,) = to_db["to"]
        cidr = target["ipBlock"]["cidr"]
        assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", cidr) and cidr != "0.0.0.0/32" and "except" not in target["ipBlock"]
        assert to_db["ports"] == [{"protocol": "TCP", "port": 5432}]
        clients = one(docs, "NetworkPolicy", "pool-clients-not-to-the-database")["spec"]
        assert clients["policyTypes"] == ["Egress"]
        assert {w for w, wl in workloads.items() if selects(clients["podSelector"]["matchLabels"], wl)} == POOLED
        blocks = [t["ipBlock"] for r in clients["egress"] for t in r["to"] if "ipBlock" in t]
        assert {"cidr": "0.0.0.0/0", "except": [cidr]} in blocks
        assert all(b.get("except") == [cidr] or ":" in b["cidr"] for b in blocks), blocks
        assert not [r for r in clients["egress"] if "ports" in r]  # every port, but not to the database


def service_port(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (port,) = one(docs, "Service", PGBOUNCER)["spec"]["ports"]
    return port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pgbouncer_reads_pool_ini_from_storage_and_holds_its_password_only_in_memory(overlay: str) -> None:
    docs = render(overlay)
    deployment = one(docs, "Deployment", PGBOUNCER)
    pod = deployment["spec"]["template"]["spec"]
    (c,) = containers(pod)
    # The image built from storage/pgbouncer/Dockerfile, run as its user (numeric: the kubelet checks it).
    assert c["image"] == f"{PGBOUNCER}:1.18" and "command" not in c and "args" not in c
    instrs = dockerfile_instructions()
    uid = {k: v for k, _, v in (a.partition("=") for i, a in instrs if i == "ARG")}["PGBOUNCER_UID"]
    assert pod["securityContext"]["runAsUser"] == int(uid) and deployment["spec"]["replicas"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    env = {e["name"]: e for e in c["env"]}
    # pool.ini: one source of truth, storage/pgbouncer/pool.ini, through the ConfigMap its folder's
    # kustomization generates (its hash in the name rolls the pod when it changes).
    cm = generated(docs, PGBOUNCER)
    assert cm["data"] == {"pool.ini": POOL_INI.read_text()}
    ini = PurePosixPath(env["PGBOUNCER_POOL_INI"]["value"])
    assert mounts[str(ini.parent)]["configMap"]["name"] == cm["metadata"]["name"] and ini.name == "pool.ini"
    assert f"kubectl apply -k deploy/overlays/{overlay}" in (REPO / "README.md").read_text()
    # Its one password, its look-up role's: from its own Secret into the entry point's environment, then into
    # the auth_file in an emptyDir in memory, the one writable folder of a read-only container. No user's
    # password (the users' SCRAM secrets are looked up in PostgreSQL): no other Secret reaches it.
    assert env["KMNIST_TUNE_PGBOUNCER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": PGBOUNCER, "key": "password"}
    assert env["KMNIST_TUNE_PGBOUNCER_USER"]["valueFrom"]["secretKeyRef"] == {"name": PGBOUNCER, "key": "username"}
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {PGBOUNCER}
    run = mounts[env["PGBOUNCER_RUN_DIR"]["value"]]
    assert run["emptyDir"]["medium"] == "Memory"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m for m in c["volumeMounts"] if not m.get("readOnly")]
    assert [m["mountPath"] for m in writable] == [env["PGBOUNCER_RUN_DIR"]["value"]]
    # It connects to the server the settings name, with their TLS mode; it listens on the Service's port.
    for var in ("KMNIST_TUNE_DB_HOST", "KMNIST_TUNE_DB_PORT", "KMNIST_TUNE_DB_NAME"):
        assert env[var]["valueFrom"]["configMapKeyRef"]["key"] == var
    assert env["PGBOUNCER_SERVER_TLS_SSLMODE"]["valueFrom"]["configMapKeyRef"]["key"] == "KMNIST_TUNE_DB_SSLMODE"
    settings = one(docs, "ConfigMap", "kmnist-tune-settings")["data"]
    if overlay == "external":
        # TLS that checks the server's certificate and name against the CA mounted read-only from the
        # ConfigMap the user creates (not secret); the schema Job, which connects there too, checks the same.
        assert settings["KMNIST_TUNE_DB_SSLMODE"] == "verify-full"
        ca = PurePosixPath(env["PGBOUNCER_SERVER_TLS_CA_FILE"]["value"])
        assert mounts[str(ca.parent)] == {"name": "db-ca", "configMap": {"name": "kmnist-tune-db-ca"}}
        schema = one(docs, "Job", "kmnist-tune-schema")["spec"]["template"]["spec"]
        (job,) = containers(schema)
        job_env = {e["name"]: e for e in job["env"]}
        assert job_env["PGSSLROOTCERT"]["value"] == str(ca)
        assert job_env["PGSSLMODE"]["valueFrom"]["configMapKeyRef"]["key"] == "KMNIST_TUNE_DB_SSLMODE"
        job_mounts = {m["mountPath"]: m for m in job["volumeMounts"]}
        assert job_mounts[str(ca.parent)]["readOnly"] is True
        assert {v["name"]: v for v in schema["volumes"]}["db-ca"]["configMap"]["name"] == "kmnist-tune-db-ca"
    else:
        # The in-cluster server has no certificate; the traffic stays between the pods its policies name.
        assert settings["KMNIST_TUNE_DB_SSLMODE"] == "prefer" and "PGBOUNCER_SERVER_TLS_CA_FILE" not in env
    (port,) = c["ports"]
    assert port["containerPort"] == 6432 and "PGBOUNCER_LISTEN_PORT" not in env
    assert c["readinessProbe"]["tcpSocket"]["port"] == port["name"] == service_port(docs)["targetPort"]


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


# Each configuration file of the store, and what reads it: compose's postgres service (a bind mount),
# PgBouncer's image (a COPY: compose builds it) and the kustomization beside it (a ConfigMap).
CONFIG_FILES = {
    "storage/pgbouncer/pool.ini": "storage/pgbouncer",
    "storage/postgresql.conf": "storage",
    "storage/initdb/10-kmnist-roles.sh": "storage",
    "storage/initdb/kmnist-roles.psql": "storage",
}


def test_each_configuration_file_has_one_source_that_compose_and_kustomize_both_read() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounted = {v.split(":")[0].removeprefix("./") for v in compose["services"]["postgres"]["volumes"]}
    copied = {str(src.relative_to(REPO)) for src in image_files().values()}
    assert compose["services"]["pgbouncer"]["build"] == "./storage/pgbouncer"
    for path, folder in CONFIG_FILES.items():
        # compose reads it where it lies (the file, or its folder mounted whole).
        assert path in copied or path in mounted or str(Path(path).parent) in mounted, path
        # A kustomization in or above its folder generates its ConfigMap, so kustomize reads it with the
        # load restrictor on; deploy/ names that folder, never the file.
        generators = yaml.safe_load((REPO / folder / "kustomization.yaml").read_text())["configMapGenerator"]
        assert str(Path(path).relative_to(folder)) in [f for g in generators for f in g["files"]], path
    for kustomization in (REPO / "deploy").rglob("kustomization.yaml"):
        text = kustomization.read_text()
        assert "configMapGenerator" not in text or "files:" not in text, kustomization  # no file read from deploy/
    # And no second copy of any of them anywhere in the repository.
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    contents = {(REPO / p).read_bytes(): p for p in CONFIG_FILES}
    for name in filter(None, tracked):
        f = REPO / name.decode()
        if f.is_file() and name.decode() not in CONFIG_FILES:
            assert f.read_bytes() not in contents, f"{name.decode()} copies {contents.get(f.read_bytes())}"


def test_a_stock_kubectl_renders_both_overlays_without_flags() -> None:
    """What users have (kubectl 1.32 carries kustomize 5.5): `kubectl kustomize DIR`, as `kubectl apply -k`,
    Argo CD and Flux run it, with no flags, renders what the pinned kustomize renders, object for object,
    so the checks above hold for what users apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed here; the pinned kustomize renders the overlays above")
    for overlay in OVERLAYS:
        out = subprocess.run(
            [kubectl, "kustomize", str(REPO / "deploy" / "overlays" / overlay)], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr
        stock, pinned = [d for d in yaml.safe_load_all(out.stdout) if d], render(overlay)
        names = [[(d["kind"], d["metadata"]["name"]) for d in docs] for docs in (stock, pinned)]
        assert names[0] == names[1], overlay
        assert stock == pinned, overlay


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's env value."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_workers_and_the_create_job_get_the_signing_key_from_its_secret(overlay: str) -> None:
    """KMNIST_TUNE_SIGNING_KEY reaches the workers and the create Job (a required Secret: a missing one
    stops the pod, never lets it run unsigned), and no other pod; never as a value in a manifest."""
    docs = render(overlay)
    holders = set()
    for where, _, pod in pod_specs(docs):
        for c in containers(pod):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("name") == "kmnist-tune-signing" or e["name"].startswith("KMNIST_TUNE_SIGNING_KEY"):
                    assert e["name"] == "KMNIST_TUNE_SIGNING_KEY" and "value" not in e, (where, e)
                    assert ref == {"name": "kmnist-tune-signing", "key": "signing-key"}, (where, ref)  # not optional
                    holders.add(f"{where}/{c['name']}")
    assert holders == {"Job/kmnist-tune-workers/worker", "Job/kmnist-tune-create/create"}


@pytest.mark.postgres
def test_the_storage_url_the_pods_build_opens_a_real_database_through_pgbouncer(tmp_path: Path) -> None:
    """What the pods build, run here: the in-cluster PostgreSQL's first start (storage/initdb with the
    environment its StatefulSet gives it: the Secrets' roles), PgBouncer's entry point with the environment
    its pod spec gives it (settings, its own Secret; the server this machine's), the schema Job's owner
    URL straight to the server, and the URLs a worker and the dashboard build (PgBouncer's Service, the user
    from their Secret, the password in libpq's PGPASSWORD), which kmnist-tune opens through PgBouncer: it
    looks their SCRAM secrets up and holds neither password. The named commands exist."""
    cluster = Cluster(pg_admin())
    try:
        db = cluster.database()
        docs = render("external")
        settings = dict(one(docs, "ConfigMap", "kmnist-tune-settings")["data"])
        settings.update(KMNIST_TUNE_DB_HOST=PG_HOST, KMNIST_TUNE_DB_PORT=str(PG_PORT), KMNIST_TUNE_DB_NAME=db)
        settings["KMNIST_TUNE_DB_SSLMODE"] = "disable"  # the test server has no TLS (verify-full: the test above)
        secrets = {
            "kmnist-tune-owner": {"username": PG_SUPERUSER, "password": "the-owner-password"},  # the server trusts loopback
            **{
                f"kmnist-tune-{who}": {"username": cluster.role_name(), "password": f"pw-{who}-{uuid.uuid4().hex}"}
                for who in ("worker", "dashboard", "pgbouncer")
            },
            "kmnist-tune-signing": {"signing-key": "s" * 32},
        }

        def pod_env(docs: list[dict[str, Any]], kind: str, name: str, container: str = "") -> dict[str, str]:
            pod = one(docs, kind, name)["spec"]["template"]["spec"]
            (c,) = [c for c in containers(pod) if container in ("", c["name"])]
            return container_env(c, settings, secrets)

        # The database's first start, as the in-cluster overlay's StatefulSet runs it.
        postgres = pod_env(render("in-cluster"), "StatefulSet", "postgres")
        init_env = {k: v for k, v in postgres.items() if k.startswith(("POSTGRES_", "KMNIST_"))}
        init = run_init_scripts(REPO / "storage" / "initdb", init_env)
        assert init and all(p.returncode == 0 for p in init), [p.stderr for p in init]

        # The schema Job: the owner, straight to the server; it makes the tables.
        schema = pod_env(docs, "Job", "kmnist-tune-schema")
        assert make_url(schema["KMNIST_TUNE_STORAGE"]).host == PG_HOST and schema["PGSSLMODE"] == "disable"
        keep = {k: v for k, v in schema.items() if k.startswith(("KMNIST_TUNE_STORAGE", "PG")) and k != "PGSSLROOTCERT"}
        made = run_cli("schema", env=cli_env(**keep), cwd=tmp_path)
        assert "ready" in made.stdout

        bouncer_env = pod_env(docs, "Deployment", PGBOUNCER)
        assert bouncer_env.pop("PGBOUNCER_POOL_INI").endswith("/pool.ini")  # the ConfigMap: pool.ini's text (test above)
        assert bouncer_env.pop("PGBOUNCER_SERVER_TLS_CA_FILE")  # the CA's ConfigMap; no TLS here (sslmode above)
        bouncer = start_pgbouncer(bouncer_env, tmp_path / "pgbouncer.log", pool_ini=POOL_INI)
        try:
            pods = (("worker", "Job", "kmnist-tune-workers", "worker"), ("dashboard", "Deployment", "kmnist-tune-dashboard", ""))
            for who, kind, name, container in pods:
                env = pod_env(docs, kind, name, container)
                url = make_url(env["KMNIST_TUNE_STORAGE"])
                assert (url.host, url.port, url.password) == (PGBOUNCER, 6432, None) and url.drivername == "postgresql+psycopg"
                env["KMNIST_TUNE_STORAGE"] = url.set(host="127.0.0.1", port=bouncer.port).render_as_string()
                keep = {k: v for k, v in env.items() if k.startswith(("KMNIST_TUNE_STORAGE", "KMNIST_TUNE_SIGNING", "PG"))}
                assert keep["PGPASSWORD"] == secrets[f"kmnist-tune-{who}"]["password"] and keep["PGSSLMODE"] == "prefer"
                assert ("KMNIST_TUNE_SIGNING_KEY" in keep) == (who == "worker")
                listed = run_cli("study", "list", env=cli_env(**keep), cwd=tmp_path)
                assert listed.returncode == 0 and keep["PGPASSWORD"] not in listed.stdout + listed.stderr
                assert f"login attempt: db={db} user={url.username}" in bouncer.output()
            auth_file = (bouncer.run_dir / "userlist.txt").read_text()
            assert auth_file.splitlines() == [f'"{secrets[PGBOUNCER]["username"]}" "{secrets[PGBOUNCER]["password"]}"']
        finally:
            assert bouncer.stop() == 0, bouncer.output()
        for who in ("worker", "dashboard", "pgbouncer"):
            assert secrets[f"kmnist-tune-{who}"]["password"] not in bouncer.output()
    finally:
        cluster.drop()
    for _, _, pod in pod_specs(docs):
        for c in [c for c in containers(pod) if c["image"].startswith("kmnist-tune:")]:
            words = c.get("args", [])[:1] if "command" not in c else re.findall(r"kmnist-tune (\w+(?: \w+)?)", c["args"][0])
            for word in words:  # in this process: the parsing is what is checked
                assert cli_here(*word.split(), "--help").returncode == 0, word
