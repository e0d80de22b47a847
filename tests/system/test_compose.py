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


def test_topology_has_every_part():
    assert {"mosquitto", "cloud", "edge", "sensors"} <= set(SERVICES)
    devices = [name for name, s in SERVICES.items() if s.get("command", [None, None])[1:2] == ["device"]]
    assert len(devices) == 2
    ids = {SERVICES[d]["environment"]["SPLITGLM_DEVICE_DEVICE_ID"] for d in devices}
    assert len(ids) == 2  # two distinct devices
    sensors_cmd = SERVICES["sensors"]["command"]
    assert set(sensors_cmd[sensors_cmd.index("--device-id") + 1].split(",")) == ids


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_has_healthcheck_and_waits_for_healthy_dependencies(name):
    service = SERVICES[name]
    if name != "sensors":  # nothing depends on the simulator
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for dependency, condition in service.get("depends_on", {}).items():
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
                assert value == "mqtt://mosquitto:1883", f"{name}: {key}"
    conf = (ROOT / "deploy" / "mosquitto.conf").read_text()
    assert "listener 1883 0.0.0.0" in conf  # beyond loopback: the other containers connect
    assert "set_tcp_nodelay true" in conf  # else Nagle holds a step's frame back for up to 40 ms per hop


def test_dockerfile_builds_what_compose_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile.split("pip install .")[0]  # CPU torch pinned before the project
    assert "splitglm demo-plan --out /plans/demo" in dockerfile
    for service in SERVICES.values():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_PLAN"):
                assert value == "/plans/demo"
