"""FP8 weights (runtime.fp8): the quantiser everywhere; on a GPU the products, the engine against bf16, graphs
against eager and batch invariance. Without CUDA an FP8 engine is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from runtime import fp8
from runtime.sampling import SamplingParams
from runtime.segment import Segment, SegmentInput
from tests.runtime.driving import drive

ON_CUDA = torch.cuda.is_available()
FP8_CARD = ON_CUDA and fp8.support_error() is None
needs_fp8 = pytest.mark.skipif(not FP8_CARD, reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")


def test_quantised_rows_keep_their_scale_and_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different sizes
    w[5] = 0.0
    q = fp8.quantize(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.shape == (64,) and q.scale.dtype == torch.float32
    assert q.scale[5] == 1.0 and torch.all(q.data[5].float() == 0)
    back = q.dequantize()
    # every row's largest entry maps to 448 exactly; E4M3 has 3 mantissa bits: relative error <= 2^-4 for normals
    assert torch.allclose(q.data.float().abs().amax(1)[w.abs().amax(1) > 0], torch.tensor(448.0))
    normal = w.abs() >= q.scale[:, None] * 2.0**-6
    rel = ((back - w).abs() / w.abs().clamp(min=1e-30))[normal]
    assert rel.max() <= 2.0**-4 + 1e-6
    assert q.nbytes() == 64 * 300 + 64 * 4


def test_quantised_activations_have_one_scale_per_row():
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 8)[:, None]
    xq, scale = fp8.quantize_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (7, 1)
    torch.testing.assert_close(xq.float() * scale, x, atol=0, rtol=2.0**-4)


@pytest.mark.skipif(ON_CUDA, reason="checks the error of a machine without CUDA")
def test_an_fp8_engine_without_a_gpu_is_refused_clearly(tiny_glm):
    ops = pytest.importorskip("runtime.triton_ops")
    assert fp8.support_error() is not None and "CUDA is not available" in fp8.support_error()
    if not ops.AVAILABLE:
        pytest.skip("triton is not installed: the engine is refused before FP8 is looked at")
    from runtime.checkpoint import load_spec
    from runtime.cuda import CudaEngine

    with pytest.raises(RuntimeError, match="fp8 weights need an NVIDIA GPU"):
        segment = Segment.from_checkpoint(tiny_glm, 0, load_spec(tiny_glm).num_layers, head=True)
        CudaEngine(segment, dtype=torch.bfloat16, fp8_linears=True, device="cpu")


# --- on a GPU ---


@needs_fp8
@pytest.mark.parametrize("m, n, k, bias", [(1, 64, 256, False), (5, 80, 200, True), (33, 96, 1024, True),
                                           (2, 8200, 128, False), (1, 4096, 13696, False)])
def test_fp8_skinny_linear_equals_the_dequantised_product(m, n, k, bias):
    from runtime import triton_ops as ops

    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    q = fp8.quantize(torch.randn(n, k, device="cuda", generator=g) * k**-0.5)
    b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
    got = ops.skinny_linear(x, q.data, b, scale=q.scale)
    want = x.double() @ q.dequantize(torch.float64).T + (b.double() if bias else 0.0)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=1e-2)  # bf16 output rounding only


@needs_fp8
@pytest.mark.parametrize("n, k", [(64, 384), (4608, 4096)])
def test_fp8_skinny_linear_is_batch_invariant(n, k):
    from runtime import triton_ops as ops

    g = torch.Generator(device="cuda").manual_seed(3)
    q = fp8.quantize(torch.randn(n, k, device="cuda", generator=g) * k**-0.5)
    big = torch.randn(33, k, device="cuda", generator=g).bfloat16()
    full = ops.skinny_linear(big, q.data, scale=q.scale)
    for i in (0, 17, 32):
        assert torch.equal(ops.skinny_linear(big[i : i + 1], q.data, scale=q.scale)[0], full[i])


@needs_fp8
def test_fp8_chunk_product_is_close_to_the_bf16_product():
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(128, 1024, device="cuda", generator=g).bfloat16()
    w = torch.randn(512, 1024, device="cuda", generator=g) * 1024**-0.5
    q = fp8.quantize(w)
    got = fp8.chunk_linear(x, q).float()
    want = x.float() @ w.T
    err = (got - want).norm() / want.norm()
    assert err < 0.06, f"relative error {err:.4f}: FP8 x FP8 should be within a few percent"


def _demo_engines(demo_checkpoint, graphs: bool = True):
    from runtime.checkpoint import load_spec
    from runtime.cuda import CudaEngine

    L = load_spec(demo_checkpoint).num_layers

    def make(fp8_linears: bool, graphs: bool, mixed: bool = True):
        return CudaEngine(Segment.from_checkpoint(demo_checkpoint, 0, L, embed=True, head=True), dtype=torch.bfloat16,
                          fp8_linears=fp8_linears, graphs=graphs, pool_tokens=1 << 14, prefill_chunk=64,
                          mixed_passes=mixed)

    return make


@needs_fp8
@pytest.mark.slow
def test_fp8_engine_agrees_with_the_bf16_engine_on_the_demo_model(demo_checkpoint, gpl3_text):
    """Teacher-forced on GPL-3 (the FP8 scales are tuned on no text): greedy agreement and the logits' error of
    the FP8 engine against the bf16 engine, through the chunk passes and through 16-row short passes."""
    from runtime.checkpoint import load_tokenizer

    make = _demo_engines(demo_checkpoint)
    bf16, f8 = make(False, True), make(True, True)
    assert f8.nbytes() < 0.75 * bf16.nbytes()
    ids = load_tokenizer(demo_checkpoint)(gpl3_text[:12000], return_tensors="pt").input_ids[0][:1024]
    for rows in (512, 16):  # chunk passes (FP8 x FP8), short passes (FP8 weights, bf16 activations)
        got = {}
        for name, engine in (("bf16", bf16), ("fp8", f8)):
            parts = [engine([SegmentInput(f"{name}{rows}", a, input_ids=ids[a : a + rows])])[0].float()
                     for a in range(0, len(ids), rows)]
            got[name] = torch.cat(parts)
        agreement = (got["fp8"].argmax(-1) == got["bf16"].argmax(-1)).float().mean().item()
        rel = ((got["fp8"] - got["bf16"]).abs().mean() / got["bf16"].std()).item()
        print(f"rows={rows}: greedy agreement {agreement:.4f}, mean |logit error| / std {rel:.4f}")
        assert agreement >= 0.85, f"rows={rows}: FP8 agrees with bf16 on only {agreement:.1%} of positions"
        assert rel < 0.15, f"rows={rows}: logits' mean error is {rel:.3f} of their spread"


@needs_fp8
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fp8_graphs_equal_eager_and_sessions_equal_themselves_alone(demo_checkpoint, gpl3_text, temperature):
    from runtime.checkpoint import load_tokenizer

    make = _demo_engines(demo_checkpoint)
    graphed, eager = make(True, True), make(True, False)
    ids = load_tokenizer(demo_checkpoint)(gpl3_text[:20000], return_tensors="pt").input_ids[0]
    prompts = {f"p{i}": ids[300 * i : 300 * i + n] for i, n in enumerate((12, 40, 7, 90, 150))}
    params = SamplingParams(temperature=temperature, seed=5)

    next_id = lambda token: torch.tensor([token])  # noqa: E731

    batch_g, batch_e = drive(graphed, prompts, 32, params, next_id), drive(eager, prompts, 32, params, next_id)
    assert batch_g == batch_e and graphed.stats["mixed_passes"] > 0  # (p1's chunk beside p0's and p2's prompts)
    separate = make(True, True, mixed=False)  # batch invariance: a mixed pass's rows are cuBLAS's, not bit-equal
    batch_s = drive(separate, prompts, 32, params, next_id)
    for sid in ("p1", "p4"):
        assert drive(separate, {sid: prompts[sid]}, 32, params, next_id)[sid] == batch_s[sid]
    assert graphed.stats["graph_replays"] > 0 and eager.stats["graph_replays"] == 0


@needs_fp8
@pytest.mark.parametrize("m, k", [(1, 64), (7, 1000), (128, 13696)])
def test_the_row_quantising_kernel_equals_the_torch_one(m, k):
    from runtime import triton_ops as ops

    x = (torch.randn(m, k, device="cuda") * torch.logspace(-2, 3, m, device="cuda")[:, None]).bfloat16()
    q, s = ops.quantize_rows(x)
    want_q, want_s = fp8.quantize_rows(x)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    step = torch.clamp(want_q.float().abs() * 2.0**-3, min=2.0**-9)  # one E4M3 step (2^-9 among the subnormals)
    assert (q.float() - want_q.float()).abs().le(step).all()
