"""The int4 row kernel (runtime.compress.int4_rows) against float64 maths on the weights it stores, and
``Int4Linear`` taking it only inside compiled graphs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runtime.compress import Int4Linear
from runtime.compress import int4_rows as rows_kernel
from runtime.compress.quant import int4_groups

needs_kernel = pytest.mark.skipif(not rows_kernel.available(), reason="no AVX-512 BF16 or no C++ compiler")


def fp32_sum_bound(k: int, group_size: int) -> float:
    """Relative error bound of the kernel's fp32 sums (products exact): a group's 32 products summed in fp32,
    then one multiply-add per group, against the sum of |x| |w|: (32 + 2 K / 32) * 2^-24, the standard
    bound of n-term recursive summation (n u), with room for the scale's and zero's roundings."""
    return (rows_kernel.GROUP + 2 * k // rows_kernel.GROUP + 2) * 2.0**-24


@pytest.mark.parametrize("n", [16, 32, 48, 80, 192, 576])
def test_codes_come_back_from_atens_packing(n):
    """Full blocks of 64 outputs and every tail: the codes ATen packed, exactly."""
    codes = torch.randint(0, 16, (n, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(rows_kernel.codes_of_int4pack(packed, n, 96), codes)


@needs_kernel
@pytest.mark.parametrize("n, k, group_size", [(32, 64, 32), (192, 576, 32), (80, 1536, 32), (64, 256, 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_kernel_is_the_fp32_product_of_its_stored_weights(n, k, group_size, m):
    """x rounded to bf16 times the weights from the codes and the bf16 scales and zeros, to within the fp32
    summation bound (a wrong nibble, row or group is off by ~|x||w|, 10^4 times more); ATen's kernel, which
    also rounds its result to bf16, is within 2^-7 of the same."""
    gen = torch.Generator().manual_seed(n + k + m)
    layer = Int4Linear(nn.Linear(k, n, bias=False), group_size)
    codes = rows_kernel.codes_of_int4pack(layer.weight_packed, n, k)
    packed, scales_zeros = rows_kernel.pack_rows(codes, layer.scales_and_zeros, group_size)
    x = torch.randn(m, k, generator=gen) * 3
    want = rows_kernel.reference(x, codes, layer.scales_and_zeros, group_size)  # (M, N) float64
    eye = torch.eye(k)
    magnitude = x.to(torch.bfloat16).double().abs() @ rows_kernel.reference(eye, codes, layer.scales_and_zeros,
                                                                              group_size).abs()  # sum |x| |w|
    got = rows_kernel.int4_rows(x, packed, scales_zeros)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - want).abs() <= fp32_sum_bound(k, group_size) * magnitude).all()
    assert ((layer(x).double() - want).abs() <= 2.0**-7 * magnitude).all()


@needs_kernel
def test_int4_linear_takes_the_kernel_only_when_compiled():
    """Eager calls stay on ATen's kernel (the reference) after ``use_row_kernel``; a compiled call takes the
    row kernel, with its bias; ``use_row_kernel(False)`` gives the graphs back to ATen's kernel."""
    lin = nn.Linear(64, 48, bias=True)
    layer = Int4Linear(lin, 32)
    x = torch.randn(2, 64)
    before = layer(x)
    assert layer.use_row_kernel() and layer.rows_packed is not None
    torch.testing.assert_close(layer(x), before, atol=0, rtol=0)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    codes = int4_groups(lin.weight.detach(), 32)[0]
    want = rows_kernel.reference(x, codes, layer.scales_and_zeros, 32) + lin.bias.detach().double()
    torch.testing.assert_close(compiled(x).double(), want, atol=1e-5, rtol=1e-5)
    assert not layer.use_row_kernel(False) and layer.rows_packed is None
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, backend="eager")(x), before, atol=0, rtol=0)


@needs_kernel
def test_kernel_rounds_the_row_as_torch_does():
    """The row is rounded to bf16 inside the kernel exactly as ``Tensor.to(torch.bfloat16)`` rounds it (ties to
    even, both ways; random bits): the result is bit for bit that of the pre-rounded row."""
    gen = torch.Generator().manual_seed(7)
    layer = Int4Linear(nn.Linear(128, 64, bias=False), 32)
    packed, scales_zeros = rows_kernel.pack_rows(rows_kernel.codes_of_int4pack(layer.weight_packed, 64, 128),
                                                 layer.scales_and_zeros, 32)
    base = torch.randn(3, 128, generator=gen).to(torch.bfloat16).float().view(torch.int32)
    ties = (base | 0x8000).view(torch.float32)  # exactly halfway between two bf16 values: even and odd ones
    bits = torch.randint(-(2**31), 2**31 - 1, (3, 128), generator=gen, dtype=torch.int32) & ~(0xFF << 23)
    noise = (bits | (127 << 23)).view(torch.float32)  # random mantissas in [1, 2) and both signs
    x = torch.cat((ties, noise))  # (6, 128)
    got = rows_kernel.int4_rows(x, packed, scales_zeros)
    assert torch.equal(got, rows_kernel.int4_rows(x.to(torch.bfloat16).float(), packed, scales_zeros))


@needs_kernel
@pytest.mark.parametrize("n, k, group_size", [(64, 256, 128), (192, 576, 32), (128, 1536, 64)])
def test_widened_weights_are_the_stored_weights_rounded_to_bf16(n, k, group_size):
    """``widen_t`` reads ATen's packing: W^T in two bf16 halves, hi = w rounded to bf16 and lo = (w - hi) rounded,
    w = (code - 8) * scale + zero in fp32; together they hold w to 2^-16 of its size."""
    layer = Int4Linear(nn.Linear(k, n, bias=False), group_size)
    codes = rows_kernel.codes_of_int4pack(layer.weight_packed, n, k)
    scale, zero = (t.t().float().repeat_interleave(group_size, 1) for t in layer.scales_and_zeros.unbind(-1))
    w = ((codes.float() - 8) * scale + zero).t()  # (K, N) fp32
    hi = w.to(torch.bfloat16)
    got = rows_kernel.widen_t(layer.weight_packed, layer.scales_and_zeros, n, k, group_size)
    assert got.dtype == torch.bfloat16 and got.shape == (2 * k, n)
    assert torch.equal(got[:k], hi) and torch.equal(got[k:], (w - hi.float()).to(torch.bfloat16))
    assert ((got[:k].float() + got[k:].float() - w).abs() <= 2.0**-16 * w.abs()).all()


@needs_kernel
def test_a_prompts_rows_take_the_widened_weights(monkeypatch):
    """From INT4_WIDE_ROWS rows an eager product widens the weights once (a step's rows below it, and shapes
    ATen does not pack in blocks of 64, keep ATen's kernel); its result is the stored weights' product to
    within the rounding of its bf16 result (2^-8) and fp32 sums (the weights' hi half alone would be off by
    ~2^-13.6 of the sum of |x| |w|), tighter than ATen's kernel is."""
    from runtime.compress import quant

    widened, wide = [], quant.INT4_WIDE_ROWS
    real = rows_kernel.widen_t
    monkeypatch.setattr(rows_kernel, "widen_t", lambda *a: widened.append(a[2:]) or real(*a))
    lin = nn.Linear(576, 192, bias=True).requires_grad_(False)
    layer = Int4Linear(lin, 32)
    codes = int4_groups(lin.weight.detach(), 32)[0]
    gen = torch.Generator().manual_seed(3)
    for m in (quant.INT4_WIDE_ROWS - 1, quant.INT4_WIDE_ROWS, 256):
        x = torch.randn(m, 576, generator=gen)
        product = rows_kernel.reference(x, codes, layer.scales_and_zeros, 32)  # the bias is added after rounding
        magnitude = x.to(torch.bfloat16).double().abs() @ rows_kernel.reference(
            torch.eye(576), codes, layer.scales_and_zeros, 32).abs()
        error = (layer(x).double() - product - lin.bias.double()).abs()
        if m >= wide:  # the widened weights: the bf16 result's rounding and fp32 sums
            assert (error <= 2.0**-8 * product.abs() + 2.0**-14 * magnitude).all()
        else:  # ATen's kernel (as in the test above)
            assert (error <= 2.0**-7 * magnitude).all()
    assert widened == [(192, 576, 32), (192, 576, 32)]
    narrow = Int4Linear(nn.Linear(64, 48), 32)  # 48 outputs: ATen packs them otherwise
    narrow(torch.randn(256, 64))
    assert len(widened) == 2
