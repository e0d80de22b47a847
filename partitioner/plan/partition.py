"""``splitglm partition``: measure (or reuse measurements), plan, export, report."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from partitioner.plan.export import export_plan
from partitioner.plan.fast_tail import DistilledTail, FastTailChoice, Floor, choose_decode_path, choose_fast_tail
from partitioner.plan.measure import (
    QUALITY_TOKENS,
    codec_costs,
    compression_costs,
    compression_entry,
    ensure_measurements,
    load_measurements,
    save_measurements,
)
from partitioner.plan.planner import Candidate, CompressionCost, Costs, plan, send_ms
from partitioner.plan.profiler import Profile
from partitioner.plan.report import write_report
from partitioner.plan.topology import TIERS, Topology, load_topology, tier_backend
from runtime.artifacts import checkpoint_fingerprint
from runtime.checkpoint import load_spec, load_tokenizer

if TYPE_CHECKING:
    from partitioner.plan.live import Rig

logger = logging.getLogger(__name__)
LIVE_THREADS = 1  # --measure runs the tiers' processes on this machine's cores: one thread each

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


def tier_compressions(topo: Topology, chosen: dict[str, str]) -> dict[str, dict]:
    """Each tier's compression entry; the cloud's carries the topology's ``gpu_weights`` (the weights its GPU
    engine runs: fp8 or bfloat16), which the cloud service takes when its ``dtype`` is ``auto``."""
    entries = {t: compression_entry(tier_backend(topo, t), n) for t, n in chosen.items()}
    if topo.tiers["cloud"].gpu_weights is not None and "cloud" in entries:
        entries["cloud"] = {**entries["cloud"], "gpu_weights": topo.tiers["cloud"].gpu_weights}
    return entries


def _tier_choices(topo: Topology, data: dict, num_layers: int) -> dict[str, list[CompressionCost]]:
    """Compression choices per tier, measured with the tier's backend: all on device and edge, none on the cloud."""
    choices = {}
    for tier in TIERS:
        t = topo.tiers[tier]
        if t.profile:  # measured on the tier itself: only what was measured there
            choices[tier] = [CompressionCost("none", _tier_profile(t.profile, num_layers), 0.0)]
            continue
        cpu_decode = t.cpu_decode if tier != "cloud" else "eager"
        costs = compression_costs(data, _threads(topo, tier), num_layers, tier_backend(topo, tier), cpu_decode)
        choices[tier] = costs if tier != "cloud" else [c for c in costs if c.name == "none"]
    return choices


def _decode_threads(topo: Topology) -> set[int]:
    """Thread counts to time the CPU decode paths at: those of the device and edge tiers that may compile."""
    return {
        _threads(topo, t) for t in ("device", "edge")
        if not topo.tiers[t].profile and tier_backend(topo, t) == "torch" and topo.tiers[t].cpu_decode != "eager"
    }


def cpu_decode_record(best: Candidate, fast: FastTailChoice) -> dict[str, str]:
    """plan.json's ``cpu_decode``: the path each CPU tier runs (the agents' ``--cpu-decode plan``)."""
    return {**{t: best.cpu_decode.get(t, "eager") for t in ("device", "edge")}, "fast_tail": fast.decode["path"]}


def path_predictions(
    topo: Topology, data: dict, best: Candidate, num_layers: int, fast: FastTailChoice
) -> dict[str, dict[str, float]]:
    """The router's starting estimates per path, for a session the edge owns (HTTP: embedding + [0, k2)).

    accurate: front + send to the cloud + cloud [k2, L) (+ head per step) + the link's round trip;
    fast: front + the fast tail measured at the edge's threads, scaled by its speed factor.
    Each on the CPU decode path the plan chose for it (the front's profile is that path's; the fast tail's step
    is ``fast.step_ms``): the fast path's step is the draft cost speculation weighs at the edge.
    ``step_ms`` includes the round trip; ``prefill_ms_per_token`` does not (one RTT per prefill);
    ``replay_ms_per_token`` is the tail alone over history positions (rebuilding its cache).
    """
    k1, k2 = best.splits
    L = num_layers
    choices = _tier_choices(topo, data, L)
    costs = {
        t: Costs(next(c.profile for c in choices[t] if c.name == best.compression[t]), L) for t in ("edge", "cloud")
    }
    edge, cloud, link = topo.tiers["edge"], topo.tiers["cloud"], topo.links["edge_cloud"]
    codec = next(c for c in codec_costs(data) if c.name == best.codecs["edge_cloud"])
    C = costs["edge"].hidden_size
    front_step = costs["edge"].compute_ms(edge, 0, k2, 1, decode=True, embed=True)
    front_prefill = costs["edge"].compute_ms(edge, 0, k2, 1, decode=False, embed=True)
    cloud_prefill = send_ms(link, 1, C, codec.bytes_per_element) + costs["cloud"].compute_ms(cloud, k2, L, 1, False)
    tail = fast.measured[fast.name]
    tail_step, tail_prefill = fast.step_ms / edge.speed_factor, tail["prefill_ms_per_token"] / edge.speed_factor
    accurate_step = (
        send_ms(link, 1, C, codec.step_bytes_per_element)
        + link.rtt_ms
        + costs["cloud"].compute_ms(cloud, k2, L, 1, decode=True, head=True)
    )
    paths = {
        "accurate": {
            "prefill_ms_per_token": front_prefill + cloud_prefill,
            "step_ms": front_step + accurate_step,
            "rtt_ms": link.rtt_ms,
            "replay_ms_per_token": cloud_prefill,
        },
        "fast": {
            "prefill_ms_per_token": front_prefill + tail_prefill,
            "step_ms": front_step + tail_step,
            "rtt_ms": 0.0,
            "replay_ms_per_token": tail_prefill,
        },
    }
    return {p: {k: round(v, 4) for k, v in d.items()} for p, d in paths.items()}


def partition(
    model: str | os.PathLike,
    topology: str | os.PathLike,
    out: str | os.PathLike,
    text: str | os.PathLike,
    top: int = 8,
    measure: Rig | None = None,
    measure_top: int = 4,
    measure_repeats: int = 2,
    measure_decode_steps: int = 16,
    fast_tail_floor: Floor = Floor(),
    students: list[str | os.PathLike] = (),
) -> dict:
    """Plan ``model`` for ``topology`` and write the plan folder ``out``; return plan.json's content.

    ``measure``: a live rig (``splitglm.live.system_rig``) to also run the best ``measure_top`` candidates
    and a few contrasting splits on (``partitioner.plan.live``; ``measure_repeats`` runs of each workload, at
    most ``measure_decode_steps`` decode steps each); predicted vs measured go to plan.json ("measured") and
    report.md.
    The edge's fast tail ([k2, L) + head) gets the fastest compression within ``fast_tail_floor``
    (``partitioner.plan.fast_tail``), measured at the edge's threads on the same text; ``students``
    (``splitglm distill`` folders of layers [k2, L) + head) join its candidates.
    """
    if measure is not None and not callable(measure):
        raise TypeError(f"measure must be a live rig (splitglm.live.system_rig) or None, not {measure!r}")
    topo = load_topology(topology)
    spec = load_spec(model)
    data = load_measurements(model)
    profiled = [t for t in TIERS if not topo.tiers[t].profile]
    backends = {tier_backend(topo, t) for t in profiled}
    live = measure is not None
    threads = {_threads(topo, t) for t in profiled} | ({LIVE_THREADS} if live else set())
    ids = load_tokenizer(model)(Path(text).read_text(errors="replace"), return_tensors="pt").input_ids[0]
    ensure_measurements(model, data, threads, ids[:QUALITY_TOKENS], backends, _decode_threads(topo))
    cache = save_measurements(model, data)
    logger.info("measurements cached in %s", cache)
    ranked = plan(
        topo,
        _tier_choices(topo, data, spec.num_layers),
        codec_costs(data),
        spec.num_layers,
        max(top, 1 << 30) if live else top,
    )
    candidates = ranked[:top]
    if not candidates:
        raise PlanError(
            f"no split of the {spec.num_layers} layers fits topology {topo.name!r}: every choice breaks a "
            f"tier's memory_mb or the quality floor ({topo.max_perplexity_increase_pct}% perplexity)"
        )
    best = candidates[0]
    offered = DistilledTail.offer(students, checkpoint_fingerprint(model), best.splits[1], spec.num_layers)
    fast = choose_fast_tail(model, best.splits[1], ids[:QUALITY_TOKENS], _threads(topo, "edge"), fast_tail_floor, data,
                            students=offered)
    edge = topo.tiers["edge"]
    choose_decode_path(model, best.splits[1], fast, _threads(topo, "edge"),
                       edge.cpu_decode if tier_backend(topo, "edge") == "torch" else "eager", data)
    save_measurements(model, data)
    result = export_plan(
        model,
        {
            "topology": topo.name,
            "splits": list(best.splits),
            "codecs": best.codecs,
            "compression": tier_compressions(topo, best.compression),
            "cpu_decode": cpu_decode_record(best, fast),
            "predicted": {
                "ttft_ms": round(best.ttft_ms, 3),
                "per_token_ms": round(best.per_token_ms, 3),
                "expected_ms": round(best.expected_ms, 3),
                "paths": path_predictions(topo, data, best, spec.num_layers, fast),
            },
            "fast_tail": fast.record(),
            "objective": OBJECTIVE,
            "perplexity_delta_pct": round(best.perplexity_delta_pct, 3),
            "candidates": [asdict(c) for c in candidates],
            "measurements": {"codecs": data["codecs"], "compression": data["compression"]},
        },
        out,
        sources={"fast_tail": fast.source} if fast.source else None,
    )
    if live:  # added after export: plan_id names the plan, not one machine's timings
        from partitioner.plan.live import contrasting, measure_candidates, summary

        chosen = ranked[:measure_top] + contrasting(ranked, spec.num_layers, ranked[:measure_top])
        rows = measure_candidates(model, topo, chosen, measure, repeats=measure_repeats, data=data,
                                  threads=LIVE_THREADS, max_decode_steps=measure_decode_steps)
        result["measured"] = {"candidates": rows, "summary": summary(rows)}
        (Path(out) / "plan.json").write_text(json.dumps(result, indent=2))
    write_report(Path(out), result, topo, data, spec.num_layers)
    return result
