"""Segments chained in one process: device -> edge -> cloud, with a codec on each link.

This is the split model without the network: the reference the agents are
checked against, the engine of ``splitglm eval`` and of the one-process demo.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from partitioner.runtime.checkpoint import load_spec
from partitioner.runtime.sampling import SamplingParams, draw_generator, sample
from partitioner.runtime.segment import Segment, SegmentInput

Link = Callable[[torch.Tensor], torch.Tensor]  # (T, C) -> (T, C): what crossing a link does to hidden states


def identity_link(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def split_segments(path: str | os.PathLike, k1: int, k2: int, dtype=torch.float32) -> list[Segment]:
    """Device (embedding + [0, k1)), edge ([k1, k2)) and cloud ([k2, L) + head) segments of a checkpoint."""
    spec = load_spec(path)
    if not 0 <= k1 <= k2 <= spec.num_layers:
        raise ValueError(f"splits must satisfy 0 <= k1 <= k2 <= {spec.num_layers}, got {k1}, {k2}")
    return [
        Segment.from_checkpoint(path, 0, k1, embed=True, dtype=dtype),
        Segment.from_checkpoint(path, k1, k2, dtype=dtype),
        Segment.from_checkpoint(path, k2, spec.num_layers, head=True, dtype=dtype),
    ]


@dataclass
class Chain:
    """Segments run in order; ``links[i]`` carries the output of segment i to segment i + 1."""

    segments: list[Segment]
    links: list[Link] = field(default_factory=list)

    def __post_init__(self):
        if not self.links:
            self.links = [identity_link] * (len(self.segments) - 1)
        if len(self.links) != len(self.segments) - 1:
            raise ValueError("a chain of n segments needs n - 1 links")

    def step(self, session_id: str, start_pos: int, input_ids: torch.Tensor, last_only: bool = False):
        """Run new positions (T,) of a session through every segment; return logits (T or 1, V)."""
        out = self.segments[0]([SegmentInput(session_id, start_pos, input_ids=input_ids)], last_only)[0]
        for link, segment in zip(self.links, self.segments[1:]):
            out = segment([SegmentInput(session_id, start_pos, hidden=link(out))], last_only)[0]
        return out

    def close(self, session_id: str) -> None:
        for segment in self.segments:
            segment.close_session(session_id)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        stop_ids: tuple[int, ...] = (),
    ) -> Iterator[tuple[int, float]]:
        """Yield (token, log-probability) one step at a time: prefill, then one position per step."""
        session = uuid.uuid4().hex
        try:
            logits = self.step(session, 0, torch.tensor(prompt_ids), last_only=True)
            position = len(prompt_ids)
            for _ in range(max_new_tokens):
                token, logprob = sample(logits[-1], params, draw_generator(params.seed, position))
                yield token, logprob
                if token in stop_ids:
                    return
                logits = self.step(session, position, torch.tensor([token]), last_only=True)
                position += 1
        finally:
            self.close(session)
