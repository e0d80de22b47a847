"""The session owner's decode loop, shared by the device agent (sensor requests) and the edge gateway (HTTP).

The owner holds the embedding and the first layers. Each step it runs its
segment on the new positions, sends one frame downstream and gets back one
StepResult. Its ``tokens`` are verified tokens, emitted in order (usually
one; after a speculative verification up to g + 1). What runs next is the
last of them, or -- while the edge drafts -- the ``draft_tokens`` it names,
never emitted; ``next_pos`` moves the next frame back after rejected drafts
(the owner's cache rewinds: a length change). It detokenizes incrementally
and ends the generation on a stop string (decided here, where the tokenizer
is) or when the downstream says ``finished`` (a stop token or
``max_tokens``, decided by the terminal tier).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from runtime.segment import SegmentInput


class Downstream(Protocol):
    """Where an owner sends frames: the edge over MQTT, or the cloud (or router) at the edge."""

    def step(self, frame: pb.Frame) -> pb.StepResult:
        """Send one frame and wait for its answer; raise on a transport failure."""

    def close(self, frame: pb.Frame) -> None:
        """Send a close frame (best effort, no answer)."""


class StepFailed(RuntimeError):
    """The downstream answered a step with an error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TextStream:
    """Incremental detokenization that holds back text which could still become a stop string."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text handed out so far
        self.text = ""  # the final text once stopped or flushed

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (newly released text, whether a stop string ended the text)."""
        self.ids.append(token)
        if self.tokenizer is None:  # token ids only (no text to release)
            return "", False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.released - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._release(len(self.text)), True
        safe = len(text) - max((len(s) - 1 for s in self.stop), default=0)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            safe = min(safe, len(text) - 1)
        self.text = text
        return self._release(max(safe, self.released)), False

    def flush(self) -> str:
        """Whatever is still held back, at the end of the generation."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.released : upto]
        self.released = max(self.released, upto)
        return piece


@dataclass
class TokenEvent:
    token: int
    logprob: float
    text: str  # text this token released (may be empty: held back or a special token)
    path: int  # pb.ACCURATE or pb.FAST
    step_ms: float  # owner compute + round trip of this step
    timings_ms: dict[str, float]  # the downstream's named timings of this step


@dataclass
class Generation:
    """One generation driven by its owner; iterate for TokenEvents, then read the summary fields."""

    segment: object  # the owner's segment (embedding + its layers)
    downstream: Downstream
    prompt_ids: list[int]
    params: pb.GenerationParams
    codec: str
    tokenizer: object  # None: token ids only (``text`` stays empty)
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    deadline_unix_ms: int = 0
    lock: threading.Lock | None = None  # serialises the owner segment between threads

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    paths: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" or "length"
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    frame_bytes: int = 0  # serialized frame bytes sent downstream
    # What the edge's router reported on the StepResults (edge_node.router; unset by a bare cloud):
    switches: list[dict] = field(default_factory=list)  # {"token": index, "to": "fast", "reason": ...}
    degraded: bool = False  # the cloud failed and the edge's fast tail answered
    predicted_ms: float | None = None  # the router's prediction of the whole completion, ms
    policy: str = ""  # the routing policy the edge applied
    # Per step: "owner" (own segment + encode) and "downstream" (until its answer) in ms, plus the
    # downstream's StepResult.timings_ms; stage_breakdown() turns the decode steps into a per-token split.
    step_timings: list[dict[str, float]] = field(default_factory=list)
    # Speculative split decoding: drafts the cloud verified, how many it accepted, in how many round trips.
    speculative: dict[str, int] = field(default_factory=lambda: {"drafted": 0, "accepted": 0, "round_trips": 0})

    def __iter__(self) -> Iterator[TokenEvent]:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        stream = TextStream(self.tokenizer, list(self.params.stop))
        start = time.perf_counter()
        ids, pos, seq = torch.tensor(self.prompt_ids), 0, 0
        try:
            while True:
                t0 = time.perf_counter()
                result = self._step(ids, pos, seq)
                if result.error:
                    raise StepFailed(result.status, result.error)
                if not result.tokens and not result.draft_tokens:
                    raise StepFailed(13, f"step {seq} of session {self.session_id} came back without a token")
                self._note_routing(result)
                done, step_ms = False, (time.perf_counter() - t0) * 1e3
                for i, (token, logprob) in enumerate(zip(result.tokens, result.logprobs)):
                    token, logprob = int(token), float(logprob)
                    self.tokens.append(token)
                    self.logprobs.append(logprob)
                    self.paths.append(result.path)
                    if len(self.tokens) == 1:
                        self.ttft_ms = (time.perf_counter() - start) * 1e3
                    last = i == len(result.tokens) - 1
                    piece, stopped = stream.push(token)
                    done = stopped or (result.finished and last) or len(self.tokens) >= self.params.max_tokens
                    if done and not stopped:
                        piece += stream.flush()
                    yield TokenEvent(token, logprob, piece, result.path, step_ms / len(result.tokens),
                                     dict(result.timings_ms))
                    if done:
                        eos = result.finished and token in self.params.stop_token_ids
                        self.finish_reason = "stop" if stopped or eos else "length"
                        break
                if done:
                    break
                pos = result.next_pos or pos + int(ids.shape[0])
                seq += 1
                ids = torch.tensor([int(result.draft_tokens[0]) if result.draft_tokens else self.tokens[-1]])
        finally:
            self.text = stream.text[: stream.released]
            self.total_ms = (time.perf_counter() - start) * 1e3
            self._close(seq + 1, pos)

    def _note_routing(self, result: pb.StepResult) -> None:
        """Keep the router's facts a StepResult carries (before the tokens it answers are added)."""
        if result.switch_reason:
            to = "fast" if result.path == pb.FAST else "accurate"
            self.switches.append({"token": len(self.tokens), "to": to, "reason": result.switch_reason})
        self.degraded = self.degraded or result.degraded
        if result.drafted:
            self.speculative["drafted"] += result.drafted
            self.speculative["accepted"] += result.accepted
            self.speculative["round_trips"] += 1
        if result.predicted_ms and self.predicted_ms is None:
            self.predicted_ms = float(result.predicted_ms)
        self.policy = self.policy or result.policy

    def _step(self, ids: torch.Tensor, pos: int, seq: int) -> pb.StepResult:
        t0 = time.perf_counter()
        with self.lock or nullcontext():
            hidden = self.segment([SegmentInput(self.session_id, pos, input_ids=ids)])[0]  # (T, C)
        frame = make_frame(
            self.session_id,
            seq,
            pos,
            hidden,
            self.codec,
            params=self.params if seq == 0 else None,
            deadline_unix_ms=self.deadline_unix_ms,
        )
        self.frame_bytes += frame.ByteSize()
        t1 = time.perf_counter()
        result = self.downstream.step(frame)
        t2 = time.perf_counter()
        self.step_timings.append({"owner": (t1 - t0) * 1e3, "downstream": (t2 - t1) * 1e3, **result.timings_ms})
        return result

    def _close(self, seq: int, pos: int) -> None:
        with self.lock or nullcontext():
            self.segment.close_session(self.session_id)
        try:
            self.downstream.close(make_frame(self.session_id, seq, pos, None, close=True))
        except Exception:  # noqa: BLE001 -- best effort: the downstream frees idle sessions on its own
            pass

    def stage_breakdown(self) -> dict[str, float]:
        """Where a decode step's time went, mean ms per token after the first (see ``stage_breakdown``)."""
        return stage_breakdown(self.step_timings[1:])

    @property
    def per_token_ms(self) -> float:
        """Mean time of each token after the first."""
        n = len(self.tokens)
        return (self.total_ms - self.ttft_ms) / (n - 1) if n > 1 else 0.0


def stage_breakdown(steps: list[dict[str, float]]) -> dict[str, float]:
    """Mean ms per step of each stage a step went through, from the owner's and the tiers' timings.

    ``owner``: the owner's segment and frame encoding. When an edge relay
    answered (``edge_total``): ``owner_edge_link`` is the owner's wait minus
    the edge's time (MQTT both ways through the broker), ``edge`` its queue,
    frame decoding, layers and encoding, and the tail's step is split into ``edge_cloud_link`` and
    ``cloud`` (the cloud's queue + compute) on the accurate path. Without a
    relay (the edge owns the session), the wait is the tail's; ``tail``
    stands for the tail's step when no cloud answered it (the fast tail).
    Each stage is averaged over all steps (a step that skipped it adds 0),
    so the stages add up to the mean step.
    """
    if not steps:
        return {}
    sums: dict[str, float] = {}
    for step in steps:
        parts = {"owner": step["owner"]}
        tail = step["downstream"]
        if "edge_total" in step:
            parts["owner_edge_link"] = step["downstream"] - step["edge_total"]
            parts["edge"] = step["edge_queue"] + step["edge_compute"]
            tail = step["tail"]
        if "queue" in step and "batch_size" in step:  # the cloud's batcher answered
            parts["cloud"] = step["queue"] + step["compute"]
            parts["edge_cloud_link"] = tail - parts["cloud"]
        else:
            parts["tail"] = tail
        for name, ms in parts.items():
            sums[name] = sums.get(name, 0.0) + ms
    return {name: round(total / len(steps), 2) for name, total in sums.items()}
