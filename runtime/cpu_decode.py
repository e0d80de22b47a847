"""The CPU decode path: a segment's decoder layers compiled by Inductor, for steps of a few rows.

A one-position step of a small model on a CPU is dominated by dispatch, not by bytes: the demo model's 30
layers are ~2000 small eager ops a token (``docs/benchmarks.md``, "CPU decode"). ``CompiledLayers`` runs the
same modules through ``torch.compile`` (Inductor's C++ backend): the norms, rotary, residuals and the MLP's
gate fuse into a few C++ loops per layer; fp32 and int8 linears stay the same ATen kernels, and int4 ones
take the row kernel (``runtime.compress.int4_rows``: AVX-512 BF16, where the host has it; exact in fp32 on
the bf16-rounded row, where ATen's kernel also rounds its result to bf16).
The KV pool, its pages, forks and rewinds are unchanged: a decode step of one session attends inside the
graph to a view of its cached keys; a step of several rows calls the eager ``PoolAttention`` from the
graph, one opaque custom op per layer, so the graph is the same whatever the sessions' lengths.

- A segment with the head also runs its final norm and LM head on one row as a graph (``CompiledHead``): a
  weight-only int8 head becomes one Inductor loop over its int8 weights (``Int8Linear.one_row``), twice as
  fast as the eager kernel on the demo model's 49152 x 576 head, and exact in fp32 where the eager kernel
  rounds to bf16. Several rows (verification) take the eager head.
- Steps of 1 .. ``max_rows`` rows take a compiled graph (a decode step, the edge relay's batch of decode
  rows, a verification step); longer steps (prompt chunks) run the eager layers, which are already fast.
- Two graphs (``CompiledLayers``): one session's decode row, its attention inside the graph; and 2 ..
  ``max_rows`` rows, attention through the op.
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
PLANNED = "plan"  # an agent's setting: the path its plan chose for the tier (``CpuDecode.for_plan``)

# No size and stride check after each extern kernel of the graph (the int4 / int8 products, the attention op):
# ~840 Python calls a token of the demo model, a third of the wrapper's own calls. The shapes are fixed.
INDUCTOR_OPTIONS: dict = {"size_asserts": False}
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

    mode: str = "eager"  # one of CPU_DECODE_MODES, or PLANNED
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self):
        if self.mode not in (*CPU_DECODE_MODES, PLANNED):
            raise ValueError(f"cpu_decode must be one of {(*CPU_DECODE_MODES, PLANNED)}, got {self.mode!r}")

    @classmethod
    def of(cls, settings) -> CpuDecode:
        """From an agent's settings (``runtime.settings.CpuDecodeSettings``)."""
        return cls(settings.cpu_decode, settings.cpu_decode_max_rows)

    def for_plan(self, planned: str | None) -> CpuDecode:
        """This choice for a tier whose plan chose ``planned`` (plan.json's ``cpu_decode``; None: eager): PLANNED
        takes the plan's, a named mode overrides it."""
        if self.mode != PLANNED:
            return self
        return CpuDecode(planned or "eager", self.max_rows)

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


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """One new row attending to its session's L cached keys and to itself: q (1, H, D), k, v (1, K, D),
    keys, values (L, K, D) -> (1, H, D). Written as products and sums, so Inductor fuses it into a few loops."""
    K, D = k.shape[1], k.shape[2]
    qg = q.view(K, -1, 1, D)  # (K, G, 1, D): query head h reads kv head h // G
    old = (qg * keys.permute(1, 0, 2)[:, None]).sum(-1)  # (K, G, L)
    new = (qg[:, :, 0] * k.view(K, 1, D)).sum(-1, keepdim=True)  # (K, G, 1)
    probs = (torch.cat((old, new), dim=-1).float() * scale).softmax(dim=-1).to(q.dtype)  # (K, G, L + 1)
    out = (probs[..., :-1, None] * values.permute(1, 0, 2)[:, None]).sum(-2)  # (K, G, D)
    return (out + probs[..., -1:] * v.view(K, 1, D)).reshape(1, -1, D)


class _OneSession:
    """The step context inside the one-session graph: the session's cached keys are graph inputs, and the new
    row's keys and values are collected, to be written into the pool once the graph has run."""

    def __init__(self, cos, sin, keys, values, first_layer: int, scale: float):
        self.cos, self.sin = cos, sin  # (1, 1, R/2)
        self.keys, self.values = keys, values  # (layers, L, K, D)
        self.first_layer, self.scale = first_layer, scale
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        i = layer - self.first_layer
        self.new_k.append(k)
        self.new_v.append(v)
        return attend_cached(q, k, v, self.keys[i], self.values[i], self.scale)


def _cached(flat: torch.Tensor, cached: slice) -> torch.Tensor:
    """Every layer's keys (or values) of the cached slots: (layers, S, K, D) -> a (layers, L, K, D) view, L
    marked dynamic (one graph whatever the session's length)."""
    view = flat[:, cached]
    torch._dynamo.mark_dynamic(view, 1)
    return view


def _own_code(method) -> types.FunctionType:
    """A copy of ``method``'s function with a code object of its own: Dynamo keeps its graphs on the code
    object, and the guards on the modules are skipped (a fifth of a step's time at one thread), so each
    ``CompiledLayers`` must compile its own."""
    return types.FunctionType(method.__code__.replace(), globals(), method.__name__)


# The head's graph writes the normed row (C floats) before the product reads it: left to its default, Inductor
# inlines the norm into the product's loop and recomputes it for each of the V outputs (5.5 ms against 2.4 ms
# on the demo model's head at one thread).
HEAD_OPTIONS: dict = {"realize_cpu_opcount_threshold": 0}


def use_row_kernels(*modules: nn.Module, on: bool = True) -> int:
    """Let the int4 linears in ``modules`` take the row kernel inside the graphs compiled from now on, or ATen's
    kernel (``on`` False); how many take the row kernel. (``Int4Linear.use_row_kernel``, found by name:
    ``runtime.compress`` imports the segment, which imports this module.)"""
    return sum(m.use_row_kernel(on) for root in modules for m in root.modules() if hasattr(m, "use_row_kernel"))


def _compile(method, owner, **options) -> types.MethodType:
    """``method`` of ``owner`` through ``torch.compile``, on code of its own, the guards on modules skipped."""
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, **INDUCTOR_OPTIONS, **options}
    return torch.compile(types.MethodType(_own_code(method), owner), options=options)


class CompiledHead:
    """A segment's final norm and LM head on one row, as one compiled graph: (1, C) -> logits (1, V).

    The head's one-row product is its ``one_row`` where it has one (``Int8Linear``: a loop over the int8
    weights, exact in fp32), else its ``forward`` (an fp32 or int4 head: the same ATen kernel as eagerly).
    """

    def __init__(self, norm: nn.Module, head: nn.Module, int4_rows: bool = True):
        self.norm, self.product = norm, getattr(head, "one_row", head)
        use_row_kernels(head, on=int4_rows)
        self._one = _compile(CompiledHead._run, self, **HEAD_OPTIONS)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(self.norm(x))  # (1, C) -> (1, V)

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The logits of one row (1, C); None for any other number of rows (the caller runs the eager head)."""
        if x.device.type != "cpu" or x.shape[0] != 1:
            return None
        return self._one(x)


class CompiledLayers:
    """Decoder layers in order, run as compiled graphs for steps of 1 .. ``max_rows`` rows.

    - One session's one new row (a decode step): attention inside the graph, against the session's cached
      keys given as one (layers, L, K, D) view of the pool (L dynamic); the new keys and values come out
      of the graph and are written into the pool with one copy for all layers.
    - 2 .. ``max_rows`` rows (several sessions, drafts): attention through the pool's own code, one custom
      op per layer (N dynamic).
    - Anything else (a session's first row, keys spread over several pool runs) runs eagerly.
    - ``head``: the segment's norm and LM head on one row (``CompiledHead``), where it has them.
    - ``int4_rows``: int4 linears take the row kernel (``runtime.compress.int4_rows``) where the host runs it;
      False: ATen's kernel, as eagerly (the A/B of ``splitglm bench cpu``'s ``compiled-aten``).
    """

    def __init__(self, layers: list[nn.Module], first_layer: int, scale: float, max_rows: int = DEFAULT_MAX_ROWS,
                 head: CompiledHead | None = None, int4_rows: bool = True):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.layers, self.first_layer, self.scale, self.max_rows = list(layers), first_layer, scale, max_rows
        self.head = head
        self.int4_rows = int4_rows
        self.row_kernels = use_row_kernels(*self.layers, on=int4_rows)  # int4 linears on the row kernel
        self._one = _compile(CompiledLayers._run_one, self)
        self._rows = _compile(CompiledLayers._run_rows, self)
        self.compile_s: float | None = None  # what ``warm_up`` took

    def _run_one(self, x, cos, sin, keys, values):
        ctx = _OneSession(cos, sin, keys, values, self.first_layer, self.scale)
        for layer in self.layers:
            x = layer(x, ctx)  # (1, C)
        return x, torch.stack(ctx.new_k), torch.stack(ctx.new_v)  # (1, C), 2 x (layers, 1, K, D)

    def _run_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx = _GraphStep(cos, sin)
        for layer in self.layers:
            x = layer(x, ctx)  # (N, C)
        return x

    def run(self, x: torch.Tensor, ctx) -> torch.Tensor | None:
        """The layers on a step's rows (N, C) through ``ctx`` (a ``runtime.attention.PoolAttention``); None
        where the step is not one the graphs take (the caller runs it eagerly)."""
        if x.device.type != "cpu" or not 1 <= x.shape[0] <= self.max_rows:
            return None
        if x.shape[0] > 1:
            return self._through_op(self._rows, x, ctx, dims=(0,))
        batch = ctx.batch
        runs, start = batch.runs[0], batch.items[0].start_pos
        if len(runs) != 1 or start < 2:  # a first row, or keys in several runs: eager
            return None
        pool, slot = ctx.pool, int(batch.slots[0])
        kflat, vflat = (t.view(t.shape[0], -1, *t.shape[-2:]) for t in (pool.k, pool.v))  # (layers, S, K, D)
        cached = slice(runs[0][0], runs[0][0] + start)
        x, new_k, new_v = self._one(x, ctx.cos, ctx.sin, _cached(kflat, cached), _cached(vflat, cached))
        kflat[:, slot] = new_k[:, 0]
        vflat[:, slot] = new_v[:, 0]
        return x

    @staticmethod
    def _through_op(compiled, x, ctx, dims=()):
        for t in (x, ctx.cos, ctx.sin):
            for d in dims:
                torch._dynamo.mark_dynamic(t, d)
        _active.ctx = ctx
        try:
            return compiled(x, ctx.cos, ctx.sin)
        finally:
            _active.ctx = None

    @torch.inference_mode()
    def warm_up(self, hidden_size: int, rotary_dim: int, kv_shape: tuple[int, int],
                dtype: torch.dtype = torch.float32) -> float:
        """Compile the graphs now (the head's too); the seconds it took. ``kv_shape``: (K, D) of the keys."""
        began = time.perf_counter()
        if self.head is not None:
            self.head.run(torch.zeros(1, hidden_size, dtype=dtype))
        if not self.layers:
            self.compile_s = time.perf_counter() - began
            return self.compile_s
        angles = torch.zeros(2, 1, rotary_dim // 2)
        cos, sin = angles.cos(), angles.sin()
        pool = torch.zeros(len(self.layers), 8, *kv_shape, dtype=dtype)  # (layers, S, K, D)
        self._one(torch.zeros(1, hidden_size, dtype=dtype), cos[:1], sin[:1], _cached(pool, slice(2, 6)),
                  _cached(pool, slice(1, 5)))
        if self.max_rows > 1:
            ctx = _NoAttention()
            ctx.cos, ctx.sin = cos, sin
            self._through_op(self._rows, torch.zeros(2, hidden_size, dtype=dtype), ctx, dims=(0,))
        self.compile_s = time.perf_counter() - began
        logger.info("compiled %d decoder layers%s for CPU steps of up to %d rows in %.1f s",
                    len(self.layers), " and the head" if self.head is not None else "", self.max_rows, self.compile_s)
        return self.compile_s
