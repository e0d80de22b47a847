"""docker-compose's steps with real processes: each service as its compose uid, seeing only its own secrets.

``splitglm secrets --per-service --chown`` (what the compose `secrets` service
runs, as root) writes one folder per service; then Mosquitto (uid 1883, the
dynamic-security plugin), the cloud, the edge, a device agent and its sensor
simulator start, each as its compose uid (``setpriv``), each pointed at its own
folder. Checked: the modes and owners, that a service's uid cannot read another's
secrets nor the CA key, that a reading is answered and an HTTPS completion with
the key works, and that a CONNECT with the edge's client id (a wrong password,
or another login) is refused and readings are still answered. Needs root (to
switch uids), as the compose `secrets` service does.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from protos.mqtt import BrokerRefused, MqttAuth, probe_protocol
from protos.topics import client_id
from splitglm.credentials import find_dynsec_plugin
from splitglm.secret_folders import FULL, services
from splitglm.system import ResultListener
from tests.procs import ROOT, Proc, free_port, mosquitto_binary

pytestmark = pytest.mark.slow

DEVICE, EDGE = "box-1", "edge-1"
ANSWER_S = 60.0  # a reading's answer on the tiny plan, with 2 shared cores, seconds
SETPRIV = shutil.which("setpriv")


def as_uid(uid: int, args: list[str]) -> list[str]:
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *args]


PACKAGES = ("protos", "runtime", "partitioner", "device_agent", "edge_node", "cloud_service", "splitglm")


def readable_by_others(*paths: str) -> bool:
    return all(subprocess.run(as_uid(65534, ["test", "-r", path]), capture_output=True).returncode == 0
               for path in paths)


def python_for_others(top: Path) -> tuple[list[str], dict[str, str]]:
    """An interpreter other uids may run (this venv's, or the system's with the venv's packages) and its env.

    A venv whose base interpreter lies under a private home (pyenv in /root) cannot be run by another uid; a
    checkout or venv under a private folder cannot be read by one: then the code is linked into ``top``.
    """
    env = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run(as_uid(65534, [sys.executable, "-c", "pass"]), capture_output=True)
    if probe.returncode == 0:
        return [sys.executable], env
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True).stdout.strip() if system else ""
    assert version == str(sys.version_info[:2]), f"no interpreter another uid may run ({sys.executable} is private)"
    site, code = sysconfig.get_paths()["purelib"], str(ROOT)
    if not readable_by_others(f"{site}/torch/__init__.py", f"{code}/runtime/__init__.py"):
        site, code = str(top / "site"), str(top / "code")
        for source, target in [(sysconfig.get_paths()["purelib"], site)] + [
                (str(ROOT / name), f"{code}/{name}") for name in PACKAGES]:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            linked = subprocess.run(["cp", "-al", source, target], capture_output=True).returncode == 0
            if not linked:  # another file system: a copy
                subprocess.run(["cp", "-a", source, target], check=True)
        subprocess.run(["chmod", "-R", "a+rX", site, code], check=True)
    return [system], {**env, "PYTHONPATH": f"{site}:{code}"}


@pytest.fixture(scope="module")
def stack(talking_plan):
    assert os.geteuid() == 0 and SETPRIV, "runs as root with setpriv (util-linux), as the compose `secrets` does"
    assert find_dynsec_plugin(), "Mosquitto's dynamic-security plugin (Debian's mosquitto package ships it)"
    from splitglm.cli import main

    top = Path(tempfile.mkdtemp(prefix="splitglm-compose-"))
    top.chmod(0o755)
    out, plan, port = top / "secrets", top / "plan", free_port()
    shutil.copytree(talking_plan, plan)
    subprocess.run(["chmod", "-R", "a+rX", str(plan)], check=True)
    assert main(["secrets", "--out", str(out), "--per-service", "--chown", "--devices", DEVICE, "--edges", EDGE,
                 "--mqtt-port", str(port)]) == 0
    uids = {s.name: s.uid for s in services([DEVICE], [EDGE])}
    python, env = python_for_others(top)
    procs: list[Proc] = []

    def start(service: str, args: list[str]) -> Proc:
        procs.append(Proc(service, as_uid(uids[service], args), env=env, cwd=str(top)))
        return procs[-1]

    def agent(service: str, module: str, *args: str) -> Proc:
        return start(service, [*python, "-m", module, *args])

    try:
        m, c, e, d = (out / name for name in ("mosquitto", "cloud", f"edge-{EDGE}", f"device-{DEVICE}"))
        start("mosquitto", [mosquitto_binary(), "-c", str(m / "mosquitto" / "mosquitto.conf"), "-v"]).wait_for(
            r"mosquitto version .* running", timeout=20)
        broker = f"mqtts://127.0.0.1:{port}"
        cloud = agent("cloud", "cloud_service", "--plan", str(plan), "--host", "127.0.0.1", "--port", "0",
                      "--threads", "1", "--tls-cert", str(c / "cloud/server.crt"),
                      "--tls-key", str(c / "cloud/server.key"), "--tls-client-ca", str(c / "ca.crt")).ready(300)
        http = agent(f"edge-{EDGE}", "edge_node", "--plan", str(plan), "--broker", broker, "--edge-id", EDGE,
                     "--cloud", cloud.split("://", 1)[-1], "--http-host", "127.0.0.1", "--http-port", "0",
                     "--threads", "1", "--mqtt-username", EDGE,
                     "--mqtt-password-file", str(e / f"edges/{EDGE}/password"),
                     "--mqtt-ca-file", str(e / "ca.crt"), "--cloud-ca", str(e / "ca.crt"),
                     "--cloud-cert", str(e / "edge/client.crt"), "--cloud-key", str(e / "edge/client.key"),
                     "--tls-cert", str(e / "edge/server.crt"), "--tls-key", str(e / "edge/server.key"),
                     "--api-keys-file", str(e / "api-key")).ready(300)
        agent(f"device-{DEVICE}", "device_agent", "--plan", str(plan), "--broker", broker, "--device-id", DEVICE,
              "--max-tokens", "2", "--threads", "1", "--mqtt-username", DEVICE,
              "--mqtt-password-file", str(d / f"devices/{DEVICE}/password"),
              "--mqtt-ca-file", str(d / "ca.crt")).ready(300)
        yield {"out": out, "uids": uids, "broker": broker, "http": http, "python": python, "env": env,
               "sensors": lambda: agent(f"sensors-{DEVICE}", "device_agent.simulator", "--broker", broker,
                                        "--device-id", DEVICE, "--count", "1", "--interval-s", "0",
                                        "--mqtt-username", f"{DEVICE}$sensors", "--mqtt-password-file",
                                        str(out / f"sensors-{DEVICE}/sensors/{DEVICE}/password"),
                                        "--mqtt-ca-file", str(out / f"sensors-{DEVICE}/ca.crt"))}
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(top, ignore_errors=True)


def test_each_service_owns_only_its_own_folder(stack):
    out, uids = stack["out"], stack["uids"]
    assert (out / FULL).stat().st_uid == 0 and (out / FULL).stat().st_mode & 0o777 == 0o700
    assert (out / FULL / "ca.key").stat().st_mode & 0o777 == 0o600
    for name, uid in uids.items():
        for path in [out / name, *(out / name).rglob("*")]:
            mode = path.stat().st_mode & 0o777
            assert path.stat().st_uid == uid, path
            assert mode in ((0o700,) if path.is_dir() else (0o600, 0o644)), (path, oct(mode))
            if path.name in ("password", "api-key") or path.suffix == ".key":
                assert mode == 0o600, path
        assert not list((out / name).rglob("ca.key"))
    # the device agent's uid reads its own password, and nothing of the edge's, the broker's or the CA's
    device = uids[f"device-{DEVICE}"]
    readable = [out / f"device-{DEVICE}" / f"devices/{DEVICE}/password"]
    refused = [out / FULL / "ca.key", out / f"edge-{EDGE}" / f"edges/{EDGE}/password", out / f"edge-{EDGE}/api-key",
               out / "mosquitto/mosquitto/passwd", out / f"sensors-{DEVICE}/sensors/{DEVICE}/password"]
    for path in readable + refused:
        code = subprocess.run(as_uid(device, ["cat", str(path)]), capture_output=True).returncode
        assert (code == 0) == (path in readable), path


def _answer(stack, listener: ResultListener, count: int) -> float:
    """Publish one reading with the simulator (its own uid and login); seconds until it is answered."""
    t0 = time.monotonic()
    sim = stack["sensors"]()
    assert sim.popen.wait(60) == 0, sim.output
    listener.wait_for_readings(count, ANSWER_S)
    return time.monotonic() - t0


def test_a_reading_and_an_https_completion_are_answered(stack):
    out = stack["out"]
    app = out / FULL / "apps" / DEVICE  # the answers' reader: the test's own login, not a service's
    auth = MqttAuth.from_files(f"{DEVICE}$app", app / "password", out / FULL / "ca.crt", client_id("app", DEVICE))
    listener = ResultListener(stack["broker"], DEVICE, auth)
    try:
        _answer(stack, listener, 1)
        edge = out / f"edge-{EDGE}"
        key = (edge / "api-key").read_text().split()[0]
        with httpx.Client(verify=ssl.create_default_context(cafile=str(edge / "ca.crt")), timeout=120) as web:
            reply = web.post(f"{stack['http']}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"prompt": "hello", "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            assert web.post(f"{stack['http']}/v1/completions", json={"prompt": "x"}).status_code == 401

        # the edge's client id with a wrong password, or with a device's valid login: refused, and the
        # readings are still answered (Mosquitto authenticates before any take-over; dynsec binds the ids)
        edge_id = client_id("edge", EDGE)
        device_password = out / FULL / "devices" / DEVICE / "password"
        for auth in (MqttAuth(EDGE, "not-the-password", out / FULL / "ca.crt", edge_id),
                     MqttAuth.from_files(DEVICE, device_password, out / FULL / "ca.crt", edge_id)):
            with pytest.raises(BrokerRefused):
                probe_protocol(stack["broker"], 10, auth)
        assert _answer(stack, listener, 2) < ANSWER_S
    finally:
        listener.close()
