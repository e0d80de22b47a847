"""Training-free activation sparsity in the MLP (TEAL, Liu et al., 2024): zero the inputs below a threshold.

Two inputs of each chosen block's MLP are thresholded by magnitude: x, the MLP's input after
``post_attention_layernorm`` (width C, before gate_up), and h = silu(gate) * up (width I, before
down). A zeroed input needs no weight: for the few rows of a decode step the kernel reads only the
weight rows of the kept inputs (the weights are stored transposed, (K, O), so an input's weights are
one contiguous row) through ``embedding_bag``; for many rows (prefill) the dense product of the
zeroed inputs is cheaper. Both equal "zero those inputs, then the dense MLP".

The thresholds are calibrated once (``calibrate_sparse_mlp``: per layer, the |x| quantile that
zeroes the target share of the calibration inputs) and travel as data in the description,
``{"pass": "sparse_mlp", "thresholds": {"12": [t_gate_up, t_down], ...}}`` (string keys: global layer
index; 0 leaves that input dense), because a tier artifact carries no calibration data at load time.
CPU only: the CUDA engine reads the plain MLP's weights.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from runtime.compress.common import CompressionError, LayerRange, check_fraction, decoder_layers
from runtime.compress.smooth import run_calibration

SITES = ("gate_up", "down")  # the thresholded inputs, in the order of a threshold pair
# Gather while the kept inputs of all rows together are fewer than this share of the input width:
# on the demo model at 1 thread the gather reads a row at ~0.7x the dense product's bandwidth
# (``splitglm bench sparse``), so past ~0.7 K rows the dense product wins.
GATHER_SHARE = 0.7
GATHER_ROWS = 4  # from 4 rows on the dense product wins even at 50% sparsity
# log2 histogram of |x| for the quantiles: 2^-32 .. 2^16 in 1/128-octave bins (0.5% apart)
LOG2_LOW, LOG2_HIGH, BINS_PER_OCTAVE = -32.0, 16.0, 128
BINS = int((LOG2_HIGH - LOG2_LOW) * BINS_PER_OCTAVE)
ALLOCATIONS = ("uniform", "equal_error")


# ---- the kernel -----------------------------------------------------------------------------------


def gather_product(x: torch.Tensor, weight_t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """sum_i x[n, i] * W_t[i] over the kept i of each row, reading only those rows of W_t.

    (N, K) inputs, (K, O) transposed weight, (nnz,) kept positions n * K + i in row-major order -> (N, O).
    """
    N, K = x.shape
    weights = x.flatten().index_select(0, kept)  # (nnz,)
    if N == 1 and kept.numel():  # one bag: no offsets to find (a decode step's few ops count against ~0.1 ms products)
        return F.embedding_bag(kept[None], weight_t, per_sample_weights=weights[None], mode="sum")
    offsets = torch.searchsorted(kept, torch.arange(0, N * K, K, device=x.device))  # (N,) where each bag starts
    return F.embedding_bag(kept % K, weight_t, offsets, mode="sum", per_sample_weights=weights)


def sparse_product(x: torch.Tensor, weight_t: torch.Tensor, threshold: float, gather: bool | None = None):
    """(x with |x| < threshold zeroed) @ W_t: (N, K), (K, O) -> (N, O).

    ``gather`` None: the gather kernel for at most ``GATHER_ROWS`` rows whose kept inputs are few
    (``GATHER_SHARE``), else the dense product of the zeroed inputs.
    """
    if threshold <= 0:
        return x @ weight_t
    keep = x.abs() >= threshold  # (N, K)
    if gather is False or (gather is None and x.shape[0] > GATHER_ROWS):
        return torch.where(keep, x, 0) @ weight_t
    kept = keep.flatten().nonzero().squeeze(1)  # (nnz,)
    if gather is None and kept.numel() >= GATHER_SHARE * x.shape[1]:
        return torch.where(keep, x, 0) @ weight_t
    return gather_product(x, weight_t, kept)


class SparseMLP(nn.Module):
    """The MLP's weights, transposed, with its two inputs thresholded (``SITES``)."""

    def __init__(self, mlp: nn.Module, thresholds: tuple[float, float]):
        super().__init__()
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        if type(gate_up) is not nn.Linear or type(down) is not nn.Linear or down.bias is not None:
            raise CompressionError("sparse_mlp needs the plain MLP's nn.Linear weights (sparsify before quantising)")
        self.gate_up_t = nn.Parameter(gate_up.weight.detach().t().contiguous(), requires_grad=False)  # (C, 2I)
        self.down_t = nn.Parameter(down.weight.detach().t().contiguous(), requires_grad=False)  # (I, C)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.tally: dict | None = None  # {site: [zeroed, seen]} while ``sparsity_tally`` counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1]  # (N,) in a step
        x = x.reshape(-1, x.shape[-1])  # (N, C)
        t_gate_up, t_down = self.thresholds
        self._count("gate_up", x, t_gate_up)
        gate, up = sparse_product(x, self.gate_up_t, t_gate_up).chunk(2, dim=-1)  # 2 x (N, I)
        h = F.silu(gate) * up  # (N, I)
        self._count("down", h, t_down)
        return sparse_product(h, self.down_t, t_down).view(*rows, -1)  # (N, C)

    def _count(self, site: str, x: torch.Tensor, threshold: float) -> None:
        if self.tally is not None:
            zeroed, seen = self.tally.setdefault(site, [0, 0])
            self.tally[site] = [zeroed + int((x.abs() < threshold).sum()), seen + x.numel()]

    def extra_repr(self) -> str:
        return f"thresholds={self.thresholds}"


@contextmanager
def sparsity_tally(module: nn.Module):
    """Count the inputs each SparseMLP under ``module`` zeroes; yields {layer: {site: share zeroed}} (filled after)."""
    blocks = [(i, b.mlp) for i, b in decoder_layers(module) if isinstance(b.mlp, SparseMLP)]
    shares: dict[int, dict[str, float]] = {}
    for _, mlp in blocks:
        mlp.tally = {}
    try:
        yield shares
    finally:
        for i, mlp in blocks:
            shares[i] = {site: zeroed / seen for site, (zeroed, seen) in mlp.tally.items() if seen}
            mlp.tally = None


# ---- the pass -------------------------------------------------------------------------------------


def check_thresholds(thresholds) -> dict[int, tuple[float, float]]:
    """{"12": [t_gate_up, t_down], ...} -> {12: (t_gate_up, t_down)}, else a clear CompressionError."""
    if not isinstance(thresholds, dict):
        raise CompressionError(f"thresholds must map a layer index to [t_gate_up, t_down], got {thresholds!r}")
    out = {}
    for key, pair in thresholds.items():
        if not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise CompressionError(f"thresholds: layer key {key!r} is not a non-negative integer")
        numbers = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not numbers or not all(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 for t in pair):
            raise CompressionError(
                f"thresholds of layer {key}: expected [t_gate_up, t_down], two finite numbers >= 0, got {pair!r}"
            )
        out[int(key)] = (float(pair[0]), float(pair[1]))
    return out


def sparse_mlp(module: nn.Module, thresholds: dict, layers: LayerRange = None) -> dict:
    """Replace the MLP of each chosen block that has thresholds with a SparseMLP holding the same weights."""
    table = check_thresholds(thresholds)
    chosen = [(i, block) for i, block in decoder_layers(module, layers) if i in table]
    for i, block in chosen:
        block.mlp = SparseMLP(block.mlp, table[i])
    touched = [i for i, _ in chosen]
    return {
        "pass": "sparse_mlp",
        "layers": [touched[0], touched[-1] + 1] if touched else [],
        "sparse_layers": len(touched),
        "mean_thresholds": mean_thresholds({i: table[i] for i in touched}) if touched else [],
    }


def mean_thresholds(table: dict[int, tuple[float, float]]) -> list[float]:
    """The layers' mean [t_gate_up, t_down] of a non-empty threshold table."""
    return [round(sum(pair[s] for pair in table.values()) / len(table), 6) for s in (0, 1)]


def mean_shares(shares: dict[int, dict[str, float]]) -> dict[str, float]:
    """The layers' mean share zeroed per input site, from ``sparsity_tally``'s {layer: {site: share}}."""
    return {site: sum(s.get(site, 0.0) for s in shares.values()) / max(len(shares), 1) for site in SITES}


# ---- calibration ----------------------------------------------------------------------------------


def log_histogram(x: torch.Tensor) -> torch.Tensor:
    """Count and energy (sum x^2) of log2|x| in ``BINS`` bins from LOG2_LOW to LOG2_HIGH: (...) -> (2, BINS),
    on the CPU wherever x is.

    Values beyond the range fall into the end bins.
    """
    x = x.detach().float().flatten().abs()  # (M,)
    logs = x.clamp(min=2.0**LOG2_LOW).log2()
    bins = ((logs - LOG2_LOW) * BINS_PER_OCTAVE).long().clamp(0, BINS - 1)  # (M,)
    return torch.stack((torch.bincount(bins, minlength=BINS).double(),
                        torch.bincount(bins, weights=x.double().square(), minlength=BINS))).cpu()


def histogram_quantile(mass: torch.Tensor, share: float) -> float:
    """The |x| below which ``share`` of the mass lies, interpolated within its bin: (BINS,) -> float."""
    if share <= 0:
        return 0.0
    cum = mass.cumsum(0)  # (BINS,)
    target = share * float(cum[-1])
    b = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0].clamp(max=BINS - 1))
    below = float(cum[b - 1]) if b else 0.0
    within = min(max((target - below) / max(float(mass[b]), 1e-30), 0.0), 1.0)  # of the way through bin b
    return 2.0 ** (LOG2_LOW + (b + within) / BINS_PER_OCTAVE)


def share_below(counts: torch.Tensor, threshold: float) -> float:
    """Share of the histogram's values below ``threshold`` (bin-resolution): (BINS,) -> float."""
    if threshold <= 0:
        return 0.0
    b = (math.log2(threshold) - LOG2_LOW) * BINS_PER_OCTAVE
    whole = min(max(int(b), 0), BINS)
    part = float(counts[whole]) * (b - whole) if whole < BINS else 0.0
    return (float(counts[:whole].sum()) + part) / float(counts.sum())


def equal_error_thresholds(hists: list[torch.Tensor], share: float, steps: int = 40) -> list[float]:
    """Thresholds that zero the same share of each histogram's energy, that share chosen (by bisection) so
    that the mean share of values zeroed is ``share``: [(2, BINS)] -> [float].
    """
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        energy = (lo + hi) / 2
        zeroed = [share_below(h[0], histogram_quantile(h[1], energy)) for h in hists]
        lo, hi = (energy, hi) if sum(zeroed) / len(zeroed) < share else (lo, energy)
    return [histogram_quantile(h[1], (lo + hi) / 2) for h in hists]


def site_thresholds(hists: list[torch.Tensor], share: float, allocation: str) -> list[float]:
    """One threshold per layer for one input site: the same share zeroed ("uniform") or the same error."""
    if share <= 0 or not hists:
        return [0.0] * len(hists)
    if allocation == "uniform":
        return [histogram_quantile(h[0], share) for h in hists]
    return equal_error_thresholds(hists, share)


def site_shares(sparsity) -> tuple[float, float]:
    """One share for both inputs, or [gate_up, down]: each in [0, 1)."""
    pair = sparsity if isinstance(sparsity, (list, tuple)) else (sparsity, sparsity)
    if len(pair) != 2:
        raise CompressionError(f"sparsity is one share or [gate_up, down], got {sparsity!r}")
    return tuple(check_fraction(s, f"sparsity of the {site} input") for s, site in zip(pair, SITES))


def _checked(sparsity, allocation: str) -> tuple[float, float]:
    """The two site shares of ``sparsity``, after checking it and ``allocation``."""
    if allocation not in ALLOCATIONS:
        raise CompressionError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    return site_shares(sparsity)


def histogram_hooks(blocks: dict[int, nn.Module]) -> tuple[dict, dict[tuple[int, str], torch.Tensor]]:
    """Forward pre-hooks {linear: hook} that add the gate_up and down inputs of each block to log2 |x|
    histograms, and the histograms they fill, {(layer, site): (2, BINS)}."""
    hists: dict[tuple[int, str], torch.Tensor] = {}

    def hook_for(key):
        def hook(_module, args):
            hists[key] = hists.get(key, 0) + log_histogram(args[0])

        return hook

    hooks = {}
    for i, block in blocks.items():
        hooks[block.mlp.gate_up_proj] = hook_for((i, "gate_up"))
        hooks[block.mlp.down_proj] = hook_for((i, "down"))
    return hooks, hists


def input_histograms(segment, calibration, blocks: dict[int, nn.Module]) -> dict[tuple[int, str], torch.Tensor]:
    """log2 |x| histograms of the gate_up and down inputs of each block over the calibration data."""
    hooks, hists = histogram_hooks(blocks)
    run_calibration(segment, calibration, hooks)
    return hists


def sparse_description(hists: dict[tuple[int, str], torch.Tensor], blocks: dict[int, nn.Module], sparsity,
                       allocation: str = "uniform") -> dict:
    """The ``sparse_mlp`` description whose thresholds zero ``sparsity`` of each input of ``hists``."""
    shares = _checked(sparsity, allocation)
    per_site = [site_thresholds([hists[i, site] for i in blocks], share, allocation) for site, share in
                zip(SITES, shares)]  # [site][layer]
    thresholds = {str(i): [float(f"{t[n]:.6g}") for t in per_site] for n, i in enumerate(blocks)}
    return {"pass": "sparse_mlp", "thresholds": thresholds}


def plain_mlp_blocks(segment, layers: LayerRange = None) -> dict[int, nn.Module]:
    """{layer: block} of the chosen blocks, each with its plain MLP (else a CompressionError)."""
    blocks = dict(decoder_layers(segment, layers))
    if any(not isinstance(b.mlp.gate_up_proj, nn.Linear) for b in blocks.values()):
        raise CompressionError("calibrate_sparse_mlp needs the plain MLP (calibrate before any MLP pass)")
    return blocks


def calibrate_sparse_mlp(
    segment, calibration, sparsity, layers: LayerRange = None, allocation: str = "uniform"
) -> dict:
    """The ``sparse_mlp`` description whose thresholds zero ``sparsity`` of each input on the calibration data.

    ``sparsity``: one share for both inputs, or [gate_up, down] (0 leaves that input dense);
    ``allocation``: "uniform" zeroes that share in every layer, "equal_error" zeroes the same share of
    each layer's input energy (sum x^2), so that the layers' mean share zeroed is ``sparsity``;
    ``calibration``: token ids (T,), or hidden states (T, C) for a segment without the embedding.
    """
    _checked(sparsity, allocation)  # before the calibration runs
    blocks = plain_mlp_blocks(segment, layers)
    hists = input_histograms(segment, calibration, blocks) if blocks else {}
    return sparse_description(hists, blocks, sparsity, allocation)


# ---- training with the inputs zeroed --------------------------------------------------------------


def attach_input_masks(module: nn.Module, thresholds: dict) -> list:
    """Zero the MLP inputs below their thresholds in the plain MLPs under ``module`` (forward pre-hooks on
    gate_up_proj and down_proj), as ``SparseMLP`` does, but differentiable in the weights and the kept
    inputs: sparsity-aware fine-tuning trains the model it will be. Returns the hook handles to remove."""
    table = check_thresholds(thresholds)
    handles = []
    for i, block in plain_mlp_blocks(module).items():
        for linear, threshold in zip((block.mlp.gate_up_proj, block.mlp.down_proj), table.get(i, (0.0, 0.0))):
            if threshold > 0:
                handles.append(linear.register_forward_pre_hook(
                    lambda _m, args, t=threshold: (torch.where(args[0].abs() >= t, args[0], 0),)))
    return handles
