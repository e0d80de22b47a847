"""The CPU decode path: a segment's decoder layers compiled by Inductor, for steps of a few rows.

A one-position step of a small model on a CPU is dominated by dispatch, not by bytes: the demo model's 30
layers are ~2000 small eager ops a token (``docs/benchmarks.md``, "CPU decode"). ``CompiledLayers`` runs the
same modules through ``torch.compile`` (Inductor's C++ backend): the norms, rotary, residuals and the MLP's
gate fuse into a few C++ loops per layer, and the linears (fp32, int8 or int4) stay the same ATen kernels.
Attention stays the eager ``PoolAttention`` -- the KV pool, its pages, forks and rewinds unchanged --
called from the graph as one opaque custom op per layer, so the graph is the same whatever the sessions'
lengths.

- Steps of 1 .. ``max_rows`` rows take the compiled graph (a decode step, the edge relay's batch of decode
  rows, a verification step); longer steps (prompt chunks) run the eager layers, which are already fast.
- Two graphs: one row (the usual decode step), and 2 .. ``max_rows`` rows (one dynamic shape).
- ``warm_up`` compiles both at load, so no request waits: ~40 s for the demo model's 30 layers on 2 cores
  the first time, a few seconds once Inductor's on-disk caches hold the kernels and graphs.
- The eager layers are the reference: tests hold the compiled path to their logits and greedy tokens.
  Compile after the compression passes (guards on the modules are skipped: a module replaced later is
  not seen).
"""

from __future__ import annotations

import logging
import threading
import time
import types
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 16  # rows a step may hold to take the compiled graph
CPU_DECODE_MODES = ("eager", "compiled")

_active = threading.local()  # the step context of the step this thread runs (``CompiledLayers.__call__``)


@torch.library.custom_op("splitglm::pool_attend", mutates_args=())
def pool_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """Attention of ``layer`` in this thread's step: store k, v (N, K, D), attend q (N, H, D) -> (N, H, D)."""
    return _active.ctx.attend(layer, q, k, v)


@pool_attend.register_fake
def _pool_attend_shape(q, k, v, layer):
    return torch.empty_like(q)


class _GraphStep:
    """The step context seen inside the graph: the rotary angles are graph inputs, attention is the op."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin  # (N, 1, R/2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.splitglm.pool_attend(q, k, v, layer)


class _NoAttention:
    """A step context for compiling only: attention gives zeros and stores nothing."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(q)


@dataclass(frozen=True)
class CpuDecode:
    """A tier's choice of decode path (its agent's ``cpu_decode`` settings)."""

    mode: str = "eager"  # one of CPU_DECODE_MODES
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self):
        if self.mode not in CPU_DECODE_MODES:
            raise ValueError(f"cpu_decode must be one of {CPU_DECODE_MODES}, got {self.mode!r}")

    @classmethod
    def of(cls, settings) -> CpuDecode:
        """From an agent's settings (``runtime.settings.CpuDecodeSettings``)."""
        return cls(settings.cpu_decode, settings.cpu_decode_max_rows)

    def apply(self, segment) -> None:
        """Compile a PyTorch CPU segment's steps when the mode says so; anything else stays as it is. A compiler
        failure (no C++ compiler on the host) is logged and leaves the segment eager."""
        if self.mode != "compiled" or not hasattr(segment, "compile_decode"):
            return
        weight = next(iter(segment.parameters()), None)
        if weight is not None and weight.device.type != "cpu":
            return
        try:
            segment.compile_decode(self.max_rows)
        except Exception as e:  # noqa: BLE001 -- Inductor raises many kinds; the eager path still serves
            segment.compiled = None
            logger.warning("the compiled CPU decode path is unavailable, running eager: %r", e)


class CompiledLayers:
    """Decoder layers in order, run as one compiled graph for steps of 1 .. ``max_rows`` rows."""

    def __init__(self, layers: list[nn.Module], max_rows: int = DEFAULT_MAX_ROWS):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.layers, self.max_rows = list(layers), max_rows
        # Dynamo keeps its graphs on the code object, and the guards on the modules (a fifth of a step's time
        # at one thread) are skipped: so each instance compiles a code object of its own
        run = types.FunctionType(CompiledLayers._run.__code__.replace(), globals(), "_run")
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._compiled = torch.compile(types.MethodType(run, self), options=options)
        self.compile_s: float | None = None  # what ``warm_up`` took

    def _run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx = _GraphStep(cos, sin)
        for layer in self.layers:
            x = layer(x, ctx)  # (N, C)
        return x

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether a step's rows (N, C) take the compiled graph."""
        return x.device.type == "cpu" and 1 <= x.shape[0] <= self.max_rows

    def __call__(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The layers on a step's rows (N, C), attending through ``ctx`` (a ``runtime.layers.StepContext``)."""
        _active.ctx = ctx
        try:
            return self._compiled(x, ctx.cos, ctx.sin)
        finally:
            _active.ctx = None

    @torch.inference_mode()
    def warm_up(self, hidden_size: int, rotary_dim: int, dtype: torch.dtype = torch.float32) -> float:
        """Compile both graphs now (steps of one row, and of several); the seconds it took."""
        began = time.perf_counter()
        for rows in sorted({1, min(2, self.max_rows)}):
            x = torch.zeros(rows, hidden_size, dtype=dtype)
            angles = torch.zeros(rows, 1, rotary_dim // 2)
            ctx = _NoAttention()
            ctx.cos, ctx.sin = angles.cos(), angles.sin()
            self(x, ctx)
        self.compile_s = time.perf_counter() - began
        logger.info("compiled %d decoder layers for CPU steps of up to %d rows in %.1f s",
                    len(self.layers), self.max_rows, self.compile_s)
        return self.compile_s
