"""Next-token choice from logits: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def draw_generator(seed: int | None, position: int) -> torch.Generator | None:
    """The generator of the draw for the token at ``position`` of a generation seeded ``seed`` (None: unseeded).

    Keyed by position rather than drawn in sequence, so any tier that samples
    that token (the cloud, or the edge's fast tail after a switch) draws the same.
    """
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed ^ ((position + 1) * 0x9E3779B97F4A7C15)) & 0xFFFF_FFFF_FFFF_FFFF)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
    """Pick one token from (V,) logits; return (token id, its log-probability under the model)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    if params.temperature == 0:
        token = int(torch.argmax(logprobs))
        return token, float(logprobs[token])
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
