"""The quality of a tail (layers [k2, L) + norm + head) against another fed the same hidden states at k2.

The fast-tail choice (``partitioner.plan.fast_tail``) and ``splitglm eval --plan`` (``assess``) both judge
a tail this way: the same windows of real text, the same hidden states in, perplexity and greedy agreement out.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable

import torch

from partitioner.eval.quality import scores, windows_of
from runtime.segment import Segment, SegmentInput

Front = Callable[[torch.Tensor], torch.Tensor]  # (T,) token ids -> (T, C) hidden states at k2
Link = Callable[[torch.Tensor], torch.Tensor]  # (T, C) -> (T, C)


def _fresh(segment: Segment, item: SegmentInput) -> torch.Tensor:
    """Run one new session's rows through ``segment`` and free it."""
    try:
        return segment([item])[0]
    finally:
        segment.close_session(item.session_id)


def segment_front(front: Segment) -> Front:
    """A front (embedding + layers [0, k2)) as a function of token ids."""
    return lambda ids: _fresh(front, SegmentInput(uuid.uuid4().hex, 0, input_ids=ids))


def hidden_windows(front: Front, ids: torch.Tensor, window: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids (T,), hidden states at the cut (T, C)) for each non-overlapping window of ``ids``."""
    return [(chunk, front(chunk)) for chunk in windows_of(ids, window)]


def tail_scores(tail: Segment, windows, link: Link | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL (N,) and greedy choices (N,) of a tail fed each window's hidden states (through ``link``)."""
    nll, greedy = [], []
    for ids, hidden in windows:
        rows = link(hidden) if link is not None else hidden
        n, g = scores(_fresh(tail, SegmentInput(uuid.uuid4().hex, 0, hidden=rows)), ids)  # (T, V) logits
        nll.append(n)
        greedy.append(g)
    return torch.cat(nll), torch.cat(greedy)


def compare_scores(reference: tuple[torch.Tensor, torch.Tensor], candidate: tuple[torch.Tensor, torch.Tensor],
                   reference_name: str = "accurate") -> dict:
    """Candidate against reference (each (NLL (N,), greedy (N,)), as ``tail_scores`` gives them): perplexities
    (the reference's under ``<reference_name>_perplexity``), change in %, greedy agreement."""
    (ref_nll, ref_greedy), (nll, greedy) = reference, candidate
    base, ppl = math.exp(float(ref_nll.mean())), math.exp(float(nll.mean()))
    return {
        "perplexity": round(ppl, 4),
        f"{reference_name}_perplexity": round(base, 4),
        "perplexity_delta_pct": round(100 * (ppl / base - 1), 3),
        "token_agreement": round(float((greedy == ref_greedy).float().mean()), 4),
        "tokens": int(nll.numel()),
    }
