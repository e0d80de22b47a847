"""Reading rendered Kubernetes objects for tests/deploy: workloads, their environment as the kubelet expands it,
their /secrets mount, label selectors and NetworkPolicy semantics (what a pod may reach, on which port)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import yaml

WORKLOADS = ("Deployment", "DaemonSet")
LABEL_REF = re.compile(r"metadata\.labels\['([^']+)'\]")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def load(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def named(objects: list[dict], *kinds: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in kinds}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: dict) -> dict:
    (only,) = pod_spec(workload)["containers"]  # one container per pod
    return only


def environment(workload: dict) -> dict[str, str]:
    """The container's variables as the kubelet sets them: label fieldRefs read, ``$(VAR)`` of earlier ones expanded."""
    env: dict[str, str] = {}
    for item in container(workload).get("env", []):
        if "valueFrom" in item:
            (label,) = LABEL_REF.fullmatch(item["valueFrom"]["fieldRef"]["fieldPath"]).groups()
            env[item["name"]] = pod_labels(workload)[label]
        else:
            env[item["name"]] = VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
    return env


def ports(workload: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(workload).get("ports", [])}


def probes(workload: dict) -> dict[str, dict]:
    return {kind: container(workload)[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")
            if f"{kind}Probe" in container(workload)}


def mounts(workload: dict) -> dict[str, dict]:
    """mount path -> the pod volume mounted there (with the mount's readOnly)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    return {m["mountPath"]: {**volumes[m["name"]], "readOnly": m.get("readOnly", False)}
            for m in container(workload).get("volumeMounts", [])}


def mounted_files(volume: dict) -> dict[str, tuple[str, str, str]]:
    """Path inside a secret or projected volume -> (kind, object name, key)."""
    sources = volume["projected"]["sources"] if "projected" in volume else [volume]
    files = {}
    for source in sources:
        kind, ref = ("Secret", source["secret"]) if "secret" in source else ("ConfigMap", source["configMap"])
        name = ref.get("secretName") or ref.get("name")
        for item in ref["items"]:
            files[item["path"]] = (kind, name, item["key"])
    return files


def data(obj: dict) -> dict[str, bytes]:
    """A Secret's or ConfigMap's contents, decoded."""
    if obj["kind"] == "Secret":
        return {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
    return {k: v.encode() for k, v in obj.get("data", {}).items()}


def secret_paths(texts) -> set[str]:
    """Every /secrets/... path named in some strings (commands, settings, a configuration file)."""
    return {w.strip("\"'();") for text in texts for w in re.split(r"[\s=]", str(text))
            if w.strip("\"'();").startswith("/secrets/")}


def relative(path: str) -> str:
    return str(PurePosixPath(path).relative_to("/secrets"))


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions) against labels; {} selects everything."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod's labels and its namespace's (None: not a pod, e.g. an outside client)."""

    name: str
    labels: dict = field(default_factory=dict, hash=False)
    namespace_labels: dict | None = field(default=None, hash=False)


def _peer_matches(peer: dict, other: Endpoint, namespace: dict) -> bool:
    if "ipBlock" in peer:
        return other.namespace_labels is None  # the tests' outside clients; no policy here names an ipBlock
    if other.namespace_labels is None:
        return False
    ns_ok = selects(peer["namespaceSelector"], other.namespace_labels) if "namespaceSelector" in peer \
        else other.namespace_labels == namespace
    return ns_ok and selects(peer.get("podSelector", {}), other.labels)


def _allows(rules: list[dict], peers_key: str, other: Endpoint, port: int, protocol: str, namespace: dict) -> bool:
    for rule in rules:
        peers = rule.get(peers_key)
        if peers and not any(_peer_matches(p, other, namespace) for p in peers):
            continue
        wanted = rule.get("ports")
        if not wanted or any(p.get("port") == port and p.get("protocol", "TCP") == protocol for p in wanted):
            return True
    return False


def allowed(policies: list[dict], src: Endpoint, dst: Endpoint, port: int, namespace: dict,
            protocol: str = "TCP") -> bool:
    """Whether NetworkPolicies (all in ``namespace``) let ``src`` open a connection to ``dst``:``port``."""
    def side(pod: Endpoint, direction: str, peers_key: str, other: Endpoint) -> bool:
        if pod.namespace_labels != namespace:
            return True  # outside the namespace: these policies do not isolate it
        chosen = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], pod.labels)
                  and direction in p["spec"].get("policyTypes", ["Ingress"])]
        return not chosen or any(_allows(p.get(direction.lower(), []), peers_key, other, port, protocol,
                                         namespace) for p in chosen)

    return side(src, "Egress", "to", dst) and side(dst, "Ingress", "from", src)


QUANTITY = re.compile(r"^([0-9.]+)(m|Ki|Mi|Gi|Ti)?$")
UNITS = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    number, unit = QUANTITY.match(str(value)).groups()
    return float(number) * UNITS[unit]
