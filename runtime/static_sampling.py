"""Processed sampling with fixed shapes: ``sample_processed``'s tokens from device buffers, capturable.

``sample_processed`` builds its tensors from the rows on the host at every step and skips what no row asks,
so its work and its shapes follow the rows: it runs eagerly after a CUDA graph's replay, and on a GPU its
launches and copies cost more than the pass of a small model (issue 23's GPU figure). Here every row's
parameters live in preallocated buffers (``StaticRows``): one host-to-device copy per step fills them, and
``sample_static`` always does all of the processing, with neutral values where a row asks nothing. It reads
no value on the host, so a graph can capture it beside the pass.

It gives the tokens, log-probabilities and top alternatives of ``sample_processed`` for the same rows:
- the penalties over a dense (N, V) count table scattered from each row's ``seen`` pairs (padding pairs add
  0 to id 0): an unseen id gets ``x - 0 - 0``, its own value;
- ``logit_bias`` by a scatter-add of (id, value) pairs (padding adds 0.0 to id 0);
- a row without a grammar has an all-ones bitmask; top-k 0 keeps the row's V largest (all of them); min-p 0
  drops nothing;
- the top ``MAX_TOP_LOGPROBS`` alternatives are always computed; a row reports its first ``top_logprobs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from runtime.sampling import MAX_TOP_LOGPROBS, Processed, SampleRow, _inverse_cdf, allowed, resolve_masks

_SCALARS = ("temperature", "top_p", "uniform", "top_k", "min_p", "presence", "frequency", "repetition")
_NEUTRAL = {"temperature": 0.0, "top_p": 1.0, "uniform": 0.0, "top_k": 0.0, "min_p": 0.0, "presence": 0.0,
            "frequency": 0.0, "repetition": 1.0}


class TooManyPairs(ValueError):
    """A row has more ``seen`` or ``bias`` pairs than the buffers hold (the caller picks a larger bucket)."""


class StaticRows:
    """Device buffers for ``rows`` sampled rows of a ``vocab``-id head: per row its scalars, up to ``max_seen``
    (id, count) pairs generated before it, up to ``max_bias`` (id, bias) pairs and its grammar's bitmask.

    The host side is a mirror of each buffer (pinned where the buffers are on a GPU) that ``fill`` rewrites
    only where rows changed, then copies whole: a step costs the host a few microseconds per row that asks
    for something, and one copy per buffer."""

    def __init__(self, rows: int, vocab: int, device, max_seen: int = 256, max_bias: int = 64):
        self.rows, self.vocab, self.max_seen, self.max_bias = rows, vocab, max_seen, max_bias
        self.words = -(-vocab // 32)
        device = torch.device(device)
        pin = device.type == "cuda"
        shapes = {"scalars": ((len(_SCALARS), rows), torch.float32), "seen_ids": ((rows, max_seen), torch.int64),
                  "seen_counts": ((rows, max_seen), torch.float32), "bias_ids": ((rows, max_bias), torch.int64),
                  "bias_values": ((rows, max_bias), torch.float32), "mask": ((rows, self.words), torch.int32)}
        self._host: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in shapes.items():
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            self._host[name] = host
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
        self._np = {name: t.numpy() for name, t in self._host.items()}
        self._np["scalars"][:] = [[_NEUTRAL[k]] for k in _SCALARS]
        self._np["mask"][:] = -1
        self._written = [(0, 0, False)] * rows  # per row: seen pairs, bias pairs, masked, as the mirror holds them
        self._copy()

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _SCALARS:
            return self.scalars[_SCALARS.index(name)]
        raise AttributeError(name)

    def fill(self, rows: Sequence[SampleRow | None]) -> None:
        """Put ``rows`` (at most ``self.rows``; None and the rest: neutral rows) into the buffers. Lazy masks are
        computed here (together: ``resolve_masks``); TooManyPairs, before anything is written, if a row has
        more pairs than the buffers hold."""
        if len(rows) > self.rows:
            raise ValueError(f"{len(rows)} rows for buffers of {self.rows}")
        rows = [*rows, *[None] * (self.rows - len(rows))]
        pairs = []
        for i, r in enumerate(rows):
            if r is None:
                pairs.append(((), ()))
                continue
            seen, bias = self._pairs(r.seen), self._pairs(r.bias)
            if len(seen) > self.max_seen or len(bias) > self.max_bias:
                raise TooManyPairs(f"row {i}: {len(seen)} seen / {len(bias)} bias pairs, buffers of "
                                   f"{self.max_seen} / {self.max_bias}")
            pairs.append((seen, bias))
        masks = resolve_masks([r if r is not None else _NO_ROW for r in rows])
        a = self._np
        table = [[_NEUTRAL[k]] * self.rows for k in _SCALARS]
        for i, (r, (seen, bias), m) in enumerate(zip(rows, pairs, masks)):
            if r is not None:
                for k, name in enumerate(_SCALARS):
                    table[k][i] = float(getattr(r, name))
            had_seen, had_bias, had_mask = self._written[i]
            for pairs_of, ids, values, had in ((seen, "seen_ids", "seen_counts", had_seen),
                                               (bias, "bias_ids", "bias_values", had_bias)):
                if len(pairs_of):
                    a[ids][i, : len(pairs_of)] = pairs_of[:, 0]
                    a[values][i, : len(pairs_of)] = pairs_of[:, 1]
                if had > len(pairs_of):
                    a[ids][i, len(pairs_of) : had] = 0
                    a[values][i, len(pairs_of) : had] = 0
            if m is not None:
                m = m.numpy()[: self.words]
                a["mask"][i, : m.shape[0]] = m
                a["mask"][i, m.shape[0] :] = 0  # ids past the mask's words are never allowed
            elif had_mask:
                a["mask"][i] = -1
            self._written[i] = (len(seen), len(bias), m is not None)
        a["scalars"][:] = table
        self._copy()

    def _pairs(self, pairs) -> np.ndarray | tuple:
        """(id, value) pairs as a (k, 2) float64 array (ids exact), those of ids past the head's vocabulary left
        out."""
        if not pairs:
            return ()
        table = np.array(pairs, dtype=np.float64)
        return table[table[:, 0] < self.vocab]

    def _copy(self) -> None:
        for name, host in self._host.items():
            getattr(self, name).copy_(host, non_blocking=True)


_NO_ROW = SampleRow()  # (a row asking nothing: where ``fill`` has None)


class Needs(NamedTuple):
    """What some row of a pass asks (``needs``): ``sample_static`` skips the rest, a no-op on rows that ask
    nothing (the answers do not change; the sorts and the (N, V) tables are most of the work)."""

    sampled: bool = True  # a temperature > 0: the draw
    top_k: bool = True  # the top-k cut (a sort)
    min_p: bool = True
    penalties: bool = True  # presence, frequency, repetition over ``seen``
    bias: bool = True  # logit_bias
    mask: bool = True  # a grammar's mask
    top: bool = True  # top log-probabilities reported


def needs(rows) -> Needs:
    """What these rows ask (None: a row asking nothing)."""
    rows = [r for r in rows if r is not None]
    return Needs(any(r.temperature > 0 for r in rows), any(r.top_k for r in rows), any(r.min_p for r in rows),
                 any(r.seen for r in rows), any(r.bias for r in rows), any(r.mask is not None for r in rows),
                 any(r.top_logprobs for r in rows))


def sample_static(logits: torch.Tensor, s: StaticRows, need: Needs = Needs()) -> Processed:
    """(N, V) logits of the rows ``s`` holds -> tokens, log-probabilities and (``need.top``) the top
    ``MAX_TOP_LOGPROBS`` alternatives of every row; no host sync, shapes from N and V only."""
    N, V = logits.shape
    logits = logits.float()
    if need.penalties:
        counts = torch.zeros(N, V, dtype=torch.float32, device=logits.device).scatter_add_(1, s.seen_ids,
                                                                                            s.seen_counts)
        seen = counts > 0
        rep = s.repetition[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - s.presence[:, None] * seen - s.frequency[:, None] * counts
    if need.bias:
        logits = logits.scatter_add(1, s.bias_ids, s.bias_values)
    temperature = s.temperature
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    top = logprobs.topk(min(MAX_TOP_LOGPROBS, V), dim=-1) if need.top else None
    if need.mask:
        scaled = torch.where(allowed(s.mask, V), scaled, float("-inf"))
    if need.top_k:
        ks = torch.where(s.top_k > 0, s.top_k, float(V)).long().clamp(max=V)
        kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (ks - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if need.min_p:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < s.min_p[:, None] * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    tokens = scaled.argmax(dim=-1)
    if need.sampled:
        drawn = _inverse_cdf(scaled, torch.ones_like(temperature), s.top_p, s.uniform)
        tokens = torch.where(temperature > 0, drawn, tokens)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    return Processed(tokens, chosen, None if top is None else top.indices, None if top is None else top.values)
