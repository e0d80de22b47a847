"""``splitglm bench fanin``: many simulated devices fanning in through a real Mosquitto, secure configuration.

One topology for every level: ``splitglm secrets`` made for the run, Mosquitto with its ``mosquitto.conf``
(TLS only, a login per device, the ACL), ``cloud_service`` behind mutual TLS and ``edge_node``
(``splitglm.system.LocalSystem``). A level of N devices runs N real ``device_agent.agent.DeviceAgent``s in
this process, sharing one loaded device tier, each with its own MQTT login; beside each, a sensor client
with the same login publishes that device's readings (QoS 1) and listens on ``results/<device>``. Every
device publishes ``readings_per_device`` readings ``interval_s`` apart, the devices' starts spread evenly
over the first interval. The agents of a level are stopped before the next level starts theirs.

Per level: readings covered exactly once by an answer (delivered), by none within ``answer_timeout_s``
(lost), by more than one (duplicated); publish-to-answer p50/p99, ms; the CPU of the broker, the edge and
this process (the simulated devices) over the level, percent of one core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protos.mqtt import MqttAuth, connect, new_client, wait_for_broker
from protos.topics import client_id, results_topic, sensor_topic

from ..processes import Proc, free_port, mosquitto_binary
from .options import add_command, add_model_plan, plan_of
from .select_patch import lift_select_limit
from .stats import percentile

logger = logging.getLogger(__name__)
EDGE = "edge-demo"
BROKER = "mosquitto (secure: TLS, a login per device, ACL)"
SENSOR = "temperature"
BROKER_START_S = 20.0  # longest wait for Mosquitto's TLS port, seconds
READY_S = 120.0  # longest wait for a level's agents and sensor clients to subscribe, seconds
DUPLICATE_GRACE_S = 1.0  # after the last reading is covered, how long a second answer may still arrive, seconds
ROLE_FOLDERS = {"sensors": "sensors", "app": "apps"}  # where `splitglm secrets` writes each role's login
Progress = Callable[[int, int, int], None]  # (devices of the level, readings covered, readings published)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used, seconds (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


@dataclass
class Ledger:
    """One level's readings: when each was published, which answers covered it and when."""

    sent: dict[str, float] = field(default_factory=dict)  # reading id -> publish time (monotonic, s)
    covers: dict[str, list[float]] = field(default_factory=dict)  # reading id -> arrival times of its answers
    answers: int = 0
    errors: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def published(self, reading_id: str, at: float) -> None:
        with self.changed:
            self.sent[reading_id] = at
            self.covers.setdefault(reading_id, [])

    def answered(self, answer: dict, at: float) -> None:
        """An answer arrived: count it where it covers readings of this level."""
        ids = [r.get("id") for r in answer.get("readings", []) if isinstance(r, dict)]
        with self.changed:
            ours = [i for i in ids if i in self.covers]
            if not ours:
                return  # an answer of another level (or not a bench reading)
            self.answers += 1
            self.errors += bool(answer.get("error"))
            for i in ours:
                self.covers[i].append(at)
            self.changed.notify_all()

    def covered(self) -> int:
        return sum(1 for times in self.covers.values() if times)

    def wait(self, total: int, until: float, progress: Callable[[int], None]) -> None:
        """Block until ``total`` readings are covered or ``until`` (monotonic) passes."""
        with self.changed:
            while (done := self.covered()) < total and time.monotonic() < until:
                progress(done)
                self.changed.wait(min(1.0, max(until - time.monotonic(), 0.01)))
            progress(self.covered())

    def row(self, timeout_s: float) -> dict:
        with self.changed:
            on_time = {i: [t for t in self.covers[i] if t - sent <= timeout_s] for i, sent in self.sent.items()}
            latencies = [(times[0] - self.sent[i]) * 1e3 for i, times in on_time.items() if times]
            return {"readings": len(self.sent), "answers": self.answers,
                    "delivered": sum(len(t) == 1 for t in on_time.values()),
                    "lost": sum(not t for t in on_time.values()),
                    "duplicated": sum(len(t) > 1 for t in on_time.values()), "errors": self.errors,
                    "p50_ms": round(percentile(latencies, 0.5), 2), "p99_ms": round(percentile(latencies, 0.99), 2)}


class Sensor:
    """One device's sensors and answer listener: two MQTT clients, with the device's sensors login (it
    publishes) and its app login (it reads the answers); each login is bound to its one client id."""

    def __init__(self, device_id: str, broker: str, sensors: MqttAuth, app: MqttAuth):
        self.device_id, self.topic = device_id, results_topic(device_id)
        self.ledger: Ledger | None = None
        self.subscribed = threading.Event()
        protocol = wait_for_broker(broker, "auto", 60, app)
        self.client = new_client(app.client_id, protocol)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a, **k: self.subscribed.set()
        self.client.message_callback_add(self.topic, self._on_answer)
        connect(self.client, broker, protocol, app)
        self.sender = new_client(sensors.client_id, wait_for_broker(broker, "auto", 60, sensors))
        connect(self.sender, broker, protocol, sensors)

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            logger.error("sensor %s: the broker refused the connection: %s", self.device_id, reason_code)
            return
        client.subscribe(self.topic, qos=1)

    def _on_answer(self, client, userdata, message) -> None:
        at = time.monotonic()
        try:
            answer = json.loads(message.payload)
        except ValueError:
            logger.warning("ignoring a non-JSON message on %s", message.topic)
            return
        if (ledger := self.ledger) is not None and isinstance(answer, dict):
            ledger.answered(answer, at)

    def publish(self, reading_id: str, value: float) -> None:
        body = {"value": value, "unit": "C", "ts": time.time(), "id": reading_id}
        self.ledger.published(reading_id, time.monotonic())
        self.sender.publish(sensor_topic(self.device_id, SENSOR), json.dumps(body), qos=1)

    def close(self) -> None:
        for client in (self.client, self.sender):
            client.disconnect()
            client.loop_stop()


def start_mosquitto(conf: Path, port: int) -> Proc:
    """Mosquitto with ``conf``, once its TLS port accepts connections."""
    proc = Proc("mosquitto", [mosquitto_binary(), "-c", str(conf)])
    deadline = time.monotonic() + BROKER_START_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return proc
        except OSError:
            if not proc.alive() or time.monotonic() > deadline:
                proc.stop()
                raise RuntimeError(f"mosquitto did not listen on {port}:\n{proc.output}") from None
            time.sleep(0.1)


def schedule(n: int, readings: int, interval_s: float) -> list[tuple[float, int, int]]:
    """(seconds from the start, device index, reading index) in order: starts spread over the first interval."""
    return sorted((d * interval_s / n + k * interval_s, d, k) for d in range(n) for k in range(readings))


class Fanin:
    """The running topology and the simulated devices of ``bench_fanin``."""

    def __init__(self, plan: str, folder: Path, port: int, threads: int):
        self.plan, self.folder, self.port, self.threads = plan, folder, port, threads
        self.url = f"mqtts://127.0.0.1:{port}"
        self.mosquitto: Proc | None = None
        self.system = None
        self.tier = None
        self.sensors: dict[str, Sensor] = {}
        self.agents: list = []

    def start(self) -> Fanin:
        """Mosquitto, then cloud and edge (``LocalSystem``), then the shared device tier."""
        from device_agent.agent import DeviceTier
        from splitglm.system import LocalSystem

        self.mosquitto = start_mosquitto(self.folder / "mosquitto" / "mosquitto.conf", self.port)
        self.system = LocalSystem(self.plan, broker=self.url, secrets=str(self.folder), edge_id=EDGE,
                                  device_agent=False, threads=self.threads).start()
        self.tier = DeviceTier.load(self.plan)
        return self

    def auth(self, role: str, device_id: str) -> MqttAuth:
        """The ``sensors`` or ``app`` login of a device, bound to its client id."""
        folder = self.folder / ROLE_FOLDERS[role] / device_id
        return MqttAuth.from_files((folder / "username").read_text().strip(), folder / "password",
                                   self.folder / "ca.crt", client_id(role, device_id))

    def start_agents(self, devices: Sequence[str], max_tokens: int) -> None:
        """A running, subscribed DeviceAgent and Sensor for each of ``devices``."""
        from device_agent.agent import DeviceAgent
        from device_agent.settings import DeviceSettings

        for d in devices:
            settings = DeviceSettings(plan=self.plan, device_id=d, broker=self.url, mqtt_username=d,
                                      mqtt_password_file=self.folder / "devices" / d / "password",
                                      mqtt_ca_file=self.folder / "ca.crt", max_tokens=max_tokens,
                                      threads=self.threads)
            self.agents.append(DeviceAgent(settings, tier=self.tier).start())
            if d not in self.sensors:
                self.sensors[d] = Sensor(d, self.url, self.auth("sensors", d), self.auth("app", d))
        deadline = time.monotonic() + READY_S
        waiting = [*(a.ready for a in self.agents), *(self.sensors[d].subscribed for d in devices)]
        if not all(e.wait(max(deadline - time.monotonic(), 0)) for e in waiting):
            raise TimeoutError(f"{len(devices)} devices did not all subscribe within {READY_S:g} s")

    def stop_agents(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.agents.clear()

    def cpu(self) -> dict[str, float | None]:
        edge = next(p for p in self.system.procs if p.name == "edge")
        pids = {"broker": self.mosquitto.popen.pid, "edge": edge.popen.pid, "devices": os.getpid()}
        return {name: cpu_seconds(pid) for name, pid in pids.items()}

    def level(self, devices: Sequence[str], readings: int, interval_s: float, timeout_s: float,
              progress: Progress | None) -> dict:
        """Publish every device's readings on ``schedule``, collect the answers; the level's row."""
        ledger = Ledger()
        for d in devices:
            self.sensors[d].ledger = ledger
        plan, total = schedule(len(devices), readings, interval_s), len(devices) * readings
        cpu0, started = self.cpu(), time.monotonic()
        for at, d, k in plan:
            time.sleep(max(started + at - time.monotonic(), 0))
            self.sensors[devices[d]].publish(f"n{len(devices)}-{devices[d]}-{k}", round(20 + 0.1 * k, 1))
        report = progress or (lambda *_: None)
        ledger.wait(total, time.monotonic() + timeout_s, lambda done: report(len(devices), done, total))
        if ledger.covered() == total:
            time.sleep(DUPLICATE_GRACE_S)
        wall_s = time.monotonic() - started
        cpu1 = self.cpu()
        pct = {f"{k}_cpu_pct": None if cpu0[k] is None or cpu1[k] is None
               else round(100 * (cpu1[k] - cpu0[k]) / wall_s, 1) for k in cpu0}
        return {"devices": len(devices), **ledger.row(timeout_s), "wall_s": round(wall_s, 2), **pct}

    def close(self) -> None:
        """Stop whatever started: agents, sensor clients, cloud and edge, Mosquitto."""
        parts = [self.stop_agents, *(s.close for s in self.sensors.values()), self.system and self.system.stop,
                 self.mosquitto and self.mosquitto.stop]
        for closing in filter(None, parts):
            try:
                closing()
            except Exception:  # noqa: BLE001 -- stop everything else regardless
                logger.exception("stopping the fan-in topology")


def bench_fanin(plan: str, devices=(50, 100, 200), readings_per_device: int = 2, interval_s: float = 1.0,
                max_tokens: int = 1, threads: int = 1, answer_timeout_s: float = 600.0,
                progress: Progress | None = None) -> list[dict]:
    """One row per level of ``devices``: readings delivered, lost, duplicated; latency; CPU of each party."""
    from ..credentials import make_secrets

    ids = [f"fanin-dev-{i}" for i in range(max(devices))]
    lift_select_limit()  # some 400 clients here: descriptors past select's 1024
    with tempfile.TemporaryDirectory(prefix="splitglm-fanin-") as tmp:
        port = free_port()
        folder = make_secrets(Path(tmp) / "secrets", devices=ids, edges=[EDGE], mqtt_port=port)
        fanin = Fanin(plan, Path(folder), port, threads)
        try:
            fanin.start()
            rows = []
            for n in devices:
                fanin.start_agents(ids[:n], max_tokens)
                try:
                    row = fanin.level(ids[:n], readings_per_device, interval_s, answer_timeout_s, progress)
                finally:
                    fanin.stop_agents()
                rows.append({**row, "broker": BROKER, "max_tokens": max_tokens,
                             "readings_per_device": readings_per_device, "interval_s": interval_s})
                logger.info("fan-in level: %s", rows[-1])
        finally:
            fanin.close()
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'devices':>7} {'readings':>8} {'answers':>7} {'delivered':>9} {'lost':>5} {'dup':>4} {'errors':>6} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'wall s':>7} {'broker %':>8} {'edge %':>7} {'devices %':>9}"]
    for r in rows:
        lines.append(f"{r['devices']:>7} {r['readings']:>8} {r['answers']:>7} {r['delivered']:>9} {r['lost']:>5} "
                     f"{r['duplicated']:>4} {r['errors']:>6} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['wall_s']:>7} "
                     f"{r['broker_cpu_pct']!s:>8} {r['edge_cpu_pct']!s:>7} {r['devices_cpu_pct']!s:>9}")
    if rows:
        lines.append(f"broker: {rows[0]['broker']}; {rows[0]['readings_per_device']} readings per device, "
                     f"{rows[0]['interval_s']:g} s apart, {rows[0]['max_tokens']} token(s) per answer; "
                     "CPU in percent of one core over the level")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = add_command(sub, "fanin", run, "many simulated devices through Mosquitto (TLS, a login per device, ACL): "
                    "readings delivered, lost, duplicated; latency; broker and edge CPU")
    add_model_plan(p)
    p.add_argument("--devices", default="50,100,200", help="device counts, one level each (default 50,100,200)")
    p.add_argument("--readings", type=int, default=2, help="readings per device and level (default 2)")
    p.add_argument("--interval-s", type=float, default=1.0, help="between a device's readings, seconds (default 1)")
    p.add_argument("--max-tokens", type=int, default=1, help="new tokens per answer (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process (default 1)")
    p.add_argument("--answer-timeout-s", type=float, default=600.0, help="a reading not answered within this is "
                   "lost, seconds (default 600)")
    p.add_argument("--json", action="store_true", help="print the JSON list of rows")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    plan = plan_of(args)
    levels = tuple(int(n) for n in args.devices.split(",") if n.strip())
    bars: dict[int, tqdm] = {}

    def progress(devices, done, total):
        bar = bars.get(devices) or bars.setdefault(devices, tqdm(total=total, desc=f"{devices} devices",
                                                                 unit="reading", file=sys.stderr))
        bar.update(done - bar.n)

    try:
        rows = bench_fanin(plan, levels, args.readings, args.interval_s, args.max_tokens, args.threads,
                           args.answer_timeout_s, progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0 if all(r["delivered"] == r["readings"] for r in rows) else 1
