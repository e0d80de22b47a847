"""Triton kernels against plain-PyTorch float64 references, on CUDA or (CPU tensors) under Triton's interpreter."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from runtime import triton_ops as ops  # noqa: E402

if not ON_CUDA and type(ops._rms_norm_kernel).__name__ != "InterpretedFunction":
    ops = importlib.reload(ops)  # imported before TRITON_INTERPRET was set: define the kernels again, interpreted

DEVICE = "cuda" if ON_CUDA else "cpu"
# the interpreter's tl.dot gives garbage on bf16, so bf16 runs on the GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative; absolute alike
EPS = 1e-5


def _randn(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Fresh random values (never zeros) on the test device."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)


def _nan(*shape, dtype) -> torch.Tensor:
    """A poisoned output buffer: any element the kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the dtype's tolerance, and fully written."""
    assert not actual.isnan().any(), "unwritten (NaN) elements"
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol)


# --- references ---


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), the normalised value rounded to dtype; float64 math."""
    x = x.double()
    y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype).double()
    return weight.double() * y


def ref_add_rms_norm(h, residual, weight, post_weight, dtype):
    """(out, residual + [post-normed] h) with the dtype roundings of a plain PyTorch implementation."""
    if post_weight is not None:
        h = ref_rms_norm(h, post_weight, dtype).to(dtype)
    r = (residual.double() + h.double()).to(dtype)
    return ref_rms_norm(r, weight, dtype), r


def ref_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM interleaved partial rotary of (N, heads, D) with (N, R/2) cos/sin; float64."""
    rot = cos.shape[-1] * 2
    x = x.double().clone()
    x0, x1 = x[..., 0:rot:2].clone(), x[..., 1:rot:2].clone()
    c, s = cos.double()[:, None], sin.double()[:, None]
    x[..., 0:rot:2] = x0 * c - x1 * s
    x[..., 1:rot:2] = x1 * c + x0 * s
    return x


def ref_paged_attention(q, k_cache, v_cache, tables, ctx_lens, q_starts, q_lens, scale) -> torch.Tensor:
    """Causal GQA attention of each session's rows over its keys gathered from the pages; float64."""
    n, h, d = q.shape
    page_size, kh = k_cache.shape[1], k_cache.shape[2]
    out = torch.full((n, h, d), float("nan"), dtype=torch.float64)
    for b in range(tables.shape[0]):
        ctx, ql, qs = int(ctx_lens[b]), int(q_lens[b]), int(q_starts[b])
        if ql == 0:
            continue
        keys = torch.arange(ctx)
        pages = tables[b].cpu().long()[keys // page_size]
        k = k_cache.cpu()[pages, keys % page_size].double().repeat_interleave(h // kh, dim=1)  # (ctx, H, D)
        v = v_cache.cpu()[pages, keys % page_size].double().repeat_interleave(h // kh, dim=1)  # (ctx, H, D)
        s = torch.einsum("thd,chd->htc", q[qs : qs + ql].double().cpu(), k) * scale  # (H, ql, ctx)
        q_pos = ctx - ql + torch.arange(ql)
        s = s.masked_fill(keys[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[qs : qs + ql] = torch.einsum("htc,chd->thd", s.softmax(-1), v)
    return out


# --- rms_norm, add_rms_norm, silu_mul ---


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [48, 256, 8192])
def test_rms_norm_matches_reference(dtype, c):
    """Rows of a strided (N, C) input, C a power of two or not, into a poisoned out=."""
    x = _randn(5, c + 16, dtype=dtype, scale=3.0)[:, :c]  # row stride != C
    weight = _randn(c, dtype=dtype)
    out = ops.rms_norm(x, weight, EPS, out=_nan(5, c, dtype=dtype))
    _close(out, ref_rms_norm(x, weight, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sandwich", [False, True])
@pytest.mark.parametrize("alias", [False, True])
def test_add_rms_norm_matches_reference(dtype, sandwich, alias):
    """out and residual_out, with and without the post norm, residual_out aliasing residual or not."""
    n, c = 4, 96
    h, residual = _randn(n, c, dtype=dtype), _randn(n, c, dtype=dtype, scale=2.0)
    weight = _randn(c, dtype=dtype)
    post_weight = _randn(c, dtype=dtype) if sandwich else None
    want_out, want_res = ref_add_rms_norm(h, residual, weight, post_weight, dtype)
    res_in = residual.clone()
    res_out = res_in if alias else _nan(n, c, dtype=dtype)
    out, got_res = ops.add_rms_norm(
        h, res_in, weight, EPS, post_weight=post_weight, out=_nan(n, c, dtype=dtype), residual_out=res_out
    )
    assert got_res.data_ptr() == res_out.data_ptr()
    _close(got_res, want_res, dtype)
    _close(out, want_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [40, 1500])
def test_silu_mul_matches_reference(dtype, width):
    """silu(first half) * second half, over one and several column blocks."""
    gate_up = _randn(3, 2 * width, dtype=dtype, scale=2.0)
    out = ops.silu_mul(gate_up, out=_nan(3, width, dtype=dtype))
    gate, up = gate_up.double().chunk(2, dim=-1)
    _close(out, torch.nn.functional.silu(gate) * up, dtype)


# --- rotary_kv_write ---


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, rotary_dim", [(16, 8), (64, 64), (128, 64)])
def test_rotary_kv_write_matches_reference(dtype, head_dim, rotary_dim):
    """q rotated into q_out, k rotated and v verbatim into their slots; padding rows and other slots untouched."""
    h, kh, n, page_size, num_pages = 6, 2, 5, 16, 3
    qkv = _randn(n, (h + 2 * kh) * head_dim, dtype=dtype)
    angles = torch.arange(64, dtype=torch.float64)[:, None] * torch.rand(rotary_dim // 2, dtype=torch.float64)
    cos, sin = angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)  # (P_max, R/2)
    index = torch.int32 if head_dim == 16 else torch.int64  # either index dtype
    positions = torch.tensor([3, 17, 0, 63, 40], dtype=index, device=DEVICE)
    slots = torch.tensor([5, -1, 47, 16, -1], dtype=index, device=DEVICE)
    k_cache = _nan(num_pages, page_size, kh, head_dim, dtype=dtype)
    v_cache = _nan(num_pages, page_size, kh, head_dim, dtype=dtype)

    q_out = ops.rotary_kv_write(
        qkv, cos, sin, positions, slots, k_cache, v_cache, h, kh, head_dim, rotary_dim,
        q_out=_nan(n, h, head_dim, dtype=dtype),
    )  # fmt: skip

    heads = qkv.view(n, h + 2 * kh, head_dim)
    pos = positions.cpu()
    _close(q_out, ref_rotary(heads[:, :h].cpu(), cos.cpu()[pos], sin.cpu()[pos]), dtype)
    assert torch.equal(q_out[..., rotary_dim:], heads[:, :h, rotary_dim:]), "pass-through dims must be verbatim"
    real = slots >= 0
    k_want = ref_rotary(heads[:, h : h + kh].cpu(), cos.cpu()[pos], sin.cpu()[pos])
    k_flat, v_flat = k_cache.view(-1, kh, head_dim), v_cache.view(-1, kh, head_dim)
    written = slots[real].long()
    _close(k_flat[written], k_want[real.cpu()], dtype)
    assert torch.equal(v_flat[written], heads[real, h + kh :]), "v must be copied verbatim"
    others = torch.ones(k_flat.shape[0], dtype=torch.bool, device=DEVICE)
    others[written] = False
    assert k_flat[others].isnan().all() and v_flat[others].isnan().all(), "only the real rows' slots are written"


# --- paged_attention ---


def _paged_setup(ctx_lens, q_lens, kh, g, d, page_size, dtype, max_pages=None):
    """Random q and a shuffled page pool holding every session's keys (the new rows' keys included)."""
    pages_per = [math.ceil(c / page_size) for c in ctx_lens]
    max_pages = max_pages or max(pages_per)
    num_pages = sum(pages_per) + 2  # spare pages stay NaN
    k_cache = _nan(num_pages, page_size, kh, d, dtype=dtype)
    v_cache = _nan(num_pages, page_size, kh, d, dtype=dtype)
    perm = torch.randperm(num_pages).tolist()
    tables = torch.zeros(len(ctx_lens), max_pages, dtype=torch.int32)
    for b, (ctx, p) in enumerate(zip(ctx_lens, pages_per)):
        tables[b, :p] = torch.tensor(perm[:p], dtype=torch.int32)
        perm = perm[p:]
        pos = torch.arange(ctx)
        pages = tables[b].long()[pos // page_size].to(DEVICE)
        k_cache[pages, pos % page_size] = _randn(ctx, kh, d, dtype=dtype)
        v_cache[pages, pos % page_size] = _randn(ctx, kh, d, dtype=dtype)
    q_lens_t = torch.tensor(q_lens, dtype=torch.int32)
    q_starts = torch.cumsum(q_lens_t, 0, dtype=torch.int32) - q_lens_t
    q = _randn(int(q_lens_t.sum()), kh * g, d, dtype=dtype)
    meta = [t.to(DEVICE) for t in (tables, torch.tensor(ctx_lens, dtype=torch.int32), q_starts, q_lens_t)]
    return q, k_cache, v_cache, *meta


def _attend(q, k_cache, v_cache, tables, ctx_lens, q_starts, q_lens, max_q_len):
    """paged_attention into a poisoned out=, scale 1/sqrt(D)."""
    out = _nan(*q.shape, dtype=q.dtype)
    scale = q.shape[-1] ** -0.5
    return ops.paged_attention(q, k_cache, v_cache, tables, ctx_lens, q_starts, q_lens, scale, max_q_len, out=out)


@pytest.mark.parametrize(
    "dtype, d, page_size, kh, g",
    [(torch.float32, 16, ps, 2, 2) for ps in (16, 32, 64, 128)]
    + [(dt, d, 16, 2, 3) for dt in DTYPES for d in (64, 128)]
    + [(torch.float16, 16, 32, 1, 16)],
)
def test_paged_attention_matches_reference(dtype, d, page_size, kh, g):
    """Sessions of mixed query and context lengths (one with no rows), pages shuffled, GQA groups of g heads."""
    ctx_lens, q_lens = [70, 9, 130, 23], [3, 0, 1, 23]  # the last one is a whole prefill
    q, k_cache, v_cache, *meta = _paged_setup(ctx_lens, q_lens, kh, g, d, page_size, dtype)
    out = _attend(q, k_cache, v_cache, *meta, max_q_len=max(q_lens))
    _close(out, ref_paged_attention(q, k_cache, v_cache, *meta, d**-0.5), dtype)


@pytest.mark.parametrize("block_m", [64, 128])
def test_taller_attention_tiles_match_the_reference(block_m):
    """Chunk passes' taller tiles (SPLITGLM_ATTN_CHUNK_ROWS): rows of several query positions in one program,
    a chunk's partial tile at the end, sessions whose rows start and end inside a tile."""
    ctx_lens, q_lens = [150, 40, 97], [61, 40, 1]
    dtype = torch.bfloat16 if ON_CUDA else torch.float16
    q, k_cache, v_cache, *meta = _paged_setup(ctx_lens, q_lens, 2, 4, 64, 16, dtype)
    out = _nan(*q.shape, dtype=q.dtype)
    ops.paged_attention(q, k_cache, v_cache, *meta, 64**-0.5, max(q_lens), out=out, block_m=block_m)
    _close(out, ref_paged_attention(q, k_cache, v_cache, *meta, 64**-0.5), dtype)


@pytest.fixture
def rowwise_dot(monkeypatch):
    """Under the interpreter, tl.dot row by row, so a row's result does not depend on where it sits in the tile."""
    # numpy's OpenBLAS sgemm rounds some rows of a 16-row tile differently from others (its micro-kernel edges),
    # while a GPU dot (FMA loop or tensor-core MMA) gives every output element the same arithmetic; the tests
    # that move a row within its tile (alone vs. batched, verify vs. decode) need the GPU's property.
    if ON_CUDA:
        return
    from triton.runtime import interpreter

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        rows = [np.matmul(row, b.data, dtype=d.data.dtype) for row in a.data]  # (BM,) x (K,) @ (K, BN)
        return interpreter.TensorHandle(np.stack(rows) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", dot)


def test_paged_attention_alone_equals_batched():
    """fp32: each session's rows are bit-identical computed alone or in a batch with the others."""
    ctx_lens, q_lens = [75, 40, 131], [5, 2, 1]
    q, k_cache, v_cache, tables, ctx_t, starts, lens = _paged_setup(ctx_lens, q_lens, 2, 3, 16, 16, torch.float32)
    batched = _attend(q, k_cache, v_cache, tables, ctx_t, starts, lens, max_q_len=5)
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for b in range(3):
        rows = slice(int(starts[b]), int(starts[b] + lens[b]))
        only = [t[b : b + 1] for t in (tables, ctx_t)]
        alone = _attend(q[rows], k_cache, v_cache, *only, zero, lens[b : b + 1], max_q_len=q_lens[b])
        assert torch.equal(alone, batched[rows]), f"session {b} alone differs from batched"


def test_paged_attention_verify_equals_decode_steps(rowwise_dot):
    """fp32: 5 rows in one step are bit-identical to 5 one-row steps, each seeing only the keys written so far."""
    prefix, new = 70, 5
    q, k_cache, v_cache, tables, *_ = _paged_setup([prefix + new], [new], 2, 3, 16, 16, torch.float32)
    meta = [torch.tensor([x], dtype=torch.int32, device=DEVICE) for x in (prefix + new, 0, new)]
    verify = _attend(q, k_cache, v_cache, tables, *meta, max_q_len=new)
    page_size, one, zero = k_cache.shape[1], meta[2] // new, meta[1]
    for t in range(new):
        ctx = prefix + t + 1
        k_step, v_step = k_cache.clone(), v_cache.clone()
        later = torch.arange(ctx, prefix + new)  # keys of later rows: not written yet at this step
        pages = tables[0].cpu().long()[later // page_size].to(DEVICE)
        k_step[pages, later % page_size] = float("nan")
        v_step[pages, later % page_size] = float("nan")
        ctx_t = torch.tensor([ctx], dtype=torch.int32, device=DEVICE)
        step = _attend(q[t : t + 1], k_step, v_step, tables, ctx_t, zero, one, max_q_len=1)
        assert torch.equal(step[0], verify[t]), f"row {t} decoded alone differs from the {new}-row step"


# --- skinny_linear ---


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m, n, k, bias",
    [(1, 64, 256, False), (5, 80, 200, True), (33, 96, 512, True), (2, 8200, 128, False), (3, 40, 1100, True)],
)
def test_skinny_linear_matches_reference(dtype, m, n, k, bias):
    """x @ w.T + b: N not a multiple of BLOCK_N, K not one of BLOCK_K, M over several tiles, a wide-N config."""
    x, w = _randn(m, k, dtype=dtype), _randn(n, k, dtype=dtype, scale=k**-0.5)
    b = _randn(n, dtype=dtype) if bias else None
    out = ops.skinny_linear(x, w, b, out=_nan(m, n, dtype=dtype))
    want = x.double() @ w.double().T + (b.double() if bias else 0.0)
    _close(out, want, dtype)


@pytest.mark.parametrize("n, k", [(64, 384), (48, 2048)])  # one split; K cut in 4 (summed in a second kernel)
def test_skinny_linear_is_batch_invariant(rowwise_dot, n, k):
    """fp32: row i is bit-identical computed alone, in a batch of 7 and in a batch of 33 (other rows random)."""
    w, b = _randn(n, k, scale=k**-0.5), _randn(n)
    big = _randn(33, k)
    full = ops.skinny_linear(big, w, b)
    for i in (0, 6, 17, 32):
        alone = ops.skinny_linear(big[i : i + 1], w, b)
        seven = torch.cat([_randn(3, k), big[i : i + 1], _randn(3, k)])
        assert torch.equal(alone[0], full[i]), f"row {i} alone differs from the 33-row batch"
        assert torch.equal(ops.skinny_linear(seven, w, b)[3], full[i]), f"row {i} in a 7-row batch differs"
    _close(full, big.double() @ w.double().T + b.double(), torch.float32)


def test_skinny_config_fills_the_gpu_and_divides_k():
    """The tuned shapes get no K mask and at least one program per H200 SM (132) at M = 1."""
    for n, k in ops.SKINNY_SHAPES:
        block_n, block_k, num_warps, num_stages, split = ops.skinny_config(n, k)
        assert k % block_k == 0 and block_n % 16 == 0 and block_k % 16 == 0
        assert triton.cdiv(n, block_n) * split >= 256 and num_warps in (4, 8) and num_stages >= 3
        assert k // block_k >= split  # every split has K tiles


# --- the module without triton; CUDA graphs ---


def test_module_imports_without_triton(monkeypatch):
    """With triton missing the module still imports, AVAILABLE is False and the wrappers fail clearly."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_ops_without_triton", ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.AVAILABLE is False
    assert module.skinny_config(4096, 4096) == ops.skinny_config(4096, 4096)
    with pytest.raises(RuntimeError, match="triton"):
        module.rms_norm(torch.ones(2, 4), torch.ones(4), EPS)


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_wrappers_replay_in_a_cuda_graph():
    """Captured once with out= buffers, a graph of the kernels recomputes correctly on new inputs."""
    dtype, m, c, kh, g, d = torch.bfloat16, 4, 256, 2, 4, 64
    x, w, lin = _randn(m, c, dtype=dtype), _randn(c, dtype=dtype), _randn(3 * c, c, dtype=dtype, scale=c**-0.5)
    q, k_cache, v_cache, *meta = _paged_setup([50, 17, 90, 33], [1, 1, 1, 1], kh, g, d, 16, dtype)
    normed, proj, att = torch.empty_like(x), torch.empty(m, 3 * c, dtype=dtype, device=DEVICE), torch.empty_like(q)

    def step():
        ops.rms_norm(x, w, EPS, out=normed)
        ops.skinny_linear(normed, lin, out=proj)
        ops.paged_attention(q, k_cache, v_cache, *meta, d**-0.5, 1, out=att)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(_randn(m, c, dtype=dtype))
    q.copy_(_randn(*q.shape, dtype=dtype))
    graph.replay()
    torch.cuda.synchronize()
    _close(normed, ref_rms_norm(x, w, dtype), dtype)
    _close(proj, normed.double() @ lin.double().T, dtype)
    _close(att, ref_paged_attention(q, k_cache, v_cache, *meta, d**-0.5), dtype)
