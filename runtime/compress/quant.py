"""Int8 and int4 linear layers for CPU tiers, and the passes that put them in place.

Kernels (PyTorch CPU, measured on the demo model's shapes at one token):
- ``Int8Linear(activations="int8")``: W8A8. Each token's activations are
  quantised to int8 on the fly (absmax per token), multiplied by int8
  weights with ``torch._int_mm`` (VNNI), rescaled per token and per output
  channel. Fast for decode and several times faster than fp32 for prefill.
- ``Int8Linear(activations="bf16")``: weight-only int8; activations cast to
  bf16 and ``torch._weight_int8pack_mm``; exact fp32 per-channel scales.
- ``Int4Linear``: asymmetric int4 groups along the input dimension,
  ``torch._weight_int4pack_mm_for_cpu`` with bf16 activations; in the compiled decode graphs, steps of
  1 .. 16 rows take ``runtime.compress.int4_rows`` instead (AVX-512 BF16, the same weights and rounding
  of the row, fp32 sums; 1.6x faster on the demo model's 180 products a token, 1 or 2 threads). Eager
  passes of ``INT4_WIDE_ROWS`` rows or more (prompts) widen the weights to two bf16 halves
  (``int4_rows.widen_t``: hi + lo hold them to ~2^-17) and take one bf16 product (oneDNN: AMX or AVX-512
  BF16, fp32 sums), several times faster than the int4 kernel there.
- ``Int8Linear.one_row``: weight-only int8 on one row in fp32, written as a
  product and a sum for Inductor (``runtime.cpu_decode.CompiledHead``). On
  the demo model's head (49152 x 576) it reads the weights at ~12 GB/s a
  core where ``_weight_int8pack_mm`` reads ~6 GB/s: 2.1 ms against 4.6 at
  one thread, 1.0 against 2.1-2.4 at two. It loses at two rows and more (it
  reads the weights once a row) and at the layers' small shapes.
Off the CPU, ``Int8Linear`` dequantises and uses F.linear; ``Int4Linear`` is CPU-only.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from runtime.compress import int4_rows
from runtime.compress.common import (
    CompressionError,
    LayerRange,
    decoder_layers,
    linears_of,
    replace_module,
    stored_bytes,
)

INT8_ACTIVATIONS = ("int8", "bf16")
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows from which an eager int4 product widens its weights to bf16 for one bf16 product (a prompt's pass);
# below it, ATen's int4 kernel. Above every decode, verification and relay step of the agents (at most 16
# rows in the compiled graphs, 8 sessions a relay step by default). SPLITGLM_INT4_WIDE_ROWS=0 turns it off.
INT4_WIDE_ROWS = int(os.environ.get("SPLITGLM_INT4_WIDE_ROWS", "64"))


# ---- pure maths -----------------------------------------------------------------------------------


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (N, K) -> int8 (N, K), fp32 scales (N,)."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
    q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (M, K) -> int8 (M, K), fp32 scales (M, 1)."""
    scale = rows.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127  # (M, 1)
    return torch.round(rows.float() / scale).to(torch.int8), scale


def int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 over groups of inputs: (N, K) -> codes (N, K) in [0, 15], scales, zeros (N, K/g).

    A weight is recovered as ``(code - 8) * scale + zero``, the layout of PyTorch's int4 kernels.
    """
    N, K = weight.shape
    groups = weight.float().view(N, K // group_size, group_size)  # (N, G, g)
    low, high = groups.amin(-1), groups.amax(-1)  # (N, G)
    scale = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return codes.view(N, K), scale, low + 8 * scale


def int4_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of ``int4_groups``: (N, K) codes -> (N, K) fp32 weights."""
    scale, zero = (
        scale.float().repeat_interleave(group_size, 1),
        zero.float().repeat_interleave(group_size, 1),
    )
    return (codes.float() - 8) * scale + zero


def int8_row_product(row: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One row through int8 weights in fp32: (1, K) x int8 (N, K), scales (N,) -> (1, N).

    Products and a sum, for a compiler: Inductor makes them one loop reading each weight once. Run eagerly it
    materialises the fp32 weights (the reference in tests, not a path to serve).
    """
    return (row.float()[:, None, :] * weight.float()).sum(-1) * scale  # (1, N, K) -> (1, N)


# ---- modules --------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (N, K) and fp32 scales per output channel."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, activations: str):
        super().__init__()
        if activations not in INT8_ACTIVATIONS:
            raise CompressionError(f"activations must be one of {INT8_ACTIVATIONS}, got {activations!r}")
        self.activations = activations
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("scale", scale.float())  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.register_buffer("_ones", torch.ones(self.out_features, dtype=torch.bfloat16), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "int8") -> Int8Linear:
        q, scale = int8_per_channel(linear.weight.detach())
        return cls(q, scale, linear.bias, activations)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if x.device.type != "cpu":
            out = F.linear(rows.float(), self.dequantized_weight())
        elif self.activations == "int8":
            xq, x_scale = int8_per_token(rows)  # (M, K), (M, 1)
            out = torch._int_mm(xq, self.weight.t()).float() * x_scale * self.scale  # (M, N)
        else:
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self._ones).float() * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def one_row(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` of one row (1, K) for a compiled graph. Weight-only (bf16 activations): the exact fp32
        product with the stored weights (``int8_row_product``), where the eager kernel rounds the row and its
        result to bf16 first (relative 2^-9 each); W8A8 keeps its int8 activations (``forward``)."""
        if self.activations == "int8":
            return self(x)
        out = int8_row_product(x.reshape(1, self.in_features), self.weight, self.scale)  # (1, N)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.activations}"


class Int4Linear(nn.Module):
    """y = x W^T + b with W in int4 groups, packed for PyTorch's CPU int4 kernel (bf16 activations).

    ``use_row_kernel`` adds a second packing for the compiled decode graphs: inside ``torch.compile`` the
    product then takes ``runtime.compress.int4_rows`` (AVX-512 BF16, 1 .. 16 rows, the same weights and
    activation rounding, fp32 sums and result); eager calls keep ATen's kernel, the reference.
    """

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        N, K = linear.weight.shape
        if K % group_size or N % 16:
            raise CompressionError(
                f"int4 needs in_features % {group_size} == 0 and out_features % 16 == 0, got ({N}, {K})"
            )
        self.out_features, self.in_features, self.group_size = N, K, group_size
        codes, scale, zero = int4_groups(linear.weight.detach(), group_size)
        self.register_buffer("weight_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        scales_zeros = torch.stack((scale.t(), zero.t()), dim=-1)  # (K/g, N, 2)
        self.register_buffer("scales_and_zeros", scales_zeros.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.register_buffer("rows_packed", None, persistent=False)  # (N/16, K/4, 32) uint8 once asked
        self.register_buffer("rows_scales_zeros", None, persistent=False)  # (N/16, K/32, 2, 16) bf16

    def use_row_kernel(self, on: bool = True) -> bool:
        """Pack the weights for the row kernel (once; the graphs compiled after this take it), or drop that
        packing (``on`` False: the graphs compiled after this take ATen's kernel); whether the graphs take it.
        False where this host or torch cannot run it."""
        if not on:
            self.rows_packed = self.rows_scales_zeros = None
        if not on or self.rows_packed is not None:
            return on
        if self.weight_packed.device.type != "cpu" or not int4_rows.available():
            return False
        codes = int4_rows.codes_of_int4pack(self.weight_packed, self.out_features, self.in_features)
        if codes is None:
            return False
        self.rows_packed, self.rows_scales_zeros = int4_rows.pack_rows(codes, self.scales_and_zeros, self.group_size)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if self.rows_packed is not None and torch.compiler.is_compiling():
            out = int4_rows.int4_rows(rows.float(), self.rows_packed, self.rows_scales_zeros)  # (M, N)
        elif self._widens(rows):  # many rows: the weights widened to bf16 halves, one bf16 product
            wide = int4_rows.widen_t(self.weight_packed, self.scales_and_zeros, self.out_features, self.in_features,
                                     self.group_size)  # (2K, N) bf16
            out = int4_rows.wide_product(rows, wide)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.to(torch.bfloat16), self.weight_packed, self.group_size, self.scales_and_zeros
            ).float()
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _widens(self, rows: torch.Tensor) -> bool:
        """Whether this eager product takes the widened bf16 weights: INT4_WIDE_ROWS rows or more, on a CPU that
        runs ``int4_rows`` (AVX-512 BF16), weights ATen packs in blocks of 64 outputs."""
        return (0 < INT4_WIDE_ROWS <= rows.shape[0] and self.out_features % 64 == 0
                and rows.device.type == "cpu" and not torch.compiler.is_compiling() and int4_rows.available())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ---- passes ---------------------------------------------------------------------------------------


def target_linears(
    module: nn.Module, layers: LayerRange, names, include_head: bool
) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, dotted name, linear) for the linears of the chosen layers, and the LM head if asked."""
    targets = [(block, n, m) for _, block in decoder_layers(module, layers) for n, m in linears_of(block, names)]
    if include_head:
        head = getattr(module, "lm_head", None)
        if not isinstance(head, nn.Linear):
            raise CompressionError("include_head: this module has no plain nn.Linear lm_head")
        targets.append((module, "lm_head", head))
    return targets


def _summary(name: str, module: nn.Module, layers, before: int, replaced: int, **extra) -> dict:
    touched = [i for i, _ in decoder_layers(module, layers)]
    return {
        "pass": name,
        "layers": [touched[0], touched[-1] + 1] if touched else [],
        "linears": replaced,
        "bytes_before": before,
        "bytes_after": stored_bytes(module),
        **extra,
    }


def quantize_int8_weights(
    module: nn.Module,
    layers: LayerRange = None,
    include_head: bool = False,
    activations: str = "int8",
    names: list[str] | None = None,
) -> dict:
    """Replace the linears of ``layers`` (and the head if asked) with per-channel ``Int8Linear``."""
    if activations not in INT8_ACTIVATIONS:
        raise CompressionError(f"activations must be one of {INT8_ACTIVATIONS}, got {activations!r}")
    before = stored_bytes(module)
    targets = target_linears(module, layers, names, include_head)
    for parent, name, linear in targets:
        replace_module(parent, name, Int8Linear.from_linear(linear, activations))
    return _summary("int8", module, layers, before, len(targets), activations=activations, head=include_head)


def quantize_int4_weights(
    module: nn.Module,
    group_size: int = 32,
    layers: LayerRange = None,
    include_head: bool = False,
    names: list[str] | None = None,
) -> dict:
    """Replace the linears of ``layers`` with ``Int4Linear``; shapes the kernel cannot take are skipped."""
    if group_size not in INT4_GROUP_SIZES:
        raise CompressionError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    before = stored_bytes(module)
    replaced, skipped = 0, []
    for parent, name, linear in target_linears(module, layers, names, include_head):
        try:
            replace_module(parent, name, Int4Linear(linear, group_size))
            replaced += 1
        except CompressionError as e:
            skipped.append(f"{name}: {e}")
    return _summary("int4", module, layers, before, replaced, group_size=group_size, skipped=skipped)
