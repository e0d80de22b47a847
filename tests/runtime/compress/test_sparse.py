"""sparse_mlp: equal to zeroing the small MLP inputs, calibrated to its target, validated, cache-correct."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from runtime.compress import CompressionError, SparseMLP, apply_compression, calibrate_sparse_mlp, validate
from runtime.compress import sparse as sparse_module
from runtime.compress.sparse import sparse_product, sparsity_tally
from runtime.segment import Segment, SegmentInput


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():  # as a segment runs its layers
        yield


@pytest.fixture(scope="module")
def whole(tiny_checkpoint) -> Segment:
    """A whole tiny glm / glm4 model, never modified (tests sparsify deep copies)."""
    return Segment.from_checkpoint(tiny_checkpoint, 0, 6, embed=True, head=True)


def token_ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def run(segment: Segment, ids: torch.Tensor) -> torch.Tensor:
    try:
        return segment([SegmentInput("t", 0, input_ids=ids)])[0]
    finally:
        segment.close_session("t")


def zeroed(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x.abs() < threshold, torch.zeros_like(x), x)


def reference_mlp(mlp, x: torch.Tensor, thresholds) -> torch.Tensor:
    """Zero the inputs below the thresholds, then the dense MLP with its nn.Linear weights: (N, C) -> (N, C)."""
    gate, up = F.linear(zeroed(x, thresholds[0]), mlp.gate_up_proj.weight).chunk(2, dim=-1)
    return F.linear(zeroed(F.silu(gate) * up, thresholds[1]), mlp.down_proj.weight)


def mlp_inputs(segment: Segment, ids: torch.Tensor) -> dict[int, tuple]:
    """{layer: (its dense MLP, the rows entering it, the rows entering its down_proj)} over ``ids``."""
    seen = {}
    handles = [
        hook
        for i, block in segment.layers.items()
        for hook in (
            block.mlp.register_forward_pre_hook(lambda _m, a, i=int(i): seen.__setitem__((i, 0), a[0].clone())),
            block.mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=int(i): seen.__setitem__((i, 1), a[0])),
        )
    ]
    run(segment, ids)
    for h in handles:
        h.remove()
    return {int(i): (b.mlp, seen[int(i), 0], seen[int(i), 1]) for i, b in segment.layers.items()}


# ---- the kernel -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("gather", [True, False])
def test_sparse_product_equals_zeroing_the_small_inputs(rows, gather):
    g = torch.Generator().manual_seed(rows)
    x, w_t = torch.randn(rows, 48, generator=g), torch.randn(48, 20, generator=g)
    x[0] *= 0.01  # a row with no input kept: its bag is empty
    out = sparse_product(x, w_t, 0.8, gather=gather)
    expected = zeroed(x, 0.8) @ w_t
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out[0] == 0).all()
    assert (expected - x @ w_t).abs().max() > 0.1  # the zeroing matters


def test_few_rows_gather_and_many_rows_do_not(monkeypatch):
    calls = []
    monkeypatch.setattr(sparse_module, "gather_product", lambda *a: calls.append(a[0].shape[0]) or a[0] @ a[1])
    w_t = torch.randn(64, 8)
    sparse_product(torch.randn(1, 64), w_t, 1.0)  # ~1/3 of 64 inputs kept
    sparse_product(torch.randn(32, 64), w_t, 1.0)
    assert calls == [1]


# ---- the pass ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 24])  # the gather kernel, then the dense product of the zeroed rows
def test_sparse_mlp_equals_zeroing_then_the_dense_mlp(whole, rows):
    ids = token_ids(24, whole.spec.vocab_size)
    spec = calibrate_sparse_mlp(whole, token_ids(64, whole.spec.vocab_size, seed=2), 0.5)
    for i, (mlp, x, _) in mlp_inputs(whole, ids).items():
        thresholds = spec["thresholds"][str(i)]
        sparse, x = SparseMLP(mlp, thresholds), x[:rows]
        expected = reference_mlp(mlp, x, thresholds)
        torch.testing.assert_close(sparse(x), expected, atol=1e-5, rtol=1e-4)
        assert (expected - mlp(x)).abs().max() > 1e-3  # something was zeroed


def test_pass_replaces_only_the_chosen_layers_with_thresholds(whole):
    spec = calibrate_sparse_mlp(whole, token_ids(32, whole.spec.vocab_size), 0.3, layers=[1, 4])
    assert sorted(spec["thresholds"]) == ["1", "2", "3"]
    seg = copy.deepcopy(whole)
    (report,) = apply_compression(seg, [{**spec, "layers": [2, 6]}])
    assert report["layers"] == [2, 4] and report["sparse_layers"] == 2
    assert [isinstance(b.mlp, SparseMLP) for b in seg.layers.values()] == [False, False, True, True, False, False]


@pytest.mark.parametrize("sparsity, allocation", [(0.4, "uniform"), ((0.0, 0.6), "uniform"), (0.4, "equal_error")])
def test_calibration_reaches_the_target_on_the_calibration_data(whole, sparsity, allocation):
    calibration = token_ids(96, whole.spec.vocab_size, seed=3)
    spec = calibrate_sparse_mlp(whole, calibration, sparsity, allocation=allocation)
    json.dumps(spec)  # the description is data
    targets = sparsity if isinstance(sparsity, tuple) else (sparsity, sparsity)
    inputs = mlp_inputs(whole, calibration)
    for site, target in enumerate(targets):
        shares = [float((inputs[i][site + 1].abs() < spec["thresholds"][str(i)][site]).float().mean()) for i in inputs]
        assert abs(sum(shares) / len(shares) - target) < 0.01, (site, shares)
        if allocation == "uniform":
            assert max(abs(s - target) for s in shares) < 0.01, (site, shares)
    if allocation == "equal_error":
        uniform = calibrate_sparse_mlp(whole, calibration, sparsity)
        assert spec["thresholds"] != uniform["thresholds"]


def test_a_sparse_model_serves_a_cached_session(whole):
    seg, ids = copy.deepcopy(whole), token_ids(12, whole.spec.vocab_size)
    apply_compression(seg, [calibrate_sparse_mlp(whole, token_ids(64, whole.spec.vocab_size, seed=2), 0.5)])
    one_shot = run(seg, ids)  # (T, V), the many-row path
    steps = [seg([SegmentInput("s", 0, input_ids=ids[:6])])[0]]
    steps += [seg([SegmentInput("s", p, input_ids=ids[p : p + 1])])[0] for p in range(6, 12)]  # the gather kernel
    seg.close_session("s")
    torch.testing.assert_close(torch.cat(steps), one_shot, atol=1e-4, rtol=1e-4)
    assert (one_shot - run(whole, ids)).abs().max() > 1e-3


def test_tally_counts_what_was_zeroed(whole):
    seg = copy.deepcopy(whole)
    apply_compression(seg, [calibrate_sparse_mlp(whole, token_ids(64, whole.spec.vocab_size, seed=2), (0.0, 0.5))])
    with sparsity_tally(seg) as shares:
        run(seg, token_ids(64, whole.spec.vocab_size, seed=2))
    assert sorted(shares) == list(range(6))
    assert all(s["gate_up"] == 0 and 0.4 < s["down"] < 0.6 for s in shares.values()), shares


# ---- descriptions and errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"pass": "sparse_mlp"}, "missing required argument 'thresholds'"),
        ({"pass": "sparse_mlp", "thresholds": {}, "sparsity": 0.4}, "unknown argument 'sparsity'"),
        ({"pass": "sparse_mlp", "thresholds": [[0.1, 0.2]]}, "must map a layer index"),
        ({"pass": "sparse_mlp", "thresholds": {"a": [0.1, 0.2]}}, "layer key 'a'"),
        ({"pass": "sparse_mlp", "thresholds": {"3": [0.1]}}, r"layer 3: expected \[t_gate_up, t_down\]"),
        ({"pass": "sparse_mlp", "thresholds": {"3": [0.1, -1]}}, "finite numbers >= 0"),
        ({"pass": "sparse_mlp", "thresholds": {"3": [float("nan"), 0.1]}}, "finite numbers >= 0"),
        ({"pass": "sparse_mlp", "thresholds": {"3": [0.1, "0.2"]}}, "finite numbers >= 0"),
        ({"pass": "sparse_mlp", "thresholds": {"3": [0.1, 0.2]}, "layers": [3, 1]}, "0 <= start <= end"),
    ],
)
def test_bad_descriptions_are_refused(entry, message):
    with pytest.raises(CompressionError, match=message):
        validate([entry])


def test_bad_calibration_arguments_are_refused(whole):
    ids = token_ids(8, whole.spec.vocab_size)
    with pytest.raises(CompressionError, match=r"sparsity of the down input must be a number in \[0, 1\)"):
        calibrate_sparse_mlp(whole, ids, (0.2, 1.0))
    with pytest.raises(CompressionError, match="allocation must be one of"):
        calibrate_sparse_mlp(whole, ids, 0.2, allocation="greedy")


def test_a_good_description_validates_and_sparsifies_before_quantising_only(whole):
    spec = calibrate_sparse_mlp(whole, token_ids(32, whole.spec.vocab_size), 0.3)
    assert validate([spec]) == [spec]
    seg = copy.deepcopy(whole)
    apply_compression(seg, [{"pass": "int8"}])
    with pytest.raises(CompressionError, match="sparsify before quantising"):
        apply_compression(seg, [spec])


# ---- the benchmark -------------------------------------------------------------------------------


def test_bench_sweep_on_the_tiny_model(tiny_glm):
    from splitglm.bench.sparse import bench_sparse, format_report, parse_sparsities, sweep

    assert parse_sparsities("0.4, 0:0.6") == [0.4, [0.0, 0.6]]
    dense = Segment.from_checkpoint(tiny_glm, 0, 6, embed=True, head=True)
    torch.set_num_threads(1)
    rows = sweep(dense, token_ids(64, 96, seed=2), token_ids(64, 96, seed=4), [0.0, 0.5], repeats=1)
    assert rows[0]["perplexity_delta_pct"] == 0 and rows[0]["token_agreement"] == 1
    assert rows[1]["perplexity_delta_pct"] != 0 and 0.3 < rows[1]["reached"]["down"] < 0.7
    assert all(r[k]["dense_ms"] > 0 and r[k]["sparse_ms"] > 0 for r in rows for k in ("mlp", "step", "layers_0_6_step"))
    report = {"model": "tiny", "threads": 1, "calibration_text": "a", "text": "b", "calibration_tokens": 64,
              "judged_tokens": 64, "allocation": "uniform", "rows": rows}
    assert len(format_report(report)) == 3 + len(rows)
    with pytest.raises(ValueError, match="must not be the calibration text"):
        bench_sparse(
            tiny_glm, "/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/../common-licenses/GPL-3"
        )
