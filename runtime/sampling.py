"""Next-token choice from logits, batched, on whatever device holds the logits: greedy, temperature, top-p.

A sampled token is drawn by inverting the (nucleus-truncated) distribution at one uniform number, and
that number is keyed by the generation's seed and the token's position (``draw_uniform``), not drawn in
sequence. So every tier that samples the token at a given position of a given prefix -- the cloud on a
GPU, the edge's fast tail on a CPU after a switch, a repeated or speculative step -- draws the same token
from the same logits, and no generator state travels with a session.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    seed: int | None = None  # None: every draw is fresh randomness

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def rows(self, first_position: int, count: int = 1) -> list[SampleRow]:
        """What sampling the tokens at positions [first_position, first_position + count) takes."""
        return [SampleRow(self.temperature, self.top_p, draw_uniform(self.seed, p))
                for p in range(first_position, first_position + count)]


@dataclass(frozen=True)
class SampleRow:
    """How to pick one token: temperature (0 = greedy), nucleus mass, and the uniform draw in [0, 1)."""

    temperature: float = 0.0
    top_p: float = 1.0
    uniform: float = 0.0


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
    logprobs = torch.log_softmax(logits, dim=-1)  # (R, V)
    tokens = logits.argmax(dim=-1)  # (R,)
    if any_sampled:
        drawn = _inverse_cdf(logits, temperature, top_p, uniform)  # (R,)
        tokens = torch.where(temperature > 0, drawn, tokens)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


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
    """Pick the token at ``position`` from (V,) logits; return (token id, its log-probability under the model)."""
    temperature, top_p, uniform = row_tensors(params.rows(position), logits.device)
    tokens, logprobs = sample_rows(logits[None], temperature, top_p, uniform, params.temperature > 0)
    return int(tokens[0]), float(logprobs[0])
