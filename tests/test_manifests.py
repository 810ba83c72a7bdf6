"""Static checks of the deployment files: Kubernetes manifests, compose, Dockerfile, jobs.

Nothing is run: the manifests are validated against the Kubernetes OpenAPI schemas
shipped with `kubernetes_validate`, and the contract between the files (ports,
probes, grace periods, labels, env names) is checked by reading them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from worker import jobs as job_kinds
from worker.config import load_jobs

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
APP_LABELS = {"app.kubernetes.io/name": "sync-worker"}
HTTP_PORT = 8080
SECRET_NAME = "sync-worker"
SECRET_KEYS = ("REDIS_URL", "DATABASE_URL", "WORKER_API_KEY", "WORKER_READ_KEY")
SECRET_DIR = Path("/run/secrets/sync-worker")
NAMESPACE = "sync-worker"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
# Validate against the newest Kubernetes schema the installed package ships.
K8S_VERSION = kubernetes_validate.latest_version()


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _one(kind: str) -> dict[str, Any]:
    found = [d for p in MANIFESTS for d in _docs(p) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in k8s/, found {len(found)}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """Resolve a probe or Service port (a number or a container port name) to a number."""
    if isinstance(port, int):
        return port
    by_name = {str(p["name"]): int(p["containerPort"]) for p in container["ports"]}
    assert port in by_name, f"no container port named {port!r}"
    return by_name[port]


def _seconds(value: str | int | float) -> float:
    """Seconds of a compose duration ("30s", "1m30s") or of a plain number."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value.strip())
    assert parts, f"not a duration: {value!r}"
    assert any(parts.groups()), f"not a duration: {value!r}"
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


def _shutdown_grace(env: dict[str, Any]) -> float:
    return float(env["WORKER_SHUTDOWN_GRACE"])


# --- Kubernetes -------------------------------------------------------------------


def test_manifests_exist() -> None:
    names = {p.name for p in MANIFESTS}
    expected = {"deployment.yaml", "service.yaml", "configmap.yaml", "namespace.yaml"}
    assert expected | {"secret.example.yaml", "pdb.yaml", "networkpolicy.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "sync-worker"


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    resources = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in resources)
    # Applying the example would overwrite the real Secret with placeholders.
    assert resources == {p.name for p in MANIFESTS} - {"secret.example.yaml"}


def test_probes_point_at_health_endpoints_on_http_port() -> None:
    container = _container(_one("Deployment"))
    assert _port_number(container, "http") == HTTP_PORT
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    if "startupProbe" in container:
        expected["startupProbe"] = "/healthz"
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port_number(container, get["port"]) == HTTP_PORT, probe


def test_worker_id_is_the_pod_name() -> None:
    env = _env(_container(_one("Deployment")))
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_secrets_are_files_from_the_sync_worker_secret() -> None:
    """Each secret is a file of the mounted Secret, named by <NAME>_FILE; none is an
    environment variable (`kubectl describe` and child processes would show it)."""
    deployment = _one("Deployment")
    container = _container(deployment)
    env = _env(container)
    secret = _one("Secret")
    assert secret["metadata"]["name"] == SECRET_NAME
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, v in volumes.items() if "secret" in v]
    assert volumes[name]["secret"]["secretName"] == SECRET_NAME
    assert volumes[name]["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == name]
    assert Path(mount["mountPath"]) == SECRET_DIR
    assert mount["readOnly"] is True
    for key in SECRET_KEYS:
        assert key not in env, f"{key} as an environment variable"
        assert Path(env[f"{key}_FILE"]["value"]) == SECRET_DIR / key
        assert key in secret["stringData"]
    for variable in container["env"]:
        assert "secretKeyRef" not in variable.get("valueFrom", {}), variable["name"]


def test_termination_grace_exceeds_shutdown_grace() -> None:
    deployment = _one("Deployment")
    env = _env(_container(deployment))
    grace = _shutdown_grace({k: v["value"] for k, v in env.items() if "value" in v})
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_deployment_shape_resources_and_security() -> None:
    deployment = _one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    pod = spec["template"]["spec"]
    container = _container(deployment)
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc.get("privileged", False) is False
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == HTTP_PORT
    assert annotations["prometheus.io/path"] == "/metrics"


def test_jobs_file_is_mounted_from_the_configmap() -> None:
    deployment = _one("Deployment")
    configmap = _one("ConfigMap")
    container = _container(deployment)
    jobs_file = Path(_env(container)["WORKER_JOBS_FILE"]["value"])
    assert jobs_file == Path("/etc/worker/jobs.toml")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (name,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[name]["configMap"]["name"] == configmap["metadata"]["name"]
    assert Path(mounts[name]["mountPath"]) == jobs_file.parent
    assert jobs_file.name in configmap["data"]


def test_selectors_match_pod_labels() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == APP_LABELS
    assert selector.items() <= pod_labels.items()
    service = _one("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("minAvailable", 0) >= 2 or pdb["spec"].get("maxUnavailable") == 1


def test_service_maps_port_80_to_http() -> None:
    service = _one("Service")
    container = _container(_one("Deployment"))
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert port["port"] == 80
    assert _port_number(container, port["targetPort"]) == HTTP_PORT


def test_pod_is_locked_down() -> None:
    """Non-root (the Dockerfile's user), seccomp RuntimeDefault, no host namespaces, no
    service account token, and /tmp the only writable place."""
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    for sc in (pod["securityContext"], container["securityContext"]):
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["runAsUser"] == _dockerfile_uid()
        assert sc["runAsGroup"] != 0
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host, False), host
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly", False)]
    assert [m["mountPath"] for m in writable] == ["/tmp"]
    assert "emptyDir" in volumes[writable[0]["name"]]
    assert volumes[writable[0]["name"]]["emptyDir"]["sizeLimit"]


def test_namespace_enforces_the_restricted_pod_security() -> None:
    namespace = _one("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kustomization_sets_the_namespace() -> None:
    """checkov reads the files one by one (CKV_K8S_21 is skipped in .checkov.yaml): the
    namespace comes from the kustomizations; the Secret, applied by hand, names it."""
    for path in (K8S / "kustomization.yaml", K8S / "monitoring" / "kustomization.yaml"):
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["namespace"] == NAMESPACE
    assert _one("Secret")["metadata"]["namespace"] == NAMESPACE
    for path in MANIFESTS:
        for doc in _docs(path):
            assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, path.name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomization_renders_into_the_namespace() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "NetworkPolicy"}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


def _rule_ports(rule: dict[str, Any]) -> set[tuple[int | str, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for p in rule.get("ports", [])}


def test_network_policy_lets_in_only_scraper_and_clients_and_out_only_what_is_needed() -> None:
    policy = _one("NetworkPolicy")
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]

    # In: the http port only (the kubelet's probes come from the node: always allowed).
    (ingress,) = spec["ingress"]
    ports = _rule_ports(ingress)
    assert {_port_number(_container(deployment), port) for port, _ in ports} == {HTTP_PORT}
    sources = ingress["from"]
    assert all(source for source in sources)  # an empty peer would let in everyone
    namespaces = {
        s["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")
        for s in sources
    }
    assert "monitoring" in namespaces  # Prometheus
    assert any(
        s.get("podSelector", {}).get("matchLabels") == {"sync-worker/api-client": "true"}
        for s in sources
    )
    assert not any("ipBlock" in s for s in sources)

    # Out: DNS, Redis, Postgres, HTTPS, and labelled in-cluster receivers; nothing else.
    egress = spec["egress"]
    opened = set().union(*(_rule_ports(rule) for rule in egress))
    assert opened == {(53, "UDP"), (53, "TCP"), (6379, "TCP"), (5432, "TCP"), (443, "TCP")}
    for rule in egress:
        # Each rule is bound by its ports, or by a labelled destination.
        assert rule.get("ports") or all(
            peer.get("podSelector", {}).get("matchLabels") for peer in rule["to"]
        ), rule
    (https,) = [rule for rule in egress if _rule_ports(rule) == {(443, "TCP")}]
    v4 = next(p["ipBlock"] for p in https["to"] if p["ipBlock"]["cidr"] == "0.0.0.0/0")
    # No upstream redirect reaches the cloud's metadata service or a private address.
    assert {"169.254.0.0/16", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(v4["except"])


def test_checkov_skips_only_what_is_reasoned() -> None:
    """Each check .checkov.yaml skips has its reason written beside it; a new skip
    needs one too (and a line here)."""
    text = (ROOT / ".checkov.yaml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    assert config["skip-download"] is True  # offline
    assert config["framework"] == ["kubernetes"]
    assert config["directory"] == ["k8s"]
    assert set(config["skip-check"]) == {"CKV_K8S_21", "CKV_K8S_43", "CKV_K8S_15"}
    for check in config["skip-check"]:
        reason = re.search(rf"#\s*{check} (.+)\n((?:\s*#.*\n)*)\s*- {check}\n", text)
        assert reason, f"{check}: no reason written above it"
        assert len(reason.group(1) + reason.group(2)) > 80, f"{check}: say why"


# --- docker compose ---------------------------------------------------------------


def test_compose_runs_three_workers_on_redis_and_postgres() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"redis", "postgres", "worker"} <= services.keys()
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert "container_name" not in worker  # a fixed name cannot be replicated
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == (
        DOCKER / "Dockerfile"
    )
    for dependency in ("redis", "postgres"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"
        assert "healthcheck" in services[dependency]
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    env = worker["environment"]
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert "@postgres:" in env["DATABASE_URL"]
    assert _seconds(worker["stop_grace_period"]) > _shutdown_grace(env)
    assert "/healthz" in str(worker["healthcheck"]["test"])
    for published in worker.get("ports", []):
        host = str(published).rsplit(":", 1)[0]
        assert "-" in host, f"fixed host port {published!r} cannot serve 3 replicas"
    source, target = worker["volumes"][0].split(":")[:2]
    assert target == env["WORKER_JOBS_FILE"]
    assert (DOCKER / source).is_file()


# --- Dockerfile -------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]
    pairs = [ln.strip().split(None, 1) for ln in lines if not ln.lstrip().startswith("#")]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def _dockerfile_uid() -> int:
    instructions = _dockerfile_instructions()
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    users = [arg for op, arg in instructions if op == "USER"]
    return int(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0])


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    final_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = instructions[final_from:]
    args = dict(
        arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg
    )  # defaults
    users = [arg for op, arg in final if op == "USER"]
    assert users, "the final stage has no USER"
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert user not in ("root", "0")
    assert any(op == "EXPOSE" and str(HTTP_PORT) in arg.split() for op, arg in final)
    (healthcheck,) = [arg for op, arg in final if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "urllib" in healthcheck
    assert healthcheck.split("CMD", 1)[1].strip().startswith("["), "exec form (DL3025)"
    assert ("ENTRYPOINT", '["worker"]') in final
    assert ("CMD", '["run"]') in final
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert any(op == "ENV" and "PYTHONUNBUFFERED=1" in arg for op, arg in final)
    assert any(op == "COPY" and "--from=" in arg for op, arg in final)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv"} <= set(ignored)


# --- jobs files -------------------------------------------------------------------


def _jobs_sources() -> list[tuple[str, str]]:
    configmap = [d for d in _docs(K8S / "configmap.yaml") if d["kind"] == "ConfigMap"]
    example = (DOCKER / "jobs.example.toml").read_text(encoding="utf-8")
    return [("configmap.yaml", configmap[0]["data"]["jobs.toml"]), ("jobs.example.toml", example)]


JOBS_SOURCES = _jobs_sources()


@pytest.mark.parametrize(("name", "text"), JOBS_SOURCES, ids=[n for n, _ in JOBS_SOURCES])
def test_jobs_files_parse(name: str, text: str, tmp_path: Path) -> None:
    jobs = tomllib.loads(text)["jobs"]
    assert jobs, f"{name} has no [[jobs]]"
    for job in jobs:
        assert {"name", "kind", "schedule"} <= job.keys(), job
    # The worker's own loader accepts it too: cron, timezone, durations, policies and
    # each kind's params.
    path = tmp_path / "jobs.toml"
    path.write_text(text, encoding="utf-8")
    assert [j.name for j in load_jobs(path, kinds=job_kinds.checkers(job_kinds.kinds()))] == [
        j["name"] for j in jobs
    ]
