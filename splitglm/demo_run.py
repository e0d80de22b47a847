"""``splitglm demo``: the whole topology as local processes, its sensor answers and one HTTP completion.

This is command-line output: it prints. ``run_demo`` starts everything,
publishes a few simulated readings, prints the device's answers and one chat
completion from the edge's HTTP API, then stops every process (exit 0 only if
all of that worked). ``serve_demo`` keeps the topology up until SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.request
from pathlib import Path

from runtime.artifacts import load_plan
from runtime.settings import stop_on_signals

from .system import LocalSystem, ResultListener

ANSWER_TIMEOUT_S = 600.0


def _describe(plan_dir: str) -> str:
    plan = load_plan(plan_dir)
    k1, k2 = plan["splits"]
    codecs = plan["codecs"]
    return (f"device [0,{k1}) edge [{k1},{k2}) cloud [{k2},{plan['num_layers']}); "
            f"codecs device->edge {codecs['device_edge']}, edge->cloud {codecs['edge_cloud']}")


OPEN_NOTE = ("security: off -- plain MQTT, gRPC and HTTP without logins or keys, on loopback only "
             "(--secure turns on TLS, logins, the MQTT ACL and API keys)")


def demo_secrets(device_id: str, folder: str | None = None) -> str:
    """The secrets of a secure demo: ``folder`` as given, else the cache's (made once, remade for a new device)."""
    from partitioner.convert import default_cache_dir
    from splitglm.credentials import make_secrets

    if folder is not None:
        if not all((Path(folder) / kind / device_id / "password").is_file() for kind in ("devices", "sensors", "apps")):
            raise ValueError(f"{folder} has no MQTT logins for device {device_id!r} and its sensors and app "
                             "(see `splitglm secrets --devices`)")
        return folder
    out = default_cache_dir() / "demo-secrets" / device_id
    if not (out / "sensors" / device_id / "password").is_file():  # older caches lack the sensors and app logins
        make_secrets(out, devices=[device_id], force=True)
    return str(out)


def _chat(system: LocalSystem, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    context = None
    if system.secrets:
        headers["Authorization"] = f"Bearer {system.api_key}"
        context = ssl.create_default_context(cafile=str(Path(system.secrets) / "ca.crt"))
    request = urllib.request.Request(f"{system.http}/v1/chat/completions", body, headers)
    with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S, context=context) as response:
        return json.loads(response.read())


def _print_answer(answer: dict) -> None:
    readings = ", ".join(
        f"{r.get('sensor', '?')}={r.get('value', r)}{r.get('unit', '') or ''}" for r in answer.get("readings", [])
    )
    if answer.get("error"):
        print(f"  [{readings}] -> error: {answer['error']}")
        return
    t = answer.get("timings_ms", {})
    print(f"  [{readings}]")
    print(f"    -> {answer.get('text', '').strip()!r}")
    print(f"       ({answer.get('tokens')} tokens, path {answer.get('path')}, "
          f"first token {t.get('ttft', 0):.0f} ms, then {t.get('per_token', 0):.1f} ms/token)")


def run_demo(plan: str, broker: str | None, device_id: str, threads: int, readings: int,
             prompt: str, max_tokens: int, secrets: str | None = None) -> int:
    print(f"plan: {plan}\n  {_describe(plan)}")
    print(f"secrets: {secrets}" if secrets else OPEN_NOTE)
    system = LocalSystem(plan, broker=broker, device_id=device_id, threads=threads, secrets=secrets)
    print("starting broker, cloud, edge and device agent (each a separate process)...", flush=True)
    with system:
        print(f"mqtt: {system.urls['mqtt']}{'' if broker else ' (embedded amqtt broker)'}")
        print(f"cloud: {system.urls['cloud']}\nhttp: {system.http}\ndevice: {device_id}", flush=True)
        listener = ResultListener(system.broker, device_id, system.device_auth)
        try:
            sensors = system.publish_readings(readings)
            print(f"\nsensor answers ({readings} readings published to sensors/{device_id}/...):", flush=True)
            start = time.monotonic()
            shown = 0
            while listener.covered() < readings:
                answers = listener.wait_for_readings(
                    min(readings, listener.covered() + 1), ANSWER_TIMEOUT_S - (time.monotonic() - start)
                )
                for answer in answers[shown:]:
                    _print_answer(answer)
                shown = len(answers)
            if sensors.stop() != 0:
                print("the sensor simulator failed:\n" + sensors.output)
                return 1
        finally:
            listener.close()
        print(f"\nHTTP completion (POST {system.http}/v1/chat/completions):\n  prompt: {prompt}", flush=True)
        reply = _chat(system, prompt, max_tokens)
        info = reply.get("splitglm", {})
        timings = info.get("timings_ms", {})
        print(f"  answer: {reply['choices'][0]['message']['content'].strip()}")
        print(f"  ({reply['usage']['completion_tokens']} tokens, path {info.get('path')}, "
              f"first token {timings.get('ttft', 0):.0f} ms, then {timings.get('per_token', 0):.1f} ms/token)")
        codes = system.stop()
    bad = {name: code for name, code in codes.items() if code != 0}
    print(f"\nstopped {len(codes)} processes" + (f"; non-zero exits: {bad}" if bad else " cleanly"))
    return 1 if bad else 0


def serve_demo(plan: str, broker: str | None, device_id: str, threads: int, http_port: int,
               secrets: str | None = None) -> int:
    if not secrets:
        print(OPEN_NOTE, flush=True)
    system = LocalSystem(plan, broker=broker, device_id=device_id, threads=threads, http_port=http_port,
                         secrets=secrets)
    with stop_on_signals() as stop, system:
        print(f"http: {system.http}\nmqtt: {system.urls['mqtt']}\ndevice: {device_id}", flush=True)
        print(f"cloud: {system.urls['cloud'].split('://', 1)[-1]}", flush=True)
        if secrets:
            print(f"secrets: {secrets}", flush=True)
        print(f"plan: {plan} ({_describe(plan)})", flush=True)
        system.publish_readings(3, interval_s=1.0)
        while not stop.wait(1.0):
            dead = [p.name for p in system.procs if p.name != "sensors" and not p.alive()]
            if dead:
                print(f"stopping: {', '.join(dead)} exited unexpectedly", flush=True)
                return 1
        print("stopping...", flush=True)
    return 0
