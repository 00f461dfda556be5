"""The deployment artefacts: Kubernetes overlays, docker compose files, the Dockerfile.

Kubernetes: every overlay of ``deploy/k8s/overlays`` is rendered with the real ``kubectl
kustomize``; every built-in object validates against the Kubernetes schemas that
``kubernetes-validate`` ships, in strict mode (unknown fields fail) for Kubernetes
:data:`K8S_VERSION`; the custom resources that it cannot know (KEDA ScaledObject and
TriggerAuthentication, prometheus-operator ServiceMonitor, PodMonitor and PrometheusRule)
validate against the JSON schemas in ``deploy/schemas/crds`` (written for this project: see
its README), and any other kind fails the test instead of being skipped. Then structural
checks that catch regressions: the security context and resources of every container,
probes, GPUs and model arguments, where the workers' model URLs lead, NetworkPolicy peers,
disruption budgets, monitors, the alert rules and the dashboard, the autoscalers, every
environment variable against ``epicrisis.config.Settings``, every Secret reference against
``deploy/k8s/secrets``. The server is secure by default, and the manifests must say how: TLS
and API keys from mounted Secrets, its readiness probed on the plaintext health port, never
plaintext or anonymous callers; the server's settings, with throwaway certificates and keys in
place of the mounted files, give the TLS credentials and API keys it starts with.

Compose: ``docker-compose.yml`` alone and merged with ``docker-compose.sim.yml`` validate
against the Compose Specification's JSON schema (``deploy/schemas/compose-spec.json``).
Docker cannot run here, so the test loads the files the way the Compose Specification says
Compose does: each file interpolated on its own (``${VAR:?message}`` fails when VAR is
unset), then merged (mappings key by key, ``command``/``entrypoint``/``healthcheck.test``
replaced, other sequences appended, ``!reset`` removes, ``!override`` replaces). The merge
refuses keys whose rule it does not implement, so it cannot silently merge them wrong.

Image: hadolint reports nothing on the Dockerfile; its stages, user, ports and
``.dockerignore`` are checked.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from tests.certs import Authority, Issued
from tests.tools import tool

from epicrisis.config import Limits, Settings
from epicrisis.serving.auth import ApiKeys, new_key
from epicrisis.serving.crypto import Sealer, new_key_text
from epicrisis.serving.server import api_keys, server_credentials

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "deploy" / "schemas"
OVERLAYS = ("med42-70b", "med42-8b", "vllm", "keda", "hpa", "mtls")
MTLS_OVERLAYS = {"mtls"}  # clients present certificates too (components/mtls, secrets/mtls)
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise (preStop sleep, grpc probes)
K8S_VERSIONS = (K8S_VERSION, kubernetes_validate.latest_version())  # and the newest known
NAMESPACE = "epicrisis"

# Custom resources and the schema each is validated against; any other kind that
# kubernetes-validate does not know fails test_custom_resources_validate.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")

# Containers allowed to differ from the locked-down default. None today: TGI and vLLM run
# non-root with a read-only root file system and writable volumes for /data, /tmp, /dev/shm.
SECURITY_EXCEPTIONS: dict[str, set[str]] = {}

# Variables an Epicrisis container may carry besides EPICRISIS_* settings: the standard
# OpenTelemetry ones (tracing is off unless the endpoint is set) and the hub's.
ALLOWED_FOREIGN_ENV = {
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "HF_TOKEN",
    "HF_HOME",
    "HF_HUB_OFFLINE",
}


# ---------------------------------------------------------------------------------------
# Kubernetes: rendering and lookups
# ---------------------------------------------------------------------------------------


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(_kustomize(K8S / "overlays" / overlay))


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects (a deep copy: tests may change them)."""
    return copy.deepcopy(list(_rendered(overlay)))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in containers(workload) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: no container {name}"
    return found[0]


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches ``labels`` (empty selects all)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def arg_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def is_epicrisis(c: dict[str, Any]) -> bool:
    image = c["image"].split("@")[0].rsplit(":", 1)[0]
    return image.rsplit("/", 1)[-1] == "epicrisis"


def env_of(objects: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str | None]:
    """The container's environment: envFrom ConfigMaps, then env (None: from a Secret)."""
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        assert "configMapRef" in source, f"{c['name']}: envFrom other than a ConfigMap"
        data = one(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
        env.update({(source.get("prefix") or "") + k: v for k, v in data.items()})
    for item in c.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def worker(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "epicrisis-worker")


def model_servers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        w
        for w in workloads(objects)
        if pod_labels(w).get("app.kubernetes.io/component") == "model-server"
    ]


def in_flight_limit(model_server: dict[str, Any]) -> int:
    """Requests one replica serves at once: TGI's or vLLM's own flag."""
    (c,) = pod_spec(model_server)["containers"]
    for flag in ("--max-concurrent-requests", "--max-num-seqs"):
        if flag in c["args"]:
            return int(arg_value(c["args"], flag))
    raise AssertionError(f"{model_server['metadata']['name']}: no in-flight limit flag")


def max_workers(objects: list[dict[str, Any]]) -> int:
    """The most worker replicas the overlay can run (its autoscaler's bound, else fixed)."""
    bounds = [
        o["spec"]["maxReplicas"]
        for o in find(objects, "HorizontalPodAutoscaler")
        if o["spec"]["scaleTargetRef"]["name"] == "epicrisis-worker"
    ] + [
        o["spec"]["maxReplicaCount"]
        for o in find(objects, "ScaledObject")
        if o["spec"]["scaleTargetRef"]["name"] == "epicrisis-worker"
    ]
    if bounds:
        return max(bounds)
    return int(worker(objects)["spec"]["replicas"])


# ---------------------------------------------------------------------------------------
# Kubernetes: rendering and schema validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_the_namespace(overlay: str) -> None:
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "NetworkPolicy"} <= kinds
    assert {"PodDisruptionBudget", "ConfigMap"} <= kinds
    for o in objects:
        if o["kind"] == "Namespace":
            assert o["metadata"]["name"] == NAMESPACE
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]["name"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"
    # Secrets are never part of an overlay (they come from deploy/k8s/secrets or a vault).
    assert "Secret" not in kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_strictly(overlay: str, version: str) -> None:
    for o in render(overlay):
        if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS:
            continue  # test_custom_resources_validate
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{o['kind']} ({o['apiVersion']}): no Kubernetes schema and no CRD schema")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{o['kind']}/{o['metadata']['name']}: {path}: {exc.message}")


@functools.cache
def _crd_validator(filename: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "crds" / filename).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def crd_errors(o: dict[str, Any]) -> list[str]:
    validator = _crd_validator(CRD_SCHEMAS[(o["apiVersion"], o["kind"])])
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(o)
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate(overlay: str) -> None:
    custom = []
    for o in render(overlay):
        key = (o["apiVersion"], o["kind"])
        if key in CRD_SCHEMAS:
            custom.append(o)
            assert not crd_errors(o), f"{o['kind']}/{o['metadata']['name']}: {crd_errors(o)}"
            continue
        try:  # every other object must be a kind that kubernetes-validate knows
            kubernetes_validate.validate(o, K8S_VERSION, strict=False)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{key}: neither a Kubernetes kind nor one in CRD_SCHEMAS")
    assert find(custom, "PodMonitor") and find(custom, "ServiceMonitor")
    assert find(custom, "PrometheusRule")


def test_the_validators_reject_mistakes() -> None:
    """Validation that passes everything proves nothing: each validator refuses a typo."""
    objects = render("keda")
    deployment = copy.deepcopy(one(objects, "Deployment", "epicrisis-server"))
    pod_spec(deployment)["containers"][0]["resouces"] = {}  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)

    scaled = copy.deepcopy(one(objects, "ScaledObject", "epicrisis-worker"))
    del scaled["spec"]["triggers"][0]["metadata"]["listName"]
    assert crd_errors(scaled)
    scaled = copy.deepcopy(one(objects, "ScaledObject", "epicrisis-worker"))
    scaled["spec"]["maxReplicas"] = 4  # the HPA's word, not KEDA's
    assert crd_errors(scaled)
    monitor = copy.deepcopy(one(objects, "PodMonitor", "epicrisis-server"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert crd_errors(monitor)
    monitor = copy.deepcopy(one(objects, "ServiceMonitor", "model-server"))
    del monitor["spec"]["selector"]
    assert crd_errors(monitor)
    rule = copy.deepcopy(one(objects, "PrometheusRule", "epicrisis"))
    alert = next(r for r in rule["spec"]["groups"][0]["rules"] if "alert" in r)
    alert["fro"] = alert.pop("for")  # misspelt field
    assert crd_errors(rule)
    rule = copy.deepcopy(one(objects, "PrometheusRule", "epicrisis"))
    recording = next(r for r in rule["spec"]["groups"][0]["rules"] if "record" in r)
    recording["alert"] = "Both"  # a rule is a recording rule or an alert, not both
    assert crd_errors(rule)


# ---------------------------------------------------------------------------------------
# Kubernetes: security, resources, labels, disruption budgets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(overlay: str) -> None:
    for w in workloads(render(overlay)):
        name = w["metadata"]["name"]
        spec = pod_spec(w)
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, name
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod_security.get("runAsUser", 1) != 0, name
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{name}: hostPath volume {volume['name']}"
        for c in containers(w):
            where = f"{name}/{c['name']}"
            exceptions = SECURITY_EXCEPTIONS.get(where, set())
            security = c.get("securityContext", {})
            run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            if "runAsNonRoot" not in exceptions:
                assert run_as_non_root is True, f"{where}: runAsNonRoot"
                assert security.get("runAsUser", pod_security.get("runAsUser")) != 0, where
            if "readOnlyRootFilesystem" not in exceptions:
                assert security.get("readOnlyRootFilesystem") is True, f"{where}: read-only root"
            assert security.get("allowPrivilegeEscalation") is False, f"{where}: escalation"
            assert security.get("privileged") is not True, where
            capabilities = security.get("capabilities", {})
            assert capabilities.get("drop") == ["ALL"], f"{where}: capabilities.drop"
            assert not capabilities.get("add"), f"{where}: capabilities.add"
            resources = c.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(bound, {}), f"{where}: {bound}.{resource}"
            assert c.get("image") and (":" in c["image"] or "@" in c["image"]), where
            assert not c["image"].endswith(":latest"), f"{where}: unpinned image"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_common_labels_and_selectors(overlay: str) -> None:
    objects = render(overlay)
    for o in objects:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "epicrisis", o["metadata"]["name"]
    for w in workloads(objects):
        labels = pod_labels(w)
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component"):
            assert key in labels, f"{w['metadata']['name']}: pod label {key}"
            assert w["spec"]["selector"]["matchLabels"].get(key) == labels[key]
        assert labels.get("app.kubernetes.io/part-of") == "epicrisis"
        assert selects(w["spec"]["selector"], labels)
    for service in find(objects, "Service"):
        matched = [
            w
            for w in workloads(objects)
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
        ]
        assert len(matched) == 1, (
            f"Service {service['metadata']['name']} selects {len(matched)} workloads"
        )
        ports = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_has_a_disruption_budget(overlay: str) -> None:
    objects = render(overlay)
    budgets = find(objects, "PodDisruptionBudget")
    for w in workloads(objects):
        covering = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(w))]
        assert len(covering) == 1, f"{w['metadata']['name']}: {len(covering)} budgets"
    for name in ("epicrisis-server", "epicrisis-worker"):
        budget = one(objects, "PodDisruptionBudget", name)
        assert budget["spec"]["minAvailable"] == 1
        # a not-ready server (e.g. while the model loads) must not block node drains
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


# ---------------------------------------------------------------------------------------
# Kubernetes: the server, the workers, Redis, the model servers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_serves_50051_and_is_probed_on_its_health_port(overlay: str) -> None:
    objects = render(overlay)
    server = one(objects, "Deployment", "epicrisis-server")
    c = container(server, "server")
    assert c["args"] == ["serve"]
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in c["ports"]
    # the health status alone, in plaintext: the kubelet's gRPC probe has no TLS, no key
    health_port = int(env_of(objects, c)["EPICRISIS_HEALTH_PORT"] or 0)
    assert health_port and health_port != 50051
    assert {"name": "health", "containerPort": health_port, "protocol": "TCP"} in c["ports"]
    # readiness: the standard gRPC health check (SERVING only with Redis and a model)
    assert c["readinessProbe"]["grpc"] == {"port": health_port}
    # liveness: the port answers; not the health status, which a restart cannot fix
    assert c["livenessProbe"]["tcpSocket"]["port"] == 50051
    assert c["startupProbe"]["tcpSocket"]["port"] == 50051
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):  # 50051 needs TLS
        assert c[kind].get("grpc", {"port": health_port})["port"] == health_port, kind
    assert pod_spec(server)["terminationGracePeriodSeconds"] >= 10 + 5  # drain + preStop
    service = one(objects, "Service", "epicrisis")
    grpc_port = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port and grpc_port[0]["port"] == 50051
    assert grpc_port[0].get("appProtocol") != "kubernetes.io/h2c", "the port speaks TLS"
    for port in service["spec"]["ports"]:  # the plaintext health port stays off the Service
        assert port["targetPort"] not in ("health", health_port) and port["port"] != health_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_shut_down_warm_and_probe_their_metrics(overlay: str) -> None:
    objects = render(overlay)
    w = worker(objects)
    c = container(w, "worker")
    assert c["args"][0] == "worker"
    env = env_of(objects, c)
    timeout = float(env.get("EPICRISIS_JOB_TIMEOUT_SECONDS") or 600)
    assert pod_spec(w)["terminationGracePeriodSeconds"] >= timeout
    metrics_port = int(env["EPICRISIS_METRICS_PORT"] or 0)
    assert metrics_port == 9464
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_persists_with_a_password(overlay: str) -> None:
    objects = render(overlay)
    redis = one(objects, "StatefulSet", "redis")
    c = container(redis, "redis")
    args = c["args"]
    assert arg_value(args, "--appendonly") == "yes"
    assert arg_value(args, "--requirepass") == "$(REDISCLI_AUTH)"
    assert arg_value(args, "--maxmemory-policy") == "noeviction"
    auth = [e for e in c["env"] if e["name"] == "REDISCLI_AUTH"]
    assert auth and auth[0]["valueFrom"]["secretKeyRef"] == {
        "name": "epicrisis-redis",
        "key": "password",
    }
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert "redis-cli ping" in " ".join(c["readinessProbe"]["exec"]["command"])


def _tgi(objects: list[dict[str, Any]]) -> dict[str, Any]:
    tgi = one(objects, "StatefulSet", "tgi")
    c = container(tgi, "tgi")
    assert c["image"].startswith("ghcr.io/huggingface/text-generation-inference:3.")
    return tgi


def _gpu_pod_checks(workload: dict[str, Any], gpus: int, min_startup_minutes: int) -> None:
    (c,) = pod_spec(workload)["containers"]
    for bound in ("requests", "limits"):
        assert c["resources"][bound]["nvidia.com/gpu"] == str(gpus)
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    claims = {t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims  # the model cache survives restarts
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= min_startup_minutes * 60
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    token = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
    assert token and token[0]["valueFrom"]["secretKeyRef"]["name"] == "epicrisis-hf-token"


def _storage_gi(workload: dict[str, Any]) -> int:
    (claim,) = workload["spec"]["volumeClaimTemplates"]
    size = claim["spec"]["resources"]["requests"]["storage"]
    assert size.endswith("Gi")
    return int(size[:-2])


@pytest.mark.parametrize("overlay", ("med42-70b", "keda", "hpa"))
def test_tgi_serves_med42_70b_over_4_gpus(overlay: str) -> None:
    tgi = _tgi(render(overlay))
    args = container(tgi, "tgi")["args"]
    assert arg_value(args, "--model-id") == "m42-health/Llama3-Med42-70B"
    assert arg_value(args, "--num-shard") == "4"
    assert int(arg_value(args, "--max-input-tokens")) == Settings().max_input_tokens
    assert arg_value(args, "--max-total-tokens") == "8192"
    assert int(arg_value(args, "--max-batch-prefill-tokens")) >= int(
        arg_value(args, "--max-input-tokens")
    )
    _gpu_pod_checks(tgi, gpus=4, min_startup_minutes=30)
    assert _storage_gi(tgi) >= 150  # ~141 GB of bf16 weights


def test_8b_overlay_runs_med42_8b_on_one_gpu() -> None:
    tgi = _tgi(render("med42-8b"))
    args = container(tgi, "tgi")["args"]
    assert arg_value(args, "--model-id") == "m42-health/Llama3-Med42-8B"
    assert arg_value(args, "--num-shard") == "1"
    assert arg_value(args, "--max-total-tokens") == "8192"
    _gpu_pod_checks(tgi, gpus=1, min_startup_minutes=15)
    assert 20 <= _storage_gi(tgi) < 150


def test_vllm_overlay_replaces_tgi() -> None:
    objects = render("vllm")
    images = [c["image"] for w in workloads(objects) for c in containers(w)]
    assert not [i for i in images if "text-generation-inference" in i]
    assert not find(objects, "StatefulSet", "tgi") and not find(objects, "Service", "tgi")
    vllm = one(objects, "StatefulSet", "vllm")
    c = container(vllm, "vllm")
    assert c["image"].startswith("vllm/vllm-openai:v")
    assert arg_value(c["args"], "--model") == "m42-health/Llama3-Med42-70B"
    assert arg_value(c["args"], "--tensor-parallel-size") == "4"
    assert arg_value(c["args"], "--max-model-len") == "8192"
    _gpu_pod_checks(vllm, gpus=4, min_startup_minutes=30)
    urls = env_of(objects, container(worker(objects), "worker"))["EPICRISIS_LLM_URLS"]
    assert urls and all(urlsplit(u).hostname == "vllm-0.vllm" for u in urls.split(","))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_llm_urls_lead_to_the_model_server_pods(overlay: str) -> None:
    """Each URL is <pod>.<headless service>:<port> of a model-server replica that exists."""
    objects = render(overlay)
    urls = env_of(objects, container(worker(objects), "worker"))["EPICRISIS_LLM_URLS"]
    assert urls
    for url in urls.split(","):
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.hostname and parts.port, url
        pod, _, service_name = parts.hostname.partition(".")
        service = one(objects, "Service", service_name)
        assert service["spec"].get("clusterIP") == "None", "pod DNS names need a headless Service"
        (server,) = [
            w
            for w in model_servers(objects)
            if w["kind"] == "StatefulSet" and w["spec"]["serviceName"] == service_name
        ]
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(server))
        prefix, _, ordinal = pod.rpartition("-")
        assert prefix == server["metadata"]["name"] and int(ordinal) < server["spec"]["replicas"]
        (c,) = pod_spec(server)["containers"]
        assert parts.port in {p["containerPort"] for p in c["ports"] if p["name"] == "http"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_never_overrun_the_model_servers(overlay: str) -> None:
    """(most workers) x EPICRISIS_LLM_MAX_IN_FLIGHT <= each replica's in-flight limit."""
    objects = render(overlay)
    env = env_of(objects, container(worker(objects), "worker"))
    per_worker = int(env["EPICRISIS_LLM_MAX_IN_FLIGHT"] or 0)
    assert per_worker > 0
    for server in model_servers(objects):
        assert max_workers(objects) * per_worker <= in_flight_limit(server)


# ---------------------------------------------------------------------------------------
# Kubernetes: configuration and secrets
# ---------------------------------------------------------------------------------------


def _setting_names() -> set[str]:
    names = {"EPICRISIS_" + field.upper() for field in Settings.model_fields}
    names |= {"EPICRISIS_LIMIT_" + field.upper() for field in Limits.model_fields}
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_epicrisis_env_vars_are_settings(overlay: str) -> None:
    objects = render(overlay)
    known = _setting_names()
    seen = 0
    for w in workloads(objects):
        for c in filter(is_epicrisis, containers(w)):
            for name in env_of(objects, c):
                seen += 1
                if name.startswith("EPICRISIS_"):
                    assert name in known, f"{c['name']}: {name} is not a field of Settings"
                else:
                    assert name in ALLOWED_FOREIGN_ENV, f"{c['name']}: unexpected variable {name}"
    assert seen


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configuration_is_accepted_by_settings(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's values parse as Settings, with the secrets' example values."""
    objects = render(overlay)
    env = env_of(objects, container(worker(objects), "worker"))
    secrets = _secret_values()
    for name, value in env.items():
        monkeypatch.setenv(name, value if value is not None else secrets["epicrisis-redis"]["url"])
    settings = Settings()
    for field in Settings.model_fields:  # every listener (gRPC, /metrics) on all interfaces
        if field.endswith("_host"):
            assert getattr(settings, field) == "0.0.0.0", f"EPICRISIS_{field.upper()}"
    assert settings.grpc_port == 50051
    assert settings.metrics_port == 9464 and settings.log_format == "json"
    assert settings.llm_urls and settings.encryption_key_file is not None
    for w, name in (
        (one(objects, "Deployment", "epicrisis-server"), "server"),
        (worker(objects), "worker"),
    ):
        key_file = str(settings.encryption_key_file)
        assert _mounted_secret(w, container(w, name), key_file) == (
            "epicrisis-encryption-key",
            "key",
        )


def _mounted_secret(workload: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str]:
    """The (Secret, key) whose file ``path`` is in container ``c``, mounted read-only."""
    folder, _, filename = path.rpartition("/")
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == folder]
    assert len(mounts) == 1, f"{c['name']}: {folder} is not a mount"
    assert mounts[0].get("readOnly") is True and "subPath" not in mounts[0], path
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mounts[0]["name"]]
    assert "secret" in volume, f"{path}: volume {volume['name']} is not a Secret"
    items = [i for i in volume["secret"]["items"] if i["path"] == filename]
    assert len(items) == 1, f"{path}: no item {filename} in volume {volume['name']}"
    return volume["secret"]["secretName"], items[0]["key"]


SECRET_DIRS = ("", "mtls")  # deploy/k8s/secrets, and deploy/k8s/secrets/mtls for mutual TLS


def _secret_dirs(overlay: str | None = None) -> tuple[str, ...]:
    """The secrets kustomizations that an overlay needs applied (all: None)."""
    return SECRET_DIRS if overlay is None or overlay in MTLS_OVERLAYS else ("",)


def _example_secrets_rendered(tmp: Path, overlay: str | None = None) -> list[dict[str, Any]]:
    """deploy/k8s/secrets (and ./mtls where the overlay needs it) rendered in a copy whose
    *.example files stand in for the real ones."""
    copy_dir = tmp / "secrets"
    if not copy_dir.exists():
        shutil.copytree(K8S / "secrets", copy_dir)
        for example in copy_dir.rglob("*.example"):
            example.rename(example.with_suffix(""))
    return [o for sub in _secret_dirs(overlay) for o in _kustomize(copy_dir / sub)]


def _provided_secrets(tmp: Path, overlay: str | None = None) -> set[tuple[str, str]]:
    return {
        (o["metadata"]["name"], key)
        for o in _example_secrets_rendered(tmp, overlay)
        for key in o.get("data", {})
    }


def _secret_generators() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every secretGenerator entry of deploy/k8s/secrets and its subfolders, with its folder."""
    for sub in SECRET_DIRS:
        folder = K8S / "secrets" / sub
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        for generator in kustomization["secretGenerator"]:
            yield folder, generator


def _secret_values() -> dict[str, dict[str, str]]:
    """The example Secrets of deploy/k8s/secrets: name -> key -> value (fake values)."""
    values: dict[str, dict[str, str]] = {}
    for folder, generator in _secret_generators():
        data = values.setdefault(generator["name"], {})
        for entry in generator["files"]:
            key, _, filename = entry.partition("=")
            data[key] = (folder / f"{filename}.example").read_text()
    return values


def test_example_secrets_render_and_are_fake(tmp_path: Path) -> None:
    rendered = _example_secrets_rendered(tmp_path)
    assert {o["kind"] for o in rendered} == {"Secret"}
    names = [o["metadata"]["name"] for o in rendered]
    assert len(names) == len(set(names))
    for o in rendered:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        assert o["metadata"]["namespace"] == NAMESPACE
    assert one(rendered, "Secret", "epicrisis-grpc-tls")["type"] == "kubernetes.io/tls"
    values = _secret_values()
    for name, data in values.items():
        for key, value in data.items():
            assert "FAKE" in value, f"{name}.{key}: the example must be an obviously fake value"
    for name, key in (
        ("epicrisis-grpc-tls", "tls.crt"),
        ("epicrisis-grpc-tls", "tls.key"),
        ("epicrisis-grpc-client-ca", "ca.crt"),
    ):
        assert "-----BEGIN " in values[name][key], f"{name}.{key}: shows the PEM format"
    # the keys file example is in the format the server reads, and admits no key
    example = tmp_path / "api-keys"
    example.write_text(values["epicrisis-api-keys"]["api-keys"])
    keys = ApiKeys.from_file(example)
    assert keys.authenticate(new_key("anyone")[0]) is None
    tracked = subprocess.run(
        ["git", "ls-files", str(K8S / "secrets")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for path in tracked:
        assert path.endswith((".example", "kustomization.yaml", "README.md")), f"{path} is tracked"
    ignored = (ROOT / ".gitignore").read_text().split()
    real_files = [
        (folder / entry.partition("=")[2]).relative_to(ROOT).as_posix()
        for folder, generator in _secret_generators()
        for entry in generator["files"]
    ]
    for name in ("encryption-key", "redis-password", "redis-url", "hf-token", "api-keys"):
        assert f"deploy/k8s/secrets/{name}" in real_files
    for path in real_files:  # every real file that a generator reads is git-ignored
        assert path in ignored, f"{path} is not in .gitignore"


def _secret_references(objects: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for w in workloads(objects):
        for c in containers(w):
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    yield ref["name"], ref["key"]
            for source in c.get("envFrom", []):
                assert "secretRef" not in source, "secrets by key only"
        for volume in pod_spec(w).get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"]["items"]:
                    yield volume["secret"]["secretName"], item["key"]
    for auth in find(objects, "TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            yield ref["name"], ref["key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_references_exist_in_the_secrets_kustomization(overlay: str, tmp_path: Path) -> None:
    provided = _provided_secrets(tmp_path, overlay)
    referenced = set(_secret_references(render(overlay)))
    assert referenced
    assert referenced <= provided, f"missing from deploy/k8s/secrets: {referenced - provided}"
    # the Redis URL carries the Redis password and names the Service
    values = _secret_values()
    url = urlsplit(values["epicrisis-redis"]["url"])
    assert url.password == values["epicrisis-redis"]["password"]
    assert url.hostname == "redis" and url.port == 6379


# Where the server finds its TLS certificate and key, the clients' CA (mutual TLS) and the
# API keys: the setting, and the Secret and key that must be mounted there.
SERVER_FILES = {
    "EPICRISIS_GRPC_TLS_CERT_FILE": ("epicrisis-grpc-tls", "tls.crt"),
    "EPICRISIS_GRPC_TLS_KEY_FILE": ("epicrisis-grpc-tls", "tls.key"),
    "EPICRISIS_API_KEYS_FILE": ("epicrisis-api-keys", "api-keys"),
    "EPICRISIS_GRPC_TLS_CLIENT_CA_FILE": ("epicrisis-grpc-client-ca", "ca.crt"),
}
INSECURE_SETTINGS = ("EPICRISIS_GRPC_ALLOW_PLAINTEXT", "EPICRISIS_ALLOW_ANONYMOUS")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_gets_tls_and_api_keys_from_mounted_secrets(overlay: str, tmp_path: Path) -> None:
    objects = render(overlay)
    server = one(objects, "Deployment", "epicrisis-server")
    c = container(server, "server")
    env = env_of(objects, c)
    provided = _provided_secrets(tmp_path, overlay)
    expected = set(SERVER_FILES) - (
        set() if overlay in MTLS_OVERLAYS else {"EPICRISIS_GRPC_TLS_CLIENT_CA_FILE"}
    )
    assert {name for name in SERVER_FILES if name in env} == expected
    for name in expected:
        path = env[name]
        assert path and path.startswith("/"), f"{name}: {path}"
        secret = _mounted_secret(server, c, path)
        assert secret == SERVER_FILES[name], f"{name}: {path} holds {secret}"
        assert secret in provided, f"{name}: {secret} is not made by deploy/k8s/secrets"
    # the workers serve no gRPC: none of the server's TLS, keys or health settings
    worker_env = env_of(objects, container(worker(objects), "worker"))
    assert not {*SERVER_FILES, "EPICRISIS_HEALTH_PORT"} & set(worker_env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_overlay_allows_plaintext_or_anonymous_callers(overlay: str) -> None:
    """Production is secure: TLS and API keys, never the local-use escape hatches."""
    objects = render(overlay)
    for w in workloads(objects):
        for c in filter(is_epicrisis, containers(w)):
            env = env_of(objects, c)
            for name in INSECURE_SETTINGS:
                assert name not in env, f"{w['metadata']['name']}/{c['name']} sets {name}"
    for config in find(objects, "ConfigMap"):
        for name in INSECURE_SETTINGS:
            assert name not in (config.get("data") or {}), config["metadata"]["name"]


def _throwaway_secrets() -> tuple[dict[tuple[str, str], bytes], str, Authority, Issued]:
    """Contents for every Secret key a server mounts: a CA-signed server certificate and its
    key, the CA as the clients' CA, an encryption key, and a keys file admitting one key.
    Returns them, that key, the CA and a client certificate it signed (for mutual TLS)."""
    authority = Authority("epicrisis test CA")
    server_cert = authority.issue("epicrisis.epicrisis.svc", server=True)
    key, line = new_key("ehr-test", "submit,read")
    files = {
        ("epicrisis-grpc-tls", "tls.crt"): server_cert.cert,
        ("epicrisis-grpc-tls", "tls.key"): server_cert.key,
        ("epicrisis-grpc-client-ca", "ca.crt"): authority.pem,
        ("epicrisis-api-keys", "api-keys"): f"{line}\n".encode(),
        ("epicrisis-encryption-key", "key"): new_key_text().encode(),
    }
    return files, key, authority, authority.issue("ehr-test", server=False)


def _tls_health_check(
    credentials: grpc.ServerCredentials, authority: Authority, client: Issued, *, mutual: bool
) -> None:
    """A TLS handshake with a server that holds ``credentials``: health answers SERVING to a
    client that trusts ``authority`` (and presents ``client`` when given)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        for present in (True, False) if mutual else (False,):
            channel_credentials = grpc.ssl_channel_credentials(
                root_certificates=authority.pem,
                private_key=client.key if present else None,
                certificate_chain=client.cert if present else None,
            )
            with grpc.secure_channel(f"localhost:{port}", channel_credentials) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                if present or not mutual:
                    answer = check(health_pb2.HealthCheckRequest(), timeout=10)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                else:  # mutual TLS: no client certificate, no call
                    with pytest.raises(grpc.RpcError):
                        check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        server.stop(0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_settings_of_the_manifests_start_a_secure_server(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's environment, with throwaway files where its Secrets are mounted, gives
    what ``epicrisis serve`` starts with: TLS credentials (mutual where the overlay says so),
    the API keys, the encryption key, the health port of the readiness probe."""
    objects = render(overlay)
    server = one(objects, "Deployment", "epicrisis-server")
    c = container(server, "server")
    files, key, authority, client = _throwaway_secrets()
    secret_values = _secret_values()
    references = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in c.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    for name, value in env_of(objects, c).items():
        if value is None:  # from a Secret: its example value
            ref = references[name]
            value = secret_values[ref["name"]][ref["key"]]
        elif value.startswith("/var/run/secrets/"):  # a mounted Secret: a throwaway file
            secret = _mounted_secret(server, c, value)
            path = tmp_path / "mounted" / secret[0] / secret[1]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[secret])
            value = str(path)
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert not settings.grpc_allow_plaintext and not settings.allow_anonymous
    credentials = server_credentials(settings)
    assert credentials is not None, "TLS"
    mutual = overlay in MTLS_OVERLAYS
    assert (settings.grpc_tls_client_ca_file is not None) is mutual
    keys = api_keys(settings)
    assert keys is not None, "API keys"
    caller = keys.authenticate(key)
    assert caller is not None and caller.id == "ehr-test" and caller.may("Submit")
    assert keys.authenticate(new_key("stranger")[0]) is None
    Sealer.from_settings(settings)  # the mounted encryption key opens
    assert settings.health_port == c["readinessProbe"]["grpc"]["port"]
    assert settings.grpc_port == 50051 and settings.grpc_host == "0.0.0.0"
    _tls_health_check(credentials, authority, client, mutual=mutual)


# ---------------------------------------------------------------------------------------
# Kubernetes: autoscaling
# ---------------------------------------------------------------------------------------


def test_keda_scales_workers_on_both_redis_lists() -> None:
    from epicrisis.serving.queue import QUEUES

    objects = render("keda")
    assert not find(objects, "HorizontalPodAutoscaler"), "KEDA creates its own HPA"
    assert "replicas" not in worker(objects)["spec"], "the autoscaler owns the replica count"
    scaled = one(objects, "ScaledObject", "epicrisis-worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "epicrisis-worker")
    assert scaled["spec"]["minReplicaCount"] >= 1  # no worker: the server is NOT_SERVING
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis"}
    assert {t["metadata"]["listName"] for t in triggers} == set(QUEUES)
    redis_url = urlsplit(_secret_values()["epicrisis-redis"]["url"])
    database = redis_url.path.strip("/") or "0"
    redis_service = one(objects, "Service", "redis")
    for t in triggers:
        host, _, port = t["metadata"]["address"].partition(":")
        assert host in {f"redis.{NAMESPACE}.svc", f"redis.{NAMESPACE}.svc.cluster.local"}
        assert int(port) == redis_service["spec"]["ports"][0]["port"]
        assert t["metadata"].get("databaseIndex", "0") == database
        one(objects, "TriggerAuthentication", t["authenticationRef"]["name"])


def test_hpa_scales_workers_on_queue_depth() -> None:
    from epicrisis.observability import metrics

    objects = render("hpa")
    assert not find(objects, "ScaledObject")
    assert "replicas" not in worker(objects)["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler", "epicrisis-worker")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "epicrisis-worker",
    }
    assert hpa["spec"]["minReplicas"] >= 1
    external = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert [e["metric"]["name"] for e in external] == ["epicrisis_queue_depth"]
    assert metrics.QUEUE_DEPTH._name == "epicrisis_queue_depth"  # the series the adapter reads
    rules = yaml.safe_load(
        (K8S / "components" / "hpa" / "prometheus-adapter-rules.yaml").read_text()
    )
    (rule,) = rules["rules"]["external"]
    assert rule["name"]["as"] == "epicrisis_queue_depth"
    assert "epicrisis_queue_depth" in rule["seriesQuery"]


@pytest.mark.parametrize("overlay", ("med42-70b", "med42-8b", "vllm"))
def test_fixed_overlays_have_no_autoscaler(overlay: str) -> None:
    objects = render(overlay)
    assert not find(objects, "HorizontalPodAutoscaler") and not find(objects, "ScaledObject")
    assert worker(objects)["spec"]["replicas"] >= 1


# ---------------------------------------------------------------------------------------
# Kubernetes: NetworkPolicies and monitors
# ---------------------------------------------------------------------------------------

PROMETHEUS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
KEDA_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
}


def _peer(component: str) -> dict[str, Any]:
    return {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "epicrisis",
                "app.kubernetes.io/component": component,
            }
        }
    }


def _policies_for(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [p for p in find(objects, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]


def _rules(
    objects: list[dict[str, Any]], labels: dict[str, str], direction: str
) -> list[dict[str, Any]]:
    return [
        rule
        for p in _policies_for(objects, labels)
        if direction.capitalize() in p["spec"].get("policyTypes", [])
        for rule in p["spec"].get(direction, [])
    ]


def _ports(rule: dict[str, Any]) -> set[Any]:
    return {p["port"] for p in rule.get("ports", [])}


def _labels_of(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    return pod_labels(one(objects, kind, name))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay: str) -> None:
    objects = render(overlay)
    (deny,) = [
        p
        for p in find(objects, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for w in workloads(objects):  # every pod is under the default deny, and may resolve names
        labels = pod_labels(w)
        assert deny in _policies_for(objects, labels)
        dns = [r for r in _rules(objects, labels, "egress") if _ports(r) == {53}]
        assert {p["protocol"] for r in dns for p in r["ports"]} == {"UDP", "TCP"}

    # Redis: only the server and the workers (and, with KEDA, its operator) on 6379.
    redis_in = _rules(objects, _labels_of(objects, "StatefulSet", "redis"), "ingress")
    peers = [peer for rule in redis_in for peer in rule["from"]]
    expected = [_peer("server"), _peer("worker")] + ([KEDA_PEER] if overlay == "keda" else [])
    canonical = functools.partial(json.dumps, sort_keys=True)
    assert sorted(map(canonical, peers)) == sorted(map(canonical, expected))
    assert all(_ports(rule) == {6379} for rule in redis_in)
    redis_out = _rules(objects, _labels_of(objects, "StatefulSet", "redis"), "egress")
    assert [r for r in redis_out if _ports(r) != {53}] == [], "Redis calls nobody"

    # Model servers: the workers on "http", Prometheus on "http" (/metrics), nobody else.
    for server in model_servers(objects):
        labels = pod_labels(server)
        ingress = _rules(objects, labels, "ingress")
        assert [r["from"] for r in ingress] == [[_peer("worker")], [PROMETHEUS_PEER]]
        assert all(_ports(r) == {"http"} for r in ingress)
        egress = [r for r in _rules(objects, labels, "egress") if _ports(r) != {53}]
        assert [_ports(r) for r in egress] == [{443}]  # the Hugging Face hub
        (block,) = [peer["ipBlock"] for peer in egress[0]["to"]]
        assert block["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in block["except"]

    # The server: clients on 50051 from anywhere, Prometheus on 9464; out only to Redis.
    server_labels = _labels_of(objects, "Deployment", "epicrisis-server")
    server_in = _rules(objects, server_labels, "ingress")
    assert [r for r in server_in if "from" not in r] == [
        {"ports": [{"protocol": "TCP", "port": 50051}]}
    ]
    assert [r["from"] for r in server_in if "from" in r] == [[PROMETHEUS_PEER]]
    # Its plaintext health port is opened to no one: the kubelet probes from the pod's own
    # node, which no NetworkPolicy blocks (as for the workers' /metrics liveness probe).
    server_env = env_of(
        objects, container(one(objects, "Deployment", "epicrisis-server"), "server")
    )
    health_port = int(server_env["EPICRISIS_HEALTH_PORT"] or 0)
    assert not [r for r in server_in if {health_port, "health"} & _ports(r)]
    server_out = [r for r in _rules(objects, server_labels, "egress") if _ports(r) != {53}]
    assert [(_ports(r), r["to"]) for r in server_out] == [
        (
            {6379},
            [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "redis",
                            "app.kubernetes.io/component": "queue",
                        }
                    }
                }
            ],
        )
    ]

    # The workers: out to Redis and the model servers only; in only from Prometheus.
    worker_labels = pod_labels(worker(objects))
    worker_out = [r for r in _rules(objects, worker_labels, "egress") if _ports(r) != {53}]
    assert sorted(str(_ports(r)) for r in worker_out) == sorted([str({6379}), str({"http"})])
    for rule in worker_out:
        for peer in rule["to"]:
            assert set(peer) == {"podSelector"}, "workers call in-namespace pods only"
    assert [r["from"] for r in _rules(objects, worker_labels, "ingress")] == [[PROMETHEUS_PEER]]
    # every pod the workers may call on "http" is a model server that names a port "http"
    for server in model_servers(objects):
        assert any(
            selects(p["podSelector"], pod_labels(server)) for r in worker_out for p in r["to"]
        )
        assert "http" in {p["name"] for p in pod_spec(server)["containers"][0]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_scrape_server_workers_and_model_servers(overlay: str) -> None:
    objects = render(overlay)
    jobs: dict[str, str] = {}
    for monitor in find(objects, "PodMonitor"):
        (w,) = [
            w for w in workloads(objects) if selects(monitor["spec"]["selector"], pod_labels(w))
        ]
        ports = {p["name"] for c in containers(w) for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports
            (relabel,) = [
                r for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"
            ]
            jobs[w["metadata"]["name"]] = relabel["replacement"]
    for monitor in find(objects, "ServiceMonitor"):
        services = [
            s
            for s in find(objects, "Service")
            if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert services
        for service in services:
            ports = {p["name"] for p in service["spec"]["ports"]}
            assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
            for w in workloads(objects):
                if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w)):
                    jobs[w["metadata"]["name"]] = service["metadata"]["name"]  # job = Service name
    assert jobs["epicrisis-server"] == "epicrisis-server"
    assert jobs["epicrisis-worker"] == "epicrisis-worker"
    for server in model_servers(objects):
        assert server["metadata"]["name"] in jobs
    if overlay != "vllm":  # the alert rules name TGI's job "tgi", as compose does
        assert jobs["tgi"] == "tgi"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_load_the_alert_rules_and_the_dashboard(overlay: str) -> None:
    """The monitoring component ships deploy/monitoring's rules and dashboard unchanged."""
    objects = render(overlay)
    monitoring = ROOT / "deploy" / "monitoring"
    rule = one(objects, "PrometheusRule", "epicrisis")
    groups = yaml.safe_load((monitoring / "alerts.yml").read_text())["groups"]
    assert rule["spec"]["groups"] == groups
    dashboard = one(objects, "ConfigMap", "epicrisis-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # Grafana's sidecar
    text = (monitoring / "dashboards" / "epicrisis.json").read_text()
    assert dashboard["data"] == {"epicrisis.json": text}


# ---------------------------------------------------------------------------------------
# Compose: loading as the Compose Specification says
# ---------------------------------------------------------------------------------------

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_SIM = ROOT / "docker-compose.sim.yml"
# The server's TLS certificate, key and API keys: files on the host, as Compose secrets.
COMPOSE_SECRET_FILES = {
    "GRPC_TLS_CERT_FILE": "EPICRISIS_GRPC_TLS_CERT_FILE",
    "GRPC_TLS_KEY_FILE": "EPICRISIS_GRPC_TLS_KEY_FILE",
    "API_KEYS_FILE": "EPICRISIS_API_KEYS_FILE",
}
SECRET_VARS = {
    "EPICRISIS_ENCRYPTION_KEY",
    "REDIS_PASSWORD",
    "HF_TOKEN",
    "GRAFANA_ADMIN_PASSWORD",
    *COMPOSE_SECRET_FILES,
}
COMPOSE_ENV = {
    "EPICRISIS_ENCRYPTION_KEY": "FAKE-key",
    "REDIS_PASSWORD": "FAKE-password",
    "HF_TOKEN": "hf_FAKE",
    "GRAFANA_ADMIN_PASSWORD": "FAKE-admin",
    "GRPC_TLS_CERT_FILE": "./secrets/FAKE-grpc-tls.crt",
    "GRPC_TLS_KEY_FILE": "./secrets/FAKE-grpc-tls.key",
    "API_KEYS_FILE": "./secrets/FAKE-api-keys",
}


class Reset:
    """``!reset``: remove the attribute from what the earlier files set."""


class Override:
    """``!override``: replace the attribute whole instead of merging it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: yaml.SafeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[^}]*)\}|(?P<invalid>))"
)
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class InterpolationError(Exception):
    pass


def interpolate_text(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e},
    ${VAR:+r}, ${VAR+r}; anything else after a $ is an error, as in Compose."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        braced = match.group("braced")
        if braced is None:
            raise InterpolationError(
                f"invalid interpolation at {match.string[match.start() : match.start() + 20]!r}"
            )
        parsed = _BRACED.match(braced)
        if not parsed:
            raise InterpolationError(f"invalid interpolation ${{{braced}}}")
        name, op, arg = parsed.group("name"), parsed.group("op"), parsed.group("arg") or ""
        value = env.get(name)
        empty_counts = op is not None and op.startswith(":")
        unset = value is None or (empty_counts and value == "")
        arg = interpolate_text(arg, env)
        if op in (":-", "-"):
            return arg if unset else str(value)
        if op in (":?", "?"):
            if unset:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if unset else arg
        return value or ""

    return _VAR.sub(substitute, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, Override):
        return Override(interpolate(node.value, env))
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, str):
        return interpolate_text(node, env)
    return node


def load_compose_file(path: Path, env: dict[str, str]) -> dict[str, Any]:
    document = yaml.load(path.read_text(), Loader=ComposeLoader)
    return dict(interpolate(document, env))


# Merge rules of the Compose Specification (merge.md) for the attributes these files use.
_REPLACED_SEQUENCES = {("command",), ("entrypoint",), ("healthcheck", "test")}
_APPENDED_SEQUENCES = {("cap_drop",), ("cap_add",), ("security_opt",), ("tmpfs",), ("dns",)}
_MAPPINGS = {
    ("deploy",),
    ("environment",),
    ("healthcheck",),
    ("sysctls",),
    ("build",),
    ("depends_on",),
}
_SCALARS = {
    ("image",),
    ("shm_size",),
    ("read_only",),
    ("restart",),
    ("user",),
    ("stop_grace_period",),
    ("build", "context"),
}


def _merge_service(
    base: dict[str, Any], override: dict[str, Any], path: tuple[str, ...] = ()
) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        here = (*path, key)
        if isinstance(value, Reset):
            merged.pop(key, None)
        elif isinstance(value, Override):
            merged[key] = value.value
        elif here in _REPLACED_SEQUENCES or here in _SCALARS:
            merged[key] = value
        elif here in _APPENDED_SEQUENCES:
            merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
        elif here in _MAPPINGS or path[:1] in {
            ("deploy",),
            ("healthcheck",),
            ("environment",),
            ("sysctls",),
        }:
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = _merge_service(merged[key], value, here)
            else:
                assert not isinstance(value, list), (
                    f"no merge rule implemented for {'.'.join(here)}"
                )
                merged[key] = value
        else:
            raise AssertionError(f"the test implements no Compose merge rule for {'.'.join(here)}")
    return merged


def merge_compose(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if key == "services":
            for name, service in value.items():
                merged["services"][name] = _merge_service(merged["services"].get(name, {}), service)
        else:
            raise AssertionError(f"the test implements no Compose merge rule for top-level {key}")
    return merged


@functools.cache
def _compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def compose_errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in _compose_validator().iter_errors(document)
    ]


def compose_base() -> dict[str, Any]:
    return load_compose_file(COMPOSE, COMPOSE_ENV)


def compose_sim() -> dict[str, Any]:
    return merge_compose(compose_base(), load_compose_file(COMPOSE_SIM, COMPOSE_ENV))


def _walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, (*path, str(index)))


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else list(command)


# ---------------------------------------------------------------------------------------
# Compose: tests
# ---------------------------------------------------------------------------------------


def test_compose_validates_against_the_compose_spec() -> None:
    document = compose_base()
    assert not compose_errors(document), compose_errors(document)
    assert {"redis", "tgi", "server", "worker", "prometheus", "grafana"} <= set(
        document["services"]
    )
    broken = copy.deepcopy(document)
    broken["services"]["server"]["helthcheck"] = {}
    assert compose_errors(broken), "the schema must refuse an unknown attribute"


def test_compose_sim_merge_validates_and_needs_no_gpu() -> None:
    document = compose_sim()
    assert not compose_errors(document), compose_errors(document)
    tgi = document["services"]["tgi"]
    for path, node in _walk(document):
        assert "gpus" not in path and path[-1:] != ("devices",), f"GPU requirement at {path}"
        assert node != "nvidia", f"nvidia at {'.'.join(path)}"
    assert "deploy" not in tgi and "runtime" not in tgi
    assert tgi["entrypoint"] == ["epicrisis"] and _command(tgi)[0] == "tgi-sim"
    assert tgi["image"] == document["services"]["server"]["image"]
    command = _command(tgi)
    assert arg_value(command, "--host") == "0.0.0.0" and arg_value(command, "--port") == "80"
    assert "HF_TOKEN" not in tgi.get("environment", {})
    assert not [v for v in tgi.get("volumes", []) if "/data" in str(v)]
    assert "curl" not in " ".join(tgi["healthcheck"]["test"]), "the epicrisis image has no curl"
    # everything else is as in the GPU file
    base = compose_base()
    for name in ("server", "worker", "redis", "prometheus", "grafana"):
        assert document["services"][name] == base["services"][name]


def test_compose_gpu_file_reserves_4_gpus_for_tgi() -> None:
    tgi = compose_base()["services"]["tgi"]
    (device,) = tgi["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    command = _command(tgi)
    assert device["count"] in (4, "all")
    assert arg_value(command, "--num-shard") == "4"
    assert arg_value(command, "--model-id") == "m42-health/Llama3-Med42-70B"
    assert arg_value(command, "--port") == "80"
    assert tgi["image"].startswith("ghcr.io/huggingface/text-generation-inference:3.")
    assert tgi.get("shm_size")
    assert tgi["healthcheck"]["test"][:2] == ["CMD", "curl"] and tgi["healthcheck"]["test"][
        -1
    ].endswith("/health")


def test_compose_secrets_are_required_variables() -> None:
    for path in (COMPOSE, COMPOSE_SIM):
        text = "\n".join(
            line.split(" #")[0]
            for line in path.read_text().splitlines()
            if not line.lstrip().startswith("#")
        )
        for name, op in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]?)", text):
            if name in SECRET_VARS or re.search(r"PASSWORD|TOKEN|SECRET|KEY", name):
                assert op == ":?", f"{path.name}: ${{{name}}} must be ${{{name}:?message}}"
    for name in SECRET_VARS:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != name}
        with pytest.raises(InterpolationError, match=name):
            load_compose_file(COMPOSE, env)
        with pytest.raises(InterpolationError, match=name):  # empty counts as unset (":?")
            load_compose_file(COMPOSE, {**env, name: ""})
    # HF_TOKEN is checked in docker-compose.yml before the sim file applies (Compose
    # interpolates each file, then merges): the sim file's header says to set any value.
    assert "HF_TOKEN=unused" in COMPOSE_SIM.read_text()
    # no literal secret anywhere: every secret-looking variable comes from interpolation
    raw = yaml.load(COMPOSE.read_text(), Loader=ComposeLoader)
    for path, node in _walk(raw):
        if (
            path
            and re.search(r"PASSWORD|TOKEN|_KEY$|REDISCLI_AUTH", path[-1])
            and isinstance(node, str)
        ):
            assert "${" in node, f"{'.'.join(path)} holds a literal value"


@pytest.mark.parametrize("variant", ("base", "sim"))
def test_compose_starts_on_health(variant: str) -> None:
    document = compose_base() if variant == "base" else compose_sim()
    services = document["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dependency, condition in depends.items():
            assert dependency in services
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
    assert set(services["server"]["depends_on"]) == {"redis"}
    assert set(services["worker"]["depends_on"]) == {"redis", "tgi"}
    assert set(services["grafana"]["depends_on"]) == {"prometheus"}


def test_compose_healthchecks_check_the_right_things() -> None:
    services = compose_base()["services"]
    redis = services["redis"]
    assert (
        redis["healthcheck"]["test"][0] == "CMD-SHELL"
        and "redis-cli ping" in redis["healthcheck"]["test"][1]
    )
    assert (
        redis["environment"]["REDISCLI_AUTH"] == COMPOSE_ENV["REDIS_PASSWORD"]
    )  # authenticated ping
    assert "--appendonly yes" in " ".join(_command(redis))
    assert '--requirepass "$REDISCLI_AUTH"' in " ".join(_command(redis))
    server_check = services["server"]["healthcheck"]["test"]
    assert server_check[:3] == ["CMD", "python", "-c"]
    code = server_check[3]
    compile(code, "<server healthcheck>", "exec")
    # the health port, in plaintext without a key (50051 needs TLS and a key for the API)
    health_port = services["server"]["environment"]["EPICRISIS_HEALTH_PORT"]
    assert health_port != "50051" and "50051" not in code
    assert f"grpc.insecure_channel('127.0.0.1:{health_port}')" in code
    assert "grpc_health.v1" in code and "SERVING" in code
    import grpc_health.v1.health_pb2_grpc  # noqa: F401  (the image has what the check imports)

    worker_check = services["worker"]["healthcheck"]["test"]
    compile(worker_check[3], "<worker healthcheck>", "exec")
    assert ":9464/metrics" in worker_check[3]


@pytest.mark.parametrize("variant", ("base", "sim"))
def test_compose_env_vars_are_settings(variant: str) -> None:
    document = compose_base() if variant == "base" else compose_sim()
    known = _setting_names()
    for name in ("server", "worker"):
        service = document["services"][name]
        assert _command(service)[0] == {"server": "serve", "worker": "worker"}[name]
        environment = service["environment"]
        for variable in environment:
            if variable.startswith("EPICRISIS_"):
                assert variable in known, f"{name}: {variable} is not a field of Settings"
            else:
                assert variable in ALLOWED_FOREIGN_ENV, f"{name}: unexpected {variable}"
        url = urlsplit(environment["EPICRISIS_REDIS_URL"])
        assert (url.hostname, url.port, url.password) == (
            "redis",
            6379,
            COMPOSE_ENV["REDIS_PASSWORD"],
        )
        assert environment["EPICRISIS_LLM_URLS"] == "http://tgi:80"
        for field in Settings.model_fields:  # every listener (gRPC, /metrics) on all interfaces
            if field.endswith("_host"):
                assert environment.get(f"EPICRISIS_{field.upper()}") == "0.0.0.0", field
        assert environment["EPICRISIS_METRICS_PORT"] == "9464"


@pytest.mark.parametrize("variant", ("base", "sim"))
def test_compose_server_needs_tls_and_api_keys(variant: str) -> None:
    """TLS and API keys from Compose secrets, in the simulator too; nothing insecure."""
    document = compose_base() if variant == "base" else compose_sim()
    server = document["services"]["server"]
    environment = server["environment"]
    targets = {}
    for entry in server["secrets"]:
        assert set(entry) == {"source", "target"}, entry
        assert "/" not in entry["target"]
        targets[f"/run/secrets/{entry['target']}"] = entry["source"]
    for variable, setting in COMPOSE_SECRET_FILES.items():
        source = targets[environment[setting]]  # the setting names a mounted secret...
        assert document["secrets"][source] == {"file": COMPOSE_ENV[variable]}  # ...of the file
    assert len(targets) == len(COMPOSE_SECRET_FILES)
    for name, service in document["services"].items():
        for setting in INSECURE_SETTINGS:
            assert setting not in service.get("environment", {}), f"{name} sets {setting}"
        for port in service.get("ports", []):  # published on this host only
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
        if name != "server":
            assert not set(COMPOSE_SECRET_FILES.values()) & set(service.get("environment", {}))
    published = [str(port).split(":")[-1] for port in server["ports"]]
    assert published == ["50051"], "the plaintext health port is not published"
    assert environment["EPICRISIS_HEALTH_PORT"] not in published


def test_compose_server_settings_start_a_secure_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's Compose environment, with throwaway files as its secrets: TLS and keys."""
    server = compose_base()["services"]["server"]
    files, key, authority, client = _throwaway_secrets()
    contents = {
        "EPICRISIS_GRPC_TLS_CERT_FILE": files[("epicrisis-grpc-tls", "tls.crt")],
        "EPICRISIS_GRPC_TLS_KEY_FILE": files[("epicrisis-grpc-tls", "tls.key")],
        "EPICRISIS_API_KEYS_FILE": files[("epicrisis-api-keys", "api-keys")],
    }
    for name, value in server["environment"].items():
        if name in contents:
            path = tmp_path / Path(value).name
            path.write_bytes(contents[name])
            value = str(path)
        monkeypatch.setenv(name, value)
    settings = Settings()
    credentials = server_credentials(settings)
    keys = api_keys(settings)
    assert credentials is not None and keys is not None and keys.authenticate(key) is not None
    assert settings.health_port == 50052
    _tls_health_check(credentials, authority, client, mutual=False)


def test_compose_mounts_exist_and_prometheus_scrapes_every_role(tmp_path: Path) -> None:
    services = compose_base()["services"]
    targets: dict[str, str] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, _, rest = volume.partition(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
                targets[source] = rest.split(":")[0]
    config_source = "./deploy/compose/prometheus.yml"
    config = yaml.safe_load((ROOT / config_source).read_text())
    assert targets[config_source] == "/etc/prometheus/prometheus.yml"
    mounted_rules = {targets[s] for s in targets if s.endswith("alerts.yml")}
    assert set(config["rule_files"]) == mounted_rules == {"/etc/prometheus/rules/alerts.yml"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"epicrisis-server", "epicrisis-worker", "tgi"} <= set(jobs)
    assert jobs["epicrisis-server"]["dns_sd_configs"][0] == {
        "names": ["server"],
        "type": "A",
        "port": 9464,
        "refresh_interval": "30s",
    }
    assert jobs["epicrisis-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["epicrisis-worker"]["dns_sd_configs"][0]["port"] == 9464
    assert jobs["tgi"]["static_configs"][0]["targets"] == ["tgi:80"]
    # promtool: the config as Prometheus reads it in the container, with the real rules file
    config["rule_files"] = [str(ROOT / "deploy" / "monitoring" / "alerts.yml")]
    copy_path = tmp_path / "prometheus.yml"
    copy_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(copy_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_the_mounts() -> None:
    grafana = compose_base()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["./deploy/compose/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "deploy" / "compose" / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "epicrisis.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == mounts["./deploy/monitoring/dashboards"]
    dashboards = list((ROOT / "deploy" / "monitoring" / "dashboards").glob("*.json"))
    assert [d.name for d in dashboards if d.name == "epicrisis.json"]
    for dashboard in dashboards:
        json.loads(dashboard.read_text())
    assert (
        grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        == COMPOSE_ENV["GRAFANA_ADMIN_PASSWORD"]
    )


def test_compose_merge_implementation_follows_the_spec() -> None:
    """The merge used above: the cases of the Compose Specification it relies on."""
    base = {
        "services": {
            "a": {
                "command": ["x", "y"],
                "cap_drop": ["ALL"],
                "environment": {"A": "1"},
                "deploy": {"resources": {"limits": {"cpus": "1"}}},
            }
        }
    }
    override = yaml.load(
        "services:\n  a:\n    command: [z]\n    cap_drop: [NET_RAW]\n    environment: {B: '2'}\n    deploy: !reset null\n",
        Loader=ComposeLoader,
    )
    merged = merge_compose(base, override)["services"]["a"]
    assert merged == {
        "command": ["z"],
        "cap_drop": ["ALL", "NET_RAW"],
        "environment": {"A": "1", "B": "2"},
    }
    replaced = merge_compose(
        base,
        yaml.load("services:\n  a:\n    environment: !override {B: '2'}\n", Loader=ComposeLoader),
    )
    assert replaced["services"]["a"]["environment"] == {"B": "2"}
    with pytest.raises(AssertionError, match="no Compose merge rule"):
        merge_compose(base, {"services": {"a": {"ports": ["1:1"]}}})
    assert interpolate_text("a$$b ${X:-d} ${Y-e} ${X:+r}", {"X": "1", "Y": ""}) == "a$b 1  r"
    with pytest.raises(InterpolationError):
        interpolate_text("e.g. $(openssl rand -hex 32)", {})


# ---------------------------------------------------------------------------------------
# Image: Dockerfile and .dockerignore
# ---------------------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_reports_nothing() -> None:
    assert (
        not (ROOT / ".hadolint.yaml").exists() or "ignored" in (ROOT / ".hadolint.yaml").read_text()
    )
    result = subprocess.run(
        [
            tool("hadolint"),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "style",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], (
        result.stdout + result.stderr
    )


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_dockerfile_is_multi_stage_and_runs_as_a_numeric_non_root_user() -> None:
    stages = _stages()
    assert len(stages) >= 2
    bases = [stage[0][1].split()[0] for stage in stages]
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    assert len(set(bases)) == 1, "the venv moves between stages: one interpreter"
    builder, runtime = stages[0], stages[-1]
    # the dependency layer: pyproject.toml alone, dependencies installed, then the sources
    copies = [rest for keyword, rest in builder if keyword == "COPY"]
    assert copies[0].split()[0] == "pyproject.toml" and len(copies[0].split()) == 2
    runs = [i for i, (keyword, _) in enumerate(builder) if keyword == "RUN"]
    sources = [
        i for i, (keyword, rest) in enumerate(builder) if keyword == "COPY" and "services" in rest
    ]
    assert runs and sources and runs[0] < sources[0]
    assert "requirements" in builder[runs[0]][1] and "pip install" in builder[runs[0]][1]
    # the runtime stage: no build tools, no pip install, the builder's venv
    runtime_runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert not re.search(r"apt-get|apk |pip install|gcc|build-essential", runtime_runs)
    assert any(keyword == "COPY" and "--from=builder" in rest for keyword, rest in runtime)
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV").split()
    for field in Settings.model_fields:  # `docker run` listens on all interfaces
        if field.endswith("_host"):
            assert f"EPICRISIS_{field.upper()}=0.0.0.0" in env, field
    exposed = {port for keyword, rest in runtime if keyword == "EXPOSE" for port in rest.split()}
    assert {"50051", "50052", "9464"} <= exposed  # gRPC, its plaintext health port, /metrics
    (entrypoint,) = [json.loads(rest) for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for keyword, rest in runtime if keyword == "CMD"]
    assert entrypoint == ["epicrisis"] and cmd == ["serve"]


def test_dockerfile_dependency_list_is_the_projects(tmp_path: Path) -> None:
    """The builder's one-liner that lists the dependencies, run on the real pyproject.toml."""
    import tomllib

    (run,) = [rest for keyword, rest in _stages()[0] if keyword == "RUN" and "tomllib" in rest]
    code = re.search(r'python -c "(.+?)" +>', run)
    assert code, run
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = subprocess.run(
        ["python3", "-c", code.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0 and "tomllib" in result.stderr:  # a python3 older than 3.11 on PATH
        import sys

        result = subprocess.run(
            [sys.executable, "-c", code.group(1)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert result.stdout.split() == expected


def _docker_context_includes(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (last matching rule wins)."""
    included = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = pattern.replace("**/", "*").replace("/**", "/*")
        if any(
            fnmatch.fnmatchcase(prefix, glob) or fnmatch.fnmatchcase(prefix, pattern)
            for prefix in prefixes
        ):
            included = negate
    return included


def test_dockerignore_sends_only_what_the_build_reads() -> None:
    for path in (
        "pyproject.toml",
        "README.md",
        "services/epicrisis/__init__.py",
        "services/epicrisis/samples/sample-stay.json",
        "services/epicrisis/v1/summarizer_pb2.py",
    ):
        assert _docker_context_includes(path), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "deploy/k8s/secrets/hf-token",
        "bench/run.py",
        "services/epicrisis/__pycache__/cli.cpython-311.pyc",
    ):
        assert not _docker_context_includes(path), path
