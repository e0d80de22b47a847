"""``splitglm partition``: measure (or reuse measurements), plan, export, report."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from .checkpoint import load_spec, load_tokenizer
from .export import export_plan
from .measure import (
    QUALITY_TOKENS,
    codec_costs,
    compression_costs,
    compression_entry,
    ensure_measurements,
    load_measurements,
    save_measurements,
)
from .planner import CompressionCost, plan
from .profiler import Profile
from .report import write_report
from .topology import TIERS, Topology, load_topology, tier_backend

logger = logging.getLogger(__name__)
LIVE_THREADS = 1  # --measure runs three tier processes on this machine's cores: one thread each

OBJECTIVE = (
    "expected request latency over the workload mix: mean_w(TTFT(prompt) + (output - 1) * per_token), "
    "TTFT and per-token time = compute on each tier + frame serialisation + one RTT per link"
)


class PlanError(ValueError):
    """No choice satisfies the topology's memory caps and quality floor."""


def _threads(topo: Topology, tier: str) -> int:
    """Threads to profile a tier at: what it asks for, at most this machine's cores."""
    return min(topo.tiers[tier].threads, os.cpu_count() or 1)


def _tier_profile(path: str, num_layers: int) -> Profile:
    """A tier's own profile file, checked to describe a model of this many layers."""
    profile = Profile.load(path)
    if sorted(profile.layers) != list(range(num_layers)):
        raise PlanError(f"profile {path} describes {len(profile.layers)} layers, the model has {num_layers}")
    return profile


def _tier_choices(topo: Topology, data: dict, num_layers: int) -> dict[str, list[CompressionCost]]:
    """Compression choices per tier, measured with the tier's backend: all on device and edge, none on the cloud."""
    choices = {}
    for tier in TIERS:
        t = topo.tiers[tier]
        if t.profile:  # measured on the tier itself: only what was measured there
            choices[tier] = [CompressionCost("none", _tier_profile(t.profile, num_layers), 0.0)]
            continue
        costs = compression_costs(data, _threads(topo, tier), num_layers, tier_backend(topo, tier))
        choices[tier] = costs if tier != "cloud" else [c for c in costs if c.name == "none"]
    return choices


def partition(
    model: str | os.PathLike,
    topology: str | os.PathLike,
    out: str | os.PathLike,
    text: str | os.PathLike,
    top: int = 8,
    measure: bool = False,
    measure_top: int = 4,
    measure_repeats: int = 2,
) -> dict:
    """Plan ``model`` for ``topology`` and write the plan folder ``out``; return plan.json's content.

    ``measure``: also run the best ``measure_top`` candidates and a few contrasting splits live
    (``partitioner.live``) and add predicted vs measured to plan.json ("measured") and report.md.
    """
    topo = load_topology(topology)
    spec = load_spec(model)
    data = load_measurements(model)
    profiled = [t for t in TIERS if not topo.tiers[t].profile]
    backends = {tier_backend(topo, t) for t in profiled}
    threads = {_threads(topo, t) for t in profiled} | ({LIVE_THREADS} if measure else set())
    ids = load_tokenizer(model)(Path(text).read_text(errors="replace"), return_tensors="pt").input_ids[0]
    ensure_measurements(model, data, threads, ids[:QUALITY_TOKENS], backends)
    cache = save_measurements(model, data)
    logger.info("measurements cached in %s", cache)
    ranked = plan(
        topo,
        _tier_choices(topo, data, spec.num_layers),
        codec_costs(data),
        spec.num_layers,
        max(top, 1 << 30) if measure else top,
    )
    candidates = ranked[:top]
    if not candidates:
        raise PlanError(
            f"no split of the {spec.num_layers} layers fits topology {topo.name!r}: every choice breaks a "
            f"tier's memory_mb or the quality floor ({topo.max_perplexity_increase_pct}% perplexity)"
        )
    best = candidates[0]
    result = export_plan(
        model,
        {
            "topology": topo.name,
            "splits": list(best.splits),
            "codecs": best.codecs,
            "compression": {t: compression_entry(tier_backend(topo, t), n) for t, n in best.compression.items()},
            "predicted": {
                "ttft_ms": round(best.ttft_ms, 3),
                "per_token_ms": round(best.per_token_ms, 3),
                "expected_ms": round(best.expected_ms, 3),
            },
            "objective": OBJECTIVE,
            "perplexity_delta_pct": round(best.perplexity_delta_pct, 3),
            "candidates": [asdict(c) for c in candidates],
            "measurements": {"codecs": data["codecs"], "compression": data["compression"]},
        },
        out,
    )
    if measure:  # added after export: plan_id names the plan, not one machine's timings
        from .live import contrasting, measure_candidates, summary

        chosen = ranked[:measure_top] + contrasting(ranked, spec.num_layers, ranked[:measure_top])
        rows = measure_candidates(model, topo, chosen, repeats=measure_repeats, data=data, threads=LIVE_THREADS)
        result["measured"] = {"candidates": rows, "summary": summary(rows)}
        (Path(out) / "plan.json").write_text(json.dumps(result, indent=2))
    write_report(Path(out), result, topo, data, spec.num_layers)
    return result
