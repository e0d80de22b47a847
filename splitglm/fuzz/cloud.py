"""The cloud's gRPC server under random and mutated frames: ``SegmentService.Stream``, one stream per input.

Each input is one stream of raw frame bytes: junk (random bytes, mutated
frames of every codec), a valid first frame, a valid first frame followed by
a valid or a mutated next one, a first frame and then another session's, a
close frame first, or a message over the server's size limit. Properties:
every stream ends within ``HANG_S``, with OK or a gRPC status that refuses
the input (never UNKNOWN or INTERNAL, which mean an exception the servicer
did not expect); valid frames are answered with one token each; an answer
never carries an error field (errors are statuses). At the end: the server
holds no session once the streams are over (those kept for a retry after
DEADLINE_EXCEEDED expire with the TTL), and a healthy session gives the same
tokens as before the run.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from hypothesis import strategies as st

from protos import splitglm_pb2 as pb
from protos.codecs import CODECS
from protos.frames import frame_to_bytes, make_frame

from . import HANG_S, FuzzFailure, expect
from .frames import FrameInput, frame_bytes, hidden_values, scramble

METHOD = "/splitglm.v1.SegmentService/Stream"
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE}
KINDS = ("junk", "junk", "junk", "new", "new+next", "new+mutant", "new+mutant", "two-sessions", "close-first",
         "oversize")


@dataclass(frozen=True)
class StreamInput:
    kind: str
    junk: FrameInput
    rows: int
    seed: int
    codec: str
    max_tokens: int

    def __repr__(self) -> str:
        return f"StreamInput({self.kind}, rows {self.rows}, seed {self.seed}, {self.codec}, {self.junk!r})"


class GrpcTarget:
    """Fuzzes a cloud server at ``address``; ``stats()`` (the server's ``Batcher.stats``) shows what it holds."""

    name = "grpc"

    def __init__(self, address: str, hidden_size: int, stats: Callable[[], dict], max_frame_bytes: int,
                 session_ttl_s: float):
        self.hidden_size, self.stats, self.max_frame_bytes = hidden_size, stats, max_frame_bytes
        self.ttl = session_ttl_s
        self.channel = grpc.insecure_channel(address)
        self.call = self.channel.stream_stream(METHOD, request_serializer=None,
                                               response_deserializer=pb.StepResult.FromString)
        self._ids = itertools.count()
        self.kept = 0  # streams that ended DEADLINE_EXCEEDED: their session waits for a retry until the TTL
        self.healthy_tokens = self.healthy()

    def strategy(self):
        return st.builds(StreamInput, kind=st.sampled_from(KINDS), junk=frame_bytes(self.hidden_size),
                         rows=st.integers(1, 4), seed=st.integers(0, 1 << 30), codec=st.sampled_from(CODECS),
                         max_tokens=st.integers(2, 6))

    def _frame(self, sid: str, seq: int, pos: int, rows: int, seed: int, codec: str, max_tokens: int = 0) -> bytes:
        params = pb.GenerationParams(max_tokens=max_tokens) if seq == 0 else None
        return frame_to_bytes(make_frame(sid, seq, pos, hidden_values(rows, self.hidden_size, "normal", seed),
                                         codec, params=params))

    def _stream(self, x: StreamInput) -> tuple[list[bytes], int]:
        """The frames of one input's stream and how many of them must be answered."""
        sid = f"fz-{next(self._ids)}"
        first = self._frame(sid, 0, 0, x.rows, x.seed, x.codec, x.max_tokens)
        following = self._frame(sid, 1, x.rows, 1, x.seed + 1, x.codec)
        if x.kind == "junk":
            return [x.junk.data], 0
        if x.kind == "oversize":
            return [bytes(self.max_frame_bytes + 1)], 0
        if x.kind == "new+next":
            return [first, following], 2
        if x.kind == "new+mutant":
            return [first, scramble(following, x.seed)], 1
        if x.kind == "two-sessions":
            return [first, self._frame(f"{sid}-other", 0, 0, x.rows, x.seed, x.codec, x.max_tokens)], 1
        if x.kind == "close-first":
            return [frame_to_bytes(make_frame(sid, 0, 0, None, close=True)), first], 0
        return [first], 1

    def check(self, example: StreamInput) -> None:
        frames, answered = self._stream(example)
        t0 = time.monotonic()
        results, code, details = [], None, ""
        try:
            for result in self.call(iter(frames), timeout=HANG_S):
                results.append(result)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        except Exception as e:  # noqa: BLE001 -- the client side breaking on an answer is a finding too
            raise FuzzFailure(f"{type(e).__name__} reading the stream of {example!r}: {e}") from e
        elapsed = time.monotonic() - t0
        what = f"{example!r} -> {code.name if code else 'OK'} {details[:160]!r} after {len(results)} answers"
        expect(elapsed < HANG_S, f"the stream hung for {elapsed:.1f} s: {what}")
        expect(code is None or code in REFUSALS, f"a status that is no refusal: {what}")
        expect(len(results) >= answered, f"{answered} answers were due: {what}")
        expect(all(not r.error and len(r.tokens) == 1 for r in results), f"a bad answer {results}: {what}")
        if example.kind == "two-sessions":
            expect(code == grpc.StatusCode.INVALID_ARGUMENT, f"a second session on one stream was served: {what}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.kept += 1

    def healthy(self) -> list[int]:
        """Tokens of a fixed greedy session of 6 steps on one stream."""
        sid, requests, tokens = f"fz-healthy-{next(self._ids)}", queue.Queue(), []
        responses = self.call(iter(requests.get, None), timeout=HANG_S * 6)
        pos = 0
        for step in range(6):
            rows = 3 if step == 0 else 1
            requests.put(self._frame(sid, step, pos, rows, 100 + step, "fp32", 6))
            result = next(responses)
            tokens += list(result.tokens)
            pos += rows
        requests.put(None)
        list(responses)
        return tokens

    def finish(self) -> None:
        """No session outlives its stream (beyond the TTL of those kept for a retry); a healthy session works."""
        deadline = time.monotonic() + HANG_S + (self.ttl * 2 if self.kept else 0)
        while time.monotonic() < deadline and (self.stats()["sessions"] or self.stats()["caches"]):
            time.sleep(0.05)
        stats = self.stats()
        expect(not stats["sessions"] and not stats["caches"], f"the cloud still holds {stats} after every stream "
               f"ended ({self.kept} kept for a retry, TTL {self.ttl:g} s)")
        again = self.healthy()
        expect(again == self.healthy_tokens, f"the healthy session's tokens changed: {self.healthy_tokens} -> {again}")

    def close(self) -> None:
        self.channel.close()
