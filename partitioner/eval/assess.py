"""``splitglm eval``: the accuracy cost of codecs, of a compression, or of a whole plan, on real text."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch

from partitioner.eval.compression import compare, window_scores
from partitioner.eval.quality import CodecQuality, FrameLink, evaluate_codecs
from partitioner.eval.tails import compare_scores, hidden_windows, tail_scores
from runtime.artifacts import load_plan, load_tier
from runtime.checkpoint import load_spec, load_tokenizer
from runtime.compress import apply_compression
from runtime.compress.named import COMPRESSIONS
from runtime.local import Chain, split_segments
from runtime.segment import Segment

logger = logging.getLogger(__name__)


def text_ids(model: str | os.PathLike, text: str | os.PathLike, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of a text file (all of them, with a warning, if it is shorter)."""
    ids = load_tokenizer(model)(Path(text).read_text(encoding="utf-8", errors="replace"), return_tensors="pt")
    ids = ids.input_ids[0]
    if ids.shape[0] < tokens:
        logger.warning("the text has %d tokens, fewer than %d: evaluating all of them", ids.shape[0], tokens)
    return ids[:tokens]


def plan_segments(plan_dir: str | os.PathLike) -> tuple[list[Segment], dict]:
    """The plan's device, edge and cloud segments as deployed (verified, compressed), and plan.json."""
    plan = load_plan(plan_dir)
    k1, k2 = plan["splits"]
    edge = load_tier(plan_dir, "edge")  # holds [0, k2); device frames run [k1, k2)
    return [load_tier(plan_dir, "device"), edge.view(k1, k2), load_tier(plan_dir, "cloud")], plan


def evaluate(
    model: str | os.PathLike,
    text: str | os.PathLike,
    splits: tuple[int, int] | None,
    codecs: list[str] | None,
    tokens: int = 4096,
    window: int = 1024,
    compression: str | None = None,
    plan_dir: str | os.PathLike | None = None,
    progress: bool = True,
    deployed: tuple[list[Segment], dict] | None = None,
) -> list[CodecQuality]:
    """Codecs at ``splits``; with ``compression`` every segment compressed; with ``plan_dir`` the plan as
    deployed (its splits, per-tier compression and per-link codecs; ``deployed``: ``plan_segments(plan_dir)``
    if already loaded). Always against the uncompressed model at the same splits with no codec."""
    spec = load_spec(model)
    if plan_dir is not None:
        segments, plan = deployed or plan_segments(plan_dir)
        splits = tuple(plan["splits"])
        codecs = codecs or [f"{plan['codecs']['device_edge']}/{plan['codecs']['edge_cloud']}"]
    if splits is None or not splits[1] <= spec.num_layers:
        raise ValueError(f"--splits must be K1,K2 with K2 <= {spec.num_layers} (or give --plan)")
    reference = split_segments(model, *splits)
    if plan_dir is None:
        segments = reference
        if compression not in (None, "none"):
            segments = split_segments(model, *splits)
            for segment in segments:
                apply_compression(segment, COMPRESSIONS[compression])
    compared = reference if segments is not reference else None
    ids = text_ids(model, text, tokens)
    return evaluate_codecs(segments, ids, codecs or ["fp32"], window, progress, reference=compared)


def evaluate_fast_tail(
    model: str | os.PathLike,
    text: str | os.PathLike,
    plan_dir: str | os.PathLike,
    tokens: int = 4096,
    window: int = 1024,
    deployed: tuple[list[Segment], dict] | None = None,
) -> dict | None:
    """The plan's fast tail against its accurate path, as deployed (``deployed``: ``plan_segments(plan_dir)``
    if already loaded); None for a plan without a fast tail.

    Both paths get the same hidden states at k2 (device, the device->edge codec, edge); the accurate
    path then crosses the edge->cloud codec to the cloud tier, the fast path runs the edge's fast tail.
    Perplexity change and greedy agreement are the fast path's against the accurate path's.
    """
    plan = load_plan(plan_dir)
    if "fast_tail" not in plan or not (Path(plan_dir) / "fast_tail").is_dir():
        return None
    (device, edge, cloud), _ = deployed or plan_segments(plan_dir)
    fast = load_tier(plan_dir, "fast_tail")
    C = load_spec(model).hidden_size
    front = Chain([device, edge], [FrameLink(plan["codecs"]["device_edge"], C)])

    def hidden_at_k2(ids: torch.Tensor) -> torch.Tensor:
        session = uuid.uuid4().hex
        try:
            return front.step(session, 0, ids)  # (T, C)
        finally:
            front.close(session)

    windows = hidden_windows(hidden_at_k2, text_ids(model, text, tokens), window)
    accurate = tail_scores(cloud, windows, link=FrameLink(plan["codecs"]["edge_cloud"], C))
    return {
        "codec": "fast_tail",
        "compression": plan["fast_tail"]["compression"]["name"],
        **compare_scores(accurate, tail_scores(fast, windows)),
    }


def compressed_tiers(plan: dict) -> list[str]:
    """The plan's device / edge / cloud tiers that run anything but the exact weights (passes or a student)."""
    entries = {t: plan.get("compression", {}).get(t, {}) for t in ("device", "edge", "cloud")}
    return [t for t, e in entries.items()
            if e.get("passes") or e.get("student") or e.get("backend", "torch") != "torch"]


def evaluate_tiers(
    model: str | os.PathLike, text: str | os.PathLike, plan_dir: str | os.PathLike, tokens: int = 4096,
    window: int = 1024, deployed: tuple[list[Segment], dict] | None = None,
) -> list[dict]:
    """Each compressed, sparse or distilled tier of the plan alone against the uncompressed model
    (``deployed``: ``plan_segments(plan_dir)`` if already loaded).

    The model at the plan's splits with lossless links, one tier swapped for the plan's (as deployed:
    verified, rebuilt, compressed); perplexity change and greedy agreement against no swap.
    """
    plan = load_plan(plan_dir)
    tiers = compressed_tiers(plan)
    if not tiers:
        return []
    deployed, _ = deployed or plan_segments(plan_dir)
    reference = split_segments(model, *plan["splits"])
    ids = text_ids(model, text, tokens)
    baseline = window_scores(reference, ids, window)
    rows = []
    for tier in tiers:
        index = ("device", "edge", "cloud").index(tier)
        candidate = [deployed[i] if i == index else reference[i] for i in range(3)]
        rows.append({"codec": f"tier:{tier}", "compression": plan["compression"][tier]["name"],
                     **compare(reference, candidate, ids, window, baseline)})
    return rows


def format_fast_tail(row: dict) -> str:
    """One line: the fast tail's perplexity and agreement against the accurate path."""
    return (
        f"fast tail ({row['compression']}) vs the accurate path over {row['tokens']} tokens: perplexity "
        f"{row['perplexity']:.4f} (accurate {row['accurate_perplexity']:.4f}), delta "
        f"{row['perplexity_delta_pct']:+.3f} %, agreement {row['token_agreement']:.4f}"
    )
