"""Compression passes: close to the uncompressed model, structurally as claimed, still cache-correct."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from partitioner.eval.compression import compare, perplexity
from runtime.checkpoint import load_hf_model
from runtime.compress import (
    CompressionError,
    Int4Linear,
    Int8Linear,
    apply_compression,
    low_rank,
    prune_heads,
    prune_mlp,
    quantize_int4_weights,
    quantize_int8_weights,
    smoothquant,
)
from runtime.compress.quant import int4_dequantize, int4_groups, int8_per_channel, int8_row_product
from runtime.compress.smooth import input_absmax, smooth_block
from runtime.segment import Segment, SegmentInput


@pytest.fixture(scope="module")
def middle(tiny_checkpoint) -> Segment:
    """Layers [1, 5) of a tiny glm / glm4 model, never modified (tests compress deep copies)."""
    return Segment.from_checkpoint(tiny_checkpoint, 1, 5)


@pytest.fixture(scope="module")
def whole(tiny_glm) -> Segment:
    return Segment.from_checkpoint(tiny_glm, 0, 6, embed=True, head=True)


def hidden(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def run(segment: Segment, rows: torch.Tensor) -> torch.Tensor:
    item = (
        SegmentInput("t", 0, hidden=rows) if not segment.has_embed else SegmentInput("t", 0, input_ids=rows)
    )
    try:
        return segment([item])[0]
    finally:
        segment.close_session("t")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def token_ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ---- maths ----------------------------------------------------------------------------------------


def test_int8_per_channel_error_is_within_half_a_step():
    w = torch.randn(24, 40) * torch.logspace(-2, 1, 24)[:, None]  # rows of very different sizes
    q, scale = int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (24,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int4_kernel_matches_its_dequantised_weights():
    lin = nn.Linear(64, 32, bias=True)
    layer = Int4Linear(lin, 32)
    codes, scale, zero = int4_groups(lin.weight.detach(), 32)
    assert codes.min() >= 0 and codes.max() <= 15
    x = torch.randn(5, 64)
    expected = x @ int4_dequantize(codes, scale, zero, 32).t() + lin.bias.detach()
    torch.testing.assert_close(layer(x), expected, atol=0.02, rtol=0.02)
    assert rel_err(layer(x), lin(x).detach()) < 0.1


def test_int8_one_row_is_the_exact_product_of_its_stored_weights():
    """``Int8Linear.one_row`` (the compiled head's product) against float64 maths on the int8 codes and their
    scales, eagerly and through Inductor; the eager bf16 kernel is within its roundings of it."""
    lin = nn.Linear(96, 200, bias=True)
    layer = Int8Linear.from_linear(lin, "bf16")
    x = hidden(1, 96, seed=4) * 3
    want = x.double() @ (layer.weight.double() * layer.scale.double()[:, None]).t() + lin.bias.detach().double()
    torch.testing.assert_close(layer.one_row(x).double(), want, atol=1e-5, rtol=1e-6)
    compiled = torch.compile(int8_row_product, dynamic=False)
    got = compiled(x, layer.weight, layer.scale) + layer.bias
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    bf16_rounding = 2 * 2**-8 * (x.abs() @ layer.dequantized_weight().abs().t()) + 1e-6  # row, then result
    assert ((layer(x) - want.float()).abs() <= bf16_rounding).all()
    w8a8 = Int8Linear.from_linear(lin, "int8")
    assert torch.equal(w8a8.one_row(x), w8a8(x))  # W8A8 keeps its int8 activations


# ---- quantisation passes --------------------------------------------------------------------------


@pytest.mark.parametrize("activations", ["int8", "bf16"])
def test_int8_pass_is_close_and_stores_int8(middle, activations):
    seg = copy.deepcopy(middle)
    report = quantize_int8_weights(seg, layers=[1, 3], activations=activations)
    assert report["linears"] == 12 and report["layers"] == [1, 3]
    assert report["bytes_after"] < report["bytes_before"]
    for i in (1, 2):
        assert isinstance(seg.layers[str(i)].mlp.down_proj, Int8Linear)
        assert seg.layers[str(i)].self_attn.q_proj.weight.dtype == torch.int8
    assert type(seg.layers["3"].self_attn.q_proj) is nn.Linear  # outside the range: untouched
    x = hidden(9, seg.spec.hidden_size)
    assert rel_err(run(seg, x), run(middle, x)) < 0.03


def test_int8_head_and_layers_outside_the_segment(whole):
    seg = copy.deepcopy(whole)
    assert quantize_int8_weights(seg, layers=[10, 20])["linears"] == 0  # none of those layers here
    report = quantize_int8_weights(seg, include_head=True)
    assert report["linears"] == 6 * 6 + 1 and isinstance(seg.lm_head, Int8Linear)
    ids = token_ids(12, seg.spec.vocab_size)
    assert rel_err(run(seg, ids), run(whole, ids)) < 0.05
    with pytest.raises(CompressionError, match="lm_head"):
        quantize_int8_weights(copy.deepcopy(middle_of(whole)), include_head=True)


def middle_of(segment: Segment) -> nn.Module:
    return nn.ModuleDict({"layers": segment.layers})


def test_int4_pass_is_close_and_packed(middle):
    seg = copy.deepcopy(middle)
    report = quantize_int4_weights(seg, group_size=32)
    assert report["linears"] == 24 and not report["skipped"]
    assert report["bytes_after"] < report["bytes_before"] / 4
    assert isinstance(seg.layers["4"].self_attn.o_proj, Int4Linear)
    x = hidden(9, seg.spec.hidden_size)
    assert rel_err(run(seg, x), run(middle, x)) < 0.3  # random weights: ~8% per linear, over 4 layers


def test_smoothing_alone_leaves_the_function_unchanged(middle):
    """The folds (norms, v rows shared by a kv group, up rows) are exact before any quantisation."""
    seg = copy.deepcopy(middle)
    calib = hidden(16, seg.spec.hidden_size, seed=3)
    blocks = list(seg.layers.values())
    stats = input_absmax(seg, calib, blocks)
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    factors = [smooth_block(b, stats, alpha=0.8) for b in blocks]
    assert any(not torch.equal(before[k], v) for k, v in seg.state_dict().items())  # weights did move
    assert all(f["o"] != 1.0 for f in factors)
    x = hidden(7, seg.spec.hidden_size)
    torch.testing.assert_close(run(seg, x), run(middle, x), atol=1e-4, rtol=1e-4)


def test_smoothquant_is_w8a8_and_close(middle):
    seg = copy.deepcopy(middle)
    report = smoothquant(
        seg, [hidden(16, seg.spec.hidden_size, seed=s) for s in (3, 4)], alpha=0.5, layers=[2, 5]
    )
    assert report["linears"] == 18 and report["calibration_positions"] == 32
    assert all(isinstance(m, Int8Linear) and m.activations == "int8" for m in seg.layers["2"].mlp.children())
    assert type(seg.layers["1"].mlp.down_proj) is nn.Linear
    x = hidden(9, seg.spec.hidden_size)
    assert rel_err(run(seg, x), run(middle, x)) < 0.03


# ---- pruning and low rank -------------------------------------------------------------------------


def test_prune_heads_equals_zeroing_those_heads(middle):
    seg, ref = copy.deepcopy(middle), copy.deepcopy(middle)
    attn = seg.layers["2"].self_attn
    H, D, C = attn.num_heads, attn.head_dim, seg.spec.hidden_size
    q_before = attn.q_proj.weight.detach().view(H, D, C).clone()
    report = prune_heads(seg, 0.5, layers=[2, 3])
    assert report["heads_removed"] == {2: 2} and attn.num_heads == 2
    assert report["params_after"] < report["params_before"]
    kept = [
        h
        for h in range(H)
        if any(torch.equal(attn.q_proj.weight.view(2, D, C)[j], q_before[h]) for j in range(2))
    ]
    assert len(kept) == 2 and {h // 2 for h in kept} == {0, 1}  # one query head kept in each kv group
    with torch.no_grad():  # the reference: the same heads contribute nothing
        ref_o = ref.layers["2"].self_attn.o_proj.weight.view(C, H, D)
        ref_o[:, [h for h in range(H) if h not in kept]] = 0
    x = hidden(8, C)
    torch.testing.assert_close(run(seg, x), run(ref, x), atol=1e-5, rtol=1e-5)


def test_prune_mlp_equals_zeroing_those_channels(middle):
    seg, ref = copy.deepcopy(middle), copy.deepcopy(middle)
    inter = seg.spec.intermediate_size
    report = prune_mlp(seg, 0.25, layers=[1, 5])
    kept_count = inter - report["channels_removed"][1]
    assert kept_count % 8 == 0 and kept_count < inter and report["params_after"] < report["params_before"]
    for i in range(1, 5):
        down = seg.layers[str(i)].mlp.down_proj.weight
        ref_down = ref.layers[str(i)].mlp.down_proj.weight
        kept = [
            j for j in range(inter) if any(torch.equal(ref_down[:, j], down[:, k]) for k in range(kept_count))
        ]
        with torch.no_grad():
            ref_down[:, [j for j in range(inter) if j not in kept]] = 0
    x = hidden(8, seg.spec.hidden_size)
    torch.testing.assert_close(run(seg, x), run(ref, x), atol=1e-5, rtol=1e-5)


def test_calibrated_pruning_runs_and_differs_from_weight_norms(middle):
    a, b = copy.deepcopy(middle), copy.deepcopy(middle)
    calib = hidden(16, middle.spec.hidden_size, seed=5)
    prune_mlp(a, 0.5, calibration=calib)
    prune_mlp(b, 0.5)
    assert a.layers["1"].mlp.down_proj.in_features == b.layers["1"].mlp.down_proj.in_features
    assert not all(
        torch.equal(a.layers[i].mlp.down_proj.weight, b.layers[i].mlp.down_proj.weight) for i in a.layers
    )


def test_low_rank_is_the_truncated_svd(middle):
    seg = copy.deepcopy(middle)
    w = middle.layers["3"].mlp.down_proj.weight.detach().double()
    report = low_rank(seg, rank_fraction=0.25, names=["mlp.down_proj", "self_attn.q_proj"], layers=[3, 4])
    rank = report["ranks"]["3.mlp.down_proj"]
    assert rank == 16 and report["params_after"] < report["params_before"]
    factors = seg.layers["3"].mlp.down_proj
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    torch.testing.assert_close((factors[1].weight @ factors[0].weight).double(), best, atol=1e-5, rtol=1e-5)
    assert low_rank(copy.deepcopy(middle), energy=1.0)["ranks"] == {}  # full rank is never smaller


# ---- the runtime still works: cached decode equals one shot --------------------------------------

SPECS = [
    [{"pass": "int8"}],
    [{"pass": "int8", "activations": "bf16", "include_head": True}],
    [{"pass": "int4", "group_size": 32, "layers": [0, 3]}, {"pass": "int8", "layers": [3, 6]}],
    [{"pass": "smoothquant", "alpha": 0.5}],
    [{"pass": "prune_heads", "fraction": 0.5}, {"pass": "prune_mlp", "fraction": 0.3}, {"pass": "int8"}],
    [{"pass": "low_rank", "energy": 0.9, "names": ["mlp.down_proj", "mlp.gate_up_proj"]}, {"pass": "int8"}],
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "+".join(p["pass"] for p in s))
def test_cached_decode_equals_one_shot(whole, spec):
    seg = copy.deepcopy(whole)
    ids = token_ids(10, seg.spec.vocab_size)
    apply_compression(seg, spec, calibration=token_ids(24, seg.spec.vocab_size, seed=2))
    one_shot = run(seg, ids)  # (T, V)
    steps = [seg([SegmentInput("s", 0, input_ids=ids[:6])])[0]]
    steps += [seg([SegmentInput("s", p, input_ids=ids[p : p + 1])])[0] for p in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps), one_shot, atol=2e-3, rtol=2e-3)


# ---- descriptions and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"pass": "int8"}, "list of passes"),
        ([{"pass": "int3"}], "unknown pass 'int3'"),
        ([{"layers": [0, 2]}], "'pass' key"),
        ([{"pass": "int8", "bits": 8}], "unknown argument 'bits'"),
        ([{"pass": "prune_mlp"}], "missing required argument 'fraction'"),
        ([{"pass": "int8", "layers": [4, 2]}], "0 <= start <= end"),
        ([{"pass": "int8", "layers": [0, 2, 4]}], "two integers"),
        ([{"pass": "int8", "activations": "fp8"}], "activations must be one of"),
        ([{"pass": "int4", "group_size": 48}], "group_size must be one of"),
        ([{"pass": "prune_heads", "fraction": 1.0}], r"fraction must be a number in \[0, 1\)"),
        ([{"pass": "low_rank", "energy": 0.9, "rank_fraction": 0.5}], "exactly one of"),
        ([{"pass": "low_rank", "energy": 0.9, "names": ["mlp.nope"]}], "no module named 'mlp.nope'"),
        ([{"pass": "smoothquant"}], "needs calibration data"),
        ([{"pass": "prune_mlp", "fraction": 0.2, "calibrated": True}], "needs calibration data"),
        ([{"pass": "int8"}, {"pass": "prune_mlp", "fraction": 0.2}], "prune before quantising"),
    ],
)
def test_bad_descriptions_raise_clear_errors(middle, spec, message):
    with pytest.raises(CompressionError, match=message):
        apply_compression(copy.deepcopy(middle), spec)


def test_smoothquant_rejects_bad_alpha(middle):
    with pytest.raises(CompressionError, match="alpha"):
        smoothquant(copy.deepcopy(middle), hidden(4, middle.spec.hidden_size), alpha=1.5)


# ---- accuracy measurement -------------------------------------------------------------------------


def test_perplexity_matches_transformers(tiny_glm):
    ids = token_ids(40, 96, seed=7)
    with torch.no_grad():
        loss = load_hf_model(tiny_glm)(ids[None], labels=ids[None]).loss
    segments = [
        Segment.from_checkpoint(tiny_glm, 0, 2, embed=True),
        Segment.from_checkpoint(tiny_glm, 2, 6, head=True),
    ]
    assert perplexity(segments, ids, window=64) == pytest.approx(math.exp(float(loss)), rel=1e-4)
    compressed = copy.deepcopy(segments)
    prune_mlp(compressed[1], 0.5)
    result = compare(segments, compressed, ids, window=16)
    assert result["tokens"] == 37  # windows of 16, 16, 8 predict 15 + 15 + 7 tokens
    assert result["perplexity_delta_pct"] != 0 and 0 <= result["token_agreement"] < 1
    assert compare(segments, segments, ids, window=16)["token_agreement"] == 1.0
