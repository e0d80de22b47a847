"""Traces: one trace per request across every process it crosses, exported over OTLP/HTTP by the standard
``OTEL_*`` variables to a receiver in the test; and, without those variables, no SDK at all.

The real processes (a broker, cloud, edge, device agent) run the tiny talking plan. An HTTP completion sent
with a caller's ``traceparent`` must come back as spans of the edge and the cloud under the caller's trace id; a
sensor reading as spans of the device, the edge and the cloud under one trace id: the context crosses MQTT in a
v5 user property on every frame (Mosquitto), or in the session's first frame alone (the embedded MQTT 3.1.1
broker), and gRPC in metadata. No span carries the prompt's text.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from splitglm.bench.otlp import OtlpReceiver
from splitglm.system import LocalSystem, ResultListener

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # the HTTP caller's trace
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PROMPT = "a secret prompt"
ANSWER_S = 60.0
SERVICES = {"cloud": "splitglm-cloud", "edge": "splitglm-edge", "device": "splitglm-device"}


def test_without_otel_variables_the_sdk_is_never_imported():
    code = ("import sys; from runtime import tracing; assert not tracing.setup('t') and not tracing.enabled; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    env["OTEL_TRACES_EXPORTER"] = "console"  # and the same switch turns it on
    code = "import sys; from runtime import tracing; assert tracing.setup('t') and 'opentelemetry.sdk' in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)


def test_wanted_reads_only_the_standard_variables():
    from runtime.tracing import wanted

    assert not wanted({}) and not wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) and wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"})
    assert not wanted({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])  # MQTT v5 (user properties), 3.1.1 (the frame)
def test_a_completion_and_a_reading_are_each_one_trace_across_their_processes(talking_plan, request, monkeypatch,
                                                                              broker):
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    mosquitto = request.getfixturevalue("mosquitto") if broker == "mosquitto" else None  # else amqtt, started here
    with OtlpReceiver(keep=True) as sink:
        for name, value in sink.env().items():
            monkeypatch.setenv(name, value)
        with LocalSystem(talking_plan, broker=mosquitto and mosquitto.url, device_max_tokens=2) as system:
            listener = ResultListener(system.broker, system.device_id)
            try:
                response = httpx.post(f"{system.http}/v1/completions", headers={"traceparent": CALLER},
                                      json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}, timeout=ANSWER_S)
                assert response.status_code == 200, response.text
                assert system.publish_readings(1, 0).popen.wait(60) == 0
                [answer] = listener.wait_for_readings(1, ANSWER_S)
                assert answer["error"] is None, answer
            finally:
                listener.close()
            codes = system.stop()  # each agent flushes its spans as it stops
        assert all(code == 0 for code in codes.values()), codes
    spans = sink.spans

    http = [s for s in spans if s.trace_id == TRACE_ID]
    assert {s.service for s in http} == {SERVICES["edge"], SERVICES["cloud"]}
    names = {s.name for s in http}
    assert {"owner.step", "link.grpc.step", "cloud.step", "/splitglm.v1.SegmentService/Stream"} <= names, names
    assert any(s.name.startswith("POST /v1/completions") for s in http), names

    [root] = [s for s in spans if s.name == "device.answer"]
    reading = [s for s in spans if s.trace_id == root.trace_id]
    assert {s.service for s in reading} == set(SERVICES.values())
    assert {"owner.step", "link.mqtt.frame", "relay.frame", "link.grpc.step", "cloud.step"} <= {s.name for s in reading}
    relayed = [s for s in reading if s.name == "relay.frame"]
    assert {s.attributes["seq"] for s in relayed} == {0, 1}  # every frame of the session, not only the first

    # the cloud's batched steps: one span per step, linked to the steps of the sessions in it
    cloud_steps = {(s.trace_id, s.span_id) for s in spans if s.name == "cloud.step"}
    batched = [s for s in spans if s.name == "scheduler.step" and s.attributes["scheduler"] == "cloud-scheduler"]
    linked = {link for s in batched for link in s.links}
    assert cloud_steps <= linked and all(s.attributes["sessions"] == len(s.links) for s in batched)

    # ids and numbers only: no prompt text anywhere
    values = [str(v) for s in spans for v in s.attributes.values()]
    assert not any(PROMPT in v or "Recent readings" in v for v in values)
