"""``splitglm bench router``: the edge's routing policies replayed over a trace of changing cloud delay.

The real processes on loopback (cloud over gRPC, the edge's HTTP API), the edge
reaching the cloud through a user-space ``DelayProxy`` whose round-trip time
follows a trace of phases, e.g. calm 20 ms -> congested 300 ms -> calm 50 ms,
each a share of the requests. Every policy gets the same seeded trace (prompt,
latency budget and RTT per request index) of greedy chat completions of the
real demo model, one request at a time. The edge takes its settings from the
environment as usual (e.g. ``SPLITGLM_EDGE_PROBE_INTERVAL_S``), so router
settings can be compared without code changes.

Budgets are derived from a calibration run at start: the median wall time of
the accurate path at each calm RTT and at the congested one, and of the fast
path. The levels spread evenly from ``CALM_FACTOR`` x the slowest calm accurate
time (the accurate path fits with room to spare) to ``CONGESTED_FACTOR`` x the
congested accurate time (it does not fit), never below ``FAST_FACTOR`` x the fast
path's time (which must fit every budget).

Per policy:

- ``budget_met_frac``: share of requests whose client-side wall time (request
  sent -> whole JSON answer read) is <= their ``latency_budget_ms``; a failed
  request counts as missed;
- ``accurate_token_frac``: share of generated tokens made by the accurate path
  (the response's ``splitglm.paths``); ``accurate_token_frac_calm``: the same over
  the calm phases only (every phase but those at the trace's largest RTT);
- ``p50_ms`` / ``p99_ms``: nearest-rank percentiles of the client's wall times;
- ``token_agreement``: over all requests, the fraction of compared tokens equal
  to the reference's token at the same index, comparing up to the shorter of the
  two sequences. The reference is the same prompt answered with policy
  "accurate", no budget, at RTT 0. Token sequences are the generated token ids
  the edge reports (``splitglm.tokens`` of the response);
- ``switches``: mid-generation path switches (sum of ``len(splitglm.switches)``);
  ``degraded``: answers flagged degraded (the cloud failed); ``errors``: failed requests;
- ``phases``: the same figures per phase of the trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from ..system import LocalSystem
from .options import add_command, add_model_plan, plan_of
from .stats import median, percentile

logger = logging.getLogger(__name__)

POLICIES = ("adaptive", "accurate", "fast")
DEFAULT_TRACE = "20:0.4,300:0.3,50:0.3"  # RTT ms : share of the requests, in order
BUDGET_LEVELS = 4
CALM_FACTOR = 1.5  # the tightest budget: 1.5 x the slowest calm accurate time
CONGESTED_FACTOR = 0.85  # the loosest budget: 0.85 x the congested accurate time
FAST_FACTOR = 1.5  # no budget below 1.5 x the fast path's time
REQUEST_TIMEOUT_S = 600.0

PROMPTS = (
    "What is the GNU General Public License?",
    "Explain what copyleft means in software licensing.",
    "Why does the GPL require sharing source code?",
    "What freedoms does free software give its users?",
    "Describe the difference between the GPL and the MIT license.",
    "What is the capital of France, and what is it known for?",
    "Explain how photosynthesis works.",
    "Why is the sky blue?",
    "Describe the water cycle in a few sentences.",
    "What causes the seasons on Earth?",
    "Give three tips for writing clean code.",
    "What is a neural network?",
    "Explain what an operating system does.",
    "How do vaccines protect people from disease?",
    "What is the difference between weather and climate?",
    "Describe how a bicycle works.",
)


@dataclass(frozen=True)
class Phase:
    rtt_ms: float  # round trip of the edge-cloud link, ms
    share: float  # share of the requests in this phase


@dataclass(frozen=True)
class TraceItem:
    index: int
    phase: int  # index into the trace's phases
    rtt_ms: float
    calm: bool
    prompt: str
    budget_ms: int


@dataclass
class Reply:
    """One answered (or failed) request as the client saw it."""

    wall_ms: float
    text: str = ""
    paths: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # the response's ``splitglm`` object
    error: str | None = None


def parse_trace(text: str) -> list[Phase]:
    """``"20:0.4,300:0.3,50:0.3"`` -> phases (shares are normalised to sum to 1)."""
    phases = []
    for part in text.split(","):
        try:
            rtt, share = (float(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"a trace phase is RTT_MS:SHARE, got {part!r} in {text!r}") from None
        if rtt < 0 or share <= 0:
            raise ValueError(f"a trace phase needs RTT >= 0 and share > 0, got {part!r}")
        phases.append(Phase(rtt, share))
    total = sum(p.share for p in phases)
    return [Phase(p.rtt_ms, p.share / total) for p in phases]


def phase_counts(requests: int, phases: list[Phase]) -> list[int]:
    """Requests per phase: rounded shares, the last phase taking the remainder."""
    counts = [round(p.share * requests) for p in phases[:-1]]
    return [*counts, requests - sum(counts)]


def make_trace(requests: int, phases: list[Phase], budgets: list[int], seed: int) -> list[TraceItem]:
    """The seeded request sequence every policy replays."""
    rng = random.Random(seed)
    congested = max(p.rtt_ms for p in phases)
    items = []
    for i, count in enumerate(phase_counts(requests, phases)):
        rtt = phases[i].rtt_ms
        for _ in range(count):
            items.append(TraceItem(len(items), i, rtt, rtt < congested, rng.choice(PROMPTS), rng.choice(budgets)))
    return items


def ask(http: str, prompt: str, max_tokens: int, policy: str, budget_ms: int | None = None) -> Reply:
    """One greedy chat completion, timed on the client."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "policy": policy,
    }
    if budget_ms is not None:
        body["latency_budget_ms"] = budget_ms
    request = urllib.request.Request(
        f"{http}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            answer = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as e:
        detail = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
        return Reply((time.perf_counter() - started) * 1e3, error=f"{e!r} {detail}".strip())
    wall_ms = (time.perf_counter() - started) * 1e3
    info = answer.get("splitglm") or {}
    return Reply(wall_ms, answer["choices"][0]["message"]["content"], list(info.get("paths") or []), info)


def median_ms(http: str, prompts: list[str], max_tokens: int, policy: str) -> float:
    """Median wall time of ``policy`` over ``prompts`` (no budget); raises if any request fails."""
    replies = [ask(http, p, max_tokens, policy) for p in prompts]
    if failed := [r.error for r in replies if r.error]:
        raise RuntimeError(f"calibration request ({policy}) failed: {failed[0]}")
    return median(r.wall_ms for r in replies)


def calibrate(system: LocalSystem, phases: list[Phase], max_tokens: int, repeats: int) -> dict:
    """Median wall times (ms) of the accurate path at each distinct RTT, and of the fast path at the first RTT."""
    prompts = list(PROMPTS[:repeats])
    system.proxy.set_rtt(0.0)
    for policy in ("accurate", "fast"):  # warm-up: first-call costs of these prompt shapes out of the figures
        median_ms(system.http, prompts, max_tokens, policy)
    accurate = {}
    for rtt in sorted({p.rtt_ms for p in phases}):
        system.proxy.set_rtt(rtt)
        accurate[rtt] = median_ms(system.http, prompts, max_tokens, "accurate")
    system.proxy.set_rtt(phases[0].rtt_ms)
    fast = median_ms(system.http, prompts, max_tokens, "fast")
    return {"accurate_ms": accurate, "fast_ms": fast}


def derive_budgets(calibration: dict, phases: list[Phase], levels: int = BUDGET_LEVELS) -> list[int]:
    """Budget levels (ms) between "accurate fits when calm" and "accurate misses when congested"."""
    congested = max(p.rtt_ms for p in phases)
    accurate = calibration["accurate_ms"]
    calm = [ms for rtt, ms in accurate.items() if rtt < congested] or [min(accurate.values())]
    low = max(CALM_FACTOR * max(calm), FAST_FACTOR * calibration["fast_ms"])
    high = CONGESTED_FACTOR * accurate[congested]
    if high <= low:
        logger.warning(
            "the congested accurate path (%.0f ms) is too close to the calm one (%.0f ms): budgets "
            "cannot separate them",
            accurate[congested],
            max(calm),
        )
        high = 1.3 * low
    step = (high - low) / max(levels - 1, 1)
    return [round(low + i * step) for i in range(levels)]


def references(http: str, system: LocalSystem, prompts: set[str], max_tokens: int) -> dict[str, list[int]]:
    """Reference token ids per prompt: policy accurate, no budget, RTT 0."""
    system.proxy.set_rtt(0.0)
    refs = {}
    for prompt in sorted(prompts):
        reply = ask(http, prompt, max_tokens, "accurate")
        if reply.error:
            raise RuntimeError(f"reference request failed: {reply.error}")
        refs[prompt] = token_ids(reply)
    return refs


def token_ids(reply: Reply) -> list[int]:
    """The generated token ids the edge reports (``splitglm.tokens``)."""
    return [int(t) for t in reply.info.get("tokens", [])]


def agreement(tokens: list[int], reference: list[int]) -> tuple[int, int]:
    """(tokens equal to the reference at the same index, tokens compared): up to the shorter length."""
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])), n


def replay(system: LocalSystem, trace: list[TraceItem], policy: str, max_tokens: int, progress: bool) -> list[Reply]:
    """Every request of the trace under ``policy``, setting the link's RTT before each."""
    replies = []
    for item in tqdm(trace, desc=policy, file=sys.stderr, disable=not progress, unit="req"):
        system.proxy.set_rtt(item.rtt_ms)
        replies.append(ask(system.http, item.prompt, max_tokens, policy, item.budget_ms))
        if replies[-1].error:
            logger.warning("%s request %d failed: %s", policy, item.index, replies[-1].error)
    return replies


def summarize(trace: list[TraceItem], replies: list[Reply], refs: dict[str, list[int]]) -> dict:
    """The figures of one set of requests (see the module doc)."""
    met = [r.error is None and r.wall_ms <= item.budget_ms for item, r in zip(trace, replies)]
    paths = [p for r in replies for p in r.paths]
    calm_paths = [p for item, r in zip(trace, replies) if item.calm for p in r.paths]
    matched = compared = 0
    for item, r in zip(trace, replies):
        if r.error is None:
            m, n = agreement(token_ids(r), refs[item.prompt])
            matched, compared = matched + m, compared + n
    walls = [r.wall_ms for r in replies]
    return {
        "requests": len(replies),
        "budget_met_frac": _frac(sum(met), len(met)),
        "accurate_token_frac": _frac(paths.count("accurate"), len(paths)),
        "accurate_token_frac_calm": _frac(calm_paths.count("accurate"), len(calm_paths)),
        "p50_ms": round(percentile(walls, 0.5), 1),
        "p99_ms": round(percentile(walls, 0.99), 1),
        "token_agreement": _frac(matched, compared),
        "switches": sum(len(r.info.get("switches") or []) for r in replies),
        "degraded": sum(bool(r.info.get("degraded")) for r in replies),
        "errors": sum(r.error is not None for r in replies),
    }


def _frac(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def policy_result(
    policy: str, trace: list[TraceItem], replies: list[Reply], refs: dict, phases: list[Phase]
) -> dict:
    """One policy's object: the overall figures, then per phase."""
    per_phase = []
    for i, phase in enumerate(phases):
        chosen = [(item, r) for item, r in zip(trace, replies) if item.phase == i]
        if chosen:
            items, rs = zip(*chosen)
            per_phase.append({"rtt_ms": phase.rtt_ms, **summarize(list(items), list(rs), refs)})
    return {"policy": policy, **summarize(trace, replies, refs), "phases": per_phase}


def records(policy: str, trace: list[TraceItem], replies: list[Reply]) -> list[dict]:
    """Per-request rows (for ``--records``): the trace item, the client's wall time, the edge's account."""
    return [
        {
            "policy": policy,
            **asdict(item),
            "wall_ms": round(r.wall_ms, 1),
            "met": r.error is None and r.wall_ms <= item.budget_ms,
            "paths": r.paths,
            "error": r.error,
            **{k: r.info.get(k) for k in ("path", "switches", "predicted_ms", "actual_ms", "degraded", "timings_ms")},
        }
        for item, r in zip(trace, replies)
    ]


def bench_router(
    plan: str,
    requests: int = 200,
    max_tokens: int = 8,
    seed: int = 0,
    policies: tuple[str, ...] = POLICIES,
    trace: str = DEFAULT_TRACE,
    threads: int = 1,
    calibration_repeats: int = 3,
    progress: bool = True,
    speculate: bool = True,
) -> dict:
    """Run the whole benchmark; return {"trace": description, "results": [one object per policy], "records"}."""
    phases = parse_trace(trace)
    if unknown := [p for p in policies if p not in POLICIES]:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    started = time.perf_counter()
    edge = () if speculate else ("--speculate", "false")  # the edge's default: speculate where it pays
    with LocalSystem(plan, mqtt=False, threads=threads, cloud_rtt_ms=0.0, edge_args=edge) as system:
        calibration = calibrate(system, phases, max_tokens, calibration_repeats)
        budgets = derive_budgets(calibration, phases)
        items = make_trace(requests, phases, budgets, seed)
        logger.info("calibration %s; budgets %s ms", calibration, budgets)
        refs = references(system.http, system, {item.prompt for item in items}, max_tokens)
        results, rows = [], []
        for policy in policies:
            replies = replay(system, items, policy, max_tokens, progress)
            results.append(policy_result(policy, items, replies, refs, phases))
            rows += records(policy, items, replies)
    description = {
        "plan": str(plan),
        "requests_per_policy": requests,
        "speculate": speculate,
        "max_tokens": max_tokens,
        "seed": seed,
        "threads": threads,
        "phases": [
            {**asdict(p), "requests": n, "calm": p.rtt_ms < max(q.rtt_ms for q in phases)}
            for p, n in zip(phases, phase_counts(requests, phases))
        ],
        "budgets_ms": budgets,
        "calibration_ms": {
            "accurate_by_rtt": {f"{k:g}": round(v, 1) for k, v in calibration["accurate_ms"].items()},
            "fast": round(calibration["fast_ms"], 1),
        },
        "latency": "client wall time of each non-streamed request",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return {"trace": description, "results": results, "records": rows}


def format_report(result: dict) -> list[str]:
    """The human-readable report: the trace, then one row per policy."""
    t = result["trace"]
    phases = " -> ".join(
        f"{p['rtt_ms']:g} ms x{p['requests']}{'' if p['calm'] else ' (congested)'}" for p in t["phases"]
    )
    cal = t["calibration_ms"]
    lines = [
        f"trace: RTT {phases}; {t['requests_per_policy']} greedy chat requests per policy, "
        f"max_tokens {t['max_tokens']}, seed {t['seed']}",
        f"calibration: accurate {', '.join(f'{v:.0f} ms at {k} ms RTT' for k, v in cal['accurate_by_rtt'].items())}; "
        f"fast {cal['fast']:.0f} ms",
        f"budgets (ms, one per request at random): {', '.join(map(str, t['budgets_ms']))}; latency = {t['latency']}",
        f"{'policy':<10} {'met':>6} {'acc tok':>8} {'acc calm':>9} {'p50 ms':>8} {'p99 ms':>8} {'agree':>6} "
        f"{'switch':>6} {'degr':>5} {'err':>4}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['policy']:<10} {_pct(r['budget_met_frac']):>6} {_pct(r['accurate_token_frac']):>8} "
            f"{_pct(r['accurate_token_frac_calm']):>9} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} "
            f"{_pct(r['token_agreement']):>6} {r['switches']:>6} {r['degraded']:>5} {r['errors']:>4}"
        )
    lines.append(f"wall time {t['wall_s']:.0f} s")
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def add_parser(sub) -> None:
    p = add_command(sub, "router", run, "routing policies over a trace of changing edge-cloud delay")
    add_model_plan(p, "plan folder with a fast tail (default: the demo plan)")
    p.add_argument("--requests", type=int, default=200, help="requests per policy (default 200)")
    p.add_argument("--max-tokens", type=int, default=8, help="new tokens per request (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace's prompts and budgets")
    p.add_argument("--policies", default="adaptive,accurate,fast", help="comma-separated (default all three)")
    p.add_argument("--trace", default="20:0.4,300:0.3,50:0.3", help="RTT_MS:SHARE phases in order")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process (default 1)")
    p.add_argument("--records", help="also write one JSON line per request to this file")
    p.add_argument("--no-speculate", action="store_true", help="the edge never speculates (default: where it pays)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print only the JSON list of per-policy results")


def run(args: argparse.Namespace) -> int:
    plan = plan_of(args)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    result = bench_router(plan, args.requests, args.max_tokens, args.seed, policies, args.trace, args.threads,
                          progress=not args.quiet, speculate=not args.no_speculate)
    if args.records:
        with open(args.records, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in result["records"])
    if args.json:
        print(json.dumps(result["results"], indent=2))
    else:
        print("\n".join(format_report(result)))
    return 0
