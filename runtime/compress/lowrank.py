"""Low-rank factorisation: a linear W (N, K) becomes two, (N, r) @ (r, K), from its truncated SVD."""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.compress.common import (
    CompressionError,
    LayerRange,
    check_fraction,
    decoder_layers,
    linears_of,
    param_count,
    replace_module,
)

DEFAULT_NAMES = ("mlp.down_proj",)


def rank_for(singular: torch.Tensor, rank_fraction: float | None, energy: float | None) -> int:
    """Rank to keep: a fraction of the full rank, or the fewest values holding ``energy`` of sum(S^2)."""
    if rank_fraction is not None:
        return max(1, math.ceil(rank_fraction * singular.numel()))
    share = (singular.double() ** 2).cumsum(0) / (singular.double() ** 2).sum()  # (R,)
    return int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1


def factorise(linear: nn.Linear, rank: int, svd=None) -> nn.Sequential:
    """Two linears whose product is the best rank-``rank`` approximation of ``linear``: K -> r -> N."""
    U, S, Vh = svd or torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)  # (N, R), (R,), (R, K)
    root = S[:rank].sqrt()
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    first.weight = nn.Parameter((root[:, None] * Vh[:rank]).to(linear.weight.dtype), requires_grad=False)  # (r, K)
    second.weight = nn.Parameter((U[:, :rank] * root[None, :]).to(linear.weight.dtype), requires_grad=False)  # (N, r)
    if linear.bias is not None:
        second.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return nn.Sequential(first, second)


@torch.no_grad()
def low_rank(
    module: nn.Module,
    rank_fraction: float | None = None,
    energy: float | None = None,
    names: list[str] | tuple[str, ...] = DEFAULT_NAMES,
    layers: LayerRange = None,
) -> dict:
    """Factorise the named linears of each chosen layer; one whose factors would not be smaller is left."""
    if (rank_fraction is None) == (energy is None):
        raise CompressionError("low_rank needs exactly one of rank_fraction or energy")
    if rank_fraction is not None:
        check_fraction(rank_fraction, "rank_fraction", upper_open=False)
    else:
        check_fraction(energy, "energy", upper_open=False)
    if isinstance(names, str) or not names:
        raise CompressionError(f"names must be a non-empty list of linear names, got {names!r}")
    chosen = decoder_layers(module, layers)
    before, ranks, kept = param_count(module), {}, []
    for i, block in chosen:
        for name, linear in linears_of(block, names):
            N, K = linear.weight.shape
            svd = torch.linalg.svd(linear.weight.double(), full_matrices=False)
            rank = rank_for(svd[1], rank_fraction, energy)
            if rank * (N + K) >= N * K:
                kept.append(f"{i}.{name}")
                continue
            replace_module(block, name, factorise(linear, rank, svd))
            ranks[f"{i}.{name}"] = rank
    touched = [i for i, _ in chosen]
    return {
        "pass": "low_rank",
        "layers": [touched[0], touched[-1] + 1] if touched else [],
        "ranks": ranks,
        "not_smaller": kept,
        "params_before": before,
        "params_after": param_count(module),
    }
