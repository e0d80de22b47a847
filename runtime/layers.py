"""GLM decoder blocks in plain PyTorch, over the flat rows of a step.

Parameter names follow transformers' ``GlmForCausalLM`` so checkpoints load as they are. A step's rows
(the new positions of every session in it, concatenated) go through the projections and the MLP as one
(N, C) matrix; attention is delegated to the step's context (``ctx.attend``), which writes the new keys
and values where they belong (the KV pool; an ONNX graph's outputs) and attends each row to its own
session's keys. This is the CPU runtime and the reference of the CUDA engine (``runtime.cuda``).

Shapes: N rows, C hidden, H query heads, K kv heads, D head dim, R rotary dims, I MLP width.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from runtime.checkpoint import GlmSpec


class StepContext(Protocol):
    """What a step gives every layer."""

    cos: torch.Tensor  # (N, 1, R/2)
    sin: torch.Tensor  # (N, 1, R/2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the rows' keys/values (N, K, D) of ``layer``, attend their queries (N, H, D): (N, H, D)."""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and scaled by ``weight`` in ``x``'s dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def inverse_frequencies(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """(R/2,) float32: the angle per position of each rotary pair."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=device) / rotary_dim))


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each row's rotary angles: (...,) positions -> 2 x (..., 1, R/2)."""
    angles = positions[..., None].float() * inverse_frequencies(rotary_dim, theta, positions.device)  # (..., R/2)
    return angles.cos()[..., None, :], angles.sin()[..., None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM's interleaved rotary on the leading dims of each head: pairs (2i, 2i+1) turn by angle i."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]  # (N, H, R), (N, H, D - R)
    pairs = x_rot.float().unflatten(-1, (-1, 2))  # (N, H, R/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    turned = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((turned.to(x.dtype), x_pass), dim=-1)


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

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows = x.shape[:-1]  # (N,) in a step; (1, T) in a traced ONNX graph
        q = self.q_proj(x).view(*rows, self.num_heads, self.head_dim)  # (N, H, D)
        k = self.k_proj(x).view(*rows, self.num_kv_heads, self.head_dim)  # (N, K, D)
        v = self.v_proj(x).view(*rows, self.num_kv_heads, self.head_dim)  # (N, K, D)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        out = ctx.attend(self.layer, q, k, v)  # (N, H, D)
        return self.o_proj(out.reshape(*rows, -1))  # (N, C)


class MLP(nn.Module):
    def __init__(self, spec: GlmSpec):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x (N, I)
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

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), ctx)
        if self.sandwich:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            h = self.post_mlp_layernorm(h)
        return x + h
