"""docker-compose.yml checked against the code it configures, in seconds (test_compose_docker.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cloud_service.settings import CloudSettings
from device_agent.settings import DeviceSettings, SensorSettings
from edge_node.settings import EdgeSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PREFIXES = {
    "SPLITGLM_CLOUD_": CloudSettings,
    "SPLITGLM_EDGE_": EdgeSettings,
    "SPLITGLM_DEVICE_": DeviceSettings,
    "SPLITGLM_SENSORS_": SensorSettings,
}


def _command(name: str) -> list[str]:
    return SERVICES[name].get("command", [None, None])


def test_topology_has_every_part():
    assert {"secrets", "mosquitto", "cloud", "edge"} <= set(SERVICES)
    devices = [name for name in SERVICES if _command(name)[1:2] == ["device"]]
    assert len(devices) == 2
    ids = {SERVICES[d]["environment"]["SPLITGLM_DEVICE_DEVICE_ID"] for d in devices}
    assert len(ids) == 2  # two distinct devices
    sensors = [name for name in SERVICES if _command(name)[1:2] == ["sensors"]]
    simulated = {_command(name)[_command(name).index("--device-id") + 1] for name in sensors}
    assert simulated == ids and len(sensors) == 2  # one simulator per device: each publishes under its login


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_has_healthcheck_and_waits_for_healthy_dependencies(name):
    service = SERVICES[name]
    if name not in ("sensors-1", "sensors-2", "secrets"):  # nothing waits for the simulators; secrets is a one-shot
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for dependency, condition in service.get("depends_on", {}).items():
        if dependency == "secrets":  # the one-shot that writes the secrets volume
            assert condition == {"condition": "service_completed_successfully"}
            continue
        assert condition == {"condition": "service_healthy"}
        assert SERVICES[dependency].get("healthcheck"), f"{name} waits for {dependency}, which has no healthcheck"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_environment_names_real_settings_fields(name):
    for key in SERVICES[name].get("environment", {}) or {}:
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        assert prefix, f"{name}: {key} is not a splitglm setting"
        field = key.removeprefix(prefix).lower()
        assert field in PREFIXES[prefix].model_fields, f"{name}: {key} names no field of {PREFIXES[prefix].__name__}"


def test_services_reach_each_other_by_service_name():
    assert SERVICES["edge"]["environment"]["SPLITGLM_EDGE_CLOUD"].split(":")[0] == "cloud"
    for name, service in SERVICES.items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_BROKER"):
                assert value == "mqtts://mosquitto:8883", f"{name}: {key}"


def _mounts(name: str) -> dict[str, str]:
    """volume -> where the service mounts it."""
    return dict(v.split(":")[:2] for v in SERVICES[name].get("volumes", []))


def _named_secrets(service: dict) -> set[str]:
    """Every /secrets/... path in a service's environment, command and healthcheck."""
    texts = [str(v) for v in (service.get("environment") or {}).values()]
    texts += [str(part) for part in service.get("command", [])]
    texts += [str(part) for part in (service.get("healthcheck") or {}).get("test", [])]
    return {w.strip("\"'()$") for text in texts for w in text.split() if w.strip("\"'()$").startswith("/secrets/")}


def test_every_service_gets_only_its_own_secrets(tmp_path):
    """Run the `secrets` service's command here (as root, as compose does); each service's volume must hold
    every /secrets path it names, belong to the uid it runs as, and no service but `secrets` sees the CA key."""
    from splitglm.cli import main

    command = _command("secrets")
    assert command[:2] == ["splitglm", "secrets"] and "--keep" in command  # later starts keep the first secrets
    assert {"--per-service", "--chown"} <= set(command) and SERVICES["secrets"]["user"] == "0:0"
    out = command[command.index("--out") + 1]
    assert out == "/secrets" and command[command.index("--mount") + 1] == "/secrets"
    args = list(command[1:])
    args[args.index("--out") + 1] = str(tmp_path)  # --mount stays /secrets: where Mosquitto will see its folder
    assert main(args) == 0
    assert main(args) == 0  # --keep: the second start keeps them
    folders = {volume: Path(str(tmp_path) + at.removeprefix("/secrets")) for volume, at in _mounts("secrets").items()}
    assert (folders["secrets"] / "ca.key").is_file()
    checked = 0
    for name, service in SERVICES.items():
        if name == "secrets":
            continue
        mounts = {v: at for v, at in _mounts(name).items() if v.startswith("secrets")}
        assert "secrets" not in mounts, f"{name} mounts the volume with the CA key"
        assert len(mounts) == 1 and list(mounts.values()) == ["/secrets"], f"{name}: one secrets volume at /secrets"
        (volume,) = mounts
        assert SERVICES[name]["volumes"][[v.split(":")[0] for v in service["volumes"]].index(volume)].endswith(":ro")
        folder = folders[volume]
        for path in _named_secrets(service):
            assert (folder / path.removeprefix("/secrets/")).is_file(), f"{path} is not in {name}'s volume"
            checked += 1
        assert not list(folder.rglob("ca.key"))
        uid = folder.stat().st_uid
        if name == "mosquitto":
            assert uid == 1883  # the image's `mosquitto`, whom the conf's `user` drops to
        else:
            assert service["user"] == f"{uid}:{uid}", f"{name} runs as {service['user']}, its volume is {uid}'s"
        for path in folder.rglob("*"):
            assert path.stat().st_uid == uid and path.stat().st_mode & 0o077 in (0, 0o044), path
    assert checked >= 20
    conf = (folders["secrets-mosquitto"] / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 8883" in conf and "set_tcp_nodelay true" in conf
    assert "persistence_location /mosquitto/data/" in conf  # QoS 1 sessions survive a broker restart
    assert "user mosquitto" in conf and "password_file /secrets/mosquitto/passwd" not in conf
    assert "plugin_opt_config_file /secrets/mosquitto/dynamic-security.json" in conf  # client ids bound
    assert "max_packet_size" in conf and "max_queued_bytes" in conf
    for service in ("cloud", "edge"):
        env = SERVICES[service]["environment"]
        prefix = "SPLITGLM_CLOUD_" if service == "cloud" else "SPLITGLM_EDGE_"
        assert env[prefix + "TLS_CERT"] and env[prefix + "TLS_KEY"]
    assert SERVICES["cloud"]["environment"]["SPLITGLM_CLOUD_TLS_CLIENT_CA"]  # mutual TLS
    assert SERVICES["edge"]["environment"]["SPLITGLM_EDGE_CLOUD_CERT"]
    assert SERVICES["edge"]["environment"]["SPLITGLM_EDGE_API_KEYS_FILE"]
    for name in SERVICES:
        env = SERVICES[name].get("environment") or {}
        users = [k for k in env if k.endswith("_MQTT_USERNAME")]
        if any(k.endswith("_BROKER") for k in env) or name.startswith("device"):
            assert users, f"{name} connects to the broker without a login"


def test_each_simulator_has_its_own_sensors_login():
    for name in ("sensors-1", "sensors-2"):
        env = SERVICES[name]["environment"]
        device = _command(name)[_command(name).index("--device-id") + 1]
        # compose reads `$$` as `$`: the login is <device>$sensors
        assert env["SPLITGLM_SENSORS_MQTT_USERNAME"].replace("$$", "$") == f"{device}$sensors"
        assert env["SPLITGLM_SENSORS_MQTT_PASSWORD_FILE"] == f"/secrets/sensors/{device}/password"


def test_dockerfile_builds_what_compose_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()  # with a registry: one image
    assert "torch==2.13.0" in dockerfile.split("pip install .")[0]  # CPU torch pinned before the project
    assert "splitglm demo-plan --out /plans/demo" in dockerfile
    script = (ROOT / "deploy/compose/build-images.sh").read_text()  # offline: the images compose names
    images = {service["image"] for service in SERVICES.values()}
    assert images == {"splitglm:latest", "splitglm-sensors:latest", "splitglm-mosquitto:latest"}
    assert "docker tag \"$base\" splitglm-mosquitto:latest" in script and "-t \"$image:latest\"" in script
    assert "/plans/demo" in script and "--target" in script
    for service in SERVICES.values():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_PLAN"):
                assert value == "/plans/demo"
