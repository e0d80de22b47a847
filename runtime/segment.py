"""A segment: [embedding +] decoder layers [a, b) [+ final norm + LM head], and its KV pool.

One ``forward`` call serves many sessions at once, each with its own number of new positions and its own
cache length (prefill and decode mixed): their rows run as one flat batch, and each row attends to its
own session's keys in the pool (``runtime.attention``). A segment with the head can sample on the spot
(``SegmentInput.sample``) and hand back tokens instead of logits. ``fork_session`` starts a session from
another's cached positions, sharing their KV pages copy-on-write (several completions of one prompt);
``stats`` counts the positions run and the positions forked.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
from torch import nn

from runtime.attention import PoolAttention
from runtime.checkpoint import GlmSpec, load_spec, load_tensors
from runtime.cpu_decode import DEFAULT_MAX_ROWS, CompiledHead, CompiledLayers
from runtime.kv_pool import DEFAULT_PAGE_SIZE, KVPool, PoolExhausted, pool_tokens
from runtime.layers import DecoderLayer, RMSNorm, rotary_cos_sin
from runtime.step import (
    Sampled,
    SegmentInput,
    SessionError,
    begin_step,
    build_step,
    check_items,
    end_step,
    output_rows,
    sample_outputs,
)

__all__ = ["PoolExhausted", "Sampled", "Segment", "SegmentInput", "SessionError"]


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
        self.kv_heads = spec.num_kv_heads  # KV heads its pool holds (a tensor-parallel shard: its own)
        self.pool: KVPool | None = None  # made at the first session (``configure_pool`` to size it)
        self._pool_size: dict = {}
        self.stats: Counter[str] = Counter()  # positions (run), forked_positions (taken from another session)
        self.compiled: CompiledLayers | None = None  # the CPU decode path (``compile_decode``)

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

        Its sessions and KV pool are its own: e.g. an edge holding [0, k2) runs [k1, k2) for device
        frames and all of [0, k2) for HTTP clients.
        """
        if not self.start <= start <= end <= self.end:
            raise ValueError(f"layers [{start}, {end}) are not within this segment's [{self.start}, {self.end})")
        part = Segment(self.spec, start, start)
        part.end, part.kv_heads = end, self.kv_heads
        part.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in range(start, end)})
        part._pool_size = dict(self._pool_size)
        if self.compiled is not None:
            part.compile_decode(self.compiled.max_rows, int4_rows=self.compiled.int4_rows)
        return part.eval()

    def compile_decode(self, max_rows: int = DEFAULT_MAX_ROWS, warm_up: bool = True, head: bool = True,
                       int4_rows: bool = True) -> CompiledLayers:
        """Run steps of up to ``max_rows`` rows through the compiled layers, and one row's norm and LM head through
        the compiled head where the segment has them and ``head`` asks (``runtime.cpu_decode``); compile now
        unless ``warm_up`` is False. Int4 linears take the row kernel in the graphs unless ``int4_rows`` is
        False. Call it after the compression passes."""
        spec = self.spec
        head = CompiledHead(self.norm, self.lm_head, int4_rows) if head and self.has_head else None
        self.compiled = CompiledLayers(list(self.layers.values()), self.start, spec.head_dim**-0.5, max_rows, head,
                                       int4_rows)
        if warm_up and (self.end > self.start or head is not None):
            self.compiled.warm_up(spec.hidden_size, spec.rotary_dim, (self.kv_heads, spec.head_dim), self._dtype())
        return self.compiled

    def _dtype(self) -> torch.dtype:
        weight = next(iter(self.parameters()), None)
        return weight.dtype if weight is not None and weight.is_floating_point() else torch.float32

    # ---- the KV pool and its sessions -----------------------------------------------------------------

    def configure_pool(
        self, tokens: int | None = None, mib: float | None = None, page_size: int = DEFAULT_PAGE_SIZE
    ) -> KVPool:
        """Size the KV pool in positions or MiB (made now, on the segment's device and dtype)."""
        if self.pool is not None and self.pool.sessions:
            raise RuntimeError("the KV pool can only be resized while it holds no session")
        self._pool_size = {"tokens": tokens, "mib": mib, "page_size": page_size}
        self.pool = None
        return self.kv_pool()

    def kv_pool(self) -> KVPool:
        if self.pool is None:
            weight = next(iter(self.parameters()), None)
            device, dtype = weight.device if weight is not None else torch.device("cpu"), self._dtype()
            spec, layers = self.spec, self.end - self.start
            size = dict(self._pool_size)
            per_token = 2 * max(layers, 1) * self.kv_heads * spec.head_dim * dtype.itemsize
            tokens = pool_tokens(per_token, size.get("tokens"), size.get("mib"))
            self.pool = KVPool(layers, self.kv_heads, spec.head_dim, tokens=tokens,
                               page_size=size.get("page_size", DEFAULT_PAGE_SIZE), dtype=dtype, device=device,
                               grow="double" if device.type == "cpu" else "exact")
        return self.pool

    @property
    def sessions(self) -> dict:
        return self.pool.sessions if self.pool is not None else {}

    def open_session(self, session_id: str) -> None:
        self.kv_pool().open(session_id)

    def close_session(self, session_id: str) -> None:
        if self.pool is not None:
            self.pool.close(session_id)

    def cached_length(self, session_id: str) -> int:
        return self.sessions[session_id].length

    def fork_session(self, src: str, dst: str, length: int, reserve: int = 0) -> None:
        """Start the new session ``dst`` from ``src``'s cached positions [0, length), their pages shared
        copy-on-write, with room for ``reserve`` positions; nothing of ``dst`` stays on failure (SessionError:
        no such source, too few positions or ``dst`` exists; PoolExhausted)."""
        self.kv_pool().fork(src, dst, length, reserve)
        self.stats["forked_positions"] += length

    def reserve(self, session_id: str, positions: int) -> None:
        """Take room for ``positions`` positions of a session now (PoolExhausted if the pool lacks it)."""
        self.kv_pool().reserve_all([(session_id, None, positions)])

    # ---- compute ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, items: list[SegmentInput], last_only: bool = False) -> list:
        """Run every session's new positions in one pass.

        Returns per session its hidden states (T, C), or with the head its logits (T, V) -- only the last
        position's (1, V) when ``last_only`` -- or, for a session that asks to sample, a ``Sampled``.
        """
        if not items:
            return []
        check_items(items, self.spec, self.has_embed, self.has_head, self.start)
        pool = self.kv_pool()
        begin_step(pool, items)
        device = pool.k.device
        batch = build_step(pool, items, device)
        x = self._input_rows(items, device)  # (N, C)
        cos, sin = rotary_cos_sin(batch.positions, self.spec.rotary_dim, self.spec.rope_theta)  # (N, 1, R/2)
        ctx = PoolAttention(pool, batch, self.start, self.spec.head_dim**-0.5, cos, sin)
        x = self._layers(x, ctx)
        end_step(pool, items)
        self.stats["positions"] += batch.num_rows
        if not self.has_head:
            return [x[first : first + item.num_positions] for item, first in zip(items, batch.offsets)]
        return self._head_outputs(items, batch.offsets, x, last_only)

    def _layers(self, x: torch.Tensor, ctx: PoolAttention) -> torch.Tensor:
        """The decoder layers on the step's rows (N, C): compiled for a few rows when asked, else eager."""
        out = self.compiled.run(x, ctx) if self.compiled is not None else None
        if out is not None:
            return out
        for layer in self.layers.values():
            x = layer(x, ctx)
        return x

    def _input_rows(self, items: list[SegmentInput], device) -> torch.Tensor:
        """Embed or take every session's rows, one after another: (N, C)."""
        if self.has_embed:
            ids = torch.cat([item.input_ids for item in items]).long().to(device, non_blocking=True)
            return self.embed_tokens(ids)
        dtype = self.pool.k.dtype
        return torch.cat([item.hidden for item in items]).to(device=device, dtype=dtype, non_blocking=True)

    def _head_outputs(self, items: list[SegmentInput], offsets: list[int], x: torch.Tensor, last_only: bool):
        """One pass of the norm and head over the rows wanted; sample those that ask, in one batch."""
        wanted = output_rows(items, offsets, last_only)
        index = torch.tensor([r for rows in wanted for r in rows], dtype=torch.long, device=x.device)
        picked = x[index]  # (R, C)
        head = self.compiled.head if self.compiled is not None else None  # one row's head, compiled
        logits = head.run(picked) if head is not None else None
        if logits is None:
            logits = self.lm_head(self.norm(picked))  # (R, V)
        return sample_outputs(items, list(logits.split([len(rows) for rows in wanted])))


def _local_name(checkpoint_name: str) -> str:
    """``model.layers.3.mlp...`` -> ``layers.3.mlp...``; ``lm_head.weight`` stays."""
    return checkpoint_name.removeprefix("model.")
