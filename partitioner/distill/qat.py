"""Quantisation-aware training: the student's linears see their int8 / int4 weights, gradients pass straight.

The fake quantisation is the runtime's own maths (``compress.quant.int8_per_channel``, ``int4_groups``), so
the exported weights (``finish``: the fake-quantised values) are exactly what ``Int8Linear`` / ``Int4Linear``
store when the tier's passes quantise them at load.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from runtime.compress.quant import int4_dequantize, int4_groups, int8_per_channel

QAT_BITS = ("int8", "int4")
INT4_GROUP = 32


def fake_quantize(weight: torch.Tensor, bits: str) -> torch.Tensor:
    """The weight as the runtime's kernel will hold it, dequantised: (N, K) -> (N, K)."""
    if bits == "int8":
        q, scale = int8_per_channel(weight)
        return q.float() * scale[:, None]
    codes, scale, zero = int4_groups(weight, INT4_GROUP)
    return int4_dequantize(codes, scale, zero, INT4_GROUP)


class FakeQuant(nn.Module):
    """A parametrisation: w -> w + (Q(w) - w).detach() (forward: Q(w); backward: identity)."""

    def __init__(self, bits: str):
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            quantized = fake_quantize(weight.detach(), self.bits).to(weight.dtype)
        return weight + (quantized - weight).detach()


def can_quantize(linear: nn.Linear, bits: str) -> bool:
    """Whether the runtime's kernel takes this shape (int4: K % 32 == 0 and N % 16 == 0)."""
    N, K = linear.weight.shape
    return bits == "int8" or (K % INT4_GROUP == 0 and N % 16 == 0)


def attach(linears: list[nn.Linear], bits: str) -> int:
    """Fake-quantise each linear's weight during training; return how many took it."""
    if bits not in QAT_BITS:
        raise ValueError(f"QAT bits must be one of {QAT_BITS}, got {bits!r}")
    done = 0
    for linear in linears:
        if can_quantize(linear, bits) and not parametrize.is_parametrized(linear, "weight"):
            parametrize.register_parametrization(linear, "weight", FakeQuant(bits))
            done += 1
    return done


def finish(module: nn.Module) -> None:
    """Replace every fake-quantised weight by its quantised value (the parametrisations removed)."""
    for linear in [m for m in module.modules() if parametrize.is_parametrized(m, "weight")]:
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def export_passes(bits: str | None, head_bits: str | None) -> list[dict]:
    """The tier's compression passes that turn the QAT weights into real low-bit kernels at load."""
    passes = []
    if bits == "int4":
        passes.append({"pass": "int4", "group_size": INT4_GROUP, "include_head": head_bits == "int4"})
    elif bits == "int8":
        passes.append({"pass": "int8", "activations": "bf16", "include_head": head_bits == "int8"})
    if head_bits and head_bits != bits:  # the head alone (the layers' linears are no plain linears by now)
        passes.append({"pass": "int4", "group_size": INT4_GROUP, "layers": [0, 0], "include_head": True}
                      if head_bits == "int4" else
                      {"pass": "int8", "activations": "bf16", "layers": [0, 0], "include_head": True})
    return passes
