"""FP8 (E4M3) weights for the GPU engine: per-output-channel scales, and the products that use them.

A weight ``W`` (N, K) is stored as ``data`` = round(W / scale) in ``float8_e4m3fn`` and ``scale`` (N,) fp32,
the absolute maximum of each output row over E4M3's largest value (448), so ``W ~ data * scale[:, None]``.
Nothing is calibrated: the scales come from the weights alone (no text is tuned on).

- **Small batches** (the engine's short passes: decode, verification): weight-only. The skinny Triton product
  (``runtime.triton_ops.skinny_linear`` with ``scale=``) reads the FP8 bytes, widens them to the activations'
  bf16 in registers and multiplies each output column's fp32 sum by its scale: half the bytes of bf16.
- **Prompt chunks** (compute-bound): FP8 activations too, with one scale per row (per token), on the tensor
  cores through ``torch._scaled_mm`` (cuBLASLt, row-wise scaling; Hopper and Ada). Where that is missing, the
  weight is widened to bf16 for the product (correct, slower).

The LM head and the embedding stay bf16, as in vLLM's FP8 checkpoints: the head's error shows directly in the
logits, and the KV cache stays bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores and the E4M3 conversions Triton uses


@dataclass
class Fp8Weight:
    """An (N, K) weight in E4M3 with one fp32 scale per output row."""

    data: torch.Tensor  # (N, K) float8_e4m3fn, contiguous
    scale: torch.Tensor  # (N,) float32

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale[:, None]).to(dtype)


def quantize(weight: torch.Tensor, device=None) -> Fp8Weight:
    """``weight`` (N, K) -> E4M3 with per-output-row absmax scales (an all-zero row gets scale 1)."""
    w = weight.detach().to(device=device or weight.device, dtype=torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    data = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()
    return Fp8Weight(data, scale.contiguous())


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations (M, K) -> (E4M3 rows, (M, 1) fp32 scales), one scale per row (token). Shapes only: graph-safe."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def chunk_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) bf16 @ W.T (+ bias) -> (M, N) in x's dtype, FP8 x FP8 on the tensor cores where the card has them."""
    if _scaled_mm_ok(x.device):
        from runtime import triton_ops

        xq, xs = triton_ops.quantize_rows(x) if triton_ops.AVAILABLE else quantize_rows(x)
        out = torch._scaled_mm(xq, w.data.t(), scale_a=xs, scale_b=w.scale.view(1, -1), out_dtype=x.dtype)
        return out if bias is None else out + bias
    return torch.nn.functional.linear(x, w.dequantize(x.dtype), bias)


_SCALED_MM: dict[int, bool] = {}


def _scaled_mm_ok(device: torch.device) -> bool:
    """Whether row-wise scaled FP8 products run on this card (probed once per device, outside any capture)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SCALED_MM:
        ok = device.type == "cuda" and torch.cuda.get_device_capability(index) >= MIN_CAPABILITY
        if ok:
            try:
                a = torch.ones(16, 32, device=device).to(E4M3)
                b = torch.ones(16, 32, device=device).to(E4M3)
                one = torch.ones(16, 1, device=device)
                torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one.view(1, -1), out_dtype=torch.bfloat16)
            except (RuntimeError, AttributeError, TypeError):
                ok = False
        _SCALED_MM[index] = ok
    return _SCALED_MM[index]


def support_error(device: torch.device | None = None) -> str | None:
    """Why FP8 weights cannot run here, in words; None when they can."""
    if not torch.cuda.is_available():
        return ("fp8 weights need an NVIDIA GPU with FP8 support (compute capability 8.9 or later: Ada, Hopper); "
                "CUDA is not available on this machine")
    index = (device.index if device is not None and device.index is not None else torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (f"fp8 weights need compute capability 8.9 or later (Ada, Hopper); {name} has "
                f"{capability[0]}.{capability[1]}")
    return None
