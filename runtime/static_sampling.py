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

import torch

from runtime.sampling import MAX_TOP_LOGPROBS, Processed, SampleRow, _inverse_cdf, allowed

_SCALARS = ("temperature", "top_p", "uniform", "top_k", "min_p", "presence", "frequency", "repetition")
_NEUTRAL = {"temperature": 0.0, "top_p": 1.0, "uniform": 0.0, "top_k": 0.0, "min_p": 0.0, "presence": 0.0,
            "frequency": 0.0, "repetition": 1.0}


class TooManyPairs(ValueError):
    """A row has more ``seen`` or ``bias`` pairs than the buffers hold (the caller picks a larger bucket)."""


class StaticRows:
    """Device buffers for ``rows`` sampled rows of a ``vocab``-id head: per row its scalars, up to ``max_seen``
    (id, count) pairs generated before it, up to ``max_bias`` (id, bias) pairs and its grammar's bitmask."""

    def __init__(self, rows: int, vocab: int, device, max_seen: int = 256, max_bias: int = 64):
        self.rows, self.vocab, self.max_seen, self.max_bias = rows, vocab, max_seen, max_bias
        self.words = -(-vocab // 32)
        self.scalars = torch.zeros(len(_SCALARS), rows, dtype=torch.float32, device=device)
        self.seen_ids = torch.zeros(rows, max_seen, dtype=torch.int64, device=device)
        self.seen_counts = torch.zeros(rows, max_seen, dtype=torch.float32, device=device)
        self.bias_ids = torch.zeros(rows, max_bias, dtype=torch.int64, device=device)
        self.bias_values = torch.zeros(rows, max_bias, dtype=torch.float32, device=device)
        self.mask = torch.full((rows, self.words), -1, dtype=torch.int32, device=device)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _SCALARS:
            return self.scalars[_SCALARS.index(name)]
        raise AttributeError(name)

    def fill(self, rows: Sequence[SampleRow]) -> None:
        """Copy ``rows`` (at most ``self.rows``; the rest get neutral values) into the buffers: the host builds
        them once, then one copy per buffer."""
        if len(rows) > self.rows:
            raise ValueError(f"{len(rows)} rows for buffers of {self.rows}")
        scalars = torch.tensor([[_NEUTRAL[k]] * self.rows for k in _SCALARS], dtype=torch.float32)
        seen_ids = torch.zeros(self.rows, self.max_seen, dtype=torch.int64)
        seen_counts = torch.zeros(self.rows, self.max_seen, dtype=torch.float32)
        bias_ids = torch.zeros(self.rows, self.max_bias, dtype=torch.int64)
        bias_values = torch.zeros(self.rows, self.max_bias, dtype=torch.float32)
        mask = torch.full((self.rows, self.words), -1, dtype=torch.int32)
        for i, r in enumerate(rows):
            for k, name in enumerate(_SCALARS):
                scalars[k, i] = float(getattr(r, name))
            seen = [(t, c) for t, c in r.seen if t < self.vocab]
            bias = [(t, b) for t, b in r.bias if t < self.vocab]
            if len(seen) > self.max_seen or len(bias) > self.max_bias:
                raise TooManyPairs(f"row {i}: {len(seen)} seen / {len(bias)} bias pairs, buffers of "
                                   f"{self.max_seen} / {self.max_bias}")
            if seen:
                seen_ids[i, : len(seen)] = torch.tensor([t for t, _ in seen])
                seen_counts[i, : len(seen)] = torch.tensor([float(c) for _, c in seen])
            if bias:
                bias_ids[i, : len(bias)] = torch.tensor([t for t, _ in bias])
                bias_values[i, : len(bias)] = torch.tensor([float(b) for _, b in bias])
            m = r.mask() if callable(r.mask) else r.mask
            if m is not None:
                m = m[: self.words]
                mask[i, : m.shape[0]] = m
                mask[i, m.shape[0] :] = 0  # ids past the mask's words are never allowed
        for dst, src in ((self.scalars, scalars), (self.seen_ids, seen_ids), (self.seen_counts, seen_counts),
                         (self.bias_ids, bias_ids), (self.bias_values, bias_values), (self.mask, mask)):
            dst.copy_(src, non_blocking=True)


def sample_static(logits: torch.Tensor, s: StaticRows) -> Processed:
    """(N, V) logits of the rows ``s`` holds -> tokens, log-probabilities and the top ``MAX_TOP_LOGPROBS``
    alternatives of every row; no host sync, shapes from N and V only."""
    N, V = logits.shape
    logits = logits.float()
    counts = torch.zeros(N, V, dtype=torch.float32, device=logits.device).scatter_add_(1, s.seen_ids, s.seen_counts)
    seen = counts > 0
    rep = s.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s.presence[:, None] * seen - s.frequency[:, None] * counts
    logits = logits.scatter_add(1, s.bias_ids, s.bias_values)
    temperature = s.temperature
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)
    top = logprobs.topk(min(MAX_TOP_LOGPROBS, V), dim=-1)
    scaled = torch.where(allowed(s.mask, V), scaled, float("-inf"))
    ks = torch.where(s.top_k > 0, s.top_k, float(V)).long().clamp(max=V)
    kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (ks - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    scaled = scaled.masked_fill(probs < s.min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    tokens = scaled.argmax(dim=-1)
    drawn = _inverse_cdf(scaled, torch.ones_like(temperature), s.top_p, s.uniform)
    tokens = torch.where(temperature > 0, drawn, tokens)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    return Processed(tokens, chosen, top.indices, top.values)
