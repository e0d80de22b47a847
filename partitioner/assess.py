"""``splitglm eval``: the accuracy cost of codecs, of a compression, or of a whole plan, on real text."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .checkpoint import load_spec, load_tokenizer
from .compress import apply_compression
from .export import load_plan, load_tier
from .measure import COMPRESSIONS
from .pipeline import split_segments
from .quality import CodecQuality, evaluate_codecs
from .segment import Segment

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
) -> list[CodecQuality]:
    """Codecs at ``splits``; with ``compression`` every segment compressed; with ``plan_dir`` the plan as
    deployed (its splits, per-tier compression and per-link codecs). Always against the uncompressed model
    at the same splits with no codec."""
    spec = load_spec(model)
    if plan_dir is not None:
        segments, plan = plan_segments(plan_dir)
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
