"""``splitglm bench speculative``: speculative split decoding against the plain accurate path, same run.

Real processes on loopback: a broker, ``cloud_service`` and ``edge_node`` (the demo plan: its codecs, its
int8 fast tail as the draft model), with the project's delaying proxy on the edge-cloud link. Two paths:

- **http**: chat completions streamed from the edge's API (the edge owns the session: [0, k2), drafts);
- **device**: this process acts as the device (``splitglm.system.LocalDevice``: the plan's device tier and
  the device agent's MQTT link): its [0, k1) per position, the edge's [k1, k2) and fast tail, the cloud.

Per row (path, edge-cloud RTT, greedy or seeded sampling) each prompt runs twice, interleaved: with
``speculate`` off (the baseline) and as the edge decides (adaptive g: 0 where speculating does not
pay). Prompts alternate between two kinds of text: the GPL-3 and the Python standard library's
documentation. Reported per row: decode tokens/s (tokens after the first over
the time after the first) of both and their ratio, the share of requests whose tokens equal the
baseline's, the acceptance rate, tokens per verification round trip, p50/p99 of the gaps between tokens.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import urllib.request
from pathlib import Path

from .options import add_command, add_model_plan, plan_of
from .stats import median, percentile, ratio

GPL3 = "/usr/share/common-licenses/GPL-3"
DOC_MODULES = ("argparse", "json", "threading", "logging", "pathlib", "unittest", "subprocess", "collections")


def prompts(count: int) -> list[tuple[str, str]]:
    """``count`` (kind, text) prompts, alternating legal text and library documentation."""
    import importlib

    legal = [p.strip() for p in Path(GPL3).read_text().split("\n\n") if len(p.strip()) > 200]
    docs = [inspect.getdoc(importlib.import_module(m)) or "" for m in DOC_MODULES]
    docs = [d[:600] for d in docs if len(d) > 200]
    out = []
    for i in range(count):
        kind, pool = ("gpl", legal) if i % 2 == 0 else ("python-docs", docs)
        text = pool[(i // 2) % len(pool)][:500]
        out.append((kind, f"Continue this text:\n\n{text}"))
    return out


def _http(url: str, prompt: str, max_tokens: int, speculate: bool, sampling: dict) -> dict:
    """One streamed chat completion; ``speculate`` False turns it off, True leaves it to the edge (adaptive)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True, **sampling}
    if not speculate:
        body["speculate"] = False
    body = json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    stamps, last, started = [], b"", time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as response:
        for line in response:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
                last = line
    info = json.loads(last[len(b"data: ") :])["splitglm"]
    gaps = [(b - a) * 1e3 for a, b in zip(stamps[1:-1], stamps[2:-1])]  # (not the role chunk, not the last)
    return {"tokens": info["tokens"], "speculative": info["speculative"], "total_ms": (stamps[-1] - started) * 1e3,
            "ttft_ms": info["timings_ms"]["ttft"], "gaps_ms": gaps}


def _device(device, tier, prompt: str, max_tokens: int, speculate: bool, sampling: dict) -> dict:
    """One generation of the chat prompt on ``device`` (a ``LocalDevice`` sharing ``tier``, a ``DeviceTier``)."""
    from protos import splitglm_pb2 as pb

    ids = tier.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    params = pb.GenerationParams(max_tokens=max_tokens, stop_token_ids=tier.stop_token_ids,
                                 speculate=pb.SPECULATE_DEFAULT if speculate else pb.SPECULATE_OFF,
                                 temperature=sampling.get("temperature", 0.0), seed=sampling.get("seed", 0))
    gen = device.generation(ids, params, tier.tokenizer)
    stamps, started = [], time.perf_counter()
    for _ in gen:
        stamps.append(time.perf_counter())
    return {"tokens": gen.tokens, "speculative": dict(gen.speculative), "total_ms": (stamps[-1] - started) * 1e3,
            "ttft_ms": (stamps[0] - started) * 1e3, "gaps_ms": [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]}


def _rate(run: dict) -> float:
    n = len(run["tokens"])
    return (n - 1) / max(run["total_ms"] - run["ttft_ms"], 1e-6) * 1e3 if n > 1 else 0.0


def _row(path: str, rtt: float, mode: str, runs: list[tuple[dict, dict]]) -> dict:
    base = [b for b, _ in runs]
    spec = [s for _, s in runs]
    rate_b, rate_s = median(map(_rate, base)), median(map(_rate, spec))
    drafted = sum(s["speculative"]["drafted"] for s in spec)
    accepted = sum(s["speculative"]["accepted"] for s in spec)
    rounds = sum(s["speculative"]["round_trips"] for s in spec)
    gaps = [g for s in spec for g in s["gaps_ms"]]
    return {
        "path": path, "rtt_ms": rtt, "mode": mode, "requests": len(runs),
        "tokens": median(len(s["tokens"]) for s in spec),
        "tokens_per_s": round(rate_s, 2), "tokens_per_s_baseline": round(rate_b, 2),
        "speedup": ratio(rate_s, rate_b, 3),
        "identical_frac": sum(b["tokens"] == s["tokens"] for b, s in runs) / len(runs),
        "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
        "tokens_per_round_trip": round((accepted + rounds) / rounds, 3) if rounds else 1.0,
        "p50_token_ms": round(percentile(gaps, 0.5), 2),
        "p99_token_ms": round(percentile(gaps, 0.99), 2),
    }  # fmt: skip


def bench_speculative(plan: str, rtts=(0, 20, 60, 150), requests: int = 10, max_tokens: int = 48,
                      broker: str | None = None, paths=("http", "device"), threads: int = 1, progress=None) -> list:
    """One row per (path, RTT, mode): greedy at every RTT, seeded sampling at 60 ms."""
    from device_agent.agent import DeviceTier

    from ..system import LocalDevice, LocalSystem

    cases = [(p, r, "greedy") for r in rtts for p in paths] + [(p, 60, "sampled") for p in paths if 60 in rtts]
    texts = prompts(requests)
    rows = []
    with LocalSystem(plan, broker=broker, threads=threads, cloud_rtt_ms=0, device_agent=False) as system:
        tier = DeviceTier.load(plan) if "device" in paths else None
        device = LocalDevice(plan, system.broker, "bench-device", tier=tier) if tier else None
        try:
            for path, rtt, mode in cases:
                system.proxy.set_rtt(rtt)
                runs = []
                for i, (_, text) in enumerate(texts):
                    sampling = {"temperature": 0.8, "seed": 1000 + i} if mode == "sampled" else {"temperature": 0}
                    order = (False, True) if i % 2 == 0 else (True, False)  # interleaved, alternating first
                    got = {}
                    for speculate in order:
                        if path == "http":
                            got[speculate] = _http(system.http, text, max_tokens, speculate, sampling)
                        else:
                            got[speculate] = _device(device, tier, text, max_tokens, speculate, sampling)
                    runs.append((got[False], got[True]))
                    if progress is not None:
                        progress(path, rtt, mode, i + 1)
                rows.append(_row(path, rtt, mode, runs))
        finally:
            if device is not None:
                device.close()
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ("path", "rtt_ms", "mode", "tokens_per_s", "tokens_per_s_baseline", "speedup", "identical_frac",
            "acceptance_rate", "tokens_per_round_trip", "p50_token_ms", "p99_token_ms")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    lines += [" | ".join(str(r[k]) for k in head) for r in rows]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = add_command(sub, "speculative", run, "speculative split decoding against the plain accurate path, "
                    "by edge-cloud round trip")
    add_model_plan(p, "plan folder with a fast tail (default: the demo plan)")
    p.add_argument("--rtts", default="0,20,60,150", help="edge-cloud round trips to measure, ms (default 0,20,60,150)")
    p.add_argument("--requests", type=int, default=10, help="requests per row, each with and without (default 10)")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per request (default 48)")
    p.add_argument("--paths", default="http,device", help="http and/or device (default both)")
    p.add_argument("--broker", help="MQTT broker URL (default: start the embedded amqtt broker)")
    p.add_argument("--json", action="store_true", help="print the JSON list of rows")


def run(args: argparse.Namespace) -> int:
    plan = plan_of(args)
    rtts = [float(r) for r in args.rtts.split(",")]
    paths = tuple(p for p in args.paths.split(",") if p)

    def progress(path, rtt, mode, done):
        if not args.json:
            print(f"  {path} {rtt:g} ms {mode}: {done}/{args.requests}", file=sys.stderr)

    rows = bench_speculative(plan, rtts, args.requests, args.max_tokens, args.broker, paths, progress=progress)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0
