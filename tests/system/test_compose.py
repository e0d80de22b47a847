"""docker-compose.yml cannot run here (no Docker): check it against the code it configures."""

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


def test_every_link_is_secured_with_what_the_secrets_service_writes(tmp_path):
    """Run the `secrets` service's command here; every /secrets path the services name must be one it wrote."""
    from splitglm.cli import main

    command = _command("secrets")
    assert command[:2] == ["splitglm", "secrets"] and "--keep" in command  # later starts keep the first secrets
    out = command[command.index("--out") + 1]
    assert out == "/secrets"
    args = [tmp_path if a == out else a for a in command[1:]]
    assert main([str(a) for a in args]) == 0
    assert main([str(a) for a in args]) == 0  # --keep: the second start keeps them
    named = set()
    for service in SERVICES.values():
        texts = [str(v) for v in (service.get("environment") or {}).values()]
        texts += [str(part) for part in service.get("command", [])]
        texts += [str(part) for part in (service.get("healthcheck") or {}).get("test", [])]
        for text in texts:
            named |= {word.strip("\"'()$") for word in text.split() if word.strip("\"'()$").startswith("/secrets/")}
    assert named, "no service uses the secrets"
    for path in named:
        assert (tmp_path / path.removeprefix("/secrets/")).is_file(), f"{path} is not written by the secrets service"
    conf = (tmp_path / "mosquitto" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 8883" in conf and "set_tcp_nodelay true" in conf
    assert "persistence_location /mosquitto/data/" in conf  # QoS 1 sessions survive a broker restart
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


def test_dockerfile_builds_what_compose_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile.split("pip install .")[0]  # CPU torch pinned before the project
    assert "splitglm demo-plan --out /plans/demo" in dockerfile
    for service in SERVICES.values():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_PLAN"):
                assert value == "/plans/demo"
