"""SmoothQuant W8A8: move activation outliers into the weights, then quantise both to int8.

For a linear y = x W^T whose input channel j is scaled down by s_j upstream,
scaling weight column j up by s_j keeps y exact; with
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) both sides quantise well
(Xiao et al., 2023). The division is folded only where a linear operation
precedes the input:

- q/k/v input: into ``input_layernorm.weight``;
- gate_up input: into ``post_attention_layernorm.weight``;
- o_proj input: into the v_proj rows (attention mixes positions, never
  channels); with grouped kv heads one factor serves the query heads of a group;
- down_proj input: into the "up" half of gate_up (silu(gate) * up is linear in up).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import torch
from torch import nn

from runtime.compress.common import CompressionError, LayerRange, decoder_layers, stored_bytes
from runtime.compress.quant import Int8Linear
from runtime.layers import DecoderLayer
from runtime.segment import Segment, SegmentInput

CALIBRATED = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), per input channel: (K,), (K,) -> (K,)."""
    act, weight = act_max.float().clamp(min=1e-5), weight_max.float().clamp(min=1e-5)
    return (act.pow(alpha) / weight.pow(1 - alpha)).clamp(min=1e-5)


def column_max(*linears: nn.Linear) -> torch.Tensor:
    """max |W| over the output rows of every linear, per input channel: (K,)."""
    return torch.stack([lin.weight.detach().abs().amax(dim=0) for lin in linears]).amax(dim=0)


# ---- calibration ----------------------------------------------------------------------------------


def _windows(data) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data]
    windows = list(data)
    if not windows or not all(isinstance(w, torch.Tensor) for w in windows):
        raise CompressionError(
            "calibration data must be a tensor of token ids (T,) / hidden states (T, C), or a list of them"
        )
    return windows


def run_calibration(segment: Segment, data, hooks: dict) -> None:
    """Run the calibration data through ``segment`` with forward pre-hooks {module: hook} in place."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    try:
        for rows in _windows(data):
            _run_window(segment, rows)
    finally:
        for h in handles:
            h.remove()


def _run_window(segment: Segment, rows: torch.Tensor) -> None:
    session = uuid.uuid4().hex
    item = SegmentInput(session, 0, input_ids=rows) if segment.has_embed else SegmentInput(session, 0, hidden=rows)
    try:
        segment([item])
    finally:
        segment.close_session(session)


def input_absmax(segment: Segment, data, blocks: Iterable[DecoderLayer], names=CALIBRATED) -> dict:
    """Per-input-channel max |x| seen by each named linear of each block over the calibration data."""
    stats: dict[tuple[int, str], torch.Tensor] = {}

    def hook_for(key):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()  # (K,)
            stats[key] = torch.maximum(stats[key], x) if key in stats else x

        return hook

    hooks = {block.get_submodule(name): hook_for((block.self_attn.layer, name)) for block in blocks for name in names}
    run_calibration(segment, data, hooks)
    return stats


# ---- folding --------------------------------------------------------------------------------------


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm output / s, linear columns * s: (K,)."""
    norm.weight.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])


@torch.no_grad()
def fold_into_v(attn: nn.Module, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Smooth o_proj's input through the v_proj rows: one factor per (kv head, dim) for its query heads."""
    K, D = attn.num_kv_heads, attn.head_dim
    G = attn.num_heads // K
    act = act_max.view(K, G, D).amax(dim=1)  # (K, D)
    weight = attn.o_proj.weight.abs().view(-1, K, G, D).amax(dim=(0, 2))  # (K, D)
    s = smoothing_factors(act, weight, alpha)  # (K, D)
    attn.v_proj.weight.div_(s.reshape(-1, 1))
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.div_(s.reshape(-1))
    attn.o_proj.weight.view(-1, K, G, D).mul_(s[None, :, None, :])
    return s


@torch.no_grad()
def fold_into_up(mlp: nn.Module, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Smooth down_proj's input by scaling the "up" rows of gate_up: (I,)."""
    s = smoothing_factors(act_max, column_max(mlp.down_proj), alpha)  # (I,)
    inter = mlp.down_proj.in_features
    mlp.gate_up_proj.weight[inter:].div_(s[:, None])
    mlp.down_proj.weight.mul_(s[None, :])
    return s


def smooth_block(block: DecoderLayer, stats: dict, alpha: float) -> dict:
    """Fold the four smoothings into one block; return the largest factor of each."""
    i, attn, mlp = block.self_attn.layer, block.self_attn, block.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s_qkv = smoothing_factors(stats[i, "self_attn.q_proj"], column_max(*qkv), alpha)
    fold_into_norm(block.input_layernorm, qkv, s_qkv)
    s_mlp = smoothing_factors(stats[i, "mlp.gate_up_proj"], column_max(mlp.gate_up_proj), alpha)
    fold_into_norm(block.post_attention_layernorm, [mlp.gate_up_proj], s_mlp)
    s_o = fold_into_v(attn, stats[i, "self_attn.o_proj"], alpha)
    s_down = fold_into_up(mlp, stats[i, "mlp.down_proj"], alpha)
    return {
        name: float(s.max())
        for name, s in zip(("qkv", "gate_up", "o", "down"), (s_qkv, s_mlp, s_o, s_down), strict=True)
    }


def _plain_linears(block: DecoderLayer) -> list[tuple[nn.Module, str, nn.Linear]]:
    parents = [(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    parents += [(block.mlp, n) for n in ("gate_up_proj", "down_proj")]
    found = [(p, n, getattr(p, n)) for p, n in parents]
    for _, n, m in found:
        if type(m) is not nn.Linear:
            raise CompressionError(
                f"smoothquant needs plain nn.Linear; layer {block.self_attn.layer} {n} is {type(m).__name__}"
            )
    return found


def smoothquant(segment: Segment, calibration, alpha: float = 0.5, layers: LayerRange = None) -> dict:
    """Calibrate on ``calibration`` (ids, or hidden states without the embedding), smooth, quantise W8A8."""
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise CompressionError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not isinstance(segment, Segment):
        raise CompressionError("smoothquant calibrates by running the module: give it a Segment")
    chosen = decoder_layers(segment, layers)
    targets = [t for _, block in chosen for t in _plain_linears(block)]  # checked before anything changes
    before = stored_bytes(segment)
    stats = input_absmax(segment, calibration, [block for _, block in chosen]) if chosen else {}
    factors = {i: smooth_block(block, stats, alpha) for i, block in chosen}
    for parent, name, linear in targets:
        setattr(parent, name, Int8Linear.from_linear(linear, "int8"))
    touched = [i for i, _ in chosen]
    return {
        "pass": "smoothquant",
        "layers": [touched[0], touched[-1] + 1] if touched else [],
        "alpha": alpha,
        "linears": len(targets),
        "calibration_positions": sum(int(w.shape[0]) for w in _windows(calibration)),
        "max_factor": max((max(f.values()) for f in factors.values()), default=None),
        "bytes_before": before,
        "bytes_after": stored_bytes(segment),
    }
