"""``python -m device_agent.simulator``: publish simulated sensor readings over MQTT.

Each round publishes one reading per device (QoS 1) on
``sensors/{device_id}/{sensor}``, cycling through the sensors: a JSON object
``{"value", "unit", "ts"}`` from a slowly drifting signal with noise, and now
and then an anomaly (a spike). It exits 0 after ``count`` readings per device,
once the broker has acknowledged them, or on SIGTERM / SIGINT; 1 if the
broker cannot be reached; 2 for bad settings.

Its client id is ``splitglm-sensors-{device_id}``: with a login (the device's
own sensors login, ``{device_id}$sensors`` from ``splitglm secrets``) the broker
binds that id to it, so a secured simulator publishes for one device only (run
one per device); an open one may publish for several.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass

from protos.mqtt import MqttAuth, connect, new_client, resolve_protocol
from protos.topics import client_id, sensor_topic
from runtime.logs import default_format, setup_logging
from runtime.settings import stop_on_signals

from .settings import SensorSettings, SettingsError, load_settings

logger = logging.getLogger("device_agent.simulator")
CONNECT_TIMEOUT_S = 30.0  # wait for the first connection, seconds
ACK_TIMEOUT_S = 30.0  # wait for the broker to acknowledge the last readings, seconds
STOPPED_ACK_TIMEOUT_S = 2.0  # the same when stopped by a signal, seconds


@dataclass(frozen=True)
class SensorModel:
    unit: str
    mean: float  # the signal's resting level, in ``unit``
    noise: float  # standard deviation of one reading around the drifting level, in ``unit``
    drift: float  # standard deviation of the level's random walk per reading, in ``unit``
    spike: float  # offset of an anomalous reading, in ``unit``
    low: float = float("-inf")  # physical bounds of a reading
    high: float = float("inf")


MODELS = {
    "temperature": SensorModel("C", 21.0, 0.15, 0.05, 14.0),
    "humidity": SensorModel("%", 45.0, 0.8, 0.3, 40.0, 0.0, 100.0),
    "vibration": SensorModel("mm/s", 0.3, 0.04, 0.01, 4.5, 0.0),
    "pressure": SensorModel("hPa", 1013.0, 0.3, 0.1, -45.0),
}


class Signal:
    """One sensor's readings: a level drifting back to its mean (AR(1)), noise, occasional spikes."""

    def __init__(self, model: SensorModel, rng: random.Random, anomaly_rate: float):
        self.model, self.rng, self.anomaly_rate = model, rng, anomaly_rate
        self.level = model.mean

    def next(self) -> tuple[float, bool]:
        """(value, whether it is an anomaly)."""
        m = self.model
        self.level += 0.1 * (m.mean - self.level) + self.rng.gauss(0.0, m.drift)
        anomaly = self.rng.random() < self.anomaly_rate
        value = self.level + self.rng.gauss(0.0, m.noise) + (m.spike if anomaly else 0.0)
        return round(min(m.high, max(m.low, value)), 2), anomaly


def sensors_client_id(devices: list[str]) -> str:
    """``splitglm-sensors-{device}``, the id bound to the device's sensors login (several devices: the first's
    plus how many more, for an open broker)."""
    return client_id("sensors", devices[0] if len(devices) == 1 else f"{devices[0]}-and-{len(devices) - 1}-more")


class Simulator:
    def __init__(self, settings: SensorSettings, stop: threading.Event):
        self.settings, self.stop = settings, stop
        rng = random.Random(settings.seed)
        self.signals = {
            (device, sensor): Signal(MODELS[sensor], rng, settings.anomaly_rate)
            for device in settings.device_ids
            for sensor in settings.sensor_names
        }
        self.connected = threading.Event()
        auth = MqttAuth.from_settings(settings, sensors_client_id(settings.device_ids))
        protocol = resolve_protocol(settings.broker, settings.mqtt_protocol, auth)
        self.client = new_client(auth.client_id, protocol)
        self.client.on_connect = self._on_connect
        connect(self.client, settings.broker, protocol, auth)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            logger.error("the broker %s refused the connection: %s", self.settings.broker, reason_code)
            return
        self.connected.set()

    def run(self) -> int:
        """Publish rounds of readings until ``count`` rounds are done or stop is set."""
        if not self.connected.wait(CONNECT_TIMEOUT_S):
            logger.error("no connection to %s within %g s", self.settings.broker, CONNECT_TIMEOUT_S)
            self.client.loop_stop()
            return 1
        sensors, pending, n = self.settings.sensor_names, [], 0
        while not self.stop.is_set() and (self.settings.count == 0 or n < self.settings.count):
            for device in self.settings.device_ids:
                pending.append(self.publish(device, sensors[n % len(sensors)]))
            pending = [info for info in pending if not info.is_published()]
            n += 1
            if self.settings.count == 0 or n < self.settings.count:
                self.stop.wait(self.settings.interval_s)
        return self._drain(pending)

    def publish(self, device: str, sensor: str):
        value, anomaly = self.signals[(device, sensor)].next()
        reading = {"value": value, "unit": MODELS[sensor].unit, "ts": round(time.time(), 3)}
        topic = sensor_topic(device, sensor)
        logger.info("%s %s%s", topic, json.dumps(reading), "  (anomaly)" if anomaly else "")
        return self.client.publish(topic, json.dumps(reading), qos=1)

    def _drain(self, pending) -> int:
        """Wait for the broker to acknowledge what is still in flight, then disconnect."""
        deadline = time.monotonic() + (STOPPED_ACK_TIMEOUT_S if self.stop.is_set() else ACK_TIMEOUT_S)
        code = 0
        for info in pending:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                logger.warning("a reading may not have reached the broker: %r", e)
            if not info.is_published():
                code = 0 if self.stop.is_set() else 1
        if code:
            logger.error("the broker did not acknowledge every reading within %g s", ACK_TIMEOUT_S)
        self.client.disconnect()
        self.client.loop_stop()
        return code


def main(argv: list[str] | None = None) -> int:
    setup_logging(fmt=default_format())  # until the settings say how
    try:
        settings = load_settings(SensorSettings, argv, "python -m device_agent.simulator", __doc__.splitlines()[0])
    except SettingsError as e:
        logger.error("%s", e)
        return 2
    settings.setup_logging()
    if settings.mqtt_username and len(settings.device_ids) > 1:
        logger.error("a login publishes for one device only (its sensors login, client id splitglm-sensors-"
                     "{device}): run one simulator per device, not --device-id %s", settings.device_id)
        return 2
    with stop_on_signals() as stop:
        try:
            return Simulator(settings, stop).run()
        except ConnectionError as e:
            logger.error("%s", e)
            return 1


if __name__ == "__main__":
    sys.exit(main())
