"""Attention against the KV pool in plain PyTorch: the CPU runtime, and the reference of the CUDA kernel.

Each session's keys are read in place as views of the pool's contiguous runs (``KVPool.runs``): a session
in one run (the usual case: the pool grows a session's pages in place) goes through PyTorch's fused
attention on that view; one in several runs gets scores against each run joined, one causal softmax,
then the value products of the runs summed. No session's cache is copied, and no session is padded to
another's length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.kv_pool import KVPool
from runtime.step import StepBatch


def attend_runs(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: list[tuple[int, int]], start: int, scale: float
) -> torch.Tensor:
    """Causal attention of one session's T new rows (at positions start..) to its keys: (T, H, D) -> (T, H, D).

    ``keys``/``values`` are a layer's flat pool (S, K, D); ``runs`` the slot ranges of positions [0, start + T).
    """
    T, H, D = q.shape
    K = keys.shape[1]
    G = H // K
    if len(runs) == 1:  # the session's keys are one view: PyTorch's fused attention reads it in place
        return _attend_view(q, keys[runs[0][0] : runs[0][1]], values[runs[0][0] : runs[0][1]], start, scale)
    qg = q.view(T, K, G, D).permute(1, 2, 0, 3).reshape(K, G * T, D)  # (K, G*T, D), row g*T + t
    scores = torch.cat([qg @ keys[a:b].permute(1, 2, 0) for a, b in runs], dim=-1).float() * scale  # (K, G*T, L)
    if T > 1:
        L = scores.shape[-1]
        allowed = torch.arange(L, device=q.device)[None, :] <= start + torch.arange(T, device=q.device)[:, None]
        scores = scores.masked_fill(~allowed.repeat(G, 1), float("-inf"))  # (T, L) -> (G*T, L)
    probs = scores.softmax(dim=-1).to(q.dtype)
    out, seen = None, 0
    for a, b in runs:
        part = probs[..., seen : seen + b - a] @ values[a:b].permute(1, 0, 2)  # (K, G*T, D)
        out = part if out is None else out + part
        seen += b - a
    return out.view(K, G, T, D).permute(2, 0, 1, 3).reshape(T, H, D)


def _attend_view(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of T rows at positions start.. to (L, K, D) keys/values views: (T, H, D)."""
    T, L = q.shape[0], keys.shape[0]
    if T == 1:  # a decode row: two small products cost less than the fused kernel's set-up
        return _attend_last(q, keys, values, scale)
    mask, causal = None, T > 1 and start == 0  # a whole prompt: plain causal attention
    if T > 1 and start > 0:  # row t sees keys [0, start + t]
        mask = torch.arange(L, device=q.device)[None, :] <= start + torch.arange(T, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                         values.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=True)  # (1, H, T, D)
    return out[0].transpose(0, 1)  # (T, H, D)


def _attend_last(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One row at the end of its keys (sees them all): (1, H, D) against (L, K, D) views -> (1, H, D)."""
    K, D = keys.shape[1], keys.shape[2]
    qg = q.view(K, -1, D)  # (K, G, D): query head h reads kv head h // G
    scores = torch.bmm(qg, keys.permute(1, 2, 0)).float() * scale  # (K, G, L)
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.bmm(probs, values.transpose(0, 1)).view(1, -1, D)  # (K, G, D) -> (1, H, D)


class PoolAttention:
    """The step context of ``layers``: rotary angles, and attention that writes and reads the pool."""

    def __init__(self, pool: KVPool, batch: StepBatch, first_layer: int, scale: float, cos, sin):
        self.pool, self.batch, self.first_layer, self.scale = pool, batch, first_layer, scale
        self.cos, self.sin = cos, sin  # (N, 1, R/2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        local = layer - self.first_layer
        self.pool.write(local, self.batch.slots, k, v)
        keys, values = self.pool.flat(local)  # (S, K, D)
        if len(self.batch.items) == 1:  # one session (a device's or an HTTP client's decode step)
            return attend_runs(q, keys, values, self.batch.runs[0], self.batch.items[0].start_pos, self.scale)
        out = torch.empty_like(q)  # (N, H, D)
        for item, first, runs in zip(self.batch.items, self.batch.offsets, self.batch.runs):
            rows = slice(first, first + item.num_positions)
            out[rows] = attend_runs(q[rows], keys, values, runs, item.start_pos, self.scale)
        return out
