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

Several completions of one prompt (n > 1, ``share_prefill``): generation 0 prefills the prompt; each
other one forks its cache instead. Its first frame names generation 0's session (``Frame.fork_of``) and
carries only the prompt's last row at P - 1; the owner's segment and every tier downstream start it from
generation 0's positions [0, P - 1). Generation 0 keeps its session open until the forks' first steps
are answered; a fork that finds it closed (or not prefilled), whose owner segment cannot fork, or whose
downstream answers NOT_FOUND / FAILED_PRECONDITION (no copy of the source there) prefills the prompt itself.
"""

from __future__ import annotations

import logging
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
from protos.status import STATUS_CODES
from runtime import tracing
from runtime.segment import SegmentInput

logger = logging.getLogger(__name__)


class Downstream(Protocol):
    """Where an owner sends frames: the edge over MQTT, or the cloud (or router) at the edge. One that sets
    ``forks_sessions = True`` starts a session from another's cache on every tier behind it (``Frame.fork_of``;
    the source session went through the same downstream's tiers), or answers NOT_FOUND / FAILED_PRECONDITION
    with nothing of the new session left, so that the owner prefills the prompt instead."""

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
    # with GenerationParams.top_logprobs: the most likely tokens at this position, (token, log-prob), best first
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


FORK_REFUSED = (STATUS_CODES["NOT_FOUND"], STATUS_CODES["FAILED_PRECONDITION"])  # a downstream that cannot fork
FORK_WAIT_S = 60.0  # longest a fork waits for its source's prefill before prefilling the prompt itself


class PrefillShare:
    """A generation's prompt cache as its forks see it: "pending" until its first step is answered, then
    "open" until the generation ends ("closed"); its close waits for the forks still copying it."""

    def __init__(self):
        self._cond = threading.Condition()
        self.state = "pending"
        self._copying = 0  # forks whose first step (which copies the cache on every tier) is not answered yet

    def opened(self) -> None:
        with self._cond:
            if self.state == "pending":
                self.state = "open"
                self._cond.notify_all()

    def close(self) -> None:
        """No more forks; wait for the ones copying the cache now."""
        with self._cond:
            self.state = "closed"
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._copying == 0)

    def hold(self, timeout_s: float = FORK_WAIT_S) -> bool:
        """Wait for the prefill; True (and held until ``release``) if the cache is open to copy."""
        with self._cond:
            self._cond.wait_for(lambda: self.state != "pending", timeout_s)
            if self.state != "open":
                return False
            self._copying += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._copying -= 1
            self._cond.notify_all()


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
    fork_of: Generation | None = None  # n > 1: start from this generation's prompt cache (``share_prefill``)

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token (empty: not asked)
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
    forked: bool = False  # the first step forked fork_of's prompt cache (False: this generation prefilled it)
    prefilled: int = 0  # prompt positions the owner's segment ran (P, or 1 for a fork)
    share: PrefillShare = field(default_factory=PrefillShare, repr=False)  # this one's prompt cache, for forks

    def __iter__(self) -> Iterator[TokenEvent]:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        stream = TextStream(self.tokenizer, list(self.params.stop))
        start = time.perf_counter()
        ids, pos, seq = torch.tensor(self.prompt_ids), 0, 0
        try:
            while True:
                t0 = time.perf_counter()
                if seq == 0:
                    ids, pos, result = self._first_step(ids)
                else:
                    result = self._step(ids, pos, seq)
                if result.error:
                    raise StepFailed(result.status, result.error)
                if not result.tokens and not result.draft_tokens:
                    raise StepFailed(13, f"step {seq} of session {self.session_id} came back without a token")
                if seq == 0:
                    self.share.opened()  # the prompt is in every tier's cache: forks may copy it
                self._note_routing(result)
                done, step_ms = False, (time.perf_counter() - t0) * 1e3
                tops = [list(zip(map(int, t.tokens), map(float, t.logprobs))) for t in result.top_logprobs]
                for i, (token, logprob) in enumerate(zip(result.tokens, result.logprobs)):
                    token, logprob = int(token), float(logprob)
                    top = tops[i] if i < len(tops) else []
                    self.tokens.append(token)
                    self.logprobs.append(logprob)
                    self.top_logprobs.append(top)
                    self.paths.append(result.path)
                    if len(self.tokens) == 1:
                        self.ttft_ms = (time.perf_counter() - start) * 1e3
                    last = i == len(result.tokens) - 1
                    piece, stopped = stream.push(token)
                    done = stopped or (result.finished and last) or len(self.tokens) >= self.params.max_tokens
                    if done and not stopped:
                        piece += stream.flush()
                    yield TokenEvent(token, logprob, piece, result.path, step_ms / len(result.tokens),
                                     dict(result.timings_ms), top)
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
            self.share.close()  # (after the forks that copy the prompt's cache now)
            self._close(seq + 1, pos)

    def _first_step(self, ids: torch.Tensor) -> tuple[torch.Tensor, int, pb.StepResult]:
        """The first step: the whole prompt from position 0, or -- a fork of a generation whose prompt cache is
        open -- the prompt's last row at P - 1 after a copy of that cache. Its rows, their start, its answer."""
        source = self.fork_of
        if source is not None and len(ids) >= 2 and source.share.hold():
            try:
                forked = self._forked_step(ids, source)
            finally:
                source.share.release()
            if forked is not None:
                return forked
        self.prefilled += len(ids)
        return ids, 0, self._step(ids, 0, 0)

    def _forked_step(self, ids: torch.Tensor, source: Generation) -> tuple[torch.Tensor, int, pb.StepResult] | None:
        """A fork's first step (``_first_step``); None when no fork could be made -- the owner's segment
        refused it, or the downstream holds no copy of the source to fork (NOT_FOUND, FAILED_PRECONDITION) --
        and nothing of it is left: the prompt is then prefilled instead."""
        start = len(ids) - 1
        try:
            with self.lock or nullcontext():
                self.segment.fork_session(source.session_id, self.session_id, start)
        except Exception as e:  # noqa: BLE001 -- no fork: this generation prefills the prompt itself
            logger.info("session %s: no fork of %s's prompt cache here (%r): prefilling it", self.session_id,
                        source.session_id, e)
            return None
        self.prefilled += 1
        result = self._step(ids[start:], start, 0, fork_of=source.session_id)
        if result.error and result.status in FORK_REFUSED:
            logger.info("session %s: no fork of %s downstream (%s): prefilling the prompt", self.session_id,
                        source.session_id, result.error)
            with self.lock or nullcontext():
                self.segment.close_session(self.session_id)
            return None
        self.forked = True
        return ids[start:], start, result

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

    def _step(self, ids: torch.Tensor, pos: int, seq: int, fork_of: str = "") -> pb.StepResult:
        if not tracing.enabled:
            return self._run_step(ids, pos, seq, fork_of)
        with tracing.span("owner.step", session_id=self.session_id, seq=seq, start_pos=pos,
                          positions=int(ids.shape[0])) as span:
            result = self._run_step(ids, pos, seq, fork_of)
            span.set_attributes({"tokens": len(result.tokens), "drafts": len(result.draft_tokens),
                                 "path": pb.Path.Name(result.path), "status": result.status})
            return result

    def _run_step(self, ids: torch.Tensor, pos: int, seq: int, fork_of: str) -> pb.StepResult:
        """Run the owner's segment on ``ids`` at ``pos``, send the frame, wait for its answer."""
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
        frame.fork_of = fork_of
        if tracing.enabled and seq == 0:
            frame.traceparent = tracing.traceparent()  # the session's trace, for the tiers downstream
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


def share_prefill(generations: list[Generation]) -> None:
    """Completions of one prompt: generations 1.. fork generation 0's prompt cache instead of prefilling it,
    where the owner's segment can fork a session (``fork_session``) and the downstream says its tiers can
    (``Downstream.forks_sessions``); else each prefills the prompt itself. Iterate generation 0 to its first
    token before the others, so that they find its cache open."""
    first = generations[0]
    if getattr(first.downstream, "forks_sessions", False) and hasattr(first.segment, "fork_session"):
        for generation in generations[1:]:
            generation.fork_of = first


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
