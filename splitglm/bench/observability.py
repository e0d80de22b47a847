"""``splitglm bench observability``: what metrics and traces cost, in tokens/s of the edge+cloud split.

    splitglm bench observability [--model DIR | --plan DIR] [--tokens 48] [--repeats 7] [--quick]

Three stacks of real processes on loopback (``cloud_service`` and ``edge_node`` on the demo plan, no
broker; ``splitglm.system.LocalSystem``), started side by side and measured in turns -- one HTTP completion
on each, then the next round, the order rotating each round -- so that all three see the same machine:

- **off**: no ``OTEL_*`` variable, no cloud metrics port, nobody scrapes;
- **metrics**: the cloud's metrics port on (``SPLITGLM_CLOUD_METRICS_PORT``), and while this stack is
  measured every tier's ``/metrics`` (the edge's on its API port, the cloud's on that port) is scraped each
  second. A cloud without a metrics endpoint (before the cloud's metrics existed) is reported
  (``cloud_metrics: false``) and only the edge is scraped;
- **tracing**: OTLP/HTTP to a receiver in this process that counts the spans and drops them
  (``splitglm.bench.otlp``), every request sampled, the batch span processor's defaults but a 100 ms delay.

Each request is a non-streamed greedy ``/v1/completions`` of ``--tokens`` tokens (the end tokens banned by
``logit_bias``, so every request decodes them all; speculation as the edge decides), timed from send to
answer: tokens/s = completion tokens / wall seconds. Reported per mode: the median tokens/s over the repeats
(``stats.median``), its ratio to off (``stats.ratio``) and the cost (``stats.overhead_pct`` of the time per
token); plus the spans received and the scrapes made, so a run where a mode did nothing shows it. The aim:
each costs at most 2%.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from .options import add_command, add_model_plan, plan_of
from .stats import median, overhead_pct, ratio

if TYPE_CHECKING:
    from .otlp import OtlpReceiver

MODES = ("off", "metrics", "tracing")
PROMPT = "Explain in a few sentences what a software license is."
AIM_PCT = 2.0  # the cost each mode should stay within, % of the time per token


class Scraper:
    """Fetches every URL once a second while ``on`` is set; counts the scrapes that answered 200."""

    def __init__(self, urls: list[str]):
        self.urls, self.ok, self.on = urls, 0, threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            if self.on.is_set():
                self.ok += sum(scrape(url) for url in self.urls)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def scrape(url: str) -> bool:
    """One GET of a metrics page; whether it answered 200."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def complete(http: str, tokens: int, no_stop: dict[str, int]) -> tuple[int, float]:
    """One greedy completion of ``tokens`` tokens (``no_stop``: the logit bias that bans the end tokens):
    (completion tokens, wall seconds)."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "logit_bias": no_stop}).encode()
    request = urllib.request.Request(f"{http}/v1/completions", body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as response:
        answer = json.loads(response.read())
    return answer["usage"]["completion_tokens"], time.perf_counter() - started


def stacks(plan: str, sink: OtlpReceiver, exits: ExitStack, threads: int) -> tuple[dict, str]:
    """The three stacks, started (each mode's LocalSystem), and the cloud metrics URL of the metrics stack."""
    from splitglm.processes import free_port
    from splitglm.system import LocalSystem

    port = free_port()
    env = {"off": {}, "metrics": {"SPLITGLM_CLOUD_METRICS_PORT": str(port)},
           "tracing": {**sink.env(), "OTEL_TRACES_SAMPLER": "always_on"}}
    systems = {mode: exits.enter_context(LocalSystem(plan, mqtt=False, threads=threads, env=env[mode]))
               for mode in MODES}
    return systems, f"http://127.0.0.1:{port}/metrics"


def bench_observability(plan: str, tokens: int, repeats: int, threads: int = 1, progress=None) -> dict:
    """Tokens/s of each mode, measured in turns (module docstring)."""
    from runtime.checkpoint import load_spec

    from .otlp import OtlpReceiver

    spec = load_spec(Path(plan) / "edge")
    no_stop = {str(t): -100 for t in spec.eos_token_ids if t < spec.vocab_size}  # every request: all its tokens
    with ExitStack() as exits:
        sink = exits.enter_context(OtlpReceiver())
        systems, cloud_metrics = stacks(plan, sink, exits, threads)
        has_cloud_metrics = scrape(cloud_metrics)
        urls = [f"{systems['metrics'].http}/metrics"] + ([cloud_metrics] if has_cloud_metrics else [])
        scraper = exits.enter_context(Scraper(urls))
        for mode in MODES:  # warm-up: each stack's first completion loads and caches what it needs
            complete(systems[mode].http, 4, no_stop)
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        for r in range(repeats):
            for mode in MODES[r % 3 :] + MODES[: r % 3]:  # the order rotates
                scraper.on.set() if mode == "metrics" else scraper.on.clear()
                n, seconds = complete(systems[mode].http, tokens, no_stop)
                rates[mode].append(n / seconds)
            if progress is not None:
                progress(r + 1)
        scraper.on.clear()
        time.sleep(0.5)  # the last spans' export
        spans, scrapes = sink.count, scraper.ok
    return summary(rates, tokens, repeats, threads, has_cloud_metrics, spans, scrapes)


def summary(rates: dict[str, list[float]], tokens: int, repeats: int, threads: int, has_cloud_metrics: bool,
            spans: int, scrapes: int) -> dict:
    """The JSON result: per mode the median tokens/s, its ratio to off, its cost in %."""
    off = median(rates["off"])
    modes = {}
    for mode in MODES:
        tok_s = median(rates[mode])
        modes[mode] = {"tok_s": round(tok_s, 2), "ratio": ratio(tok_s, off),
                       "cost_pct": overhead_pct(1 / tok_s, 1 / off), "runs_tok_s": [round(x, 2) for x in rates[mode]]}
    return {"bench": "observability", "tokens": tokens, "repeats": repeats, "threads": threads,
            "aim_cost_pct": AIM_PCT, "cloud_metrics": has_cloud_metrics, "spans_received": spans,
            "scrapes": scrapes, "modes": modes}


def format_table(result: dict) -> list[str]:
    lines = [f"{'mode':>8} {'tokens/s':>9} {'ratio':>6} {'cost %':>7}"]
    for mode, row in result["modes"].items():
        lines.append(f"{mode:>8} {row['tok_s']:>9.2f} {row['ratio']:>6.3f} {row['cost_pct']:>7.1f}")
    lines.append(f"aim: cost <= {result['aim_cost_pct']:g}%; {result['spans_received']} spans received, "
                 f"{result['scrapes']} scrapes (cloud metrics: {'on' if result['cloud_metrics'] else 'absent'})")
    return lines


def add_parser(sub) -> None:
    p = add_command(sub, "observability", run, "the tokens/s cost of metrics and of tracing, against both off")
    add_model_plan(p)
    p.add_argument("--tokens", type=int, default=48, help="completion tokens per request (default 48)")
    p.add_argument("--repeats", type=int, default=7, help="rounds of one request per mode; medians (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each tier process (default 1)")
    p.add_argument("--quick", action="store_true", help="seconds: 4 tokens, 1 round")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", help="also write the JSON to this file (e.g. examples/results/observability-cpu.json)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.tokens, args.repeats = 4, 1
    progress = None if args.json else lambda r: sys.stderr.write(f"round {r}/{args.repeats}\n")
    result = bench_observability(plan_of(args), args.tokens, args.repeats, args.threads, progress)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(json.dumps(result) + "\n" if args.json else "\n".join(format_table(result)) + "\n")
    return 0
