"""Triton kernels for the GPU step: norms, rotary + KV-cache write, paged attention, SiLU-gate and skinny linears.

Every wrapper allocates its output unless ``out=`` is given, launches one kernel and never reads tensor values
on the host (no ``.item()``, grids from shapes only), so a step built from them can be captured in a CUDA graph.
Attention and the skinny linear are batch-invariant: a row's arithmetic depends only on its own inputs and on
fixed block constants, never on how many other rows or sessions share the launch.

The module imports without triton; ``AVAILABLE`` says whether the kernels exist.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # CPU-only installs: the runtime falls back to plain PyTorch
    triton = None
    tl = None
    AVAILABLE = False

ATTN_BLOCK_M = 16  # flattened (query position, head) rows per attention program, fixed for batch invariance
ATTN_BLOCK_N = 64  # keys per attention inner step, fixed for batch invariance
# Flattened rows per attention program in passes with a prompt chunk. 16 (the default) reads every key tile
# once per query position; 64 shares each tile read among 4 positions (an H100 profile of a 4096-token
# prefill spends 55 of 184 ms in attention at 16 rows). SPLITGLM_ATTN_CHUNK_ROWS=64 (128: 8 warps) runs that,
# exact on the interpreter but not yet timed or checked for bit-identity on a GPU, so it is not the default.
ATTN_CHUNK_BLOCK_M = int(os.environ.get("SPLITGLM_ATTN_CHUNK_ROWS", "16"))
SKINNY_BLOCK_M = 16  # the MMA's rows: every row is multiplied by the same instructions whatever the tile holds
# Rows per skinny program: up to this many rows share one read of a weight tile. A row's arithmetic is that of
# its 16-row MMA whatever the tile's height (the GPU batch-invariance tests check it); SPLITGLM_SKINNY_ROWS=16
# keeps every tile at 16 rows.
SKINNY_MAX_ROWS = int(os.environ.get("SPLITGLM_SKINNY_ROWS", "32"))
ROTARY_BLOCK_H = 4  # heads per rotary program
SILU_BLOCK = 1024  # columns per silu_mul program
PAGE_SIZES = (16, 32, 64, 128)

# (N, K) -> (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K); the GLM-4-9B projections, tuned in one place.
# SPLIT_K > 1 cuts K into that many fixed ranges (more programs in flight for the narrow matrices); their fp32
# partial sums are added in a fixed order by a second kernel, so the split depends on (N, K) only.
SKINNY_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (4608, 4096): (32, 256, 4, 4, 4),  # qkv: 144 tiles x 4 splits
    (4096, 4096): (32, 256, 4, 4, 4),  # o_proj: 128 tiles x 4
    (27392, 4096): (64, 128, 4, 4, 2),  # gate_up: 428 tiles x 2, 80 KB of stages (bf16): 2 per SM
    (4096, 13696): (32, 128, 4, 4, 4),  # down: 128 tiles x 4 (13696 = 107 * 128, no K mask)
    (151552, 4096): (64, 128, 4, 4, 1),  # lm_head: 2368 tiles
}
SKINNY_SHAPES = tuple(SKINNY_CONFIGS)
# FP8 weights: BLOCK_K times this where K allows, so a stage moves as many bytes as bf16's (1 keeps bf16's K).
FP8_BLOCK_K = int(os.environ.get("SPLITGLM_FP8_BLOCK_K", "2"))
# FP8 weights of the GLM-4-9B projections, tuned apart: in a kernel sweep on one H100 at M=1, 8.6% less time
# over a layer's four products than bf16's configs with BLOCK_K doubled. A whole step with them (and tiles of
# 32 rows) is not yet timed or tested on a GPU, so they are taken only with SPLITGLM_FP8_CONFIGS=tuned; by
# default every shape takes skinny_config's with FP8_BLOCK_K.
FP8_SKINNY_CONFIGS: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (4608, 4096): (32, 256, 4, 4, 2),
    (4096, 4096): (32, 256, 4, 4, 2),
    (27392, 4096): (32, 256, 4, 4, 1),
    (4096, 13696): (32, 128, 4, 4, 4),
}
if os.environ.get("SPLITGLM_FP8_CONFIGS", "off") != "tuned":
    FP8_SKINNY_CONFIGS = {}
SM_PROGRAMS = 3 * 132  # programs to aim for at M <= 16 (three per H200 SM)
SKINNY_SMEM_BYTES = 160 * 1024  # cap on a program's pipelined tiles (H200: 227 KB per block), see _fit_stages


def skinny_config(n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) for an (N, K) weight; from N and K only, never M."""
    if (n, k) in SKINNY_CONFIGS:
        return SKINNY_CONFIGS[(n, k)]
    block_n = 32 if n <= 8192 else 64
    block_k = 256 if block_n == 32 and k % 256 == 0 else 128
    tiles, k_tiles = -(-n // block_n), -(-k // block_k)
    split = max(1, min(8, k_tiles // 2, SM_PROGRAMS // max(tiles, 1)))
    return block_n, block_k, 4, 4, split


def skinny_rows(m: int) -> int:
    """Rows per skinny program for an M-row product: 16, 32, ... up to SKINNY_MAX_ROWS."""
    rows = SKINNY_BLOCK_M
    while rows < min(m, SKINNY_MAX_ROWS):
        rows *= 2
    return rows


def _fit_stages(num_stages: int, block_m: int, block_n: int, block_k: int, element_size: int,
                weight_size: int | None = None) -> int:
    """Fewer pipeline stages where wide dtypes (fp32) would overflow shared memory; arithmetic is unchanged."""
    per_stage = (block_m * element_size + block_n * (weight_size or element_size)) * block_k
    return max(1, min(num_stages, SKINNY_SMEM_BYTES // per_stage))


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs, the tensor-core default otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _norm_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel of ``block`` columns."""
    return max(1, min(16, block // 512))


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A preallocated output of the right shape, dtype and device, or a fresh one."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    assert tuple(out.shape) == tuple(shape), f"out has shape {tuple(out.shape)}, expected {tuple(shape)}"
    assert out.dtype == like.dtype and out.device == like.device, "out must match the input's dtype and device"
    assert out.stride(-1) == 1, "out must be contiguous in its last dim"
    return out


if AVAILABLE:

    @triton.jit
    def _rms_scale(x, w, C, eps, DTYPE: tl.constexpr):
        """weight * rms-normalised x, the normalised value rounded to DTYPE first; fp32 in and out."""
        var = tl.sum(x * x, axis=0) / C
        y = (x * tl.rsqrt(var + eps)).to(DTYPE).to(tl.float32)
        return y * w

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, C, eps, BLOCK: tl.constexpr):
        """One row: out = rms_norm(x) * weight."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
        y = _rms_scale(x, w, C, eps, out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + cols, y, mask=ok)

    @triton.jit
    def _add_rms_norm_kernel(
        h_ptr,
        res_ptr,
        w_ptr,
        post_w_ptr,
        out_ptr,
        res_out_ptr,
        stride_h,
        stride_res,
        stride_out,
        stride_res_out,
        C,
        eps,
        HAS_POST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row: [h = rms_norm(h) * post_w]; r = residual + h; out = rms_norm(r) * w."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < C
        dtype = out_ptr.dtype.element_ty
        h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
        res = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK,)
        if HAS_POST:
            post_w = tl.load(post_w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            h = _rms_scale(h, post_w, C, eps, dtype).to(dtype).to(tl.float32)
        r = (res + h).to(dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, r, mask=ok)
        y = _rms_scale(r.to(tl.float32), w, C, eps, dtype)
        tl.store(out_ptr + row * stride_out + cols, y, mask=ok)

    @triton.jit
    def _rotary_kv_write_kernel(
        qkv_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        slot_ptr,
        k_cache_ptr,
        v_cache_ptr,
        q_out_ptr,
        stride_qkv,
        stride_table,
        stride_qo_n,
        stride_qo_h,
        H: tl.constexpr,
        KH: tl.constexpr,
        D: tl.constexpr,
        HALF_ROT: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """One row, BLOCK_H of its [q | k | v] heads: rotate q and k, store q to q_out and k, v to the cache slot."""
        n = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,) index into [q | k | v]
        pairs = tl.arange(0, D // 2)  # (D/2,)
        head_ok = heads < H + 2 * KH
        even = heads[:, None] * D + 2 * pairs[None, :]  # (BH, D/2) offset of x[2i] in the row
        src = qkv_ptr + n * stride_qkv + even
        x0 = tl.load(src, mask=head_ok[:, None], other=0.0).to(tl.float32)  # (BH, D/2)
        x1 = tl.load(src + 1, mask=head_ok[:, None], other=0.0).to(tl.float32)  # (BH, D/2)

        pos = tl.load(pos_ptr + n).to(tl.int64)
        in_rot = pairs < HALF_ROT  # (D/2,)
        c = tl.load(cos_ptr + pos * stride_table + pairs, mask=in_rot, other=1.0)[None, :]  # (1, D/2)
        s = tl.load(sin_ptr + pos * stride_table + pairs, mask=in_rot, other=0.0)[None, :]  # (1, D/2)
        turn = (heads < H + KH)[:, None] & in_rot[None, :]  # (BH, D/2) q and k heads, rotary dims
        y0 = tl.where(turn, x0 * c - x1 * s, x0)
        y1 = tl.where(turn, x1 * c + x0 * s, x1)

        is_q = heads < H
        q_dst = q_out_ptr + n * stride_qo_n + heads[:, None] * stride_qo_h + 2 * pairs[None, :]
        tl.store(q_dst, y0, mask=is_q[:, None])
        tl.store(q_dst + 1, y1, mask=is_q[:, None])

        slot = tl.load(slot_ptr + n).to(tl.int64)
        cached = (slot + tl.zeros((BLOCK_H,), tl.int64)) >= 0  # (BH,) a vector: the interpreter rejects scalar & vector
        is_k = cached & (heads >= H) & (heads < H + KH)
        is_v = cached & (heads >= H + KH) & head_ok
        kv_row = slot * (KH * D) + 2 * pairs[None, :]  # (1, D/2) offset of the slot's x[2i] in head 0
        k_dst = k_cache_ptr + kv_row + (heads - H)[:, None] * D
        tl.store(k_dst, y0, mask=is_k[:, None])
        tl.store(k_dst + 1, y1, mask=is_k[:, None])
        v_dst = v_cache_ptr + kv_row + (heads - H - KH)[:, None] * D
        tl.store(v_dst, y0, mask=is_v[:, None])
        tl.store(v_dst + 1, y1, mask=is_v[:, None])

    @triton.jit
    def _attn_rows(q_start_ptr, q_len_ptr, ctx_ptr, b, g, tile, G: tl.constexpr, BLOCK_M: tl.constexpr):
        """The tile's flattened rows r = t * G + h % G: (query row index, query head, absolute position, valid)."""
        q_start = tl.load(q_start_ptr + b)
        q_len = tl.load(q_len_ptr + b)
        ctx = tl.load(ctx_ptr + b)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        valid = rows < q_len * G
        t = rows // G
        q_row = (q_start + t).to(tl.int64)  # (BM,) row in q / out
        head = g * G + rows % G  # (BM,)
        pos = ctx - q_len + t  # (BM,) absolute position of the query
        return q_row, head, pos, valid

    @triton.jit
    def _attn_kv_offsets(bt_row_ptr, kpos, ctx, stride_page, stride_slot, PAGE_SIZE: tl.constexpr):
        """Offsets of keys ``kpos`` in the paged pool (head 0, dim 0) and whether each key exists."""
        k_ok = kpos < ctx  # (BN,)
        page = tl.load(bt_row_ptr + kpos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)  # (BN,)
        return page * stride_page + (kpos % PAGE_SIZE) * stride_slot, k_ok

    @triton.jit
    def _paged_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        ctx_ptr,
        q_start_ptr,
        q_len_ptr,
        out_ptr,
        qk_scale,
        stride_qn,
        stride_qh,
        stride_on,
        stride_oh,
        stride_kp,
        stride_ks,
        stride_kh,
        stride_vp,
        stride_vs,
        stride_vh,
        stride_bt,
        G: tl.constexpr,
        D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Session b, kv head g, BLOCK_M flattened query rows: causal online-softmax attention over the pages."""
        b = tl.program_id(0)
        g = tl.program_id(1)
        q_row, head, pos, valid = _attn_rows(q_start_ptr, q_len_ptr, ctx_ptr, b, g, tl.program_id(2), G, BLOCK_M)
        ctx = tl.load(ctx_ptr + b)
        dims = tl.arange(0, D)  # (D,)
        q_off = q_row[:, None] * stride_qn + head[:, None] * stride_qh + dims[None, :]  # (BM, D)
        q = tl.load(q_ptr + q_off, mask=valid[:, None], other=0.0)  # (BM, D)
        bt_row_ptr = bt_ptr + b.to(tl.int64) * stride_bt

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2
        acc = tl.zeros((BLOCK_M, D), tl.float32)  # running weighted sum of values
        hi = tl.max(tl.where(valid, pos + 1, 0), axis=0)  # one past the tile's last causal key; 0 for an empty tile
        for start in range(0, hi, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)  # (BN,) absolute key positions
            k_off, k_ok = _attn_kv_offsets(bt_row_ptr, kpos, ctx, stride_kp, stride_ks, PAGE_SIZE)
            k = tl.load(k_ptr + k_off[:, None] + g * stride_kh + dims[None, :], mask=k_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
            allowed = valid[:, None] & (kpos[None, :] <= pos[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BM,)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep exp2 finite
            alpha = tl.exp2(m_i - m_safe)  # 1 exactly when the block adds nothing to a row
            p = tl.exp2(s - m_safe[:, None])  # (BM, BN), 0 where masked
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + k_off[:, None] + g * stride_vh + dims[None, :], mask=k_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BM, D)
            m_i = m_new
        o = acc / tl.where(valid, l_i, 1.0)[:, None]
        o_off = q_row[:, None] * stride_on + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptr + o_off, o, mask=valid[:, None])

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, width, BLOCK: tl.constexpr):
        """One row, BLOCK columns: out = silu(gate) * up."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        ok = cols < width
        gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + width + cols, mask=ok, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * stride_out + cols, y, mask=ok)

    @triton.jit
    def _skinny_tile_ids():
        """(N block, M block) of this program, M fastest so the M tiles of one weight block run together (L2)."""
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        num_m = tl.num_programs(1)
        return pid // num_m, pid % num_m

    @triton.jit
    def _skinny_linear_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) output tile over one of SPLIT_K fixed K ranges, in BLOCK_K steps, fp32 sums;
        with SPLIT_K > 1 the partial sum goes to ``out_ptr`` as fp32 (SPLIT_K, M, N) for ``_splitk_sum``.
        HAS_SCALE: the weight is FP8 (E4M3), widened to x's dtype per tile; each column's sum is multiplied
        by its scale (``s_ptr``, fp32 (N,)) before it is stored."""
        pid_n, pid_m = _skinny_tile_ids()
        split = pid_n % SPLIT_K
        pid_n = pid_n // SPLIT_K
        k_tiles = tl.cdiv(K, BLOCK_K)
        first, last = split * k_tiles // SPLIT_K, (split + 1) * k_tiles // SPLIT_K  # this split's K tiles
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        rk = tl.arange(0, BLOCK_K)  # (BK,)
        m_ok = rm < M
        n_ok = rn < N
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + first * BLOCK_K + rk[None, :]  # (BM, BK)
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + first * BLOCK_K + rk[None, :]  # (BN, BK)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(first, last):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k_ok = rk < K - k * BLOCK_K
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if HAS_SCALE:
                w = w.to(x_ptr.dtype.element_ty)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)  # (BM, BN)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_SCALE:
            acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        else:  # the partial sum of this split: (SPLIT_K, M, N) fp32
            out_ptrs = out_ptr + (split * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _splitk_sum_kernel(ws_ptr, b_ptr, out_ptr, M, N, stride_om, HAS_BIAS: tl.constexpr,
                           SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """One row, BLOCK columns: out = sum of the SPLIT_K partials in split order (+ bias)."""
        m = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + (s * M + m) * N + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + cols, acc, mask=ok)


if AVAILABLE:

    @triton.jit
    def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        """Read STEPS * BLOCK int32 words per program and store their sum (so the loads stay)."""
        start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
        acc = tl.zeros((BLOCK,), tl.int32)
        for s in range(STEPS):
            offs = start + s * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
        tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


if AVAILABLE:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, QMAX: tl.constexpr, BLOCK: tl.constexpr):
        """One row: scale = max|x| / QMAX (at least 1e-12), q = x / scale in q's (FP8) type."""
        m = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < K
        x = tl.load(x_ptr + m * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / QMAX, 1e-12)
        q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(q_ptr + m * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + m, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (E4M3 (M, K), fp32 (M, 1) scales): one scale per row, one kernel (``runtime.fp8.quantize_rows``)."""
    _require_triton()
    _check_rows(x, "x")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=448.0, BLOCK=block,
                                num_warps=16 if block >= 8192 else 4)
    return q, s


def read_words(x: torch.Tensor) -> torch.Tensor:
    """Read every byte of ``x`` (its size a multiple of 4) once; a per-program sum, for bandwidth figures."""
    _require_triton()
    words = x.view(torch.int32).view(-1)
    block, steps = 1024, 16
    grid = (triton.cdiv(words.numel(), block * steps),)
    out = torch.empty(grid[0], dtype=torch.int32, device=x.device)
    _read_kernel[grid](words, out, words.numel(), BLOCK=block, STEPS=steps, num_warps=8)
    return out


def _require_triton() -> None:
    """Fail clearly when a wrapper is called without triton."""
    if not AVAILABLE:
        raise RuntimeError("triton is not installed; runtime.triton_ops needs it")


def _check_rows(x: torch.Tensor, name: str) -> None:
    """A 2-D tensor whose rows are contiguous."""
    assert x.dim() == 2, f"{name} must be 2-D, got shape {tuple(x.shape)}"
    assert x.stride(1) == 1, f"{name} rows must be contiguous"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C) -> (N, C): weight * rms-normalised x, fp32 math, in x.dtype."""
    _require_triton()
    _check_rows(x, "x")
    n, c = x.shape
    assert weight.shape == (c,) and weight.is_contiguous()
    out = _check_out(out, (n, c), x)
    block = triton.next_power_of_2(c)
    _rms_norm_kernel[(n,)](
        x, weight, out, x.stride(0), out.stride(0), c, eps, BLOCK=block, num_warps=_norm_warps(block)
    )
    return out


def add_rms_norm(
    h: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    post_weight: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) x 2 -> (normed, residual + [post-normed] h); residual_out may alias residual."""
    _require_triton()
    _check_rows(h, "h")
    _check_rows(residual, "residual")
    n, c = h.shape
    assert residual.shape == (n, c) and residual.dtype == h.dtype
    assert weight.shape == (c,) and weight.is_contiguous()
    if post_weight is not None:
        assert post_weight.shape == (c,) and post_weight.is_contiguous()
    out = _check_out(out, (n, c), h)
    residual_out = _check_out(residual_out, (n, c), h)
    block = triton.next_power_of_2(c)
    _add_rms_norm_kernel[(n,)](
        h, residual, weight, weight if post_weight is None else post_weight, out, residual_out,
        h.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0), c, eps,
        HAS_POST=post_weight is not None, BLOCK=block, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out, residual_out


def rotary_kv_write(
    qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, (H + 2K) * D) -> q (N, H, D) rotated; rotated k and v go to the cache slots (slot < 0: nowhere)."""
    _require_triton()
    _check_rows(qkv, "qkv")
    n = qkv.shape[0]
    h, kh, d = num_heads, num_kv_heads, head_dim
    assert qkv.shape[1] == (h + 2 * kh) * d, "qkv width must be (H + 2K) * D"
    assert d >= 16 and d & (d - 1) == 0, "head_dim must be a power of two >= 16"
    assert rotary_dim % 2 == 0 and 0 <= rotary_dim <= d, "rotary_dim must be even and <= head_dim"
    assert cos_table.shape == sin_table.shape and cos_table.shape[1] == rotary_dim // 2
    assert cos_table.dtype == torch.float32 and sin_table.dtype == torch.float32
    assert cos_table.is_contiguous() and sin_table.is_contiguous()
    assert positions.shape == (n,) and slot_mapping.shape == (n,)
    for cache in (k_cache, v_cache):
        assert cache.dim() == 4 and cache.shape[2:] == (kh, d) and cache.is_contiguous()
    if q_out is None:
        q_out = torch.empty((n, h, d), dtype=qkv.dtype, device=qkv.device)
    assert q_out.shape == (n, h, d) and q_out.dtype == qkv.dtype and q_out.stride(2) == 1
    grid = (n, triton.cdiv(h + 2 * kh, ROTARY_BLOCK_H))
    _rotary_kv_write_kernel[grid](
        qkv, cos_table, sin_table, positions, slot_mapping, k_cache, v_cache, q_out,
        qkv.stride(0), cos_table.stride(0), q_out.stride(0), q_out.stride(1),
        H=h, KH=kh, D=d, HALF_ROT=rotary_dim // 2, BLOCK_H=ROTARY_BLOCK_H, num_warps=4 if d >= 128 else 2,
    )  # fmt: skip
    return q_out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    scale: float,
    max_q_len: int,
    out: torch.Tensor | None = None,
    block_m: int = ATTN_BLOCK_M,
) -> torch.Tensor:
    """q (N, H, D) -> (N, H, D): each session's new rows attend causally to its paged keys (GQA). ``block_m``:
    flattened (query position, head) rows per program (ATTN_CHUNK_BLOCK_M for a prompt chunk's many rows)."""
    _require_triton()
    n, h, d = q.shape
    num_pages, page_size, kh, d_k = k_cache.shape
    assert v_cache.shape == k_cache.shape and d_k == d and h % kh == 0
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert d >= 16 and d & (d - 1) == 0, "head_dim must be a power of two >= 16"
    assert page_size in PAGE_SIZES, f"page_size must be one of {PAGE_SIZES}"
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    b = block_tables.shape[0]
    assert ctx_lens.shape == (b,) and q_starts.shape == (b,) and q_lens.shape == (b,)
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
    out = _check_out(out, (n, h, d), q)
    g = h // kh
    assert block_m >= 16 and block_m & (block_m - 1) == 0, "block_m must be a power of two >= 16"
    grid = (b, kh, triton.cdiv(max(max_q_len, 1) * g, block_m))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, block_tables, ctx_lens, q_starts, q_lens, out, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        G=g, D=d, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=ATTN_BLOCK_N,
        PRECISION=_dot_precision(q.dtype), num_warps=8 if block_m >= 128 else 4, num_stages=2,
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2I) -> (N, I): silu(gate) * up, gate the first I columns; fp32 math, in the input dtype."""
    _require_triton()
    _check_rows(gate_up, "gate_up")
    n, two_i = gate_up.shape
    assert two_i % 2 == 0
    i = two_i // 2
    out = _check_out(out, (n, i), gate_up)
    grid = (n, triton.cdiv(i, SILU_BLOCK))
    _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), i, BLOCK=SILU_BLOCK, num_warps=4)
    return out


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(M, K) @ (N, K).T + bias -> (M, N) for small M; batch-invariant (fixed BLOCK_M, split-K from (N, K) only).

    ``scale``: ``weight`` is FP8 (E4M3, ``runtime.fp8``) with this fp32 (N,) scale per output row."""
    _require_triton()
    _check_rows(x, "x")
    _check_rows(weight, "weight")
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k
    if scale is None:
        assert weight.dtype == x.dtype
    else:
        assert weight.dtype == torch.float8_e4m3fn and scale.shape == (n,) and scale.dtype == torch.float32
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous()
    out = _check_out(out, (m, n), x)
    block_n, block_k, num_warps, num_stages, split = skinny_config(n, k)
    if scale is not None and (n, k) in FP8_SKINNY_CONFIGS:
        block_n, block_k, num_warps, num_stages, split = FP8_SKINNY_CONFIGS[(n, k)]
    elif scale is not None and k % (block_k * FP8_BLOCK_K) == 0:
        block_k *= FP8_BLOCK_K  # the same bytes per stage as bf16
    block_m = skinny_rows(m)
    num_stages = _fit_stages(num_stages, block_m, block_n, block_k, x.element_size(), weight.element_size())
    grid = (triton.cdiv(n, block_n) * split, triton.cdiv(m, block_m))
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _skinny_linear_kernel[grid](
        x, weight, weight if scale is None else scale, weight if bias is None else bias, target, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0), HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split, PRECISION=_dot_precision(x.dtype), num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if split > 1:
        _splitk_sum_kernel[(m, triton.cdiv(n, SILU_BLOCK))](
            target, weight if bias is None else bias, out, m, n, out.stride(0), HAS_BIAS=bias is not None,
            SPLIT_K=split, BLOCK=SILU_BLOCK, num_warps=4,
        )  # fmt: skip
    return out


# --- benchmark (CUDA only; not run by the tests) ---


def _bench_row(kernel: str, shape: str, fn, nbytes: int) -> dict:
    """Time ``fn`` with do_bench and express it as achieved bandwidth."""
    from triton.testing import do_bench

    ms = do_bench(fn)
    return {"kernel": kernel, "shape": shape, "ms": ms, "gbytes": nbytes / 1e9, "gbps": nbytes / ms / 1e6}


def _bench_skinny_shape(m: int, n: int, k: int, dtype: torch.dtype, fp8_weights: bool = False) -> list[dict]:
    """skinny_linear against torch.matmul on one (M, N, K); ``fp8_weights``: the FP8 product (E4M3 weights)."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    nbytes = (n * k + m * k + m * n) * x.element_size()
    rows = [_bench_row("torch.matmul", f"M={m} N={n} K={k}", lambda: torch.matmul(x, w.T, out=out), nbytes)]
    if fp8_weights:  # (speed does not depend on the values: one scale for the whole matrix will do)
        scale = torch.full((n,), float(w.float().abs().max()) / 448.0, device="cuda")
        data = (w.float() / scale[:, None]).to(torch.float8_e4m3fn)
        fp8_bytes = n * k + 4 * n + (m * k + m * n) * x.element_size()
        return rows + [_bench_row("skinny_linear fp8", f"M={m} N={n} K={k}",
                                  lambda: skinny_linear(x, data, out=out, scale=scale), fp8_bytes)]
    return rows + [_bench_row("skinny_linear", f"M={m} N={n} K={k}", lambda: skinny_linear(x, w, out=out), nbytes)]


def _bench_pointwise(m: int, dtype: torch.dtype, hidden: int = 4096, inter: int = 13696) -> list[dict]:
    """rms_norm, add_rms_norm and silu_mul on m rows of GLM-4-9B widths."""
    es = torch.finfo(dtype).bits // 8
    x = torch.randn(m, hidden, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    gu = torch.randn(m, 2 * inter, device="cuda", dtype=dtype)
    out, res_out, act = torch.empty_like(x), torch.empty_like(x), torch.empty(m, inter, device="cuda", dtype=dtype)
    return [
        _bench_row("rms_norm", f"M={m} C={hidden}", lambda: rms_norm(x, w, 1e-5, out=out), (2 * m + 1) * hidden * es),
        _bench_row("add_rms_norm", f"M={m} C={hidden} sandwich",
                   lambda: add_rms_norm(x, res, w, 1e-5, post_weight=w, out=out, residual_out=res_out),
                   (4 * m + 2) * hidden * es),
        _bench_row("silu_mul", f"M={m} I={inter}", lambda: silu_mul(gu, out=act), 3 * m * inter * es),
    ]  # fmt: skip


def _bench_attention(m: int, dtype: torch.dtype, ctx: int = 4096, page_size: int = 16) -> list[dict]:
    """rotary_kv_write and one-row decode paged_attention for m sessions of ``ctx`` keys (H=32, K=2, D=128)."""
    h, kh, d, rot = 32, 2, 128, 64
    es = torch.finfo(dtype).bits // 8
    pages_per = triton.cdiv(ctx, page_size)
    k_cache = torch.randn(m * pages_per, page_size, kh, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(m * pages_per, device="cuda", dtype=torch.int32).view(m, pages_per)
    ctx_lens = torch.full((m,), ctx, device="cuda", dtype=torch.int32)
    ones = torch.ones(m, device="cuda", dtype=torch.int32)
    starts = torch.arange(m, device="cuda", dtype=torch.int32)
    q = torch.randn(m, h, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    qkv = torch.randn(m, (h + 2 * kh) * d, device="cuda", dtype=dtype)
    angles = torch.arange(ctx, device="cuda")[:, None] * torch.rand(rot // 2, device="cuda")
    cos, sin = angles.cos(), angles.sin()
    positions = torch.full((m,), ctx - 1, device="cuda")
    slots = torch.arange(m, device="cuda") * ctx + ctx - 1
    q_out = torch.empty_like(q)
    return [
        _bench_row("paged_attention", f"B={m} ctx={ctx} decode",
                   lambda: paged_attention(q, k_cache, v_cache, tables, ctx_lens, starts, ones, d**-0.5, 1, out=out),
                   (2 * m * ctx * kh * d + 2 * m * h * d) * es),
        _bench_row("rotary_kv_write", f"N={m}",
                   lambda: rotary_kv_write(qkv, cos, sin, positions, slots, k_cache, v_cache,
                                           h, kh, d, rot, q_out=q_out),
                   2 * m * (h + 2 * kh) * d * es),
    ]  # fmt: skip


def benchmark(dtype: torch.dtype = torch.bfloat16, ms: tuple[int, ...] = (1, 8, 32), fp8_weights: bool = False,
              products_only: bool = False) -> list[dict]:
    """Time every kernel on GLM-4-9B shapes on CUDA; one dict per (kernel, shape) with ms and achieved GB/s."""
    _require_triton()
    assert torch.cuda.is_available(), "benchmark() needs a CUDA device"
    rows = []
    for m in ms:
        for n, k in SKINNY_SHAPES:
            rows += _bench_skinny_shape(m, n, k, dtype, fp8_weights)
        if products_only:
            continue
        rows += _bench_pointwise(m, dtype) + _bench_attention(m, dtype)
    return rows
