"""Per-layer time and memory of a segment on the machine it runs on, and whole steps of segments side by side.

Times come from forward hooks around every decoder layer (and the
embedding and head) while the segment runs a real prefill and real decode
steps with its KV cache; medians over repeats. ``step_times`` times whole
steps of several segments taking turns (the fast tail's candidates, the two
CPU decode paths of ``decode_paths``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runtime.segment import Segment, SegmentInput

logger = logging.getLogger(__name__)


@dataclass
class StageCost:
    prefill_ms_per_token: float  # prefill time / prompt tokens
    decode_ms: float  # one decode step (one new position)
    weight_bytes: int


@dataclass
class Profile:
    model: str
    backend: str
    compression: str
    threads: int
    machine: str
    hidden_size: int
    kv_bytes_per_token_per_layer: int
    layers: dict[int, StageCost] = field(default_factory=dict)  # by global layer index
    embed: StageCost | None = None
    head: StageCost | None = None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        stage = lambda d: StageCost(**d) if d else None  # noqa: E731
        layers = {int(k): StageCost(**v) for k, v in data["layers"].items()}
        return cls(**{**data, "layers": layers, "embed": stage(data["embed"]), "head": stage(data["head"])})


class _Stopwatch:
    """Forward hooks that add each module's wall time to a named bucket."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.totals: dict[str, float] = {name: 0.0 for name in modules}
        self._started: dict[str, float] = {}
        self._handles = []
        self.cuda = any(p.is_cuda for m in modules.values() for p in m.parameters())
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self._sync()
            self._started[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, out):
            self._sync()
            self.totals[name] += time.perf_counter() - self._started[name]

        return hook

    def _sync(self) -> None:
        """On a GPU, wait for the queued kernels: wall time then covers the module's own work."""
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _timed_modules(segment: Segment) -> dict[str, torch.nn.Module]:
    modules = {str(i): layer for i, layer in segment.layers.items()}
    if segment.has_embed:
        modules["embed"] = segment.embed_tokens
    if segment.has_head:
        modules["head"] = segment.lm_head  # the final norm is negligible
    return modules


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _one_run(segment: Segment, watch: _Stopwatch, prompt: int, steps: int) -> tuple[dict, dict]:
    """Time a prefill of ``prompt`` positions and ``steps`` decode steps of one session."""
    session = uuid.uuid4().hex
    C = segment.spec.hidden_size

    def item(start: int, n: int) -> SegmentInput:
        if segment.has_embed:
            return SegmentInput(session, start, input_ids=torch.randint(0, segment.spec.vocab_size, (n,)))
        return SegmentInput(session, start, hidden=torch.randn(n, C))

    try:
        watch.reset()
        segment([item(0, prompt)])
        prefill = {k: v * 1000 / prompt for k, v in watch.totals.items()}
        watch.reset()
        for s in range(steps):
            segment([item(prompt + s, 1)], last_only=True)
        decode = {k: v * 1000 / steps for k, v in watch.totals.items()}
    finally:
        segment.close_session(session)
    return prefill, decode


def profile_segment(
    segment: Segment,
    model: str,
    threads: int = 2,
    prompt_tokens: int = 128,
    decode_steps: int = 16,
    repeats: int = 3,
    backend: str = "torch",
    compression: str = "none",
) -> Profile:
    """Measure every stage of ``segment`` at ``threads`` threads (one warm-up run, then medians)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    modules = _timed_modules(segment)
    watch = _Stopwatch(modules)
    try:
        _one_run(segment, watch, min(prompt_tokens, 16), 2)  # warm-up
        runs = [_one_run(segment, watch, prompt_tokens, decode_steps) for _ in range(repeats)]
    finally:
        watch.remove()
        torch.set_num_threads(previous)
    spec = segment.spec
    kv_bytes = 2 * spec.num_kv_heads * spec.head_dim * next(segment.parameters()).element_size()
    profile = Profile(
        model, backend, compression, threads, platform.processor() or platform.machine(), spec.hidden_size, kv_bytes
    )
    for name, module in modules.items():
        cost = StageCost(
            prefill_ms_per_token=statistics.median(p[name] for p, _ in runs),
            decode_ms=statistics.median(d[name] for _, d in runs),
            weight_bytes=_weight_bytes(module),
        )
        if name == "embed":
            profile.embed = cost
        elif name == "head":
            profile.head = cost
        else:
            profile.layers[int(name)] = cost
    return profile


# ---- whole steps, side by side ------------------------------------------------------------------


def _session_times(segment: Segment, prompt: int, steps: int) -> tuple[float, float]:
    """One session: (prefill ms per position, mean decode step ms) of random hidden states."""
    session, C = uuid.uuid4().hex, segment.spec.hidden_size
    try:
        start = time.perf_counter()
        segment([SegmentInput(session, 0, hidden=torch.randn(prompt, C))], last_only=True)
        middle = time.perf_counter()
        for s in range(steps):
            segment([SegmentInput(session, prompt + s, hidden=torch.randn(1, C))], last_only=True)
        end = time.perf_counter()
    finally:
        segment.close_session(session)
    return (middle - start) * 1000 / prompt, (end - middle) * 1000 / steps


def step_times(
    segments: dict[str, Segment], threads: int = 1, rounds: int = 5, prompt: int = 64, steps: int = 8
) -> dict[str, dict]:
    """Each segment's decode step (ms, head included) and prefill/replay cost per position (ms).

    The segments take turns (one session each per round) and each keeps its fastest round, so a busy
    machine slows them alike and its bursts drop out (noise only ever adds time).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = {name: (math.inf, math.inf) for name in segments}
    try:
        for _ in range(rounds):
            for name, segment in segments.items():
                prefill, step = _session_times(segment, prompt, steps)
                best[name] = (min(best[name][0], prefill), min(best[name][1], step))
    finally:
        torch.set_num_threads(previous)
    return {
        name: {"step_ms": round(step, 4), "prefill_ms_per_token": round(prefill, 4), "threads": threads}
        for name, (prefill, step) in best.items()
    }


def decode_paths(eager: Segment, compiled: Segment, threads: int, rounds: int = 3, steps: int = 8) -> dict:
    """One decode step of the same layers (and head, where the segments have one: a fast tail's compiled head
    included) eager and compiled (``runtime.cpu_decode``), ms, taking turns:
    ``{"layers", "threads", "eager_ms", "compiled_ms"}`` (``compiled_ms`` None where it does not compile here).
    ``compiled`` is compiled at ``threads`` threads here (Inductor's kernels keep the thread count they were
    built at)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    segments = {"eager": eager, "compiled": compiled}
    try:
        compiled.compile_decode(max_rows=1)  # one session's decode row: the step the plan predicts
    except Exception as e:  # noqa: BLE001 -- as runtime.cpu_decode.CpuDecode.apply: e.g. no C++ compiler here
        logger.warning("the compiled CPU decode path is unavailable here, timing eager only: %r", e)
        del segments["compiled"]
    finally:
        torch.set_num_threads(previous)
    times = step_times(segments, threads, rounds, prompt=16, steps=steps)
    return {"layers": eager.end - eager.start, "threads": threads, "eager_ms": times["eager"]["step_ms"],
            "compiled_ms": times["compiled"]["step_ms"] if "compiled" in times else None}


def faster_compiled(measured: dict | None) -> bool:
    """Whether a side-by-side timing (``decode_paths``) found the compiled step the shorter."""
    return bool(measured) and measured["compiled_ms"] is not None and measured["compiled_ms"] < measured["eager_ms"]
