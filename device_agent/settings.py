"""Settings of the device agent and of the sensor simulator: one pydantic-settings class each.

Values come, highest priority first, from command-line flags (``--max-tokens 8``:
the field name in kebab-case), environment variables (``SPLITGLM_DEVICE_MAX_TOKENS``,
``SPLITGLM_SENSORS_COUNT``), an optional YAML file (``--config FILE``, field
names as keys) and the defaults. Every field carries its unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from protos.mqtt import broker_address
from protos.topics import DEFAULT_POOL, frames_topic, steps_topic
from runtime.settings import (  # noqa: F401 -- re-exported
    AgentSettings,
    CpuDecodeSettings,
    LogSettings,
    MqttClientSettings,
    SettingsError,
    load_settings,
)

DEFAULT_PROMPT = (
    "You monitor the sensors of device {device_id}. Recent readings:\n{readings}\n"
    "In one short sentence, is anything unusual?"
)
SENSOR_NAMES = ("temperature", "humidity", "vibration", "pressure")  # what the simulator can publish

def _mqtt_url(value: str) -> str:
    broker_address(value)
    return value


def _protocol(value: Any) -> str:
    return str(value)


class DeviceSettings(MqttClientSettings, CpuDecodeSettings, LogSettings):
    """The device agent: one device's sensor readings in, its answers out; runs the plan's device segment."""

    model_config = SettingsConfigDict(env_prefix="SPLITGLM_DEVICE_", extra="forbid")

    plan: Path = Field(description="plan folder (plan.json + device/ tier artifact)")
    device_id: str = Field(description="this device's id: one MQTT topic level (no '/', '+', '#', '$')")
    broker: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker URL, mqtt://HOST[:PORT] or (TLS) mqtts://...")
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field("auto", description="MQTT version: auto (probe), 5, 3.1.1")
    pool: str = Field(DEFAULT_POOL, description="edge pool that new sessions (seq 0 frames) go to")
    threads: int = Field(1, ge=1, description="torch CPU threads for the device segment")
    window: int = Field(8, ge=1, description="readings kept for the prompt (count); also the most per answer")
    prompt_template: str = Field(
        DEFAULT_PROMPT, description="str.format template with {device_id} and {readings} (one reading per line)"
    )
    system_prompt: str | None = Field(None, description="system message of the chat template (none if unset)")
    max_tokens: int = Field(48, ge=1, le=4096, description="most new tokens per answer (tokens)")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    seed: int = Field(0, ge=0, description="seed of the sampler (with temperature > 0)")
    speculate: Literal["default", "on", "off"] = Field(
        "default", description="speculative split decoding on the accurate path (default: the edge's setting)"
    )
    latency_budget_ms: int = Field(0, ge=0, description="end-to-end budget per answer, milliseconds (0 = none)")
    policy: Literal["adaptive", "accurate", "fast"] = Field(
        "adaptive", description="the edge router's policy for these sessions (adaptive uses latency_budget_ms)"
    )
    step_timeout_s: float = Field(10.0, gt=0, description="wait for one step's answer before republishing, seconds")
    max_attempts: int = Field(30, ge=1, description="publishes of one step before giving up (count)")
    max_reading_bytes: int = Field(4096, ge=1, description="largest accepted sensor payload, bytes")
    max_queued_readings: int = Field(256, ge=1, description="readings waiting for an answer, readings; more are "
                                     "refused on the dead-letter topic results/{device_id}/errors")
    max_readings_per_s: int = Field(20, ge=0, description="readings taken per second, readings/s, bursts of as many; "
                                    "more are dropped unread, counted, and reported on results/{device_id}/errors "
                                    "at most once a second; 0 = no limit")
    ready_file: Path | None = Field(None, description="file present while ready: touched once the broker acknowledged "
                                    "the sensors and steps subscriptions, removed when they are lost and at exit "
                                    "(health checks)")
    log_content: bool = Field(False, description="log prompts, readings and answers at INFO (debug only: at INFO "
                              "the log otherwise holds only ids, counts, timings and topics)")
    results_include_prompt: bool = Field(False, description="the answers on results/{device_id} carry the prompt "
                                         "(\"prompt\"); off, they carry the readings and the answer only")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="port of the Prometheus metrics (plain "
                                     "HTTP, GET /metrics); 0 = a free port; unset = no metrics endpoint")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="interface the metrics port listens on")

    _check_broker = field_validator("broker")(_mqtt_url)
    _check_protocol = field_validator("mqtt_protocol", mode="before")(_protocol)

    @field_validator("plan")
    @classmethod
    def _check_plan(cls, value: Path) -> Path:
        if not (value / "plan.json").is_file() or not (value / "device").is_dir():
            raise ValueError(f"{str(value)!r} is not a plan folder (plan.json and device/); see `splitglm partition`")
        return value

    @field_validator("device_id")
    @classmethod
    def _check_device(cls, value: str) -> str:
        steps_topic(value)
        return value

    @field_validator("pool")
    @classmethod
    def _check_pool(cls, value: str) -> str:
        frames_topic(value, "device")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            value.format(device_id="d", readings="r")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"must be a str.format template using only {{device_id}} and {{readings}}: {e!r}") from e
        return value


class SensorSettings(MqttClientSettings, LogSettings):
    """The sensor simulator: plausible readings, with an occasional anomaly, for one or more devices."""

    model_config = SettingsConfigDict(env_prefix="SPLITGLM_SENSORS_", extra="forbid")

    device_id: str = Field(description="device id(s) to publish for, comma-separated")
    broker: str = Field("mqtt://127.0.0.1:1883", description="MQTT broker URL, mqtt://HOST[:PORT] or (TLS) mqtts://...")
    mqtt_protocol: Literal["auto", "5", "3.1.1"] = Field("auto", description="MQTT version: auto (probe), 5, 3.1.1")
    count: int = Field(0, ge=0, description="readings per device before exiting (0 = forever)")
    interval_s: float = Field(1.0, ge=0.0, description="pause between rounds of readings, seconds")
    sensors: str = Field(",".join(SENSOR_NAMES[:3]), description=f"comma-separated, of {', '.join(SENSOR_NAMES)}")
    anomaly_rate: float = Field(0.1, ge=0.0, le=1.0, description="probability that a reading is anomalous")
    seed: int | None = Field(None, description="random seed (unset: a different run each time)")

    _check_broker = field_validator("broker")(_mqtt_url)
    _check_protocol = field_validator("mqtt_protocol", mode="before")(_protocol)

    @field_validator("device_id")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        for device in value.split(","):
            steps_topic(device.strip())
        return value

    @field_validator("sensors")
    @classmethod
    def _check_sensors(cls, value: str) -> str:
        names = [s.strip() for s in value.split(",") if s.strip()]
        unknown = [s for s in names if s not in SENSOR_NAMES]
        if unknown or not names:
            raise ValueError(f"unknown sensor(s) {unknown or value!r}; known: {', '.join(SENSOR_NAMES)}")
        return value

    @property
    def device_ids(self) -> list[str]:
        return [d.strip() for d in self.device_id.split(",")]

    @property
    def sensor_names(self) -> list[str]:
        return [s.strip() for s in self.sensors.split(",") if s.strip()]
