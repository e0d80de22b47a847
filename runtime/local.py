"""Segments chained in one process: device -> edge -> cloud, with a codec on each link.

This is the split model without the network: the reference the agents are
checked against, the engine of ``splitglm eval`` and of the one-process demo.
``LocalTail`` is the tiers after the owner as a ``Downstream`` (frames in,
StepResults out, sampled by ``TailSessions`` as the cloud does), so a chain's
generation runs the owner's one decode loop (``session.owner.Generation``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from protos import splitglm_pb2 as pb
from protos.errors import CodecError
from protos.frames import decode_frame_hidden
from protos.status import error_result
from runtime.checkpoint import load_spec
from runtime.owner import Generation
from runtime.sampling import SamplingParams
from runtime.segment import Segment, SegmentInput
from runtime.step import SessionError
from runtime.terminal import StepError, TailSessions

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
        """Yield (token, log-probability) one step at a time: prefill, then one position per step.

        The owner's decode loop over a ``LocalTail`` of the other segments, with lossless (fp32) frames
        into the first link; an unseeded ``params`` samples with seed 0.
        """
        wire = pb.GenerationParams(max_tokens=max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                                   seed=params.seed or 0, stop_token_ids=list(stop_ids))
        tail = LocalTail(self.segments[1:], self.links)
        for event in Generation(self.segments[0], tail, list(prompt_ids), wire, "fp32", tokenizer=None):
            yield event.token, event.logprob


class LocalTail:
    """The tiers after the owner in this process (a ``Downstream``): ``links[i]`` carries a frame's hidden
    states (or the previous segment's output) into ``segments[i]``; the last segment samples."""

    def __init__(self, segments: list[Segment], links: list[Link] | None = None):
        self.segments = segments
        self.links = links or [identity_link] * len(segments)
        self.tails = TailSessions()
        self.lock = threading.Lock()  # one step at a time

    def step(self, frame: pb.Frame) -> pb.StepResult:
        try:
            hidden = decode_frame_hidden(frame, self.segments[0].spec.hidden_size)  # (T, C)
        except CodecError as e:
            return error_result(frame.session_id, frame.seq, "INVALID_ARGUMENT", str(e))
        with self.lock:
            try:
                stored = self.tails.accept(frame)
                if stored is not None:
                    return stored
                x = hidden
                for link, segment in zip(self.links, self.segments[:-1]):
                    x = segment([SegmentInput(frame.session_id, frame.start_pos, hidden=link(x))])[0]
                work = self.tails.work(frame, self.links[len(self.segments) - 1](x))
                return self.tails.answer(frame, self.segments[-1]([work])[0])
            except StepError as e:
                return error_result(frame.session_id, frame.seq, e.status, str(e))
            except SessionError as e:
                return error_result(frame.session_id, frame.seq, "FAILED_PRECONDITION", str(e))

    def close(self, frame: pb.Frame) -> None:
        with self.lock:
            self.tails.close(frame.session_id)
            for segment in self.segments:
                segment.close_session(frame.session_id)
