"""A few rows through int4 weights on AVX-512 BF16 CPUs: ``splitglm_int4::int4_rows`` (``int4_rows.cpp``).

The compiled CPU decode path's int4 product (``Int4Linear`` inside ``runtime.cpu_decode`` graphs), for steps of
1 .. 16 rows. ATen's ``_weight_int4pack_mm_for_cpu`` stays the eager reference of a step's few rows. A
prompt's many rows (``quant.INT4_WIDE_ROWS``) take ``splitglm_int4::int4_widen_t`` instead: the weights widened
to two bf16 halves (hi + lo hold the stored weights to ~2^-17), then one bf16 product of [x, x] with them
(oneDNN: AMX or AVX-512 BF16), fp32 sums.
- Numerics: the row is rounded to bf16 as the eager kernel rounds it; the codes minus 8 are exact in bf16, so
  each product is exact (``vdpbf16ps``) and the sums are fp32: ``sum_g scale * sum (code - 8) x + zero * sum x``
  with the eager kernel's bf16 scales and zeros. The result stays fp32 (the eager kernel rounds it to bf16).
- Speed: the demo model's 180 products a token in 4.3-4.5 ms at 1 thread, 2.9-3.0 at 2, against 7.1 / 4.6 for
  ATen's kernel (``docs/benchmarks.md``, "The int4 products, a kernel of their own").
- Built once per torch version with the host's C++ compiler (the one Inductor needs), a few seconds, into
  torch's extension folder; without a compiler or AVX-512 BF16, ``available()`` is False and the graphs
  keep ATen's kernel.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

GROUP = 32  # the kernel's group of inputs; coarser groups are given as repeated group-32 scales
BLOCK = 16  # output rows per packed block
SOURCE = Path(__file__).with_name("int4_rows.cpp")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16")


# ---- layouts (pure) -------------------------------------------------------------------------------


def codes_of_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The (N, K) codes of ATen's CPU int4 packing (``_convert_weight_to_int4pack_for_cpu``), or None where
    this torch packs otherwise (checked by packing the codes again). Blocks of 64 outputs, per input 32
    bytes: output j's code in the low nibble of byte j, output j + 32's in the high one; the last N % 64
    outputs, per input, output 2j and 2j + 1 in byte j."""
    if n % 2 or packed.numel() * 2 != n * k:
        return None
    main, flat = n - n % 64, packed.reshape(-1).to(torch.int32)
    nib = flat[: main * k // 2].view(main // 64, k, 32)  # (N/64, K, 32)
    codes = torch.cat((nib & 15, nib >> 4), dim=-1).permute(0, 2, 1).reshape(main, k)  # (main, K)
    tail = flat[main * k // 2 :].view(k, (n - main) // 2)  # (K, rest / 2)
    tail = torch.stack((tail & 15, tail >> 4), dim=-1).view(k, n - main).t()  # (rest, K)
    codes = torch.cat((codes, tail))
    if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), packed):
        return None
    return codes


def pack_rows(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout: codes (N, K) in [0, 15], ATen's bf16 scales_zeros (K/g, N, 2) ->
    packed (N/16, K/4, 32) uint8, scales_zeros (N/16, K/32, 2, 16) bf16 (``int4_rows.cpp`` names the bytes)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // BLOCK, BLOCK, k // 4, 2, 2)  # (NB, 16 rows, K/4, low/high, j)
    packed = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 2, 1, 3).reshape(n // BLOCK, k // 4, 2 * BLOCK)
    sz = scales_zeros.repeat_interleave(group_size // GROUP, dim=0)  # (K/32, N, 2)
    sz = sz.view(k // GROUP, n // BLOCK, BLOCK, 2).permute(1, 0, 3, 2)  # (NB, K/32, 2, 16)
    return packed.contiguous(), sz.contiguous()


def reference(x: torch.Tensor, codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """What the kernel computes, in float64: x (M, K) rounded to bf16, times the weights from the bf16 scales
    and zeros (K/g, N, 2) -> (M, N)."""
    scale, zero = (t.t().double().repeat_interleave(group_size, 1) for t in scales_zeros.unbind(-1))  # (N, K)
    weight = (codes.double() - 8) * scale + zero
    return x.to(torch.bfloat16).double() @ weight.t()


# ---- the op ---------------------------------------------------------------------------------------


def int4_rows(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 through the packed weights -> (M, N) fp32 (``available()`` must be True)."""
    return torch.ops.splitglm_int4.int4_rows(x, packed, scales_zeros)


def widen_t(packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """ATen's CPU int4 packing (N % 64 == 0) and its bf16 (K/g, N, 2) scales and zeros -> W^T as two bf16
    halves stacked, (2K, N): hi = bf16(w), then lo = bf16(w - hi), w = ``(code - 8) * scale + zero`` in fp32,
    each rounded to nearest even (``available()`` must be True)."""
    return torch.ops.splitglm_int4.int4_widen_t(packed, scales_zeros, n, k, group_size)


def wide_product(x: torch.Tensor, widened: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded to bf16 through ``widen_t``'s (2K, N): [x, x] @ [hi; lo], one bf16 product with fp32
    sums, its result rounded to bf16 (as the int4 kernel rounds its own) -> (M, N) fp32."""
    xb = x.to(torch.bfloat16)
    return torch.mm(torch.cat((xb, xb), dim=1), widened).float()


@functools.cache
def available() -> bool:
    """Whether this host runs the kernel: AVX-512 BF16 and the library built (once) and loaded."""
    if not torch.cpu._is_avx512_bf16_supported():
        return False
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, RuntimeError) as e:
        logger.warning("the int4 row kernel is unavailable (ATen's int4 kernel serves instead): %r", e)
        return False
    torch.library.register_fake("splitglm_int4::int4_rows")(_fake)
    return True


def _fake(x, packed, scales_zeros):
    return x.new_empty(x.shape[0], packed.shape[0] * BLOCK)


def _build() -> Path:
    """The shared library, compiled unless a build of this source, these flags and this torch exists."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + torch.__version__.encode()).hexdigest()[:16]
    folder = Path(cpp_extension.get_default_build_root()) / "splitglm_int4"
    library = folder / f"int4_rows_{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [flag for p in cpp_extension.library_paths() for flag in (f"-L{p}", f"-Wl,-rpath,{p}")]
    partial = folder / f"{library.name}.{os.getpid()}"
    command = [os.environ.get("CXX", "c++"), *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE),
               "-o", str(partial), *libs, "-ltorch_cpu", "-lc10"]
    logger.info("building the int4 row kernel: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    partial.replace(library)  # atomic: another process never loads a half-written library
    return library
