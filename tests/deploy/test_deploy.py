"""The deployment: every overlay renders, validates against the Kubernetes schemas, passes the
policy scan, and agrees with the server it runs; the Dockerfile lints clean and agrees too.

Rendering uses the machine's kubectl (its built-in kustomize); kubernetes-validate, hadolint and
checkov come from their own virtual environment, made by deploy/tools-env. A missing tool fails
these tests with a message saying so; nothing is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nvfp4_prep.server.config import ENV_PREFIX, ConfigError, ServeConfig, add_arguments
from nvfp4_prep.server.server import HEALTH_NAMES, SERVICE_NAME

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS_ENV = DEPLOY / "tools-env"
# The oldest Kubernetes these manifests support (native gRPC probes are GA
# from 1.27) and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Rendered variants: the two overlays, and blackwell with the TLS component.
VARIANTS = ("dev", "blackwell", "blackwell-tls")
CRD_KINDS = {"ServiceMonitor"}  # no schema in kubernetes-validate; checked by hand below


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
    with_tls = out / "blackwell-tls-kustomization"
    with_tls.mkdir()
    (with_tls / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(DEPLOY / 'overlays' / 'blackwell', with_tls)}]\n"
        f"components: [{os.path.relpath(DEPLOY / 'components' / 'tls', with_tls)}]\n")
    sources = {"dev": DEPLOY / "overlays" / "dev", "blackwell": DEPLOY / "overlays" / "blackwell",
               "blackwell-tls": with_tls}
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
    environ.update({item["name"]: item["value"] for item in container.get("env", [])})
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
    overlays = {path.name for path in (DEPLOY / "overlays").iterdir() if path.is_dir()}
    components = {path.name for path in (DEPLOY / "components").iterdir() if path.is_dir()}
    assert overlays == {"dev", "blackwell"}, "render and check the new overlay in VARIANTS"
    # servicemonitor comes with blackwell, tls with blackwell-tls.
    assert components == {"servicemonitor", "tls"}, "render and check the new component in VARIANTS"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_every_object(manifests, variant):
    kinds = sorted(kind for kind, _ in manifests[variant])
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "NetworkPolicy",
                "PodDisruptionBudget", "Service", "Service", "ServiceAccount"]
    if variant.startswith("blackwell"):
        expected.append("ServiceMonitor")
    if variant == "dev":
        expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(rendered, version):
    result = tools("kubernetes-validate", "--strict", "--quiet", "-k", version, *map(str, rendered.values()),
                   check=False)
    assert result.returncode == 0, result.stdout + result.stderr
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


@pytest.mark.parametrize("variant", ["blackwell", "blackwell-tls"])
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
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == health_port, probe
        assert container[probe]["grpc"].get("service", "") in HEALTH_NAMES, probe
    # Readiness follows the Prep service, which turns NOT_SERVING while the server drains.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
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
    assert [port["name"] for port in headless["ports"]] == ["grpc"]
    for name in ("nvfp4-prep", "nvfp4-prep-headless"):
        assert objects["Service", name]["spec"]["selector"].items() <= pod_labels.items()
    budget = objects["PodDisruptionBudget", "nvfp4-prep"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    scaler = objects["HorizontalPodAutoscaler", "nvfp4-prep"]["spec"]
    assert scaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nvfp4-prep"}
    assert 1 <= scaler["minReplicas"] <= scaler["maxReplicas"]
    assert "replicas" not in deployment(objects)["spec"]  # the autoscaler owns the count

    policy = objects["NetworkPolicy", "nvfp4-prep"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["egress"] == []
    grpc_rules = [rule for rule in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in rule["ports"]]
    assert grpc_rules
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


def test_base_image_cuda_matches_the_pinned_torch_and_supports_blackwell():
    (base,) = [args for keyword, args in dockerfile() if keyword == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", base)
    assert match, base
    image_cuda = (int(match[1]), int(match[2]))
    assert image_cuda >= (12, 8)  # the first CUDA with Blackwell (sm_100, sm_120)
    pins = constraint_pins()
    # torch's wheels name their CUDA through the runtime they depend on.
    (runtime,) = [version for name, version in pins.items() if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name)]
    assert tuple(int(part) for part in runtime.split(".")[:2]) == image_cuda


def constraint_pins() -> dict[str, str]:
    lines = (DEPLOY / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_constraints_pin_every_dependency_within_the_package_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = constraint_pins()
    assert pins["flashinfer-python"] == "0.7.2.post1"
    for spec in project["dependencies"] + project["optional-dependencies"]["flashinfer"]:
        requirement = Requirement(spec)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
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
