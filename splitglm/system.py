"""The whole topology as local processes: broker, cloud, edge, a device agent, a sensor simulator.

``splitglm demo`` runs it once (sensor answers and one HTTP completion, then
everything stops); ``splitglm demo --serve`` keeps it up until SIGINT/SIGTERM.
Each part is the same process an operator runs (``python -m cloud_service``,
``python -m edge_node``, ``python -m device_agent``), talking over a real MQTT
broker, real gRPC and real HTTP. With ``secrets`` (a folder from ``splitglm
secrets``) every link is encrypted and authenticated: MQTT over TLS with a
login per device and per edge and the ACL, mutual TLS from edge to cloud,
HTTPS with API keys.

Links can be shaped with the project's user-space link proxy
(``splitglm.linkproxy.DelayProxy``): ``cloud_rtt_ms`` (and
``cloud_bandwidth_mbit_s``) puts one between the edge and the cloud,
``device_rtt_ms`` (and ``device_bandwidth_mbit_s``) one between the device and
the broker (``device_broker``: the broker's URL as the device sees it), so a
device's step pays that RTT once, through the broker to the edge and back.
``LocalDevice`` is a device in this process: the plan's device tier driving
the owner's decode loop over the device agent's MQTT link, for callers that
give prompt ids and read per-step timings (``splitglm.live``, the benches' simulated devices).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from protos.mqtt import MqttAuth, broker_address, connect, new_client, resolve_protocol, wait_for_broker
from protos.topics import client_id, results_topic

from .linkproxy import DelayProxy
from .processes import Proc, free_port

if TYPE_CHECKING:
    from runtime.owner import Generation

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # loading a tier on a busy 2-core machine takes a while


@dataclass
class LocalSystem:
    plan: str
    broker: str | None = None  # an existing broker's URL; None = start the embedded amqtt broker
    device_id: str = "demo-device-1"
    threads: int = 1  # torch threads of each tier process
    host: str = "127.0.0.1"
    http_port: int = 0  # 0 = a free port
    device_max_tokens: int = 32
    mqtt: bool = True  # False: cloud and edge only, the edge serving HTTP without a broker
    cloud_rtt_ms: float | None = None  # set: the edge reaches the cloud through a DelayProxy of this RTT, ms
    cloud_bandwidth_mbit_s: float | None = None  # with cloud_rtt_ms: that link's bandwidth, Mbit/s (None: unlimited)
    proxy: DelayProxy | None = None  # that proxy (``set_rtt`` changes the link while running)
    device_rtt_ms: float | None = None  # set: the device reaches the broker through a DelayProxy of this RTT, ms
    device_bandwidth_mbit_s: float | None = None  # with device_rtt_ms: that link's bandwidth, Mbit/s (None: unlimited)
    device_proxy: DelayProxy | None = None  # that proxy
    device_agent: bool = True  # with mqtt: start the device agent too
    edge_args: tuple[str, ...] = ()  # more flags for the edge (e.g. ("--speculate", "false"))
    device_args: tuple[str, ...] = ()  # more flags for the device agent
    secrets: str | None = None  # a `splitglm secrets` folder: TLS, logins and API keys on every link
    edge_id: str = "edge-demo"  # with secrets: an edge login of that folder
    env: dict[str, str] = field(default_factory=dict)  # more environment variables for every tier process
    procs: list[Proc] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    def _spawn(self, name: str, module: str, *args: str) -> Proc:
        proc = Proc(name, [sys.executable, "-m", module, *args], self.env)
        self.procs.append(proc)
        return proc

    def _ready(self, proc: Proc) -> str:
        url = proc.ready(START_TIMEOUT_S)
        self.urls[proc.name] = url
        logger.info("%s ready: %s", proc.name, url)
        return url

    def _start(self, name: str, module: str, *args: str) -> str:
        return self._ready(self._spawn(name, module, *args))

    def start(self) -> LocalSystem:
        """Start broker (unless given) and cloud at once, then edge and device agent, each once the ones before
        are ready."""
        try:
            broker = None
            if self.mqtt and self.broker is None:
                secure = ("--secrets", self.secrets) if self.secrets else ()
                broker = self._spawn("broker", "splitglm.broker", "--host", self.host, "--port", str(free_port()),
                                     *secure)
            elif self.mqtt:
                broker_address(self.broker)  # a clear error for a malformed URL before anything loads
            threads = ("--threads", str(self.threads))
            cloud = self._spawn("cloud", "cloud_service", "--plan", self.plan, "--host", self.host, "--port", "0",
                                *threads, *self._cloud_tls())
            if broker is not None:
                self.broker = self._ready(broker)
            if self.mqtt:
                self.urls["mqtt"] = self.broker
            cloud = self._ready(cloud)
            cloud = cloud.split("://", 1)[-1]
            if self.cloud_rtt_ms is not None:
                host, _, port = cloud.rpartition(":")
                self.proxy = DelayProxy(host, int(port), self.cloud_rtt_ms,
                                        bandwidth_mbit_s=self.cloud_bandwidth_mbit_s).start()
                cloud = self.proxy.address
            if self.mqtt and self.device_rtt_ms is not None:
                self.device_proxy = DelayProxy(*broker_address(self.broker), self.device_rtt_ms,
                                               bandwidth_mbit_s=self.device_bandwidth_mbit_s).start()
            self._start("edge", "edge_node", "--plan", self.plan, "--broker", self.broker if self.mqtt else "",
                        "--cloud", cloud, "--http-host", self.host,
                        "--http-port", str(self.http_port or free_port()), *threads, *self._edge_security(),
                        *self.edge_args)
            if self.mqtt and self.device_agent:
                self._start("device", "device_agent", "--plan", self.plan, "--broker", self.device_broker,
                            "--device-id", self.device_id, "--max-tokens", str(self.device_max_tokens), *threads,
                            *self._device_login(), *self.device_args)
        except BaseException:
            self.stop()
            raise
        return self

    # ---- security (with ``secrets``) -------------------------------------------------------------

    def _secret(self, *parts: str) -> str:
        return str(Path(self.secrets, *parts))

    def _cloud_tls(self) -> tuple[str, ...]:
        if not self.secrets:
            return ()
        return ("--tls-cert", self._secret("cloud", "server.crt"), "--tls-key", self._secret("cloud", "server.key"),
                "--tls-client-ca", self._secret("ca.crt"))

    def _edge_security(self) -> tuple[str, ...]:
        if not self.secrets:
            return ()
        login = ("--mqtt-username", self.edge_id, "--mqtt-password-file", self._secret("edges", self.edge_id,
                 "password"), "--mqtt-ca-file", self._secret("ca.crt")) if self.mqtt else ()
        return ("--edge-id", self.edge_id, *login,
                "--cloud-ca", self._secret("ca.crt"), "--cloud-cert", self._secret("edge", "client.crt"),
                "--cloud-key", self._secret("edge", "client.key"),
                "--tls-cert", self._secret("edge", "server.crt"), "--tls-key", self._secret("edge", "server.key"),
                "--api-keys-file", self._secret("api-key"))

    def _device_login(self) -> tuple[str, ...]:
        if not self.secrets:
            return ()
        return ("--mqtt-username", self.device_id, "--mqtt-password-file",
                self._secret("devices", self.device_id, "password"), "--mqtt-ca-file", self._secret("ca.crt"))

    def _sensors_login(self) -> tuple[str, ...]:
        """The device's sensors login (``{device}$sensors``, bound to the simulator's client id)."""
        if not self.secrets:
            return ()
        folder = Path(self._secret("sensors", self.device_id))
        return ("--mqtt-username", (folder / "username").read_text().strip(), "--mqtt-password-file",
                str(folder / "password"), "--mqtt-ca-file", self._secret("ca.crt"))

    @property
    def device_auth(self) -> MqttAuth | None:
        """The login that reads the device's answers (None without secrets): its app login ``{device}$app``,
        bound to ``splitglm-app-{device}`` (the device's own login is the device agent's alone)."""
        if not self.secrets:
            return None
        folder = Path(self._secret("apps", self.device_id))
        return MqttAuth.from_files((folder / "username").read_text().strip(), folder / "password",
                                   Path(self._secret("ca.crt")), client_id("app", self.device_id))

    @property
    def api_key(self) -> str | None:
        """The first HTTP API key (None without secrets)."""
        if not self.secrets:
            return None
        return Path(self._secret("api-key")).read_text().split()[0]

    @property
    def http(self) -> str:
        return self.urls["edge"]

    @property
    def device_broker(self) -> str:
        """The broker's URL for the device: through ``device_proxy`` when the device link is shaped."""
        if self.device_proxy is None:
            return self.broker
        return f"{urlsplit(self.broker).scheme}://{self.device_proxy.address}"

    def publish_readings(self, count: int, interval_s: float = 0.5) -> Proc:
        """Run the sensor simulator for ``count`` readings of this system's device."""
        proc = Proc("sensors", [sys.executable, "-m", "device_agent.simulator", "--broker", self.broker,
                                "--device-id", self.device_id, "--count", str(count), "--interval-s", str(interval_s),
                                *self._sensors_login()])
        self.procs.append(proc)
        return proc

    def stop(self) -> dict[str, int]:
        """Stop every child, last started first, then the delay proxies; return the children's exit codes."""
        codes = {}
        for proc in reversed(self.procs):
            codes[proc.name] = proc.stop()
        self.procs.clear()
        for proxy in (self.proxy, self.device_proxy):
            if proxy is not None:
                proxy.stop()
        self.proxy = self.device_proxy = None
        return codes

    def __enter__(self) -> LocalSystem:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ResultListener:
    """Collects the JSON answers published on ``results/{device_id}``."""

    def __init__(self, broker: str, device_id: str, auth: MqttAuth | None = None):
        self.topic = results_topic(device_id)
        self.answers: list[dict] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        protocol = resolve_protocol(broker, "auto", auth)
        self.client = new_client(auth.client_id if auth and auth.client_id else f"splitglm-demo-{free_port()}",
                                 protocol)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a, **k: self._subscribed.set()
        self.client.on_message = self._on_message
        connect(self.client, broker, protocol, auth)
        if not self._subscribed.wait(30):
            raise ConnectionError(f"could not subscribe to {self.topic} on {broker}")

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, message):
        try:
            answer = json.loads(message.payload)
        except ValueError:
            logger.warning("ignoring a non-JSON message on %s", message.topic)
            return
        with self._changed:
            self.answers.append(answer)
            self._changed.notify_all()

    def covered(self) -> int:
        return sum(len(a.get("readings", [])) for a in self.answers)

    def wait_for_readings(self, count: int, timeout_s: float) -> list[dict]:
        """Block until the answers cover ``count`` readings; return them (TimeoutError otherwise)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.covered() >= count, timeout_s):
                raise TimeoutError(f"answers covered {self.covered()} of {count} readings after {timeout_s:g} s")
            return list(self.answers)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class LocalDevice:
    """A device in this process: a plan's device tier over the device agent's MQTT link (``EdgeLink``).

    ``generation`` gives the owner's decode loop (``runtime.owner.Generation``) for prompt ids;
    iterating it runs the steps, and its ``step_timings`` say where each step's time went. ``tier``: a
    loaded ``device_agent.agent.DeviceTier`` that several devices here share (one step at a time, through
    its lock; None: the plan's device tier, loaded for this device); ``auth``: the device's MQTT login."""

    def __init__(self, plan: str | None, broker: str, device_id: str = "local-device", step_timeout_s: float = 120.0,
                 auth: MqttAuth | None = None, tier=None):
        from device_agent.link import EdgeLink
        from runtime.artifacts import load_plan, load_tier

        self.device_id = device_id
        if tier is None:
            self.segment, self.lock = load_tier(plan, "device"), None
            self.codec = load_plan(plan)["codecs"]["device_edge"]
        else:
            self.segment, self.codec, self.lock = tier.segment, tier.codec, tier.lock
        protocol = wait_for_broker(broker, "auto", START_TIMEOUT_S, auth)
        # with a login: the device's own client id, bound to it
        self.client = new_client(auth.client_id if auth and auth.client_id else f"splitglm-{device_id}-{free_port()}",
                                 protocol)
        self.link = EdgeLink(self.client, protocol, device_id, step_timeout_s=step_timeout_s)
        self.client.on_connect = self.link.on_connect
        self.client.on_disconnect = self.link.on_disconnect
        connect(self.client, broker, protocol, auth)

    def generation(self, prompt_ids: list[int], params, tokenizer=None) -> Generation:
        """One generation of ``prompt_ids`` with these ``GenerationParams`` (token ids only, unless a
        ``tokenizer`` is given to decode the text as the device agent does)."""
        from runtime.owner import Generation

        return Generation(self.segment, self.link, list(prompt_ids), params, self.codec, tokenizer=tokenizer,
                          lock=self.lock)

    def close(self) -> None:
        self.link.shutdown()
        self.client.disconnect()
        self.client.loop_stop()
