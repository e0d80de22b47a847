"""Structured pruning: query heads within kv groups, and MLP channels.

Key/value heads are kept: every layer of a segment shares one KV-cache
shape, and the grouped attention maps query head h to kv head h // G. So the
same number of query heads is removed from every group, which keeps the
layout (G' query heads per kv head) the runtime expects.

Importance without calibration data is a weight norm: for a head, the
Frobenius norm of its o_proj columns times that of its q_proj rows; for an
MLP channel, |down column| * |up row| * |gate row|. With calibration data it
is the mean size of what the head or channel adds to the output over real
activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.compress.common import (
    CompressionError,
    LayerRange,
    check_fraction,
    decoder_layers,
    param_count,
)
from runtime.compress.smooth import run_calibration
from runtime.layers import DecoderLayer


def _require_linear(module: nn.Module, what: str) -> nn.Linear:
    if type(module) is not nn.Linear:
        raise CompressionError(
            f"pruning needs plain nn.Linear {what}; it is {type(module).__name__} (prune before quantising)"
        )
    return module


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping only ``rows`` (outputs) and ``cols`` (inputs)."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return out


def _input_norms(segment, data, modules: dict) -> dict:
    """Mean |x| per input channel of each module over calibration data: {key: (K,)}."""
    sums, counts = {}, {}

    def hook_for(key):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (M, K)
            sums[key] = sums.get(key, 0) + x.abs().sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        return hook

    run_calibration(segment, data, {m: hook_for(k) for k, m in modules.items()})
    return {k: sums[k] / counts[k] for k in sums}


# ---- heads ----------------------------------------------------------------------------------------


def head_scores(attn: nn.Module, o_input: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each query head: (H,)."""
    H, D = attn.num_heads, attn.head_dim
    o_norm = attn.o_proj.weight.detach().view(-1, H, D).norm(dim=(0, 2))  # (H,)
    if o_input is not None:
        return o_norm * o_input.view(H, D).norm(dim=1)
    return o_norm * attn.q_proj.weight.detach().view(H, D, -1).norm(dim=(1, 2))


def heads_to_keep(scores: torch.Tensor, num_kv_heads: int, drop_per_group: int) -> torch.Tensor:
    """Indices of the query heads kept: the best G - drop of each group, in order: (H',)."""
    groups = scores.view(num_kv_heads, -1)  # (K, G)
    G = groups.shape[1]
    best = groups.topk(G - drop_per_group, dim=1).indices.sort(dim=1).values  # (K, G')
    return (best + torch.arange(num_kv_heads)[:, None] * G).flatten()


@torch.no_grad()
def prune_block_heads(block: DecoderLayer, drop_per_group: int, o_input: torch.Tensor | None = None) -> int:
    """Remove ``drop_per_group`` query heads from each kv group of one block; return heads removed."""
    attn = block.self_attn
    q, o = _require_linear(attn.q_proj, "q_proj"), _require_linear(attn.o_proj, "o_proj")
    keep = heads_to_keep(head_scores(attn, o_input), attn.num_kv_heads, drop_per_group)  # (H',)
    D = attn.head_dim
    channels = (keep[:, None] * D + torch.arange(D)).flatten()  # (H' * D,)
    attn.q_proj, attn.o_proj = _sliced(q, rows=channels), _sliced(o, cols=channels)
    removed = attn.num_heads - keep.numel()
    attn.num_heads = keep.numel()
    return removed


def prune_heads(module: nn.Module, fraction: float, layers: LayerRange = None, calibration=None) -> dict:
    """Remove round(fraction * G) of the G query heads of every kv group in each chosen layer."""
    check_fraction(fraction, "fraction")
    chosen = decoder_layers(module, layers)
    o_inputs = {}
    if calibration is not None and chosen:
        o_inputs = _input_norms(module, calibration, {i: b.self_attn.o_proj for i, b in chosen})
    before, removed = param_count(module), {}
    for i, block in chosen:
        G = block.self_attn.num_heads // block.self_attn.num_kv_heads
        drop = min(round(fraction * G), G - 1)
        if drop:
            removed[i] = prune_block_heads(block, drop, o_inputs.get(i))
    return _summary("prune_heads", chosen, before, module, fraction=fraction, heads_removed=removed)


# ---- MLP channels ---------------------------------------------------------------------------------


def channel_scores(mlp: nn.Module, down_input: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each intermediate channel: (I,)."""
    inter = mlp.down_proj.in_features
    down = mlp.down_proj.weight.detach().norm(dim=0)  # (I,)
    if down_input is not None:
        return down * down_input
    gate_up = mlp.gate_up_proj.weight.detach().norm(dim=1)  # (2I,)
    return down * gate_up[:inter] * gate_up[inter:]


@torch.no_grad()
def prune_block_mlp(block: DecoderLayer, keep_count: int, down_input: torch.Tensor | None = None) -> int:
    """Keep the ``keep_count`` most important intermediate channels of one block; return channels removed."""
    mlp = block.mlp
    gate_up, down = (
        _require_linear(mlp.gate_up_proj, "gate_up_proj"),
        _require_linear(mlp.down_proj, "down_proj"),
    )
    inter = down.in_features
    keep = channel_scores(mlp, down_input).topk(keep_count).indices.sort().values  # (I',)
    mlp.gate_up_proj = _sliced(gate_up, rows=torch.cat((keep, keep + inter)))
    mlp.down_proj = _sliced(down, cols=keep)
    return inter - keep_count


def prune_mlp(
    module: nn.Module, fraction: float, layers: LayerRange = None, calibration=None, multiple_of: int = 8
) -> dict:
    """Remove ``fraction`` of the MLP channels of each chosen layer, keeping a multiple of ``multiple_of``."""
    check_fraction(fraction, "fraction")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise CompressionError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    chosen = decoder_layers(module, layers)
    down_inputs = {}
    if calibration is not None and chosen:
        down_inputs = _input_norms(module, calibration, {i: b.mlp.down_proj for i, b in chosen})
    before, removed = param_count(module), {}
    for i, block in chosen:
        inter = block.mlp.down_proj.in_features
        keep = max(multiple_of, math.ceil((1 - fraction) * inter / multiple_of) * multiple_of)
        if keep < inter:
            removed[i] = prune_block_mlp(block, keep, down_inputs.get(i))
    return _summary("prune_mlp", chosen, before, module, fraction=fraction, channels_removed=removed)


def _summary(name: str, chosen, before: int, module: nn.Module, **extra) -> dict:
    touched = [i for i, _ in chosen]
    return {
        "pass": name,
        "layers": [touched[0], touched[-1] + 1] if touched else [],
        "params_before": before,
        "params_after": param_count(module),
        **extra,
    }
