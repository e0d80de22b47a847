"""Per-layer time and memory of a segment on the machine it runs on.

Times come from forward hooks around every decoder layer (and the
embedding and head) while the segment runs a real prefill and real decode
steps with its KV cache; medians over repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from runtime.segment import Segment, SegmentInput


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
