"""The differentiable forward of a segment over windows of B sequences of T positions (training only).

The runtime's layers (``runtime.layers``) take any leading shape; here the rows are (B, T)
and attention is plain causal attention over each sequence (``DenseContext``), with no KV pool, so
autograd sees every operation. Equal to the runtime's output for a fresh session (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.layers import rotary_cos_sin
from runtime.segment import Segment


class DenseContext:
    """``StepContext`` for (B, T) rows: rotary angles of positions 0..T-1 and causal attention."""

    def __init__(self, T: int, spec, device):
        self.cos, self.sin = rotary_cos_sin(torch.arange(T, device=device), spec.rotary_dim, spec.rope_theta)
        self.scale = spec.head_dim**-0.5

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, T, H, D) queries, (B, T, K, D) keys and values -> (B, T, H, D)."""
        groups = q.shape[2] // k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=self.scale)
        return out.transpose(1, 2)


def dense_forward(segment: Segment, x: torch.Tensor, collect: bool = False):
    """(B, T) ids or (B, T, C) hidden states -> (output, {layer key: (B, T, C) after that layer}).

    The output is the hidden states after the last layer, or with the head the logits (B, T, V).
    """
    ctx = DenseContext(x.shape[1], segment.spec, x.device)
    h = segment.embed_tokens(x) if segment.has_embed else x  # (B, T, C)
    hidden = {}
    for key, layer in segment.layers.items():
        h = layer(h, ctx)
        if collect:
            hidden[key] = h
    out = segment.lm_head(segment.norm(h)) if segment.has_head else h
    return out, hidden
