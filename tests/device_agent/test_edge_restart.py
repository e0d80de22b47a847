"""The edge is killed (SIGKILL) while devices generate: the devices replay their sessions to a new edge.

Real processes on the demo model with lossless fp32 frames: Mosquitto, ``cloud_service``, ``edge_node``
and two ``device_agent``s (greedy, and seeded sampling at temperature 0.8), both forcing speculation so
that the edge drafts and the kill may land inside a draft round. Each answer after the kill must arrive
exactly once and equal, text and token count, the answer of an undisturbed run of the same reading.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from protos.mqtt import V5, broker_address
from protos.topics import frames_subscription, sensor_topic
from splitglm.system import ResultListener
from tests.procs import Mosquitto, Proc, free_port

pytestmark = pytest.mark.slow

EDGE = "edge-restart"
DEVICES = {"box-greedy": ("--temperature", "0"), "box-seeded": ("--temperature", "0.8", "--seed", "11")}
START_S = 300.0  # loading a tier on a busy 2-core machine takes a while
ANSWER_S = 400.0
MAX_TOKENS = 40
FRAMES_BEFORE_KILL = 4  # frames each device sends to the edge's own topic before the kill (a few tokens in)


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    from partitioner.plan.demo import demo_plan

    plan = str(demo_plan(codecs=("fp32", "fp32")))
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    procs: list[Proc] = []

    def start(name: str, module: str, *args: str) -> Proc:
        proc = Proc.python(name, module, *args)
        procs.append(proc)
        proc.ready(START_S)
        return proc

    def start_edge(edge_id: str) -> Proc:
        return start(f"edge {edge_id}", "edge_node", "--plan", plan, "--broker", broker.url, "--cloud", cloud_address,
                     "--edge-id", edge_id, "--http-host", "127.0.0.1", "--http-port", str(free_port()),
                     "--threads", "1")

    listeners: dict[str, ResultListener] = {}
    try:
        cloud = start("cloud", "cloud_service", "--plan", plan, "--host", "127.0.0.1", "--port", str(free_port()),
                      "--threads", "1")
        cloud_address = cloud.ready().removeprefix("grpc://")
        edge = start_edge(EDGE)
        devices = {
            device: start(device, "device_agent", "--plan", plan, "--broker", broker.url, "--device-id", device,
                          "--window", "1", "--max-tokens", str(MAX_TOKENS), "--speculate", "on",
                          "--step-timeout-s", "3", "--threads", "1", *flags)
            for device, flags in DEVICES.items()
        }
        listeners = {device: ResultListener(broker.url, device) for device in DEVICES}
        yield SimpleNamespace(broker=broker, edge=edge, devices=devices, listeners=listeners, start_edge=start_edge)
    finally:
        for listener in listeners.values():
            listener.close()
        for proc in reversed(procs):
            proc.stop()
        broker.stop()


def ask_all(system, ts: float) -> None:
    """The same reading (but its ``ts``, which is not in the prompt) to every device, QoS 1."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=V5)
    client.connect(*broker_address(system.broker.url))
    client.loop_start()
    try:
        for device in DEVICES:
            reading = json.dumps({"value": 23.5, "unit": "C", "ts": ts})
            client.publish(sensor_topic(device, "temperature"), reading, qos=1).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def answers(system, ts: float) -> dict[str, list[dict]]:
    return {device: [a for a in listener.answers if any(r.get("ts") == ts for r in a.get("readings", []))]
            for device, listener in system.listeners.items()}


def wait_answers(system, ts: float) -> dict[str, dict]:
    deadline = time.monotonic() + ANSWER_S
    while any(len(got) < 1 for got in answers(system, ts).values()):
        assert time.monotonic() < deadline, f"no answer to the reading of {ts} within {ANSWER_S} s"
        time.sleep(0.2)
    time.sleep(3)  # a duplicate answer would arrive by now
    got = answers(system, ts)
    assert all(len(a) == 1 for a in got.values()), got  # exactly once
    return {device: a[0] for device, a in got.items()}


class FrameWatch:
    """Counts each device's frames on an edge's own topic (seq >= 1: the device is generating)."""

    def __init__(self, url: str, edge_id: str):
        self.counts: Counter[str] = Counter()
        self.changed = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=V5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda client, *a: client.subscribe(frames_subscription(edge_id), qos=0)
        self.client.connect(*broker_address(url))
        self.client.loop_start()
        assert subscribed.wait(20)

    def _on_message(self, client, userdata, message) -> None:
        with self.changed:
            self.counts[message.topic.rsplit("/", 1)[-1]] += 1
            self.changed.notify_all()

    def wait(self, n: int, timeout_s: float) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: all(self.counts[d] >= n for d in DEVICES), timeout_s)
        assert ok, f"the devices sent {dict(self.counts)} frames to the edge, not {n} each"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def kill_edge_mid_generation(system, edge: Proc, ts: float) -> None:
    """Publish the reading to every device, SIGKILL ``edge`` once each device is a few tokens in."""
    watch = FrameWatch(system.broker.url, edge.args[edge.args.index("--edge-id") + 1])
    try:
        ask_all(system, ts)
        watch.wait(FRAMES_BEFORE_KILL, ANSWER_S)
    finally:
        watch.close()
    os.killpg(edge.popen.pid, signal.SIGKILL)
    edge.popen.wait(30)


def check_same(got: dict[str, dict], reference: dict[str, dict]) -> None:
    for device, answer in got.items():
        ref = reference[device]
        assert answer["error"] is None, answer
        assert (answer["text"], answer["tokens"]) == (ref["text"], ref["tokens"]), (device, answer, ref)
        assert answer["paths"] == ["accurate"] * answer["tokens"]


@pytest.fixture(scope="module")
def reference(system) -> dict[str, dict]:
    """The undisturbed answers."""
    ask_all(system, 1.0)
    got = wait_answers(system, 1.0)
    for answer in got.values():
        assert answer["error"] is None and answer["tokens"] >= FRAMES_BEFORE_KILL + 4, answer
        assert answer["speculative"]["drafted"] > 0, answer  # the edge drafted: draft rows were in flight
    return got


def replays(system) -> dict[str, list[str]]:
    """Each device's log lines of replays so far."""
    return {name: [line for line in device.lines if "replaying its" in line] for name, device in system.devices.items()}


def test_edge_restarts_with_the_same_id(system, reference):
    kill_edge_mid_generation(system, system.edge, 2.0)
    system.edge = system.start_edge(EDGE)
    check_same(wait_answers(system, 2.0), reference)
    print(replays(system))
    assert all(len(lines) == 1 for lines in replays(system).values()), replays(system)


def test_another_edge_takes_over(system, reference):
    before = replays(system)
    kill_edge_mid_generation(system, system.edge, 3.0)
    system.edge = system.start_edge("edge-other")
    check_same(wait_answers(system, 3.0), reference)
    after = replays(system)
    print(after)
    assert all(len(after[d]) == len(before[d]) + 1 for d in DEVICES), after
    assert all("no answer from its edge" in after[d][-1] for d in DEVICES), after
