"""docker-compose.yml, run for real: images built offline, the secure stack up, then what an operator would check.

``make compose-test`` (and ``make test``: the test is slow) builds the images with
deploy/compose/build-images.sh (debootstrap + ``docker import``, wheels from the
host: no registry), runs ``docker-compose up -d`` under its own project name with
the published ports on free loopback ports, waits for every service to be healthy
(``docker inspect``: compose 1.29 has no ``up --wait``), then checks an HTTPS
completion with the API key (CA and key read out of the edge's volume), a sensor
reading answered on ``results/<device>`` (the simulator's own, read with the
device's app login), every tier's ``/metrics``, and that the simulator's image
has no torch. ``docker-compose down -v`` always follows.

Needs root and Docker (``make docker`` installs docker.io, docker-compose and
debootstrap); dockerd is started when none answers. When Docker cannot run, the
test fails with the reason: it never skips.

tests/system/test_compose_run.py stays: it checks, with the same ``splitglm
secrets`` folders and processes, what this one does not (file modes and owners,
one uid unable to read another's secrets, client-id take-overs refused).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from protos.mqtt import MqttAuth
from protos.topics import client_id
from splitglm.system import ResultListener
from tests.procs import ROOT

pytestmark = pytest.mark.slow

PROJECT = "splitglm-compose-test"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICES = {name: s for name, s in yaml.safe_load(COMPOSE_FILE.read_text())["services"].items()
            if not s.get("profiles")}  # services under a profile (observability) are not started
DEVICE = "sensor-box-1"
BUILD_S = 1800.0  # a cold build (debootstrap, the wheels, torch installed), seconds
HEALTHY_S = 420.0  # every service healthy after `up`, on 2 shared cores, seconds
ANSWER_S = 180.0  # a reading's answer (48 tokens), seconds
LOG_LINES = 30  # of an unhealthy service, in the failure message
# The cloud's and the device agents' metrics ports (SPLITGLM_*_METRICS_PORT) come with issue 24's metrics work:
# until its settings exist, those scrapes are not asserted (the edge's is). Once they do, docker-compose.yml's
# commented SPLITGLM_{CLOUD,DEVICE}_METRICS_{PORT,HOST} lines must be on (and deploy/k8s's) for this test to pass.

def compose_command() -> list[str]:
    """docker-compose 1.29 (Debian's), else the `docker compose` plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def compose(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPLITGLM_COMPOSE_HTTPS": "127.0.0.1:", "SPLITGLM_COMPOSE_MQTTS": "127.0.0.1:"}
    done = subprocess.run([*compose_command(), "-p", PROJECT, "-f", str(COMPOSE_FILE), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{' '.join(done.args)}: {done.stderr[-3000:]}"
    return done


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def states() -> dict[str, dict]:
    """service -> {status, health, exit_code, id} of its container (those created so far)."""
    every = ["-a"] if compose_command() == ["docker", "compose"] else []  # v1 lists stopped containers anyway
    ids = compose("ps", "-q", *every).stdout.split()
    if not ids:
        return {}
    found = {}
    for info in json.loads(docker("inspect", *ids).stdout):
        state = info["State"]
        found[info["Config"]["Labels"]["com.docker.compose.service"]] = {
            "status": state["Status"], "health": (state.get("Health") or {}).get("Status"),
            "exit_code": state["ExitCode"], "id": info["Id"]}
    return found


def ready(service: str, state: dict) -> bool:
    if service == "secrets":  # the one-shot
        return state["status"] == "exited" and state["exit_code"] == 0
    if SERVICES[service].get("healthcheck"):
        return state["health"] == "healthy"
    return state["status"] == "running"


def broken(service: str, state: dict) -> bool:
    return state["health"] == "unhealthy" or (state["status"] in ("exited", "dead") and not ready(service, state))


def diagnosis(found: dict[str, dict], why: str) -> str:
    """What failed, and the last log lines of every service that is not ready."""
    lines = [why]
    for service in SERVICES:
        state = found.get(service)
        if state is None:
            lines.append(f"  {service}: not created")
            continue
        lines.append(f"  {service}: {state['status']} health={state['health']} exit={state['exit_code']}")
        if not ready(service, state):
            logs = docker("logs", "--tail", str(LOG_LINES), state["id"], check=False)
            lines += [f"    | {line}" for line in (logs.stdout + logs.stderr).splitlines()[-LOG_LINES:]]
    return "\n".join(lines)


def wait_healthy(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        found = states()
        bad = [s for s in SERVICES if s in found and broken(s, found[s])]
        assert not bad, diagnosis(found, f"unhealthy: {', '.join(bad)}")
        if all(s in found and ready(s, found[s]) for s in SERVICES):
            return
        assert time.monotonic() < deadline, diagnosis(found, f"not healthy after {timeout_s:g} s")
        time.sleep(2)


def published(service: str, port: int) -> int:
    return int(compose("port", service, str(port)).stdout.strip().rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose")
    assert os.geteuid() == 0, "Docker, debootstrap and the images' uids need root"
    build = subprocess.run([str(ROOT / "deploy/compose/build-images.sh")], capture_output=True, text=True,
                           timeout=BUILD_S, env={**os.environ, "PYTHON": sys.executable})
    assert build.returncode == 0, f"deploy/compose/build-images.sh failed:\n{build.stderr[-4000:]}"
    compose("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left
    try:
        up = compose("up", "-d", check=False, timeout=HEALTHY_S + 120)
        if up.returncode != 0:
            pytest.fail(diagnosis(states(), f"docker-compose up failed: {up.stderr[-2000:]}"))
        wait_healthy(HEALTHY_S)
        edge = {name: compose("exec", "-T", "edge", "cat", f"/secrets/{name}").stdout
                for name in ("ca.crt", "api-key")}
        (folder / "ca.crt").write_text(edge["ca.crt"])
        yield {"folder": folder, "ca": folder / "ca.crt", "key": edge["api-key"].split()[0],
               "https": f"https://127.0.0.1:{published('edge', 8000)}",
               "mqtts": f"mqtts://127.0.0.1:{published('mosquitto', 8883)}"}
    finally:
        compose("down", "-v", "--remove-orphans", check=False)


def complete(stack, max_tokens: int = 4) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(stack["ca"])), timeout=120) as web:
        return web.post(f"{stack['https']}/v1/completions", headers={"Authorization": f"Bearer {stack['key']}"},
                        json={"prompt": "The sensor reads", "max_tokens": max_tokens})


def test_https_completion_needs_the_key(stack):
    reply = complete(stack)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    with httpx.Client(verify=ssl.create_default_context(cafile=str(stack["ca"])), timeout=60) as web:
        assert web.post(f"{stack['https']}/v1/completions", json={"prompt": "x"}).status_code == 401
    with pytest.raises(httpx.ConnectError):  # TLS only, and only with the deployment's CA
        httpx.get(f"{stack['https']}/v1/models", timeout=10)


def app_login(stack) -> MqttAuth:
    """The device's app login (reads results/<device>) out of the `secrets` volume, which holds every secret."""
    password = docker("run", "--rm", "--network", "none", "-v", f"{PROJECT}_secrets:/s:ro", "splitglm-mosquitto:latest",
                      "cat", f"/s/apps/{DEVICE}/password").stdout
    (stack["folder"] / "app-password").write_text(password)
    return MqttAuth.from_files(f"{DEVICE}$app", stack["folder"] / "app-password", stack["ca"],
                               client_id("app", DEVICE))


def test_a_simulated_reading_is_answered(stack):
    listener = ResultListener(stack["mqtts"], DEVICE, app_login(stack))
    try:
        compose("restart", "sensors-1")  # the simulator publishes a reading as it starts
        (answer, *_) = listener.wait_for_readings(1, ANSWER_S)
    finally:
        listener.close()
    assert answer["device_id"] == DEVICE and answer["error"] is None, answer
    assert {"sensor", "value", "unit"} <= set(answer["readings"][0]), answer  # the simulator's reading
    assert answer["tokens"] >= 1 and answer["text"], answer


def scrape_in_network(url: str) -> str:
    """GET a plain-HTTP metrics URL from inside the compose network (the edge's container), as Prometheus would."""
    code = f"import sys, urllib.request; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    return compose("exec", "-T", "edge", "python", "-c", code).stdout


def test_every_tier_serves_metrics(stack):
    assert complete(stack).status_code == 200
    with httpx.Client(verify=ssl.create_default_context(cafile=str(stack["ca"])), timeout=60) as web:
        assert web.get(f"{stack['https']}/metrics").status_code == 401  # the key guards the edge's metrics
        edge = web.get(f"{stack['https']}/metrics", headers={"Authorization": f"Bearer {stack['key']}"})
    assert edge.status_code == 200 and "splitglm_edge_" in edge.text
    assert "splitglm_edge_time_to_first_token_seconds_count" in edge.text
    assert "splitglm_edge_inter_token_latency_seconds_bucket" in edge.text
    cloud = scrape_in_network("http://cloud:9464/metrics")
    for name in ("splitglm_cloud_batch_size_bucket", "splitglm_cloud_queue_depth", "splitglm_cloud_step_seconds",
                 "process_cpu_seconds_total"):
        assert name in cloud, name
    for device in ("device-1", "device-2"):
        text = scrape_in_network(f"http://{device}:9465/metrics")
        assert "splitglm_device_readings_total" in text and "process_resident_memory_bytes" in text, device


def test_the_simulator_image_has_no_torch():
    assert docker("run", "--rm", "--network", "none", "splitglm-sensors:latest", "python", "-c", "import torch",
                  check=False).returncode != 0
    assert docker("run", "--rm", "--network", "none", "splitglm-sensors:latest", "splitglm", "sensors",
                  "--help").returncode == 0
    assert docker("run", "--rm", "--network", "none", "splitglm:latest", "python", "-c", "import torch").returncode == 0
