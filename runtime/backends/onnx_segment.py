"""Run an exported segment with ONNX Runtime behind the same interface as ``Segment``.

Each session's KV cache lives here as numpy arrays, one (1, K, P, D) pair per
layer; every call feeds the past and keeps the present the graph returns.
Sessions in one call run one after another. ONNX Runtime takes its past as
dense inputs, so unlike the PyTorch pool a rewind here truncates (copies) the
arrays; the steps are checked by the same ``runtime.step`` rules. For the same reason a fork (several
completions of one prompt) copies the source's arrays instead of sharing them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.backends.onnx_export import FORMAT_VERSION, META_FILE
from runtime.checkpoint import GlmSpec
from runtime.kv_pool import check_fork
from runtime.step import SegmentInput, check_continues, check_items, output_rows, sample_outputs

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
        if session_id in self.sessions:
            raise ValueError(f"session {session_id!r} is already open")
        self.sessions[session_id] = OnnxCache(
            keys={i: empty for i in self.layer_ids}, values={i: empty for i in self.layer_ids}
        )

    def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def cached_length(self, session_id: str) -> int:
        return self.sessions[session_id].length

    def fork_session(self, src: str, dst: str, length: int, reserve: int = 0) -> None:
        """Start the new session ``dst`` from a copy of ``src``'s cached positions [0, length) (SessionError:
        no such source, too few positions or ``dst`` exists); ``reserve`` is ignored, as in ``reserve``."""
        source = self.sessions.get(src)
        check_fork(None if source is None else source.length, src, dst, dst in self.sessions, length)
        self.sessions[dst] = OnnxCache(keys={i: a[:, :, :length].copy() for i, a in source.keys.items()},
                                       values={i: a[:, :, :length].copy() for i, a in source.values.items()},
                                       length=length)

    def reserve(self, session_id: str, positions: int) -> None:
        """Open the session (ONNX caches grow per step: there is no pool to reserve in)."""
        if session_id not in self.sessions:
            self.open_session(session_id)

    # ---- compute --------------------------------------------------------------------------------

    def __call__(self, items: list[SegmentInput], last_only: bool = False) -> list:
        """Per session its hidden states (T, C), or with the head logits (T, V) ((1, V) if ``last_only``),
        or a ``Sampled`` for a session that asks to sample."""
        check_items(items, self.spec, self.has_embed, self.has_head, self.start)  # before any cache changes
        for item in items:
            cache = self.sessions.get(item.session_id)
            check_continues(item.session_id, item.start_pos, None if cache is None else cache.length)
        for item in items:
            if item.session_id not in self.sessions:
                self.open_session(item.session_id)
            self.sessions[item.session_id].truncate(item.start_pos)  # a rewind drops what followed, even on failure
        out = [self._run_one(self.sessions[item.session_id], item) for item in items]
        if not self.has_head:
            return out
        keep = [rows.stop - rows.start for rows in output_rows(items, [0] * len(items), last_only)]
        return sample_outputs(items, [rows[rows.shape[0] - k :] for rows, k in zip(out, keep)])

    forward = __call__

    def _rows(self, item: SegmentInput) -> np.ndarray:
        """The graph's first input for one session: input_ids (1, T) int64 or hidden (1, T, C) float32."""
        if self.has_embed:
            return item.input_ids.detach().cpu().long().numpy().reshape(1, -1)  # (1, T)
        return item.hidden.detach().cpu().float().numpy()[None]  # (1, T, C)

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
