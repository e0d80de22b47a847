"""``splitglm bench all``: split inference against the alternatives, side by side, in one run.

It runs the project's own benches, not copies of them, and writes ``OUT/REPORT.md``,
``OUT/results.json`` and PNG plots:

1. **codecs** (``partitioner.eval.assess.evaluate``): bytes per element of prefill and decode-step
   frames against the perplexity change and the agreement, on two kinds of text;
2. **splits** (``partitioner.plan.partition`` with ``measure``): on each example topology the
   planner's best candidates and contrasting splits run live (``splitglm.live.system_rig``: the real
   broker, cloud and edge processes, the device tier here, links through the link proxy),
   predicted against measured, and the chosen candidate's measured latency over the best one's;
3. **baselines** (``splitglm.bench.baselines``): cloud-only, edge-only, device-only and the
   planned split (accurate and fast) on the same rig and links; speculative decoding on
   the real agents (``splitglm.bench.speculative``) at each topology's edge-cloud round trip;
4. **router** (``splitglm.bench.router``): the routing policies over a trace of changing
   edge-cloud delay, with and without speculation;
5. **batching** (``splitglm.bench.cloud``): the CPU cloud's decode throughput at 1-32 concurrent
   sessions, beside the saved GPU result (``bench cloud-gpu``, with its date and card);
6. **fan-in** (``splitglm.bench.fanin``): simulated devices on Mosquitto with the secure
   configuration: answers delivered, lost, duplicated, reading-to-answer latency, CPU.

Every link is measured (``splitglm.linkcheck``) before a section uses it, and the measurement is
reported beside the set value. ``results.json`` is rewritten after every section, so a failure
loses only the section that failed (its error is recorded; the run goes on and exits 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .options import MODEL_HELP, add_command
from .stats import median, ratio

logger = logging.getLogger(__name__)

SECTIONS = ("codecs", "splits", "baselines", "router", "batching", "fanin")
REPO = Path(__file__).resolve().parents[2]
TOPOLOGIES = tuple(str(REPO / "examples" / "topologies" / f"{n}.yaml") for n in ("lan", "wifi_wan", "cellular"))
GPU_RESULT = REPO / "examples" / "results" / "cloud-gpu-h200.json"
GPL3 = "/usr/share/common-licenses/GPL-3"
TEXTS = (GPL3, "/usr/lib/python3.11/argparse.py")  # legal English; Python source
# the text each codec's constants were chosen on (README, "Codecs"): a codec judged on its own text proves little
TUNED_ON = {"int8+outliers": "GPL-3", "int4+outliers": "GPL-3", "rot-int4+outliers": "GPL-3",
            "ec+outliers": "GPL-3", "gr+outliers": "argparse.py"}


@dataclass(frozen=True)
class Scale:
    """How large each section's runs are."""

    codec_tokens: int = 4096
    codec_window: int = 1024
    measure_top: int = 2
    measure_repeats: int = 3
    measure_decode_steps: int = 16
    baseline_decode_steps: int = 16
    baseline_repeats: int = 3
    speculative_requests: int = 4
    speculative_max_tokens: int = 32
    router_requests: int = 60
    router_max_tokens: int = 8
    cloud_sessions: tuple[int, ...] = (1, 4, 16, 32)
    cloud_steps: int = 32
    fanin_devices: tuple[int, ...] = (50, 100, 200)
    fanin_readings: int = 3
    fanin_interval_s: float = 2.0


FULL = Scale()
QUICK = Scale(codec_tokens=2048, codec_window=1024, measure_top=1, measure_repeats=2, measure_decode_steps=8,
              baseline_decode_steps=8, baseline_repeats=2, speculative_requests=2, speculative_max_tokens=16,
              router_requests=12, router_max_tokens=6, cloud_steps=12, fanin_readings=1, fanin_interval_s=2.0)


@dataclass
class Run:
    """What ``bench_all`` runs on, and where it writes."""

    out: Path
    model: str
    plan: str  # the agents' plan (router, speculation, batching, fan-in)
    scale: Scale
    topologies: tuple[str, ...] = TOPOLOGIES
    texts: tuple[str, ...] = TEXTS
    gpu_result: Path | None = GPU_RESULT
    results: dict = field(default_factory=dict)
    say: Callable[[str], None] = print

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))


def machine() -> dict:
    """This machine, in the words a reader needs to weigh the numbers."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": memory, "python": platform.python_version(),
            "torch": torch.__version__, "os": platform.platform(), "gpu": None}


def model_info(model: str) -> dict:
    from runtime.checkpoint import load_spec

    spec = load_spec(model)
    return {"folder": str(model), "name": Path(model).name, "layers": spec.num_layers, "hidden": spec.hidden_size,
            "vocab": spec.vocab_size}


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements."""
    return {"median": round(median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": len(values)}


# ---- 1. codecs ---------------------------------------------------------------------------------------


def codecs_section(run: Run) -> list[dict]:
    from partitioner.eval.assess import evaluate
    from protos.codecs import CODECS
    from runtime.checkpoint import load_spec

    L = load_spec(run.model).num_layers
    splits = (L // 3, 2 * L // 3)
    rows = []
    for text in run.texts:
        name = Path(text).name
        run.say(f"codecs: {name}, splits {splits[0]},{splits[1]}, {run.scale.codec_tokens} tokens")
        for r in evaluate(run.model, text, splits, list(CODECS), run.scale.codec_tokens, run.scale.codec_window,
                          progress=False):
            d = r.as_dict()
            tuned = TUNED_ON.get(d["codec"])
            rows.append({**d, "text": name, "splits": list(splits), "tuned_on": tuned,
                         "held_out": tuned is None or tuned != name})
    return rows


# ---- 2. splits ----------------------------------------------------------------------------------------


def splits_section(run: Run) -> list[dict]:
    from partitioner.plan.partition import partition
    from partitioner.plan.topology import load_topology

    from ..linkcheck import measure_proxy
    from ..live import system_rig

    rows = []
    for path in run.topologies:
        topo = load_topology(path)
        links = {name: measure_proxy(link.rtt_ms, link.bandwidth_mbit_s) for name, link in topo.links.items()}
        run.say(f"splits: {topo.name} (links measured: " + ", ".join(
            f"{n} {m['measured_rtt_ms']} ms / {m['measured_mbit_s']} Mbit/s" for n, m in links.items()) + ")")
        plan = partition(run.model, path, run.out / "plans" / topo.name, run.texts[0], measure=system_rig,
                         measure_top=run.scale.measure_top, measure_repeats=run.scale.measure_repeats,
                         measure_decode_steps=run.scale.measure_decode_steps)
        candidates = plan["measured"]["candidates"]
        best = min(c["measured"]["expected_ms"] for c in candidates)
        rows.append({
            "topology": topo.name, "topology_file": str(path), "links": links,
            "chosen": {"splits": plan["splits"], "codecs": plan["codecs"],
                       "compression": {t: c["name"] for t, c in plan["compression"].items()}},
            "chosen_over_best": ratio(candidates[0]["measured"]["expected_ms"], best, 4),
            "summary": plan["measured"]["summary"], "candidates": candidates,
            "perplexity_delta_pct": plan["perplexity_delta_pct"], "fast_tail": plan.get("fast_tail"),
            "plan": str(run.out / "plans" / topo.name),
        })  # fmt: skip
    return rows


# ---- 3. baselines -------------------------------------------------------------------------------------


def baselines_section(run: Run) -> list[dict]:
    from partitioner.plan.topology import load_topology

    from ..linkcheck import measure_proxy
    from .baselines import bench_baselines
    from .speculative import bench_speculative

    planned = {s["topology"]: s for s in run.results.get("splits") or [] if "chosen" in s}
    rows = []
    rtts = {}
    for path in run.topologies:
        topo = load_topology(path)
        if topo.name not in planned:
            raise RuntimeError(f"no measured plan for {topo.name}: the splits section must run first")
        split = planned[topo.name]
        run.say(f"baselines: {topo.name}, split {split['chosen']['splits']}")
        for row in bench_baselines(run.model, path, split["chosen"], prompt_tokens=topo.workload[0].prompt_tokens,
                                   decode_steps=run.scale.baseline_decode_steps, repeats=run.scale.baseline_repeats):
            row["quality"] = quality(row["system"], split)
            row["rig"] = ("live (broker, cloud and edge processes, links through the link proxy, "
                          "time-dilated to the tiers' speed)")
            rows.append(row)
        rtts[topo.name] = topo.links["edge_cloud"].rtt_ms
    run.say(f"baselines: speculative decoding on the agents at edge-cloud RTTs {sorted(set(rtts.values()))} ms")
    links = {rtt: measure_proxy(rtt) for rtt in sorted(set(rtts.values()))}
    spec = bench_speculative(run.plan, sorted(set(rtts.values())), run.scale.speculative_requests,
                             run.scale.speculative_max_tokens, paths=("http",))
    for name, rtt in rtts.items():
        for r in spec:
            if r["rtt_ms"] == rtt and r["mode"] == "greedy":
                rows.append({"system": "split-speculative", "topology": name, "ttft_ms": None,
                             "per_token_p50_ms": r["p50_token_ms"], "per_token_p99_ms": r["p99_token_ms"],
                             "per_token_mean_ms": _per_token(r["tokens_per_s"]),
                             "per_token_mean_ms_without": _per_token(r["tokens_per_s_baseline"]),
                             "speedup": r["speedup"], "tokens_per_round_trip": r["tokens_per_round_trip"],
                             "acceptance_rate": r["acceptance_rate"], "uplink_bytes": None,
                             "leaves_device": "hidden states (the demo plan's device cut), encrypted on the wire",
                             "quality": {"tokens_equal_accurate": r["identical_frac"]},
                             "link": links[rtt], "requests": r["requests"],
                             "rig": "agents (HTTP edge, real gRPC to the cloud through a DelayProxy of this RTT; "
                                    "the demo plan; this machine's speed, not dilated)"})  # fmt: skip
    return rows


def _per_token(tokens_per_s: float | None) -> float | None:
    """Mean time per decode token, ms (speculation delivers tokens in bursts: its gaps' median says little)."""
    return round(1e3 / tokens_per_s, 2) if tokens_per_s else None


def quality(system: str, split: dict) -> dict:
    from .baselines import FAST_COMPRESSION

    """Quality against the full model: exact for the whole model; the plan's measured cost for a split."""
    if system in ("cloud-only", "edge-only", "device-only"):
        return {"perplexity_delta_pct": 0.0, "agreement": 1.0, "source": "the whole model, uncompressed"}
    if system == "split-fast":  # the rig's fast tail is int8 (FAST_COMPRESSION): its measurement in the plan
        fast = ((split.get("fast_tail") or {}).get("candidates") or {}).get(FAST_COMPRESSION) or {}
        return {"perplexity_delta_pct": fast.get("perplexity_delta_pct"), "agreement": fast.get("token_agreement"),
                "source": f"the plan's measurement of an {FAST_COMPRESSION} fast tail against the accurate tail "
                          "(on the plan's text, GPL-3)"}
    return {"perplexity_delta_pct": split["perplexity_delta_pct"], "agreement": None,
            "source": "the planner's cost of the plan's codecs and compression, from its measurements on GPL-3"}


# ---- 4. router ----------------------------------------------------------------------------------------


def router_section(run: Run) -> list[dict]:
    from ..linkcheck import measure_proxy
    from .router import DEFAULT_TRACE, bench_router, parse_trace

    links = {p.rtt_ms: measure_proxy(p.rtt_ms) for p in parse_trace(DEFAULT_TRACE)}
    rows = []
    for speculate in (False, True):
        run.say(f"router: {run.scale.router_requests} requests per policy, speculation {'on' if speculate else 'off'}")
        result = bench_router(run.plan, run.scale.router_requests, run.scale.router_max_tokens, progress=False,
                              speculate=speculate)
        for r in result["results"]:
            rows.append({**r, "speculate": speculate, "trace": result["trace"],
                         "links": [links[p["rtt_ms"]] for p in result["trace"]["phases"]]})
    return rows


# ---- 5. batching --------------------------------------------------------------------------------------


def batching_section(run: Run) -> dict:
    from .cloud import bench_cloud

    run.say(f"batching: the CPU cloud at {', '.join(map(str, run.scale.cloud_sessions))} sessions")
    cpu = bench_cloud(run.plan, run.scale.cloud_sessions, steps=run.scale.cloud_steps)
    gpu = None
    if run.gpu_result and Path(run.gpu_result).exists():
        saved = json.loads(Path(run.gpu_result).read_text())
        gpu = {"date": saved.get("date"), "card": saved.get("card"), "command": saved.get("command"),
               "shape": saved.get("shape"), "random_weights": saved.get("random_weights"), "file": str(run.gpu_result),
               "rows": [{"sessions": b, "tokens_per_s": saved[f"tokens_per_s_b{b}"], "step_ms": saved[f"step_ms_b{b}"]}
                        for b in (1, 8, 32) if f"tokens_per_s_b{b}" in saved]}  # fmt: skip
    return {"cpu": cpu, "gpu": gpu}


# ---- 6. fan-in ----------------------------------------------------------------------------------------


def fanin_section(run: Run) -> list[dict]:
    from .fanin import bench_fanin

    run.say(f"fan-in: {', '.join(map(str, run.scale.fanin_devices))} devices on Mosquitto (TLS, logins, ACL)")
    return bench_fanin(run.plan, devices=run.scale.fanin_devices, readings_per_device=run.scale.fanin_readings,
                       interval_s=run.scale.fanin_interval_s)


RUNNERS = {"codecs": codecs_section, "splits": splits_section, "baselines": baselines_section,
           "router": router_section, "batching": batching_section, "fanin": fanin_section}


def bench_all(out: str | os.PathLike, quick: bool = True, model: str | None = None, plan: str | None = None,
              sections: tuple[str, ...] = SECTIONS, scale: Scale | None = None,
              topologies: tuple[str, ...] = TOPOLOGIES,
              texts: tuple[str, ...] = TEXTS, gpu_result: Path | None = GPU_RESULT,
              say: Callable[[str], None] = print) -> dict:
    """Run ``sections`` and write OUT/REPORT.md, OUT/results.json and the plots; return the results.

    ``model`` defaults to the demo model, ``plan`` (the agents' plan) to the demo plan."""
    from partitioner.plan.demo import demo_plan

    if unknown := [s for s in sections if s not in SECTIONS]:
        raise ValueError(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    if "baselines" in sections and "splits" not in sections:
        raise ValueError("the baselines section runs each topology's planned split: give the splits section too")
    if model is None:
        from partitioner.convert import demo_model

        model = str(demo_model())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, model, plan or str(demo_plan(model)), scale or (QUICK if quick else FULL), tuple(topologies),
              tuple(texts), gpu_result, say=say)
    run.results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick,
                   "command": f"splitglm bench all{' --quick' if quick else ''} --out {out}",
                   "machine": machine(), "model": model_info(model), "plan": run.plan,
                   "scale": asdict(run.scale), "sections": list(sections), "wall_s": {}, "errors": {}}
    for name in sections:
        t0 = time.perf_counter()
        try:
            run.results[name] = RUNNERS[name](run)
        except Exception as e:  # noqa: BLE001 -- recorded; the other sections still run
            logger.exception("section %s failed", name)
            run.results["errors"][name] = f"{e!r}\n{traceback.format_exc(limit=8)}"
            say(f"{name}: FAILED: {e!r}")
        run.results["wall_s"][name] = round(time.perf_counter() - t0, 1)
        say(f"{name}: {run.results['wall_s'][name]} s")
        run.save()
    from .report import write_report

    write_report(run.out, run.results)
    run.save()
    return run.results


def tiny_scale() -> Scale:
    """The smallest runs that still exercise every section (the test suite's)."""
    return replace(QUICK, codec_tokens=64, codec_window=32, measure_top=1, measure_repeats=2,
                   measure_decode_steps=2, baseline_decode_steps=2, baseline_repeats=2, speculative_requests=1,
                   speculative_max_tokens=4, router_requests=4, router_max_tokens=3, cloud_sessions=(1, 4),
                   cloud_steps=3, fanin_devices=(2, 4), fanin_readings=2, fanin_interval_s=0.2)


def add_parser(sub) -> None:
    p = add_command(sub, "all", run, "the benchmark report: codecs, splits, baselines (cloud-, edge-, device-only), "
                    "router, batching, MQTT fan-in, side by side; writes OUT/REPORT.md, results.json, plots")
    p.add_argument("--out", required=True, help="folder for REPORT.md, results.json, the plots and the plans")
    p.add_argument("--quick", action="store_true", help="smaller runs (under 25 minutes on 2 cores)")
    p.add_argument("--sections", default="all", help="comma-separated, of codecs,splits,baselines,router,batching,"
                   "fanin (default all; baselines needs splits)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--plan", help="the agents' plan for router, speculation, batching, fan-in (default: the demo plan)")


def run(args: argparse.Namespace) -> int:
    sections = SECTIONS if args.sections == "all" else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {line}", file=sys.stderr, flush=True)

    results = bench_all(args.out, args.quick, args.model, args.plan, sections, say=say)
    print(Path(args.out) / "REPORT.md")
    return 1 if results["errors"] else 0
