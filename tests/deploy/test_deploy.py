"""The deployment: every overlay renders, validates against the Kubernetes schemas, passes the
policy scan, and agrees with the server it runs; the Dockerfile lints clean and agrees too.

Rendering uses the machine's kubectl (its built-in kustomize); kubernetes-validate, hadolint and
checkov come from their own virtual environment, made by deploy/tools-env. A missing tool fails
these tests with a message saying so; nothing is skipped.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nvfp4_prep.server.config import ENV_PREFIX, ConfigError, ServeConfig, add_arguments
from nvfp4_prep.server.device_probe import LIVENESS_NAME
from nvfp4_prep.server.metrics import Metrics
from nvfp4_prep.server.server import HEALTH_NAMES, SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS_ENV = DEPLOY / "tools-env"
# The oldest Kubernetes these manifests support (native gRPC probes are GA
# from 1.27) and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Rendered variants that run the server: the overlays, and overlays with opt-in components.
OVERLAYS = DEPLOY / "overlays"
COMPONENTS = DEPLOY / "components"
SERVER_SOURCES = {
    "dev": (OVERLAYS / "dev", ()),
    "blackwell": (OVERLAYS / "blackwell", ()),
    "blackwell-tls": (OVERLAYS / "blackwell", ("tls",)),
    "blackwell-knobs": (OVERLAYS / "blackwell", ("nvidia-runtime", "priority")),
    "blackwell-monitoring": (OVERLAYS / "blackwell-monitoring", ()),
    "blackwell-monitoring-tls": (OVERLAYS / "blackwell-monitoring", ("tls",)),
    "blackwell-keda": (OVERLAYS / "blackwell-monitoring", ("keda",)),
}
VARIANTS = tuple(SERVER_SOURCES)
# Variants with the ServiceMonitor (the KEDA one is over blackwell-monitoring).
MONITORED = ("blackwell-monitoring", "blackwell-monitoring-tls", "blackwell-keda")
# What is applied beside the server: the volumes and the prepare Job.
OTHER_SOURCES = {"volumes": DEPLOY / "volumes", "prepare-job": DEPLOY / "jobs" / "prepare"}
# Custom resources, each from an opt-in part: kubernetes-validate has no schema for them (checked by hand below).
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com", "ScaledObject": "keda.sh"}
# API groups every cluster serves; "" is the core group (apiVersion v1).
BUILT_IN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "scheduling.k8s.io"}
# Variants that must apply on a cluster with no operator installed.
PLAIN_VARIANTS = ("dev", "blackwell", "blackwell-tls", "blackwell-knobs", "volumes", "prepare-job")


def tools(*command: str, timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Runs ``command`` inside deploy/tools-env (which installs the tools on first use)."""
    result = subprocess.run([str(TOOLS_ENV), *command], capture_output=True, text=True, timeout=timeout,
                            cwd=ROOT, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def load_yaml(path: Path) -> list[dict]:
    """YAML documents as dicts, parsed by PyYAML from the tools' environment."""
    script = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)"
    return json.loads(tools("python", "-c", script, str(path)).stdout)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant's ``kubectl kustomize`` output, as a file."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found on PATH: it renders the Kustomize overlays (machine image's "
                    "google-cloud-cli kubectl, or any kubectl >= 1.27)")
    out = tmp_path_factory.mktemp("rendered")
    sources = dict(OTHER_SOURCES)
    for name, (overlay, components) in SERVER_SOURCES.items():
        if not components:
            sources[name] = overlay
            continue
        # What a user does to turn components on: a kustomization over the overlay that lists them.
        combined = out / f"{name}-kustomization"
        combined.mkdir()
        (combined / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources: [{os.path.relpath(overlay, combined)}]\n"
            f"components: [{', '.join(os.path.relpath(COMPONENTS / c, combined) for c in components)}]\n")
        sources[name] = combined
    files = {}
    for name, source in sources.items():
        result = subprocess.run([kubectl, "kustomize", str(source)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"kubectl kustomize {source}:\n{result.stderr}"
        files[name] = out / f"{name}.yaml"
        files[name].write_text(result.stdout)
    return files


@pytest.fixture(scope="session")
def manifests(rendered: dict[str, Path]) -> dict[str, dict[tuple[str, str], dict]]:
    """Each variant's objects by (kind, name)."""
    return {name: {(doc["kind"], doc["metadata"]["name"]): doc for doc in load_yaml(path)}
            for name, path in rendered.items()}


@pytest.fixture(scope="session")
def checkov(rendered: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One checkov run over every rendered variant and the Dockerfile (reports per framework)."""
    scan = tmp_path_factory.mktemp("checkov")
    for name, path in rendered.items():
        shutil.copy(path, scan / f"{name}.yaml")
    shutil.copy(ROOT / "Dockerfile", scan / "Dockerfile")
    result = tools("checkov", "--directory", str(scan), "--framework", "kubernetes", "dockerfile",
                   "--skip-download", "--output", "json", check=False)
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return reports if isinstance(reports, list) else [reports]


def deployment(objects: dict) -> dict:
    return objects["Deployment", "nvfp4-prep"]


def server_container(objects: dict) -> dict:
    (container,) = [c for c in deployment(objects)["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return container


def settings(objects: dict) -> dict[str, str]:
    """The NVFP4_PREP_* environment the server container gets: the ConfigMap, then its own env."""
    container = server_container(objects)
    environ: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        environ.update(objects["ConfigMap", name]["data"])
    for item in container.get("env", []):  # a value from the downward API (the pod's IP) stands as its field path
        field = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        environ[item["name"]] = item["value"] if "value" in item else f"$({field})"
    return environ


def serve_help() -> str:
    """``nvfp4-prep serve``'s flag help, whitespace folded; each flag names its variable as ``[env NAME]``."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return " ".join(parser.format_help().split())


def effective_config(objects: dict, model_store: Path) -> ServeConfig:
    """What the server would run with; the allowed roots (mount paths that exist only in the pod)
    point at ``model_store`` instead, and are checked against the mounts separately."""
    environ = dict(settings(objects))
    if ENV_PREFIX + "ALLOWED_ROOT" in environ:
        environ[ENV_PREFIX + "ALLOWED_ROOT"] = str(model_store)
    for name in ("TLS_CERT", "TLS_KEY", "TLS_CLIENT_CA"):  # files from the Secret, likewise
        environ.pop(ENV_PREFIX + name, None)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return ServeConfig.from_args(parser.parse_args([]), environ)


def size(quantity: str) -> int:
    """Bytes from a Kubernetes memory quantity such as ``48Gi`` or ``512M``."""
    match = re.fullmatch(r"(\d+)([KMGTE]i?)?", quantity)
    assert match, f"unexpected quantity {quantity!r}"
    units = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(match[1]) * units[match[2]]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


# --- rendering and schemas ------------------------------------------------------------------------

def test_every_overlay_and_component_is_rendered_here():
    overlays = {path.name for path in OVERLAYS.iterdir() if path.is_dir()}
    components = {path.name for path in COMPONENTS.iterdir() if path.is_dir()}
    rendered_overlays = {overlay.name for overlay, _ in SERVER_SOURCES.values()}
    rendered_components = {component for _, parts in SERVER_SOURCES.values() for part in [parts] for component in part}
    rendered_components.add("servicemonitor")  # comes with blackwell-monitoring
    assert overlays == rendered_overlays, "render and check the new overlay in SERVER_SOURCES"
    assert components == rendered_components, "render and check the new component in SERVER_SOURCES"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_every_object(manifests, variant):
    kinds = sorted(kind for kind, _ in manifests[variant])
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy",
                "PodDisruptionBudget", "Service", "Service", "ServiceAccount"]
    if variant in MONITORED:
        expected.append("ServiceMonitor")
    if variant == "blackwell-keda":
        expected.remove("HorizontalPodAutoscaler")  # KEDA makes its own from the ScaledObject
        expected.append("ScaledObject")
    if variant == "blackwell-knobs":
        expected.append("PriorityClass")
    if variant == "dev":
        expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)


def api_group(document: dict) -> str:
    return document["apiVersion"].rpartition("/")[0]


@pytest.mark.parametrize("variant", PLAIN_VARIANTS)
def test_variant_applies_without_any_operator(manifests, variant):
    # `kubectl apply -k deploy/overlays/blackwell` on a cluster without the Prometheus Operator (or KEDA): every
    # object is of a built-in API group, so no "no matches for kind" error.
    custom = sorted(f"{document['apiVersion']} {kind}" for (kind, _), document in manifests[variant].items()
                    if api_group(document) not in BUILT_IN_GROUPS)
    assert not custom, f"{variant} needs custom resource definitions: {custom}"


@pytest.mark.parametrize(("variant", "kind"), [("blackwell-monitoring", "ServiceMonitor"),
                                               ("blackwell-keda", "ScaledObject")])
def test_custom_resources_come_only_with_their_component(manifests, variant, kind):
    custom = {(kind, api_group(document)) for (kind, _), document in manifests[variant].items()
              if api_group(document) not in BUILT_IN_GROUPS}
    assert (kind, CRD_KINDS[kind]) in custom
    assert {kind for kind, _ in custom} <= CRD_KINDS.keys()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(rendered, version):
    result = tools("kubernetes-validate", "--strict", "--quiet", "-k", version, *map(str, rendered.values()),
                   check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Custom resources have no schema there: a warning each, and nothing else.
    for line in result.stdout.splitlines():
        assert line.startswith("WARN") and any(f"kind {kind} " in line for kind in CRD_KINDS), line


def test_schema_validation_rejects_a_broken_manifest(manifests, tmp_path):
    # A named port where the gRPC probe takes a number, and a misspelt field.
    broken = json.loads(json.dumps(deployment(manifests["blackwell"])))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"
    container["resource"] = container.pop("resources")
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = tools("kubernetes-validate", "--strict", "-k", KUBERNETES_VERSIONS[-1], str(path), check=False)
    assert result.returncode != 0
    assert "ERROR" in result.stdout



@pytest.mark.parametrize("variant", MONITORED)
def test_servicemonitor_scrapes_the_metrics_port(manifests, variant):
    objects = manifests[variant]
    monitor = objects["ServiceMonitor", "nvfp4-prep"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [service for (kind, _), service in objects.items()
                if kind == "Service" and selector.items() <= service["metadata"].get("labels", {}).items()]
    assert [s["metadata"]["name"] for s in selected] == ["nvfp4-prep"]
    ports = {port["name"]: port for port in selected[0]["spec"]["ports"]}
    container_ports = {port["name"]: port["containerPort"] for port in server_container(objects)["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert container_ports[ports[endpoint["port"]]["targetPort"]] == effective_config(objects, ROOT).metrics_port
        assert endpoint["path"] == "/metrics"


def image_registry(image: str) -> str:
    """The registry host of an image reference, "" for a short name (which Docker Hub would serve)."""
    first, slash, _ = image.partition("/")
    return first if slash and ("." in first or ":" in first or first == "localhost") else ""


def pod_containers(objects: dict) -> list[dict]:
    return [container for (kind, _), document in objects.items() if kind in ("Deployment", "Job")
            for container in document["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("variant", [*VARIANTS, "prepare-job"])
def test_images_name_a_registry_and_a_tag(manifests, variant):
    # A short name resolves to Docker Hub, where anybody may own "nvfp4-prep"; the overlays set placeholders.
    for container in pod_containers(manifests[variant]):
        image = container["image"]
        assert image_registry(image), f"{variant}: {image} names no registry"
        assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", image), f"{variant}: {image} has no tag or digest"
    readme = (DEPLOY / "README.md").read_text()
    assert "kustomize edit set image" in readme


def test_production_images_are_a_placeholder_that_resolves_nowhere(manifests):
    images = {container["image"] for variant in ("blackwell", "prepare-job")
              for container in pod_containers(manifests[variant])}
    assert len(images) == 1, "the Job runs the servers' image"
    (image,) = images
    assert image_registry(image).endswith(".invalid"), image  # RFC 2606: never a real host
    assert image in (DEPLOY / "README.md").read_text()


# --- agreement with the server --------------------------------------------------------------------

# The TLS component sets --tls-cert, --tls-key and --health-port, which the server does not have yet;
# strict, so the mark must go once they land.
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_is_a_serve_flag_with_a_valid_value(manifests, variant, tmp_path):
    documented = serve_help()
    names = [name for name in settings(manifests[variant]) if name.startswith(ENV_PREFIX)]
    assert names
    unknown = [name for name in names if f"[env {name}]" not in documented]
    assert not unknown, f"no `nvfp4-prep serve` flag reads {unknown}"
    try:
        effective_config(manifests[variant], tmp_path)
    except ConfigError as err:
        pytest.fail(f"{variant}: the server would refuse to start: {err}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_and_probes_agree_with_the_server(manifests, variant, tmp_path):
    objects = manifests[variant]
    config = effective_config(objects, tmp_path)
    environ = settings(objects)
    health_port = int(environ.get(ENV_PREFIX + "HEALTH_PORT", 0)) or config.port
    container = server_container(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == config.port
    assert ports["metrics"] == config.metrics_port
    assert config.bulk_address is not None and ports["bulk"] == config.bulk_address[1]
    assert environ[ENV_PREFIX + "BULK_ADVERTISE_HOST"] == "$(status.podIP)", "offers name the pod, not the Service"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
        assert container[probe]["grpc"].get("service", "") in HEALTH_NAMES, probe
    # Readiness follows the Prep service, which turns NOT_SERVING while the server drains; liveness the name the
    # device probe turns NOT_SERVING when the GPU stops answering.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_NAME
    for name in ("nvfp4-prep", "nvfp4-prep-headless"):
        for port in objects["Service", name]["spec"]["ports"]:
            assert port["targetPort"] in ports
            assert port["port"] == ports[port["targetPort"]], f"{name} port {port['name']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_drain_fits_in_the_termination_grace(manifests, variant, tmp_path):
    objects = manifests[variant]
    config = effective_config(objects, tmp_path)
    pod = deployment(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = pod["terminationGracePeriodSeconds"]
    assert pre_stop + config.drain_timeout < grace
    # Health turns NOT_SERVING for the whole drain: liveness must not restart a draining pod.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= grace


@pytest.mark.parametrize("variant", VARIANTS)
def test_allowed_roots_are_read_only_model_store_mounts(manifests, variant):
    objects = manifests[variant]
    roots = settings(objects)[ENV_PREFIX + "ALLOWED_ROOT"].split(":")
    pod = deployment(objects)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in server_container(objects)["volumeMounts"]}
    for root in roots:
        mount = mounts[root]
        assert mount.get("readOnly") is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["readOnly"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_host_memory_settings_fit_the_memory_limit(manifests, variant, tmp_path):
    objects = manifests[variant]
    config = effective_config(objects, tmp_path)
    resources = server_container(objects)["resources"]
    limit = size(resources["limits"]["memory"])
    assert size(resources["requests"]["memory"]) == limit  # memory is not overcommitted
    host_bytes = config.cache_bytes
    if "cpu" in config.devices:
        # On the CPU the memory budget is host memory too, and "auto" would read the node's size.
        assert config.memory_budget is not None, "set NVFP4_PREP_MEMORY_BUDGET for a CPU deployment"
        host_bytes += config.memory_budget
    assert host_bytes < limit * 0.75


def test_blackwell_gets_one_gpu_on_a_blackwell_node(manifests, tmp_path):
    objects = manifests["blackwell"]
    pod = deployment(objects)["spec"]["template"]["spec"]
    resources = server_container(objects)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    for term in terms:
        (product,) = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.product"]
        assert product["operator"] == "In" and product["values"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert effective_config(objects, tmp_path).devices == ("cuda:0",)


def test_dev_runs_on_cpu_without_gpu_scheduling(manifests, tmp_path):
    objects = manifests["dev"]
    pod = deployment(objects)["spec"]["template"]["spec"]
    resources = server_container(objects)["resources"]
    assert not any("nvidia.com" in key for part in resources.values() for key in part)
    assert "affinity" not in pod and "tolerations" not in pod
    assert effective_config(objects, tmp_path).devices == ("cpu",)


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_budget_autoscaler_and_network_policy_select_the_pods(manifests, variant):
    objects = manifests[variant]
    pod_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    headless = objects["Service", "nvfp4-prep-headless"]["spec"]
    assert headless["clusterIP"] == "None" and not headless.get("publishNotReadyAddresses")
    assert [port["name"] for port in headless["ports"]] == ["grpc", "bulk"]
    for name in ("nvfp4-prep", "nvfp4-prep-headless"):
        assert objects["Service", name]["spec"]["selector"].items() <= pod_labels.items()
    budget = objects["PodDisruptionBudget", "nvfp4-prep"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    if ("ScaledObject", "nvfp4-prep") in objects:
        scaled = objects["ScaledObject", "nvfp4-prep"]["spec"]
        assert scaled["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nvfp4-prep"}
        assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    else:
        scaler = objects["HorizontalPodAutoscaler", "nvfp4-prep"]["spec"]
        assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nvfp4-prep"}
        assert 1 <= scaler["minReplicas"] <= scaler["maxReplicas"]
    assert "replicas" not in deployment(objects)["spec"]  # the autoscaler owns the count

    policy = objects["NetworkPolicy", "nvfp4-prep"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["egress"] == []
    grpc_rules = [rule for rule in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]
    assert grpc_rules
    bulk_rules = [rule for rule in policy["ingress"] if {"port": "bulk", "protocol": "TCP"} in rule["ports"]]
    assert bulk_rules == grpc_rules, "the bulk port admits whom the gRPC port admits"
    for rule in grpc_rules:
        for peer in rule["from"]:
            assert peer["podSelector"]["matchExpressions"] == [
                {"key": "nvfp4-prep/client", "operator": "In", "values": ["true"]}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_runs_as_the_image_user_with_a_read_only_root(manifests, variant):
    objects = manifests[variant]
    pod = deployment(objects)["spec"]["template"]["spec"]
    container = server_container(objects)
    instructions = dockerfile()
    user = [args for keyword, args in instructions if keyword == "USER"][-1]
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Writable scratch where torch and friends write: /tmp and $HOME/.cache.
    home = [m.group(1) for keyword, args in instructions if keyword == "ENV"
            for m in [re.search(r"\bHOME=(\S+)", args)] if m][-1]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    writable = {mount["mountPath"] for mount in container["volumeMounts"]
                if "emptyDir" in volumes[mount["name"]] and not mount.get("readOnly")}
    assert {"/tmp", f"{home}/.cache"} <= writable


def emptydir_bytes(pod: dict, container: dict) -> int:
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return sum(size(volumes[mount["name"]]["emptyDir"]["sizeLimit"]) for mount in container["volumeMounts"]
               if "emptyDir" in volumes[mount["name"]])


@pytest.mark.parametrize("variant", [*VARIANTS, "prepare-job"])
def test_ephemeral_storage_is_requested_and_covers_the_scratch_volumes(manifests, variant):
    for (kind, _), document in manifests[variant].items():
        if kind not in ("Deployment", "Job"):
            continue
        pod = document["spec"]["template"]["spec"]
        for container in pod["containers"]:
            resources = container["resources"]
            request = size(resources["requests"]["ephemeral-storage"])
            limit = size(resources["limits"]["ephemeral-storage"])
            # emptyDirs are node disk too; the rest is for logs.
            assert emptydir_bytes(pod, container) < request <= limit, (variant, kind)


def test_knobs_set_the_runtime_class_and_a_priority_class_that_exists(manifests):
    objects = manifests["blackwell-knobs"]
    pod = deployment(objects)["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    priority = objects["PriorityClass", pod["priorityClassName"]]
    assert priority["value"] > 0 and priority["globalDefault"] is False
    plain = deployment(manifests["blackwell"])["spec"]["template"]["spec"]
    assert "runtimeClassName" not in plain and "priorityClassName" not in plain  # opt-in: a missing class refuses pods
    readme = (DEPLOY / "README.md").read_text()
    assert "runtimeClassName" in readme and "priorityClassName" in readme


def served_metric_names() -> set[str]:
    """The metric family names a server's /metrics page has (its real registry)."""
    return {family.name for family in Metrics(["cpu"]).registry.collect()}


def test_autoscaling_scales_on_served_in_flight_metrics(manifests):
    served = served_metric_names()
    adapter = load_yaml(DEPLOY / "autoscaling" / "prometheus-adapter-rules.yaml")[0]["rules"]["custom"]
    exposed = {}
    for rule in adapter:
        (series,) = re.findall(r"^(\w+)\{", rule["seriesQuery"])
        assert series in served, f"prometheus-adapter rule reads {series}, which the server does not serve"
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        exposed[rule["name"]["as"]] = rule
    for variant in ("dev", "blackwell", "blackwell-monitoring"):
        scaler = manifests[variant]["HorizontalPodAutoscaler", "nvfp4-prep"]["spec"]
        for metric in scaler["metrics"]:
            assert metric["type"] == "Pods", "scale on what limits a pod, not on CPU"
            assert metric["pods"]["metric"]["name"] in exposed, "no prometheus-adapter rule serves it"
    scaled = manifests["blackwell-keda"]["ScaledObject", "nvfp4-prep"]["spec"]
    for trigger in scaled["triggers"]:
        assert trigger["type"] == "prometheus"
        names = set(re.findall(r"\b(nvfp4_prep_\w+)\{", trigger["metadata"]["query"]))
        assert names and names <= served, names - served
        namespace = re.search(r'namespace="([^"]+)"', trigger["metadata"]["query"])[1]
        assert namespace == manifests["blackwell-keda"]["Deployment", "nvfp4-prep"]["metadata"]["namespace"]


def test_volumes_are_the_claims_the_servers_and_the_job_mount(manifests):
    claims = {name: document["spec"] for (kind, name), document in manifests["volumes"].items()
              if kind == "PersistentVolumeClaim"}
    assert claims["nvfp4-prep-models"]["accessModes"] == ["ReadOnlyMany"]
    assert claims["nvfp4-prep-prepared"]["accessModes"] == ["ReadWriteMany"]
    namespaces = {document["metadata"]["namespace"] for document in manifests["volumes"].values()}
    assert namespaces == {deployment(manifests["blackwell"])["metadata"]["namespace"]}
    server_claims = {volume["persistentVolumeClaim"]["claimName"]
                     for volume in deployment(manifests["blackwell"])["spec"]["template"]["spec"]["volumes"]
                     if "persistentVolumeClaim" in volume}
    job = manifests["prepare-job"]["Job", "nvfp4-prep-prepare"]
    job_claims = {volume["persistentVolumeClaim"]["claimName"] for volume in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in volume}
    assert server_claims | job_claims == claims.keys()
    assert job["metadata"]["namespace"] in namespaces


def job_environment(objects: dict) -> tuple[dict, dict[str, str]]:
    job = objects["Job", "nvfp4-prep-prepare"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    environ: dict[str, str] = {}
    for source in container["envFrom"]:
        environ.update(objects["ConfigMap", source["configMapRef"]["name"]]["data"])
    return container, environ


def test_prepare_job_is_a_client_and_never_a_server_pod(manifests):
    job = manifests["prepare-job"]["Job", "nvfp4-prep-prepare"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    objects = manifests["blackwell"]
    selectors = [objects["Service", "nvfp4-prep"]["spec"]["selector"],
                 objects["Service", "nvfp4-prep-headless"]["spec"]["selector"],
                 objects["PodDisruptionBudget", "nvfp4-prep"]["spec"]["selector"]["matchLabels"],
                 objects["NetworkPolicy", "nvfp4-prep"]["spec"]["podSelector"]["matchLabels"]]
    for selector in selectors:
        assert not selector.items() <= labels.items(), f"the Job's pods would be selected by {selector}"
    assert labels.get("nvfp4-prep/client") == "true"  # admitted by the servers' NetworkPolicy
    # Its own policy: nothing in, out only to the servers' gRPC and bulk ports (and DNS); the CLI asks for bulk.
    policy = manifests["prepare-job"]["NetworkPolicy", "nvfp4-prep-prepare"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["ingress"] == []
    server_labels = deployment(objects)["spec"]["template"]["metadata"]["labels"]
    for port in ("grpc", "bulk"):
        assert any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= server_labels.items()
                   and "namespaceSelector" not in peer and {"port": port, "protocol": "TCP"} in rule["ports"]
                   for rule in policy["egress"] for peer in rule["to"]), port
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    container, environ = job_environment(manifests["prepare-job"])
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    assert environ[ENV_PREFIX + "CHECKPOINT"].startswith("/models/")
    assert environ[ENV_PREFIX + "OUT"].startswith("/prepared/")
    assert not mounts["/prepared"].get("readOnly")
    server = environ[ENV_PREFIX + "SERVER"]
    headless = objects["Service", "nvfp4-prep-headless"]
    assert server == f"dns:///{headless['metadata']['name']}:{headless['spec']['ports'][0]['port']}"


def test_prepare_job_runs_its_command_with_its_settings(manifests, start_server, tmp_path):
    # The Job's command and settings, run for real: /models and /prepared are folders here, the checkpoint is the
    # CLI's bundled sample, and the server is a real one on loopback in place of the headless Service.
    container, environ = job_environment(manifests["prepare-job"])
    assert container["command"][:2] == ["nvfp4-prep", "prepare"]
    roots = {"/models": tmp_path / "models", "/prepared": tmp_path / "prepared"}
    environ = {name: str(roots[value[:value.index("/", 1)]]) + value[value.index("/", 1):]
               if value.startswith(tuple(roots)) else value for name, value in environ.items()}
    sample = ROOT / "client" / "nvfp4_prep" / "cli" / "sample" / "qwen3moe_ct_nvfp4"
    shutil.copytree(sample, environ[ENV_PREFIX + "CHECKPOINT"])
    roots["/prepared"].mkdir()
    environ[ENV_PREFIX + "SERVER"] = start_server().address
    script = Path(sys.executable).with_name(container["command"][0])
    result = subprocess.run([str(script), *container["command"][1:]], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **environ}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = Path(environ[ENV_PREFIX + "OUT"])
    assert any(out.glob("*.safetensors")), sorted(p.name for p in out.iterdir())


# --- the Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_lints_clean():
    result = tools("hadolint", "--no-color", str(ROOT / "Dockerfile"), check=False)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_agrees_with_the_server_and_the_package():
    instructions = dockerfile()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = ServeConfig.from_args(parser.parse_args([]), {})
    exposed = {int(port) for keyword, args in instructions if keyword == "EXPOSE" for port in args.split()}
    assert exposed == {defaults.port, defaults.metrics_port}
    (entrypoint,) = [json.loads(args) for keyword, args in instructions if keyword == "ENTRYPOINT"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert entrypoint[0] in project["scripts"] and entrypoint[1:] == ["serve"]


TORCH_LOCK = DEPLOY / "requirements-torch.txt"
SERVER_LOCK = DEPLOY / "requirements-server.txt"


def lock_pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """A hashed lock's pins by normalised name: (version, its sha256 hashes)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)(.*)", line)
        if match:
            pins[match[1].lower().replace("_", "-")] = (match[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", match[3]))
    return pins


def test_base_image_is_fully_qualified_and_cuda_comes_from_torch_alone():
    (base,) = [args for keyword, args in dockerfile() if keyword == "FROM"]
    # podman and containerd refuse short names; docker.io/library/ is what Docker would have guessed.
    registry, _, rest = base.partition("/")
    assert "." in registry and ":" in rest, base
    assert "cuda" not in base.lower(), f"{base}: CUDA comes from torch's wheels; a CUDA base image doubles it"
    runs = " ".join(args for keyword, args in dockerfile() if keyword == "RUN")
    assert "apt-get" not in runs and "cuda" not in runs.lower()
    torch_pins, server_pins = lock_pins(TORCH_LOCK), lock_pins(SERVER_LOCK)
    cuda = sorted(name for name in torch_pins.keys() | server_pins.keys() if name.startswith(("nvidia-", "cuda-")))
    assert cuda and not any(name in server_pins for name in cuda), "CUDA libraries only through torch's lock"
    (runtime,) = [version for name, (version, _) in torch_pins.items()
                  if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name)]
    # The first CUDA with Blackwell (sm_100, sm_120); the torch pin is the one in requirements-torch.in.
    assert tuple(int(part) for part in runtime.split(".")[:2]) >= (12, 8)
    (torch_in,) = [line for line in (DEPLOY / "requirements-torch.in").read_text().splitlines()
                   if line.startswith("torch==")]
    assert torch_pins["torch"][0] == torch_in.removeprefix("torch==")


def test_image_has_no_flashinfer_since_the_server_never_imports_it():
    imported = set()
    for path in (ROOT / "server").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert "flashinfer" not in imported, "the server imports FlashInfer: install it in the image again"
    pins = lock_pins(TORCH_LOCK) | lock_pins(SERVER_LOCK)
    assert not [name for name in pins if "flashinfer" in name or "cutlass" in name]


def test_every_pip_step_installs_hashed_pins_only():
    # Each RUN's pip command, up to a following `&& ...`.
    steps = [args.split("&&")[0].strip() for keyword, args in dockerfile()
             if keyword == "RUN" and "pip install" in args]
    copied = {source for keyword, args in dockerfile() if keyword == "COPY" for source in args.split()[:-1]}
    locks = []
    for step in steps:
        if "-r " in step:
            assert "--require-hashes" in step and "--no-deps" in step, step
            locks.append(re.search(r"-r (\S+)", step)[1])
        else:  # the package itself, from the copied sources: nothing may come from an index
            assert "--no-deps" in step and "--no-index" in step and step.split()[-1] in (".", "./"), step
    assert locks == [str(TORCH_LOCK.relative_to(ROOT)), str(SERVER_LOCK.relative_to(ROOT))]
    assert set(locks) <= copied
    for lock in (TORCH_LOCK, SERVER_LOCK):
        assert "deploy/lock-image" in lock.read_text().split("\n\n")[0], f"{lock.name} is written by deploy/lock-image"
        pins = lock_pins(lock)
        assert pins and all(hashes for _, hashes in pins.values()), f"{lock.name}: a pin without a hash"
    assert not lock_pins(TORCH_LOCK).keys() & lock_pins(SERVER_LOCK).keys(), "each package in one layer only"


def test_locks_pin_every_dependency_within_the_package_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {name: version for name, (version, _) in (lock_pins(TORCH_LOCK) | lock_pins(SERVER_LOCK)).items()}
    # The last pip step builds the package without build isolation: its build backend comes from the lock.
    for spec in project["project"]["dependencies"] + project["build-system"]["requires"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not locked by deploy/lock-image"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {spec}"


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    let_in = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {source for keyword, args in dockerfile() if keyword == "COPY" for source in args.split()[:-1]}
    assert copied == let_in


# --- policy scan ----------------------------------------------------------------------------------

def test_policy_scan_finds_nothing_unlisted(checkov):
    readme = (DEPLOY / "README.md").read_text()
    frameworks = {report["check_type"]: report for report in checkov}
    assert set(frameworks) == {"kubernetes", "dockerfile"}
    for name, report in frameworks.items():
        summary = report["summary"]
        assert summary["parsing_errors"] == 0 and summary["passed"] > 0, (name, summary)
        failed = [(c["check_id"], c["resource"], c["check_name"]) for c in report["results"]["failed_checks"]]
        assert not failed, f"{name}: fix these or skip them with a reason listed in deploy/README.md: {failed}"
        for check in report["results"]["skipped_checks"]:
            assert f"`{check['check_id']}`" in readme, f"{check['check_id']} is skipped without a reason in the README"


def test_hadolint_exceptions_are_listed_with_reasons():
    readme = (DEPLOY / "README.md").read_text()
    ignored = re.findall(r"#\s*hadolint ignore=([\w,]+)", (ROOT / "Dockerfile").read_text())
    assert ignored
    for rule in ",".join(ignored).split(","):
        assert f"`{rule}`" in readme, f"hadolint {rule} is ignored without a reason in deploy/README.md"
