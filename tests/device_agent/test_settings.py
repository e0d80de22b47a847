"""Device and simulator settings: flags > environment > YAML file > defaults; bad settings exit with 2."""

from __future__ import annotations

import pytest

from device_agent.__main__ import main
from device_agent.settings import DeviceSettings, SensorSettings, SettingsError, load_settings
from device_agent.simulator import main as simulator_main
from protos.topics import DEFAULT_POOL


@pytest.fixture()
def plan(tmp_path):
    """Enough of a plan folder for the settings check (nothing is loaded)."""
    (tmp_path / "device").mkdir()
    (tmp_path / "plan.json").write_text("{}")
    return tmp_path


def device(argv) -> DeviceSettings:
    return load_settings(DeviceSettings, argv, "device", "test")


def test_defaults(plan):
    s = device(["--plan", str(plan), "--device-id", "box-1"])
    assert (s.broker, s.mqtt_protocol, s.pool, s.window, s.max_tokens) == (
        "mqtt://127.0.0.1:1883", "auto", DEFAULT_POOL, 8, 48)
    assert (s.step_timeout_s, s.max_attempts, s.max_reading_bytes, s.policy) == (10.0, 30, 4096, "adaptive")
    assert "{device_id}" in s.prompt_template and "{readings}" in s.prompt_template


def test_priority_flags_env_yaml(plan, tmp_path, monkeypatch):
    config = tmp_path / "device.yaml"
    config.write_text("max-tokens: 5\nwindow: 3\nmqtt_protocol: 5\nstep_timeout_s: 2.5\n")
    monkeypatch.setenv("SPLITGLM_DEVICE_WINDOW", "4")
    monkeypatch.setenv("SPLITGLM_DEVICE_DEVICE_ID", "from-env")
    s = device(["--plan", str(plan), "--config", str(config), "--step-timeout-s", "0.5"])
    assert s.device_id == "from-env"
    assert s.max_tokens == 5 and s.mqtt_protocol == "5"  # YAML
    assert s.window == 4  # env beats YAML
    assert s.step_timeout_s == 0.5  # the flag beats YAML


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device-id", "a/b"], "device_id"),
        (["--device-id", "box", "--broker", "http://x"], "broker"),
        (["--device-id", "box", "--top-p", "0"], "top_p"),
        (["--device-id", "box", "--window", "0"], "window"),
        (["--device-id", "box", "--prompt-template", "{sensor}"], "prompt_template"),
        (["--device-id", "box", "--mqtt-protocol", "4"], "mqtt_protocol"),
        ([], "device_id"),
    ],
)
def test_bad_settings(plan, argv, message):
    with pytest.raises(SettingsError, match=message):
        device(["--plan", str(plan), *argv])


def test_bad_files(plan, tmp_path):
    with pytest.raises(SettingsError, match="plan"):
        device(["--plan", str(tmp_path / "nothing"), "--device-id", "box"])
    with pytest.raises(SettingsError, match="no such file"):
        device(["--plan", str(plan), "--device-id", "box", "--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        device(["--plan", str(plan), "--device-id", "box", "--config", str(bad)])
    bad.write_text("unknown_setting: 1\n")
    with pytest.raises(SettingsError, match="unknown_setting"):
        device(["--plan", str(plan), "--device-id", "box", "--config", str(bad)])


def test_mains_exit_2_for_bad_settings(plan):
    assert main(["--plan", str(plan), "--device-id", "a#b"]) == 2
    assert main(["--plan", str(plan / "missing"), "--device-id", "box"]) == 2
    assert simulator_main(["--device-id", "box", "--sensors", "temperature,smell"]) == 2
    assert simulator_main(["--device-id", "box", "--count", "-1"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--no-such-flag"])
    assert e.value.code == 2


def test_simulator_settings(monkeypatch):
    monkeypatch.setenv("SPLITGLM_SENSORS_BROKER", "mqtt://broker:1884")
    s = load_settings(SensorSettings, ["--device-id", "a, b", "--sensors", "humidity"], "sensors", "test")
    assert s.device_ids == ["a", "b"] and s.sensor_names == ["humidity"] and s.broker == "mqtt://broker:1884"
    assert (s.count, s.interval_s) == (0, 1.0)


def test_splitglm_subcommands_pass_their_flags_through(plan):
    from splitglm.cli import main as splitglm

    assert splitglm(["device", "--plan", str(plan), "--device-id", "a+b"]) == 2
    assert splitglm(["sensors", "--device-id", "box", "--interval-s", "-1"]) == 2


def test_mqtt_login_settings(plan, tmp_path):
    from protos.mqtt import MqttAuth

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    s = device(["--plan", str(plan), "--device-id", "box-1", "--broker", "mqtts://broker.example",
                "--mqtt-username", "box-1", "--mqtt-password-file", str(secret)])
    assert MqttAuth.from_settings(s) == MqttAuth("box-1", "s3cret", None)
    with pytest.raises(SettingsError, match="mqtt_password_file"):  # a file that is not there
        device(["--plan", str(plan), "--device-id", "box-1", "--mqtt-username", "box-1",
                "--mqtt-password-file", str(tmp_path / "missing")])
    with pytest.raises(SettingsError, match="needs mqtt_username"):
        load_settings(SensorSettings, ["--device-id", "a", "--mqtt-password-file", str(secret)], "sensors", "test")
