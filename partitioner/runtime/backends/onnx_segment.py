"""Run an exported segment with ONNX Runtime behind the same interface as ``Segment``.

Each session's KV cache lives here as numpy arrays, one (1, K, P, D) pair per
layer; every call feeds the past and keeps the present the graph returns.
Sessions in one call run one after another.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from partitioner.runtime.backends.onnx_export import FORMAT_VERSION, META_FILE
from partitioner.runtime.checkpoint import GlmSpec
from partitioner.runtime.segment import SegmentInput, SessionError, continue_session

logger = logging.getLogger(__name__)


@dataclass
class OnnxCache:
    """One session's keys and values: layer -> (1, K, P, D) arrays, P = ``length``."""

    keys: dict[int, np.ndarray] = field(default_factory=dict)
    values: dict[int, np.ndarray] = field(default_factory=dict)
    length: int = 0

    def truncate(self, length: int) -> None:
        """Drop positions from ``length`` on (a retried or replayed step)."""
        if length == self.length:
            return
        for store in (self.keys, self.values):
            for i, a in store.items():
                store[i] = np.ascontiguousarray(a[:, :, :length])
        self.length = length

    def nbytes(self) -> int:
        return sum(a.nbytes for store in (self.keys, self.values) for a in store.values())


def load_meta(folder: str | os.PathLike) -> dict:
    """Read and check ``segment.json`` of an exported segment folder."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {META_FILE}: not an exported ONNX segment")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this splitglm reads format {FORMAT_VERSION}")
    return meta


def _session_options(threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile_prefix:  # onnxruntime's per-node trace (JSON), written by ``session.end_profiling()``
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxSegment:
    """An exported segment run by ONNX Runtime; call it like ``Segment``.

    ``profile_prefix``: turn on onnxruntime's profiling, its trace file named from this prefix.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        precision: str = "fp32",
        threads: int | None = None,
        profile_prefix: str | None = None,
    ):
        import onnxruntime as ort

        meta = load_meta(folder)
        if precision not in meta["models"]:
            raise ValueError(f"{str(folder)!r} has no {precision!r} model, only {sorted(meta['models'])}")
        spec = dict(meta["spec"], eos_token_ids=tuple(meta["spec"]["eos_token_ids"]))
        self.spec = GlmSpec(**spec)
        self.start, self.end = meta["start"], meta["end"]
        self.has_embed, self.has_head = meta["embed"], meta["head"]
        self.precision = precision
        self.layer_ids = list(range(self.start, self.end))
        self.input_names, self.output_names = meta["inputs"], meta["outputs"]
        model = str(Path(folder) / meta["models"][precision])
        self.session = ort.InferenceSession(
            model, _session_options(threads, profile_prefix), providers=["CPUExecutionProvider"]
        )
        self.sessions: dict[str, OnnxCache] = {}

    # ---- sessions (the same rules as Segment) ---------------------------------------------------

    def open_session(self, session_id: str) -> None:
        empty = np.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=np.float32)  # (1, K, 0, D)
        self.sessions[session_id] = OnnxCache(
            keys={i: empty for i in self.layer_ids}, values={i: empty for i in self.layer_ids}
        )

    def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def cached_length(self, session_id: str) -> int:
        return self.sessions[session_id].length

    def _cache_for(self, item: SegmentInput) -> OnnxCache:
        """The session's cache, created at position 0, checked to continue where it left off."""
        return continue_session(self.sessions, item, self.open_session)

    # ---- compute --------------------------------------------------------------------------------

    def __call__(self, items: list[SegmentInput], last_only: bool = False) -> list[torch.Tensor]:
        """Per session its hidden states (T, C), or with the head logits (T, V); (1, V) if ``last_only``."""
        if len({item.session_id for item in items}) != len(items):
            raise SessionError("a batch holds at most one step per session")
        for item in items:
            self._rows(item)  # refuse a malformed batch before any cache changes
        caches = [self._cache_for(item) for item in items]
        for cache, item in zip(caches, items, strict=True):
            cache.truncate(item.start_pos)  # a rewind drops what followed, even if this pass fails
        out = [self._run_one(cache, item) for cache, item in zip(caches, items, strict=True)]
        if self.has_head and last_only:
            out = [rows[-1:] for rows in out]
        return out

    forward = __call__

    def _rows(self, item: SegmentInput) -> np.ndarray:
        """The graph's first input for one session: input_ids (1, T) int64 or hidden (1, T, C) float32."""
        if self.has_embed:
            if item.input_ids is None:
                raise ValueError("this segment starts with the embedding: give input_ids, not hidden states")
            return item.input_ids.detach().cpu().long().numpy().reshape(1, -1)  # (1, T)
        if item.hidden is None:
            raise ValueError(f"this segment starts at layer {self.start}: give hidden states")
        rows = item.hidden
        if rows.ndim != 2 or rows.shape[1] != self.spec.hidden_size:
            raise ValueError(f"hidden states must be (T, {self.spec.hidden_size}), got {tuple(rows.shape)}")
        return rows.detach().cpu().float().numpy()[None]  # (1, T, C)

    def _run_one(self, cache: OnnxCache, item: SegmentInput) -> torch.Tensor:
        """One session's new rows through the graph; the cache takes the presents."""
        feed = {
            self.input_names[0]: self._rows(item),
            "position_offset": np.array([item.start_pos], dtype=np.int64),
        }
        for i in self.layer_ids:
            feed[f"past_key_{i}"], feed[f"past_value_{i}"] = cache.keys[i], cache.values[i]  # (1, K, P, D)
        out, *presents = self.session.run(self.output_names, feed)
        for j, i in enumerate(self.layer_ids):
            cache.keys[i], cache.values[i] = presents[2 * j], presents[2 * j + 1]  # (1, K, P + T, D)
        cache.length = item.start_pos + item.num_positions
        return torch.from_numpy(out[0])  # (T, C) or (T, V)
