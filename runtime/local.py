"""Segments chained in one process: device -> edge -> cloud, with a codec on each link.

This is the split model without the network: the reference the agents are
checked against, the engine of ``splitglm eval`` and of the one-process demo.
``LocalTail`` is the tiers after the owner as a ``Downstream`` (frames in,
StepResults out, sampled by a ``runtime.terminal.Terminal`` as the cloud's), so a chain's
generation runs the owner's one decode loop (``runtime.owner.Generation``). A chain
loaded with ``Chain.from_checkpoint`` compiles grammars against the checkpoint's
vocabulary when its folder has a ``tokenizer.json`` (``runtime.grammar``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from protos import splitglm_pb2 as pb
from protos.errors import CodecError
from protos.frames import decode_frame_hidden
from protos.status import error_result
from runtime.checkpoint import load_spec
from runtime.grammar import Grammars, tier_grammars
from runtime.owner import Generation
from runtime.sampling import SamplingParams
from runtime.segment import Segment, SegmentInput
from runtime.terminal import Terminal, status_of

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
    """Segments run in order; ``links[i]`` carries the output of segment i to segment i + 1; the last one
    samples, with ``grammars`` (None: requests with a grammar are refused)."""

    segments: list[Segment]
    links: list[Link] = field(default_factory=list)
    grammars: Grammars | None = None

    def __post_init__(self):
        if not self.links:
            self.links = [identity_link] * (len(self.segments) - 1)
        if len(self.links) != len(self.segments) - 1:
            raise ValueError("a chain of n segments needs n - 1 links")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, k1: int, k2: int, links: list[Link] | None = None,
                        dtype=torch.float32) -> Chain:
        """The checkpoint split at k1, k2 (``split_segments``), with its vocabulary's grammars if it ships one."""
        segments = split_segments(path, k1, k2, dtype)
        return cls(segments, links or [], tier_grammars([path], segments[-1].spec.vocab_size))

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
        grammar: pb.Grammar | None = None,
    ) -> Iterator[tuple[int, float]]:
        """Yield (token, log-probability) one step at a time: prefill, then one position per step.

        The owner's decode loop over a ``LocalTail`` of the other segments, with lossless (fp32) frames
        into the first link; an unseeded ``params`` samples with seed 0.
        """
        wire = wire_params(params, max_new_tokens, stop_ids, grammar)
        tail = LocalTail(self.segments[1:], self.links, self.grammars)
        for event in Generation(self.segments[0], tail, list(prompt_ids), wire, "fp32", tokenizer=None):
            yield event.token, event.logprob


def wire_params(params: SamplingParams, max_tokens: int, stop_ids=(), grammar: pb.Grammar | None = None
                ) -> pb.GenerationParams:
    """A generation's wire parameters from its ``SamplingParams`` (unseeded: seed 0)."""
    return pb.GenerationParams(
        max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed or 0,
        stop_token_ids=list(stop_ids), top_k=params.top_k, min_p=params.min_p,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, logit_bias=dict(params.logit_bias),
        top_logprobs=params.top_logprobs, grammar=grammar)


class LocalTail:
    """The tiers after the owner in this process (a ``Downstream``): ``links[i]`` carries a frame's hidden
    states (or the previous segment's output) into ``segments[i]``; the last segment samples (a
    ``Terminal`` over them all, one step at a time)."""

    def __init__(self, segments: list[Segment], links: list[Link] | None = None, grammars: Grammars | None = None):
        self.segments = segments
        self.links = links or [identity_link] * len(segments)
        self.terminal = Terminal(_Row(segments, self.links), grammars=grammars)

    def step(self, frame: pb.Frame) -> pb.StepResult:
        try:
            hidden = decode_frame_hidden(frame, self.segments[0].spec.hidden_size)  # (T, C)
        except CodecError as e:
            return error_result(frame.session_id, frame.seq, *status_of(e))
        return self.terminal.step(frame, hidden)

    def close(self, frame: pb.Frame) -> None:
        self.terminal.close(frame.session_id)


class _Row:
    """Segments in a row as one segment with the head: ``links[i]`` carries the rows into ``segments[i]``."""

    def __init__(self, segments: list[Segment], links: list[Link]):
        self.segments, self.links = segments, links
        self.spec = segments[-1].spec

    @property
    def sessions(self) -> dict:
        return self.segments[-1].sessions

    def __call__(self, items: list[SegmentInput]) -> list:
        """Each item's rows (T, C) through every segment; the last one's output (sampled when asked)."""
        out = []
        for item in items:
            x = item.hidden
            for link, segment in zip(self.links, self.segments[:-1]):
                x = segment([SegmentInput(item.session_id, item.start_pos, hidden=link(x))])[0]
            out += self.segments[-1]([replace(item, hidden=self.links[len(self.segments) - 1](x))])
        return out

    def close_session(self, session_id: str) -> None:
        for segment in self.segments:
            segment.close_session(session_id)

    def fork_session(self, src: str, dst: str, length: int, reserve: int = 0) -> None:
        """Fork ``src``'s cache into the new session ``dst`` in every segment (``Segment.fork_session``)."""
        for i, segment in enumerate(self.segments):
            try:
                segment.fork_session(src, dst, length, reserve)
            except Exception:
                for done in self.segments[:i]:
                    done.close_session(dst)
                raise
