"""GLM decoder blocks in plain PyTorch, written for a split runtime.

Parameter names follow transformers' ``GlmForCausalLM`` so checkpoints load
as they are. Attention reads and writes a caller-provided KV view, so one
forward can serve many sessions with different cache lengths.

Shapes: B sessions, T new positions, L cached + new positions, C hidden,
H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from partitioner.runtime.checkpoint import GlmSpec


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotary angles: (B, T) -> 2 x (B, 1, T, rotary_dim / 2)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim)
    )
    angles = positions[..., None].float() * inv_freq  # (B, T, R/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM's interleaved rotary on the leading dims of each head: pairs (2i, 2i+1) turn by angle i."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]  # (B, H, T, R), (B, H, T, D - R)
    pairs = x_rot.float().unflatten(-1, (-1, 2))  # (B, H, T, R/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((turned.to(x.dtype), x_pass), dim=-1)


@dataclass
class AttentionBatch:
    """Per-forward facts shared by every layer of a segment."""

    cos: torch.Tensor  # (B, 1, T, R/2)
    sin: torch.Tensor  # (B, 1, T, R/2)
    mask: torch.Tensor | None  # (B, 1, T, L) bool, True = may attend; None = plain single-session decode
    caches: list  # per session: a KVCache with room for its new positions
    starts: list[int]  # per session: cached positions before this forward
    lengths: list[int]  # per session: new (unpadded) positions in this forward


class Attention(nn.Module):
    def __init__(self, spec: GlmSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        bias = spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * spec.head_dim, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * spec.head_dim, bias=bias)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, batch.cos, batch.sin), apply_rotary(k, batch.cos, batch.sin)
        keys, values = self._cached_kv(k, v, batch)  # (B, K, L, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)

    def _cached_kv(self, k, v, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each session's new keys/values into its cache; return the keys/values to attend to."""
        views = []
        for i, (cache, start, n) in enumerate(zip(batch.caches, batch.starts, batch.lengths)):
            views.append(cache.write(self.layer, start, k[i, :, :n], v[i, :, :n]))  # (K, start + n, D)
        if len(views) == 1:
            keys, values = views[0]
            return keys[None], values[None]
        L = batch.mask.shape[-1]
        keys = k.new_zeros(len(views), self.num_kv_heads, L, self.head_dim)
        values = torch.zeros_like(keys)
        for i, (kv_k, kv_v) in enumerate(views):
            keys[i, :, : kv_k.shape[1]] = kv_k
            values[i, :, : kv_v.shape[1]] = kv_v
        return keys, values


class MLP(nn.Module):
    def __init__(self, spec: GlmSpec):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x (B, T, I)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block; glm4 adds a norm after attention and after the MLP."""

    def __init__(self, spec: GlmSpec, layer: int):
        super().__init__()
        self.self_attn = Attention(spec, layer)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if spec.sandwich_norm:
            self.post_self_attn_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.sandwich = spec.sandwich_norm

    def forward(self, x: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), batch)
        if self.sandwich:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            h = self.post_mlp_layernorm(h)
        return x + h
