"""Next-token choice from logits, batched, on whatever device holds the logits: greedy, temperature, top-p.

A sampled token is drawn by inverting the (nucleus-truncated) distribution at one uniform number, and
that number is keyed by the generation's seed and the token's position (``draw_uniform``), not drawn in
sequence. So every tier that samples the token at a given position of a given prefix -- the cloud on a
GPU, the edge's fast tail on a CPU after a switch, a repeated or speculative step -- draws the same token
from the same logits, and no generator state travels with a session.

Logit processing (``SampleRow``'s optional fields, ``sample_processed``), in vLLM's order: the penalties over
the tokens generated before the position (``seen``; OpenAI's presence and frequency penalties, vLLM's
multiplicative repetition penalty), ``logit_bias``, then temperature. The log-probabilities reported (of the
sampled token and its ``top_logprobs`` alternatives) are those of that processed distribution. Then the
grammar's mask (a bitmask of allowed ids) and top-k, top-p and min-p truncation choose among the allowed
tokens; they do not change the reported log-probabilities. A row with none of these (``SampleRow.plain``)
takes ``sample_rows``, the path the CUDA engine captures in a graph; ``sample_processed`` gives the same
tokens for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    seed: int | None = None  # None: every draw is fresh randomness
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top one's (0 = all)
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0), over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count
    repetition_penalty: float = 1.0  # vLLM: a seen token's logit / r when > 0, else * r (1 = off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    top_logprobs: int = 0  # alternatives reported per token, 0-20

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2 or not -2 <= self.frequency_penalty <= 2:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def rows(self, first_position: int, count: int = 1, seen=None, masks=None) -> list[SampleRow]:
        """What sampling the tokens at positions [first_position, first_position + count) takes.

        ``seen``: per row, the generated tokens before its position as ((token, count), ...) -- only read
        when a penalty is on; ``masks``: per row, the grammar's bitmask of allowed ids (or None).
        """
        plain = (self.temperature, self.top_p)
        extra = dict(top_k=self.top_k, min_p=self.min_p, presence=self.presence_penalty,
                     frequency=self.frequency_penalty, repetition=self.repetition_penalty,
                     bias=self.logit_bias, top_logprobs=self.top_logprobs)
        rows = []
        for j, p in enumerate(range(first_position, first_position + count)):
            row_seen = seen[j] if seen is not None and self.penalised else ()
            mask = masks[j] if masks is not None else None
            rows.append(SampleRow(*plain, draw_uniform(self.seed, p), seen=row_seen, mask=mask, **extra))
        return rows


@dataclass(frozen=True, eq=False)
class SampleRow:
    """How to pick one token: temperature (0 = greedy), nucleus mass, and the uniform draw in [0, 1); and the
    optional logit processing (``SamplingParams``'s fields, with ``seen`` and the grammar's ``mask``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    uniform: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    seen: tuple[tuple[int, int], ...] = ()  # (token, times generated before this position)
    bias: tuple[tuple[int, float], ...] = ()
    mask: torch.Tensor | Callable[[], torch.Tensor] | None = None  # (ceil(V / 32),) int32 bitmask of the ids
    # the grammar allows, or what computes it when the sampler needs it (``runtime.generation``: lazily)
    top_logprobs: int = 0

    @property
    def plain(self) -> bool:
        """Nothing but temperature and top-p: the fast path (``sample_rows``)."""
        return (not self.top_k and not self.min_p and not self.seen and not self.bias and self.mask is None
                and not self.top_logprobs)


def draw_uniform(seed: int | None, position: int) -> float:
    """The uniform draw in [0, 1) for the token at ``position`` of a generation seeded ``seed`` (splitmix64)."""
    if seed is None:
        return random.random()
    z = (seed ^ ((position + 1) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)  # 24 bits: exact in float32


def row_tensors(rows: Sequence[SampleRow], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(temperature, top_p, uniform) as (R,) float32 tensors on ``device``."""
    table = torch.tensor([(r.temperature, r.top_p, r.uniform) for r in rows], dtype=torch.float32)  # (R, 3)
    table = table.to(device, non_blocking=True)
    return table[:, 0], table[:, 1], table[:, 2]


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor, any_sampled=True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick a token per row of (R, V) logits; return (tokens (R,) int64, their log-probabilities (R,) fp32).

    ``any_sampled=False`` (every row greedy) skips the sort; it changes no result. No host sync: shapes
    alone decide the work, so the whole function can be captured in a CUDA graph.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # (R,)
    if any_sampled:
        drawn = _inverse_cdf(logits, temperature, top_p, uniform)  # (R,)
        tokens = torch.where(temperature > 0, drawn, tokens)
        logits = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]  # the distribution drawn from
    logprobs = torch.log_softmax(logits, dim=-1)  # (R, V)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


@dataclass
class Processed:
    """``sample_processed``'s answer: per row the token, its log-probability and its top alternatives."""

    tokens: torch.Tensor  # (R,) int64
    logprobs: torch.Tensor  # (R,) fp32
    top_tokens: torch.Tensor | None = None  # (R, k) int64, k the largest top_logprobs asked (None: none asked)
    top_logprobs: torch.Tensor | None = None  # (R, k) fp32

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.tokens, self.logprobs, self.top_tokens, self.top_logprobs

    def map(self, fn) -> Processed:
        """``fn`` applied to each tensor (a slice, a copy); the absent alternatives stay absent."""
        return Processed(*(None if t is None else fn(t) for t in self.tensors()))

    @staticmethod
    def cat(parts: Sequence[Processed]) -> Processed:
        """Rows of several answers, in order (all with alternatives, or all without)."""
        return Processed(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))))

    def on_host(self, rows: Sequence[SampleRow]) -> tuple[list[int], list[float], list]:
        """(tokens, logprobs, top) of ``rows`` as host lists, after one host sync: ``top`` is per row an
        (ids, log-probabilities) pair of its ``top_logprobs`` alternatives (empty when it asked none)."""
        tokens, logprobs = self.tokens.tolist(), self.logprobs.tolist()
        if self.top_tokens is None or not any(r.top_logprobs for r in rows):
            return tokens, logprobs, [((), ())] * len(rows)
        ids, values = self.top_tokens.tolist(), self.top_logprobs.tolist()
        return tokens, logprobs, [(tuple(ids[i][: r.top_logprobs]), tuple(values[i][: r.top_logprobs]))
                                  for i, r in enumerate(rows)]


def process_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """(R, V) logits after each row's penalties and logit_bias (a new tensor, fp32)."""
    R, V = logits.shape
    seen = [(i, t, c) for i, r in enumerate(rows) for t, c in r.seen if t < V]
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.bias if t < V]
    logits = logits.float().clone() if seen or bias else logits.float()  # (written in place only then)
    if seen:
        index = torch.tensor([(i, t) for i, t, _ in seen], dtype=torch.int64).to(logits.device)  # (K, 2)
        counts = torch.tensor([c for *_, c in seen], dtype=torch.float32).to(logits.device)  # (K,)
        table = torch.tensor([(r.repetition, r.presence, r.frequency) for r in rows],
                             dtype=torch.float32).to(logits.device)[index[:, 0]]  # (K, 3)
        values = logits[index[:, 0], index[:, 1]]
        values = torch.where(values > 0, values / table[:, 0], values * table[:, 0])  # vLLM's repetition penalty
        values = values - table[:, 1] * (counts > 0) - table[:, 2] * counts  # OpenAI's presence and frequency
        logits[index[:, 0], index[:, 1]] = values
    if bias:
        index = torch.tensor([(i, t) for i, t, _ in bias], dtype=torch.int64).to(logits.device)
        logits.index_put_((index[:, 0], index[:, 1]),
                          torch.tensor([b for *_, b in bias], dtype=torch.float32).to(logits.device), accumulate=True)
    return logits


_BITS: dict = {}  # device -> (256, 8) bools: the bits of each byte value, lowest first


def allowed(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, W) int32 bitmasks (bit j of word w: id 32 w + j) as (R, vocab) bools."""
    table = _BITS.get(masks.device)
    if table is None:
        values = torch.arange(256, dtype=torch.int32)
        table = _BITS[masks.device] = ((values[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool().to(
            masks.device)
    data = masks.contiguous().view(torch.uint8)  # (R, 4W): little-endian, so byte k holds ids 8k .. 8k + 7
    out = table[data.long()].reshape(masks.shape[0], -1)[:, :vocab]
    if out.shape[1] < vocab:  # ids past the mask's words are never allowed
        out = torch.nn.functional.pad(out, (0, vocab - out.shape[1]))
    return out


def sample_processed(logits: torch.Tensor, rows: Sequence[SampleRow]) -> Processed:
    """Pick a token per row of (R, V) logits with each row's processing (see the module docstring)."""
    R, V = logits.shape
    device = logits.device
    logits = process_logits(logits, rows)
    temperature, top_p, uniform = row_tensors(rows, device)
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    logprobs = torch.log_softmax(scaled, dim=-1)  # (R, V): what is reported
    k = max(r.top_logprobs for r in rows)
    top = logprobs.topk(k, dim=-1) if k else None
    masks = {i: m for i, m in enumerate(resolve_masks(rows)) if m is not None}
    if masks:  # (a lazy mask is computed only now: on a GPU, while the forward pass runs)
        words = max(int(m.shape[0]) for m in masks.values())
        table = torch.full((R, words), -1, dtype=torch.int32)
        for i, m in masks.items():
            table[i, : m.shape[0]] = m
        keep = allowed(table.to(device, non_blocking=True), V)
        scaled = torch.where(keep, scaled, float("-inf"))
    if any(r.top_k for r in rows):
        ks = torch.tensor([r.top_k or V for r in rows], device=device)
        kth = scaled.sort(dim=-1, descending=True).values.gather(-1, (ks.clamp(max=V) - 1)[:, None])  # (R, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if any(r.min_p for r in rows):
        min_p = torch.tensor([r.min_p for r in rows], dtype=torch.float32, device=device)
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    tokens = scaled.argmax(dim=-1)
    if any(r.temperature > 0 for r in rows):
        drawn = _inverse_cdf(scaled, torch.ones_like(temperature), top_p, uniform)  # (already scaled)
        tokens = torch.where(temperature > 0, drawn, tokens)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    return Processed(tokens, chosen, None if top is None else top.indices, None if top is None else top.values)


def resolve_masks(rows: Sequence[SampleRow]) -> list[torch.Tensor | None]:
    """Each row's mask (None where it has none), lazy ones computed now: together, where they know how (a
    callable's ``together(callables)``, ``runtime.generation.LazyMask``: the sessions' grammars in parallel)."""
    lazy = [r.mask for r in rows if callable(r.mask)]
    together = getattr(lazy[0], "together", None) if lazy else None
    if together is not None and len(lazy) > 1:
        together(lazy)
    return [r.mask() if callable(r.mask) else r.mask for r in rows]


def _inverse_cdf(logits, temperature, top_p, uniform) -> torch.Tensor:
    """The token where the nucleus-truncated CDF (tokens by falling probability) first exceeds the draw."""
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)  # (R, V)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
    kept = torch.where((before < top_p[:, None]) | (top_p[:, None] >= 1), sorted_probs, 0.0)  # keeps the first
    cdf = kept.cumsum(dim=-1)  # (R, V)
    target = uniform[:, None] * cdf[:, -1:]  # (R, 1)
    index = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1)  # (R, 1)
    return order.gather(-1, index)[:, 0]


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> tuple[int, float]:
    """Pick the token at ``position`` from (V,) logits; return (token id, its log-probability)."""
    rows = params.rows(position)
    if not rows[0].plain:
        out = sample_processed(logits[None], rows)
        return int(out.tokens[0]), float(out.logprobs[0])
    temperature, top_p, uniform = row_tensors(rows, logits.device)
    tokens, logprobs = sample_rows(logits[None], temperature, top_p, uniform, params.temperature > 0)
    return int(tokens[0]), float(logprobs[0])


def sample_batch(logits: torch.Tensor, rows: Sequence[SampleRow]):
    """(tokens, logprobs, top) for (R, V) logits as host lists, after one host sync: ``top`` is per row a
    (ids, log-probabilities) pair of its ``top_logprobs`` alternatives (empty when it asked none)."""
    if all(r.plain for r in rows):
        temperature, top_p, uniform = row_tensors(rows, logits.device)
        tokens, logprobs = sample_rows(logits, temperature, top_p, uniform, any(r.temperature > 0 for r in rows))
        return tokens.tolist(), logprobs.tolist(), [((), ())] * len(rows)
    return sample_processed(logits, rows).on_host(rows)
