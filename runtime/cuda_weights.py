"""The CUDA engine's weights: each layer's q|k|v fused, cast for the GPU, or FP8 (``runtime.fp8``); of a whole
segment or of a tensor-parallel shard (``runtime.tensor_parallel``: its own slices)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runtime import fp8
from runtime.checkpoint import GlmSpec
from runtime.tensor_parallel import RowParallel, VocabParallelHead

Linear = torch.Tensor | fp8.Fp8Weight  # a product's weight: the engine's dtype, or FP8 with row scales


@dataclass
class LayerWeights:
    qkv: Linear  # ((H + 2K) D, C)
    qkv_bias: torch.Tensor | None  # ((H + 2K) D,)
    o: Linear  # (C, H D)
    gate_up: Linear  # (2 I, C)
    down: Linear  # (C, I)
    input_norm: torch.Tensor  # (C,)
    post_attention_norm: torch.Tensor
    post_self_attn_norm: torch.Tensor | None  # glm4's sandwich norms
    post_mlp_norm: torch.Tensor | None


@dataclass
class Weights:
    layers: list[LayerWeights]
    embed: torch.Tensor | None  # (V, C)
    norm: torch.Tensor | None  # (C,)
    lm_head: torch.Tensor | None  # (V, C)

    def nbytes(self) -> int:
        tensors = [t for w in self.layers for t in vars(w).values() if t is not None]
        tensors += [t for t in (self.embed, self.norm, self.lm_head) if t is not None]
        return sum(t.nbytes() if isinstance(t, fp8.Fp8Weight) else t.numel() * t.element_size() for t in tensors)


def weights_of(segment, dtype: torch.dtype, device, fp8_linears: bool = False) -> Weights:
    """The segment's weights fused (q|k|v) and cast for the GPU; refuses compressed layers. ``fp8_linears``:
    the layers' four products in E4M3 with per-row scales (``runtime.fp8``); norms, biases and the head keep
    ``dtype``."""

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

    def linear(t: torch.Tensor) -> Linear:
        return fp8.quantize(t, device) if fp8_linears else cast(t)

    layers = []
    for layer in segment.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        o_proj, down_proj = _unwrap(attn.o_proj), _unwrap(mlp.down_proj)
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, o_proj, mlp.gate_up_proj, down_proj]
        if any(type(m) is not torch.nn.Linear for m in linears):
            raise ValueError("the CUDA engine runs uncompressed layers: load the tier without compression passes")
        bias = None if attn.q_proj.bias is None else torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        sandwich = getattr(layer, "sandwich", False)
        layers.append(LayerWeights(
            qkv=linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
            qkv_bias=cast(bias), o=linear(o_proj.weight), gate_up=linear(mlp.gate_up_proj.weight),
            down=linear(down_proj.weight),
            input_norm=cast(layer.input_layernorm.weight),
            post_attention_norm=cast(layer.post_attention_layernorm.weight),
            post_self_attn_norm=cast(layer.post_self_attn_layernorm.weight) if sandwich else None,
            post_mlp_norm=cast(layer.post_mlp_layernorm.weight) if sandwich else None,
        ))  # fmt: skip
    return Weights(
        layers,
        cast(segment.embed_tokens.weight) if segment.has_embed else None,
        cast(segment.norm.weight) if segment.has_head else None,
        cast(_unwrap(segment.lm_head).weight) if segment.has_head else None,
    )


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """A tensor-parallel shard's product (``runtime.tensor_parallel``) as the linear of its own slice."""
    if isinstance(module, RowParallel):
        return module.linear
    return module.local if isinstance(module, VocabParallelHead) else module


def random_weights(spec: GlmSpec, layers: int, embed: bool, head: bool, dtype, device, seed: int = 0,
                   fp8_linears: bool = False, world: int = 1) -> Weights:
    """Random weights of a segment's shape, made on the GPU (speed benchmarks of shapes without a checkpoint);
    ``fp8_linears`` as in ``weights_of``; ``world`` > 1: the shape of one tensor-parallel shard of it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    C, D, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size // world
    heads, kv_heads, vocab = spec.num_heads // world, max(spec.num_kv_heads // world, 1), -(-spec.vocab_size // world)
    qkv_rows = (heads + 2 * kv_heads) * D

    def rand(*shape, fan_in=None):
        scale = 1.0 / math.sqrt(fan_in or shape[-1])
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    def ones():
        return torch.ones(C, device=device, dtype=dtype)

    def linear(*shape) -> Linear:
        return fp8.quantize(rand(*shape)) if fp8_linears else rand(*shape)

    sandwich = spec.sandwich_norm
    made = [LayerWeights(
        qkv=linear(qkv_rows, C),
        qkv_bias=torch.zeros(qkv_rows, device=device, dtype=dtype) if spec.attention_bias else None,
        o=linear(C, heads * D), gate_up=linear(2 * inter, C), down=linear(C, inter), input_norm=ones(),
        post_attention_norm=ones(), post_self_attn_norm=ones() if sandwich else None,
        post_mlp_norm=ones() if sandwich else None,
    ) for _ in range(layers)]  # fmt: skip
    return Weights(made, rand(spec.vocab_size, C) if embed else None, ones() if head else None,
                   rand(vocab, C) if head else None)
