"""``splitglm bench split``: per-token latency of the split path against monolithic generation.

Monolithic: the transformers model (``GlmForCausalLM``) in this process,
greedy decoding with its KV cache, one token per step. Split: the real
processes on loopback with a lossless codec (fp32) on both links, two ways:
the edge's HTTP API as session owner (edge [0, k2) -> gRPC -> cloud), and a
sensor answer (device [0, k1) -> MQTT broker -> edge [k1, k2) -> gRPC -> cloud).
Speculation is off here (``splitglm bench speculative`` measures it): this is the cost of the
split itself. Every tier gets the same torch threads as the monolithic run: a single
generation runs one tier at a time, so the tiers do not compete for cores.
The three run in interleaved rounds (one generation each per round), so a
drift in the machine's speed hits them alike. Monolithic and HTTP figures are
medians of the per-token gaps; the device path's is the median of each
answer's mean per token, as the device agent reports it. Each split answer
also says where its time went (``stages_ms``, ``runtime.owner.stage_breakdown``).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

import torch

from runtime.checkpoint import load_hf_model, load_tokenizer

from ..system import LocalSystem, ResultListener
from .options import MODEL_HELP, add_command
from .stats import mean, median, overhead_pct

PROMPT = "Explain in a few sentences what a software license is."


def _monolithic_step_ms(model, prompt_ids: list[int], tokens: int) -> list[float]:
    """Per-token decode times (ms) of one greedy generation in this process."""
    from transformers import DynamicCache

    times = []
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


def _http_step_ms(http: str, prompt: str, tokens: int) -> tuple[list[float], dict]:
    """Per-token times (ms) between the streamed SSE chunks of one chat completion from the edge, and its
    stage breakdown (``splitglm.stages_ms`` of the last chunk)."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "stream": True,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(f"{http}/v1/chat/completions", body, {"Content-Type": "application/json"})
    stamps, last = [], b""
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
                last = line
    times = [(b - a) * 1e3 for a, b in zip(stamps[1:-1], stamps[2:-1])]  # skip the role chunk and the last
    return times, json.loads(last[len(b"data: ") :])["splitglm"]["stages_ms"]


def _mqtt_answer(system: LocalSystem, listener, n: int) -> dict:
    """The device agent's answer to the ``n``-th reading (device -> MQTT -> edge -> gRPC -> cloud)."""
    reading = json.dumps({"value": 20.0 + n, "unit": "C"})
    listener.client.publish(f"sensors/{system.device_id}/temperature", reading, qos=1)
    answers = listener.wait_for_readings(n + 1, 600)
    answer = answers[-1]
    if answer.get("error"):
        raise RuntimeError(f"the device agent answered with an error: {answer['error']}")
    return answer


def _mean_stages(breakdowns: list[dict]) -> dict[str, float]:
    """The per-stage mean over several answers' breakdowns (ms per token)."""
    names = [name for name in breakdowns[0] if all(name in b for b in breakdowns)] if breakdowns else []
    return {name: round(mean(b[name] for b in breakdowns), 2) for name in names}


def bench_split(
    plan: str,
    model_dir: str,
    tokens: int = 32,
    repeats: int = 5,
    threads: int = 2,
    mqtt: bool = True,
    broker: str | None = None,
) -> dict:
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    model = load_hf_model(model_dir)
    mono, split, device, split_stages, device_stages = [], [], [], [], []
    plain = {"edge_args": ("--speculate", "false"), "device_args": ("--speculate", "off")}  # the split itself
    with LocalSystem(plan, broker=broker, threads=threads, mqtt=mqtt, device_max_tokens=tokens, **plain) as system:
        listener = ResultListener(system.broker, system.device_id) if mqtt else None
        try:
            _monolithic_step_ms(model, list(prompt_ids), 4)  # warm-ups
            _http_step_ms(system.http, PROMPT, 4)
            if listener is not None:
                _mqtt_answer(system, listener, 0)
            for r in range(repeats):  # interleaved, so a drift of the machine's speed hits every path alike
                mono += _monolithic_step_ms(model, list(prompt_ids), tokens)
                times, stages = _http_step_ms(system.http, PROMPT, tokens)
                split += times
                split_stages.append(stages)
                if listener is not None:
                    answer = _mqtt_answer(system, listener, r + 1)
                    if answer["tokens"] > 1:
                        device.append(answer["timings_ms"]["per_token"])
                        device_stages.append(answer["stages_ms"])
        finally:
            if listener is not None:
                listener.close()
    mono_ms, split_ms = median(mono), median(split)
    extra = {}
    if device:
        device_ms = median(device)
        extra = {
            "split_mqtt_ms_per_token": round(device_ms, 2),
            "mqtt_overhead_pct": overhead_pct(device_ms, mono_ms),
            "split_mqtt_stages_ms": _mean_stages(device_stages),
        }
    return {
        "tokens": tokens,
        "repeats": repeats,
        "threads": threads,
        "monolithic_ms_per_token": round(mono_ms, 2),
        "split_http_ms_per_token": round(split_ms, 2),
        "overhead_pct": overhead_pct(split_ms, mono_ms),
        "split_http_stages_ms": _mean_stages(split_stages),
        "broker": "embedded amqtt (MQTT 3.1.1)" if broker is None else broker,
        **extra,
        "target_pct": 15.0,
    }


def add_parser(sub) -> None:
    p = add_command(sub, "split", run, "per-token latency: split path on loopback vs monolithic generation")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--plan", help="plan folder (default: the demo plan with lossless fp32 frames)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds, one generation of each path per round")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each process and of the monolithic run")
    p.add_argument("--no-mqtt", action="store_true", help="measure the HTTP path only (no broker, no device agent)")
    p.add_argument("--broker", help="MQTT broker URL for the device path (default: start the embedded amqtt broker)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from partitioner.convert import demo_model
    from partitioner.plan.demo import demo_plan

    model = args.model or str(demo_model())
    plan = args.plan or str(demo_plan(model, codecs=("fp32", "fp32")))
    result = bench_split(plan, model, args.tokens, args.repeats, args.threads, not args.no_mqtt, args.broker)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"plan {plan} (lossless fp32 frames), {args.threads} threads per process, {args.tokens} tokens")
        print(f"monolithic (transformers, one process): {result['monolithic_ms_per_token']:.1f} ms/token")
        print(f"split over loopback (HTTP -> edge -> gRPC -> cloud): {result['split_http_ms_per_token']:.1f} ms/token")
        print(f"overhead {result['overhead_pct']:+.1f}% (target within {result['target_pct']:g}%)")
        print(f"  where a token's time goes (ms): {_stages(result['split_http_stages_ms'])}")
        if "split_mqtt_ms_per_token" in result:
            print(f"split over loopback (device -> MQTT -> edge -> gRPC -> cloud): "
                  f"{result['split_mqtt_ms_per_token']:.1f} ms/token, overhead {result['mqtt_overhead_pct']:+.1f}%")
            print(f"  where a token's time goes (ms): {_stages(result['split_mqtt_stages_ms'])}")
    return 0


def _stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.1f}" for name, ms in stages.items())
