"""Run planned candidates for real and compare measured latency with the planner's prediction.

This is the planner's side of a live run: which candidates to measure
(``contrasting``), the prompts and decode steps per workload, time dilation,
the planner's prediction at the live thread count (``repredict``), the rows,
``summary`` and ``format_table``. The rig that runs a candidate is passed in
(a ``Rig``): partitioner imports no agent, so the composition root provides
it -- ``splitglm.live.system_rig`` exports the candidate's plan and runs it on
the real processes (broker, cloud, edge; the device tier over the device
agent's MQTT link) with the topology's links shaped by the project's link
proxy (``splitglm.linkproxy.DelayProxy``), as the system tests do.

Threads: the processes share this machine's cores (2 here), so each tier
runs ``threads`` (1) torch threads, whatever the tier asks for. Predictions
are therefore re-evaluated with the 1-thread profiles ("predicted@1t") for
the error column; the planner's own prediction (at the tiers' thread counts)
is kept beside it.

Tier speed (time dilation): this machine cannot run a tier ``speed_factor``
times faster, so the rig reports each tier's compute per step (the tiers'
``StepResult.timings_ms``) and

    measured = wall time + sum over tiers of compute_ms * (1 / speed_factor - 1)

i.e. each tier's compute is rescaled to its stated speed while the link
delays and the other overheads (MQTT, gRPC, protobuf) stay as measured.

``measure_candidates`` measures each workload of the topology with a prompt
of ``prompt_tokens`` random ids and ``min(output_tokens - 1, max_decode_steps)``
decode steps; per-token time is the mean decode step, extrapolated to the
whole output; TTFT / per-token / expected are weighted over the workload mix
exactly as the planner does (``planner.evaluate_candidate``).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Protocol

import torch

from partitioner.plan.topology import TIERS, Topology, tier_backend

logger = logging.getLogger(__name__)


def dilated_ms(wall_ms: float, compute_ms: dict[str, float], topo: Topology) -> float:
    """Wall time with each tier's compute rescaled to its ``speed_factor``."""
    return wall_ms + sum(ms * (1 / topo.tiers[t].speed_factor - 1) for t, ms in compute_ms.items())


@dataclass
class LiveRun:
    """One generation on a live rig: tokens and per-step times (step 0 = prefill)."""

    tokens: list[int]
    steps: list[dict] = field(default_factory=list)  # {"wall_ms", "compute_ms": {tier: ms}, "measured_ms"}

    def dilate(self, topo: Topology) -> LiveRun:
        """Set each step's ``measured_ms``: its wall time with the tiers' compute at their speed."""
        for s in self.steps:
            s["measured_ms"] = dilated_ms(s["wall_ms"], s["compute_ms"], topo)
        return self

    @property
    def ttft_ms(self) -> float:
        return self.steps[0]["measured_ms"]

    @property
    def per_token_ms(self) -> float | None:
        decode = [s["measured_ms"] for s in self.steps[1:]]
        return statistics.fmean(decode) if decode else None


class Runner(Protocol):
    """One candidate running live."""

    def run(self, prompt_ids: list[int], decode_steps: int) -> LiveRun:
        """Prefill ``prompt_ids``, then ``decode_steps`` greedy steps (no stop token): 1 + decode_steps tokens,
        each step with ``wall_ms`` and ``compute_ms`` per tier."""


class Rig(Protocol):
    """Starts a candidate on live processes (``splitglm.live.system_rig``); leaving the context stops them."""

    def __call__(
        self, model: str | os.PathLike, topo: Topology, candidate: dict, threads: int
    ) -> AbstractContextManager[Runner]:
        """``candidate``: splits, codecs per link and compression names per tier."""


# ---- measuring candidates ------------------------------------------------------------------------


def _as_dict(candidate) -> dict:
    return asdict(candidate) if is_dataclass(candidate) else dict(candidate)


def repredict(topo: Topology, data: dict, candidate: dict, num_layers: int, threads: int) -> dict | None:
    """The planner's prediction of ``candidate`` with this machine's ``threads``-thread profiles."""
    from partitioner.plan.measure import codec_costs, compression_costs, key
    from partitioner.plan.planner import Costs, evaluate_candidate

    backends = {t: tier_backend(topo, t) for t in TIERS}
    profiles = data.get("profiles", {})
    if not all(key(backends[t], c, threads) in profiles for t, c in candidate["compression"].items()):
        return None
    codecs = {c.name: c for c in codec_costs(data)}
    chosen = {
        t: next(c for c in compression_costs(data, threads, num_layers, backends[t]) if c.name == n)
        for t, n in candidate["compression"].items()
    }
    costs = {t: Costs(chosen[t].profile, num_layers) for t in TIERS}
    pair = (codecs[candidate["codecs"]["device_edge"]], codecs[candidate["codecs"]["edge_cloud"]])
    c = evaluate_candidate(topo, costs, tuple(candidate["splits"]), pair, chosen, num_layers)
    return None if c is None else {"ttft_ms": c.ttft_ms, "per_token_ms": c.per_token_ms, "expected_ms": c.expected_ms}


def measure_candidates(
    model: str | os.PathLike,
    topo: Topology,
    candidates,
    rig: Rig,
    repeats: int = 2,
    max_decode_steps: int = 16,
    data: dict | None = None,
    threads: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Run each candidate live (on ``rig``) on the topology's workload mix; predicted vs measured.

    Per candidate: splits, codecs, compression, ``predicted`` (the planner's,
    at the tiers' threads), ``predicted_live`` (re-evaluated with
    ``threads``-thread profiles when ``data`` -- the measurements -- has them),
    ``measured`` (ttft / per_token / expected, medians over ``repeats``,
    time-dilated) and ``error_pct`` of measured expected against
    ``predicted_live`` (else ``predicted``).
    """
    from runtime.checkpoint import load_spec

    spec = load_spec(model)
    gen = torch.Generator().manual_seed(seed)
    prompts = {
        w.prompt_tokens: torch.randint(0, spec.vocab_size, (w.prompt_tokens,), generator=gen).tolist()
        for w in topo.workload
    }
    total_w = sum(w.weight for w in topo.workload)
    rows = []
    for cand in map(_as_dict, candidates):
        t_start = time.perf_counter()
        with rig(model, topo, cand, threads) as live:
            live.run(prompts[topo.workload[0].prompt_tokens][:8], 2)  # warm-up (first-call overheads)
            per_w = []
            for w in topo.workload:
                steps = max(1, min(w.output_tokens - 1, max_decode_steps))
                runs = [live.run(prompts[w.prompt_tokens], steps).dilate(topo) for _ in range(repeats)]
                per_w.append(
                    (w, statistics.median(r.ttft_ms for r in runs), statistics.median(r.per_token_ms for r in runs))
                )
        measured = {
            "ttft_ms": sum(w.weight * t for w, t, _ in per_w) / total_w,
            "per_token_ms": sum(w.weight * p for w, _, p in per_w) / total_w,
            "expected_ms": sum(w.weight * (t + (w.output_tokens - 1) * p) for w, t, p in per_w) / total_w,
        }
        predicted = {k: cand[k] for k in ("ttft_ms", "per_token_ms", "expected_ms")}
        live_pred = repredict(topo, data, cand, spec.num_layers, threads) if data else None
        ref = live_pred or predicted
        rows.append(
            {
                "splits": list(cand["splits"]),
                "codecs": cand["codecs"],
                "compression": cand["compression"],
                "predicted": _round(predicted),
                "predicted_live": _round(live_pred) if live_pred else None,
                "measured": _round(measured),
                "error_pct": round(100 * (measured["expected_ms"] - ref["expected_ms"]) / ref["expected_ms"], 2),
                "threads": threads,
                "repeats": repeats,
                "max_decode_steps": max_decode_steps,
            }
        )
        logger.info("measured %s in %.1f s: %s", cand["splits"], time.perf_counter() - t_start, measured)
    return rows


def _round(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}


def contrasting(ranked, num_layers: int, have) -> list:
    """From the planner's full ranking: the best plan with other cuts than all of ``have`` (the runner-up
    split), the best with k1 = k2 = L // 2 and the best with k2 = L."""
    seen = {_key(_as_dict(c)) for c in have}
    cuts = {tuple(_as_dict(c)["splits"]) for c in have}
    picks = []
    for want in (lambda s: s not in cuts, lambda s: s[0] == s[1] == num_layers // 2, lambda s: s[1] == num_layers):
        for c in ranked:
            d = _as_dict(c)
            if want(tuple(d["splits"])) and _key(d) not in seen:
                picks.append(c)
                seen.add(_key(d))
                break
    return picks


def _key(d: dict) -> tuple:
    return (tuple(d["splits"]), tuple(sorted(d["codecs"].items())), tuple(sorted(d["compression"].items())))


def summary(rows: list[dict]) -> dict:
    """Is the planner's choice (rows[0]) within 5% of the best measured candidate?"""
    best = min(rows, key=lambda r: r["measured"]["expected_ms"])
    chosen = rows[0]["measured"]["expected_ms"]
    gap = 100 * (chosen - best["measured"]["expected_ms"]) / best["measured"]["expected_ms"]
    return {
        "chosen_splits": rows[0]["splits"],
        "best_measured_splits": best["splits"],
        "gap_pct": round(gap, 2),
        "within_5pct": gap <= 5.0,
    }


def format_table(rows: list[dict]) -> list[str]:
    """Markdown table: predicted (planner; at live threads) against measured, per candidate."""
    out = [
        "| # | splits | codecs (dev-edge / edge-cloud) | compression (dev / edge) | predicted TTFT / tok / expected ms "
        "| predicted@live-threads ms | measured TTFT / tok / expected ms | error % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        p, q, m = r["predicted"], r["predicted_live"], r["measured"]
        ql = f"{q['ttft_ms']:.1f} / {q['per_token_ms']:.2f} / {q['expected_ms']:.1f}" if q else "-"
        out.append(
            f"| {i} | {r['splits'][0]},{r['splits'][1]} | {r['codecs']['device_edge']} / {r['codecs']['edge_cloud']} "
            f"| {r['compression']['device']} / {r['compression']['edge']} "
            f"| {p['ttft_ms']:.1f} / {p['per_token_ms']:.2f} / {p['expected_ms']:.1f} | {ql} "
            f"| {m['ttft_ms']:.1f} / {m['per_token_ms']:.2f} / {m['expected_ms']:.1f} | {r['error_pct']:+.1f} |"
        )
    return out
