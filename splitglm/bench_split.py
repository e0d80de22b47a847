"""``splitglm bench split``: per-token latency of the split path against monolithic generation.

Monolithic: the transformers model (``GlmForCausalLM``) in this process,
greedy decoding with its KV cache, one token per step. Split: the real
processes on loopback with a lossless codec (fp32) on both links, two ways:
the edge's HTTP API as session owner (edge [0, k2) -> gRPC -> cloud), and a
sensor answer (device [0, k1) -> MQTT broker -> edge [k1, k2) -> gRPC -> cloud).
Every tier gets the same torch threads as the monolithic run: a single
generation runs one tier at a time, so the tiers do not compete for cores.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request

import torch

from partitioner.checkpoint import load_hf_model, load_tokenizer

from .system import LocalSystem

PROMPT = "Explain in a few sentences what a software license is."


def _monolithic_step_ms(model_dir: str, prompt_ids: list[int], tokens: int, repeats: int) -> list[float]:
    """Per-token decode times (ms) of greedy generation in one process."""
    from transformers import DynamicCache

    model = load_hf_model(model_dir)
    times = []
    for _ in range(repeats):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            for _ in range(tokens - 1):
                t0 = time.perf_counter()
                logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
                token = int(logits[0, -1].argmax())
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def _http_step_ms(http: str, prompt: str, tokens: int, repeats: int) -> list[float]:
    """Per-token times (ms) between streamed SSE chunks of chat completions from the edge."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "stream": True,
            "temperature": 0,
        }
    ).encode()
    times = []
    for _ in range(repeats):
        request = urllib.request.Request(f"{http}/v1/chat/completions", body, {"Content-Type": "application/json"})
        stamps = []
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())
        times += [(b - a) * 1e3 for a, b in zip(stamps[1:-1], stamps[2:-1])]  # skip the role chunk and the last
    return times


def _mqtt_step_ms(system: LocalSystem, repeats: int) -> list[float]:
    """Per-token times (ms) of sensor answers: device -> MQTT -> edge -> gRPC -> cloud, as the device measured them."""
    from paho.mqtt import publish

    from protos.mqtt import broker_address

    from .system import ResultListener

    host, port = broker_address(system.broker)
    listener = ResultListener(system.broker, system.device_id)
    try:
        for i in range(repeats + 1):  # the first answer warms up
            publish.single(
                f"sensors/{system.device_id}/temperature",
                json.dumps({"value": 20.0 + i, "unit": "C"}),
                qos=1,
                hostname=host,
                port=port,
            )
            listener.wait_for_readings(i + 1, 600)
    finally:
        listener.close()
    answers = [a for a in listener.answers[1:] if a.get("tokens", 0) > 1 and not a.get("error")]
    return [a["timings_ms"]["per_token"] for a in answers]


def bench_split(
    plan: str,
    model_dir: str,
    tokens: int = 32,
    repeats: int = 3,
    threads: int = 2,
    mqtt: bool = True,
    broker: str | None = None,
) -> dict:
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    mono = _monolithic_step_ms(model_dir, list(prompt_ids), tokens, repeats)
    with LocalSystem(plan, broker=broker, threads=threads, mqtt=mqtt, device_max_tokens=tokens) as system:
        _http_step_ms(system.http, PROMPT, 4, 1)  # warm-up
        split = _http_step_ms(system.http, PROMPT, tokens, repeats)
        device = _mqtt_step_ms(system, repeats) if mqtt else []
    mono_ms, split_ms = statistics.median(mono), statistics.median(split)
    extra = {}
    if device:
        device_ms = statistics.median(device)
        extra = {
            "split_mqtt_ms_per_token": round(device_ms, 2),
            "mqtt_overhead_pct": round(100 * (device_ms / mono_ms - 1), 1),
        }
    return {
        "tokens": tokens,
        "repeats": repeats,
        "threads": threads,
        "monolithic_ms_per_token": round(mono_ms, 2),
        "split_http_ms_per_token": round(split_ms, 2),
        "overhead_pct": round(100 * (split_ms / mono_ms - 1), 1),
        "broker": "embedded amqtt (MQTT 3.1.1)" if broker is None else broker,
        **extra,
        "target_pct": 15.0,
    }
