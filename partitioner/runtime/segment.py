"""A segment: [embedding +] decoder layers [a, b) [+ final norm + LM head], with per-session KV caches.

One ``forward`` call serves many sessions at once, each with its own number
of new positions and its own cache length (prefill and decode mixed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from partitioner.runtime.checkpoint import GlmSpec, load_spec, load_tensors
from partitioner.runtime.kvcache import KVCache
from partitioner.runtime.layers import AttentionBatch, DecoderLayer, RMSNorm, rotary_cos_sin


class SessionError(ValueError):
    """A request names an unknown session or a position that does not follow its cache."""


@dataclass
class SegmentInput:
    """New positions of one session: token ids for a segment with the embedding, else hidden states."""

    session_id: str
    start_pos: int  # absolute position of the first new row; < cached length rewinds (retry / replay)
    hidden: torch.Tensor | None = None  # (T, C)
    input_ids: torch.Tensor | None = None  # (T,)

    @property
    def num_positions(self) -> int:
        rows = self.input_ids if self.input_ids is not None else self.hidden
        return int(rows.shape[0])


class Segment(nn.Module):
    def __init__(self, spec: GlmSpec, start: int, end: int, embed: bool = False, head: bool = False):
        super().__init__()
        if not 0 <= start <= end <= spec.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is not within the model's {spec.num_layers} layers")
        self.spec, self.start, self.end = spec, start, end
        self.has_embed, self.has_head = embed, head
        if embed:
            self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(spec, i) for i in range(start, end)})
        if head:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.sessions: dict[str, KVCache] = {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        start: int,
        end: int,
        embed: bool = False,
        head: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Segment:
        """Build the segment and load only its own weights from a local checkpoint."""
        spec = load_spec(path)
        with torch.device("meta"):
            segment = cls(spec, start, end, embed, head)
        wanted = set(segment.state_dict())
        tied = head and "lm_head.weight" in wanted and spec.tie_word_embeddings
        tensors = load_tensors(
            path, lambda name: _local_name(name) in wanted or (tied and name.endswith("embed_tokens.weight"))
        )
        state = {_local_name(k): v.to(dtype) for k, v in tensors.items()}
        if tied:
            state.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"].to(dtype))
        state = {k: v for k, v in state.items() if k in wanted}
        missing = wanted - set(state)
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        segment.load_state_dict(state, assign=True)
        return segment.eval()

    def view(self, start: int, end: int) -> Segment:
        """Layers [start, end) of this segment as a segment of their own, sharing the weights (no copy).

        Its sessions and KV caches are its own: e.g. an edge holding [0, k2)
        runs [k1, k2) for device frames and all of [0, k2) for HTTP clients.
        """
        if not self.start <= start <= end <= self.end:
            raise ValueError(f"layers [{start}, {end}) are not within this segment's [{self.start}, {self.end})")
        part = Segment(self.spec, start, start)
        part.end = end
        part.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in range(start, end)})
        return part.eval()

    # ---- sessions -------------------------------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        self.sessions[session_id] = KVCache(
            range(self.start, self.end),
            self.spec.num_kv_heads,
            self.spec.head_dim,
            self._dtype(),
            device=self._device(),
        )

    def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def cached_length(self, session_id: str) -> int:
        return self.sessions[session_id].length

    def _device(self) -> torch.device:
        return next(self.parameters()).device if len(list(self.parameters())) else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype if len(list(self.parameters())) else torch.float32

    def _cache_for(self, item: SegmentInput) -> KVCache:
        """The session's cache, created at position 0, checked to continue where it left off."""
        return continue_session(self.sessions, item, self.open_session)

    # ---- compute --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, items: list[SegmentInput], last_only: bool = False) -> list[torch.Tensor]:
        """Run every session's new positions in one pass.

        Returns per session its hidden states (T, C), or with the head its
        logits (T, V) -- only the last position's (1, V) when ``last_only``.
        """
        if not items:
            return []
        if len({item.session_id for item in items}) != len(items):
            raise SessionError("a batch holds at most one step per session")
        caches = [self._cache_for(item) for item in items]
        lengths = [item.num_positions for item in items]
        starts = [item.start_pos for item in items]
        x = self._input_rows(items, max(lengths))  # (B, T, C)
        for cache, start, n in zip(caches, starts, lengths):
            cache.length = start  # a rewind drops what followed, even if this pass fails
            cache.reserve(start + n)
        batch = _attention_batch(caches, starts, lengths, self.spec, x.device)
        for layer in self.layers.values():
            x = layer(x, batch)
        for cache, start, n in zip(caches, starts, lengths):
            cache.length = start + n
        rows = [x[i, :n] for i, n in enumerate(lengths)]  # B x (T_i, C)
        if not self.has_head:
            return rows
        if last_only:
            rows = [r[-1:] for r in rows]
        logits = self.lm_head(self.norm(torch.cat(rows)))  # (sum T_i, V): one pass over the head for the batch
        return list(logits.split([r.shape[0] for r in rows]))  # B x (T_i, V)

    def _input_rows(self, items: list[SegmentInput], width: int) -> torch.Tensor:
        """Embed or take each session's rows, zero-padded to ``width`` positions: (B, T, C)."""
        x = torch.zeros(len(items), width, self.spec.hidden_size, dtype=self._dtype(), device=self._device())
        for i, item in enumerate(items):
            if self.has_embed:
                if item.input_ids is None:
                    raise ValueError("this segment starts with the embedding: give input_ids, not hidden states")
                rows = self.embed_tokens(item.input_ids.long().to(x.device))
            else:
                if item.hidden is None:
                    raise ValueError(f"this segment starts at layer {self.start}: give hidden states")
                rows = item.hidden.to(x.device)
                if rows.ndim != 2 or rows.shape[1] != self.spec.hidden_size:
                    raise ValueError(f"hidden states must be (T, {self.spec.hidden_size}), got {tuple(rows.shape)}")
            x[i, : rows.shape[0]] = rows
        return x


def continue_session(sessions: dict, item: SegmentInput, open_session):
    """The cache of ``item``'s session (opened at position 0), checked to continue where it left off.

    Shared by every backend, so they all answer the same errors the same way.
    """
    if item.session_id not in sessions:
        if item.start_pos != 0:
            raise SessionError(f"unknown session {item.session_id!r} (a new session starts at position 0)")
        open_session(item.session_id)
    cache = sessions[item.session_id]
    if not 0 <= item.start_pos <= cache.length:
        raise SessionError(
            f"session {item.session_id!r} has {cache.length} positions cached; "
            f"a step cannot start at position {item.start_pos}"
        )
    return cache


def _local_name(checkpoint_name: str) -> str:
    """``model.layers.3.mlp...`` -> ``layers.3.mlp...``; ``lm_head.weight`` stays."""
    return checkpoint_name.removeprefix("model.")


def _attention_batch(caches, starts: list[int], lengths: list[int], spec: GlmSpec, device=None) -> AttentionBatch:
    """Rotary angles and the causal + padding mask for sessions with different cache lengths."""
    width = max(lengths)
    offsets = torch.arange(width, device=device)
    positions = torch.tensor(starts, device=device)[:, None] + offsets  # (B, T)
    cos, sin = rotary_cos_sin(positions, spec.rotary_dim, spec.rope_theta)
    mask = None
    if len(caches) > 1 or width > 1:
        ends = torch.tensor([s + n for s, n in zip(starts, lengths)], device=device)  # (B,)
        keys = torch.arange(int(ends.max()), device=device)  # (L,)
        causal = keys[None, None, :] <= positions[:, :, None]  # (B, T, L)
        mask = (causal & (keys[None, None, :] < ends[:, None, None]))[:, None]  # (B, 1, T, L)
    return AttentionBatch(cos=cos, sin=sin, mask=mask, caches=caches, starts=starts, lengths=lengths)
