"""What a compression costs in accuracy: perplexity and greedy-token agreement over real text."""

from __future__ import annotations

import copy
import math
import uuid
from collections.abc import Callable

import torch
from tqdm import tqdm

from partitioner.eval.quality import scores as _scores
from partitioner.eval.quality import windows_of
from partitioner.eval.tails import compare_scores
from runtime.compress.passes import apply_compression
from runtime.local import Chain
from runtime.segment import Segment

Model = Segment | Chain | list[Segment]  # one whole-model segment, or segments from embedding to head


def as_chain(model: Model) -> Chain:
    """A Chain from a Chain, segments or one segment, from the embedding to the head."""
    chain = model if isinstance(model, Chain) else Chain([model] if isinstance(model, Segment) else list(model))
    if not chain.segments[0].has_embed or not chain.segments[-1].has_head:
        raise ValueError("perplexity needs segments from the embedding to the LM head")
    return chain


def window_scores(model: Model, ids: torch.Tensor, window: int = 512, progress: bool = False):
    """Next-token NLL (N,) and greedy choices (N,) over non-overlapping windows of ``ids`` (T,)."""
    chain, nll, greedy = as_chain(model), [], []
    for chunk in tqdm(windows_of(ids, window), desc="windows", disable=not progress, leave=False):
        session = uuid.uuid4().hex
        try:
            logits = chain.step(session, 0, chunk)  # (T, V)
        finally:
            chain.close(session)
        n, g = _scores(logits, chunk)
        nll.append(n)
        greedy.append(g)
    return torch.cat(nll), torch.cat(greedy)


def perplexity(model: Model, ids: torch.Tensor, window: int = 512) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens."""
    nll, _ = window_scores(model, ids, window)
    return math.exp(float(nll.mean()))


def token_agreement(reference: Model, candidate: Model, ids: torch.Tensor, window: int = 512) -> float:
    """Share of positions where the candidate's greedy next token equals the reference's."""
    _, ref = window_scores(reference, ids, window)
    _, cand = window_scores(candidate, ids, window)
    return float((ref == cand).float().mean())


def compare(reference: Model, candidate: Model, ids: torch.Tensor, window: int = 512, baseline=None) -> dict:
    """Perplexity, its change in %, greedy agreement; ``baseline``: window_scores(reference), reused."""
    reference_scores = baseline or window_scores(reference, ids, window)
    return compare_scores(reference_scores, window_scores(candidate, ids, window), reference_name="baseline")


def layer_sensitivity(
    segments: list[Segment],
    ids: torch.Tensor,
    pass_entry: dict,
    layers: range,
    window: int = 512,
    calibration=None,
    progress: Callable | None = None,
) -> dict[int, dict]:
    """Apply one pass to one layer at a time on a copy of the model; the accuracy cost of each layer."""
    baseline = window_scores(segments, ids, window)
    out = {}
    for i in tqdm(layers, desc="layers", disable=progress is None, leave=False):
        trial = copy.deepcopy(segments)
        for segment in trial:
            apply_compression(segment, [{**pass_entry, "layers": [i, i + 1]}], calibration)
        out[i] = compare(segments, trial, ids, window, baseline)
    return out
