"""The cloud service under test: real gRPC servers on free ports, frames made the way the edge makes them."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from cloud_service.server import CloudServer, serve
from cloud_service.settings import CloudSettings
from protos import splitglm_pb2 as pb
from protos import splitglm_pb2_grpc as rpc
from protos.frames import make_frame
from runtime.local import Chain, split_segments
from runtime.sampling import SamplingParams
from runtime.segment import SegmentInput

HEALTHY_PROMPT = [3, 14, 15, 92, 65]
HEALTHY_TOKENS = 256  # long enough to outlast the bad requests sent beside it


class Edge:
    """The tiny model's device + edge segments: the hidden states at k2 that an edge sends to the cloud."""

    def __init__(self, tiny_glm: str):
        self.device, self.edge, _ = split_segments(tiny_glm, 2, 4)
        self.lock = threading.Lock()

    def hidden(self, session: str, pos: int, ids: list[int]) -> torch.Tensor:
        """(T, C) hidden states of new tokens ``ids`` at positions pos.. of ``session``."""
        with self.lock:
            x = self.device([SegmentInput(session, pos, input_ids=torch.tensor(ids))])[0]
            return self.edge([SegmentInput(session, pos, hidden=x)])[0]

    def close(self, session: str) -> None:
        with self.lock:
            self.device.close_session(session)
            self.edge.close_session(session)


class Stream:
    """One SegmentService.Stream call (one session): write frames, read StepResults."""

    def __init__(self, port: int, raw: bool = False):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.requests: queue.Queue = queue.Queue()
        if raw:  # bytes as they are, not a Frame
            call = self.channel.stream_stream("/splitglm.v1.SegmentService/Stream", request_serializer=None,
                                              response_deserializer=pb.StepResult.FromString)
        else:
            call = rpc.SegmentServiceStub(self.channel).Stream
        self.responses = call(iter(self.requests.get, None))

    def step(self, frame) -> pb.StepResult:
        self.requests.put(frame)
        return next(self.responses)

    def send(self, frame) -> None:
        self.requests.put(frame)

    def end(self) -> list[pb.StepResult]:
        """Half-close and read what is left (raises the stream's error status, if any)."""
        self.requests.put(None)
        try:
            return list(self.responses)
        finally:
            self.channel.close()

    def error(self, frame) -> grpc.RpcError:
        """Send ``frame``; the stream must end with an error status, returned."""
        with pytest.raises(grpc.RpcError) as info:
            self.step(frame)
        self.channel.close()
        return info.value


@dataclass
class Run:
    """One generation through the cloud, driven like an owner: prefill, then one token per step."""

    edge: Edge
    port: int
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    session: str = field(default_factory=lambda: uuid.uuid4().hex)
    results: list[pb.StepResult] = field(default_factory=list)

    def frame(self, seq: int, pos: int, ids: list[int], **kw) -> pb.Frame:
        params = pb.GenerationParams(max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed)
        hidden = self.edge.hidden(self.session, pos, ids)
        return make_frame(self.session, seq, pos, hidden, codec="fp32", params=params if seq == 0 else None, **kw)

    def __call__(self, start: threading.Barrier | None = None, pace: threading.Event | None = None,
                 lockstep: threading.Barrier | None = None) -> Run:
        """Generate all tokens on one stream; ``pace``: sleep between steps until it is set; ``lockstep``: every
        step's frame is made first, then sent when all the runs sharing the barrier have theirs (so the frames of
        concurrent sessions reach the server together, however fast it answers)."""
        stream = Stream(self.port)
        pos, ids = 0, self.prompt
        try:
            if start is not None:
                start.wait()
            for seq in range(self.max_tokens):
                frame = self.frame(seq, pos, ids)
                if lockstep is not None:
                    try:
                        lockstep.wait(10)
                    except threading.BrokenBarrierError:
                        pass  # a run that finished early: the rest go on without it
                result = stream.step(frame)
                self.results.append(result)
                if result.finished:
                    if lockstep is not None:
                        lockstep.abort()
                    break
                pos, ids = pos + len(ids), [result.tokens[0]]
                if pace is not None and not pace.is_set():
                    time.sleep(0.01)
            stream.end()
        finally:
            self.edge.close(self.session)
        return self

    @property
    def tokens(self) -> list[int]:
        return [r.tokens[0] for r in self.results]

    @property
    def logprobs(self) -> list[float]:
        return [r.logprobs[0] for r in self.results]


def reference(tiny_glm: str, prompt: list[int], n: int, temperature: float = 0.0, seed: int = 0):
    """Tokens and log-probabilities of the split model in one process (no gRPC)."""
    chain = Chain(split_segments(tiny_glm, 2, 4))
    out = list(chain.generate(prompt, n, SamplingParams(temperature=temperature, seed=seed)))
    return [t for t, _ in out], [lp for _, lp in out]


@pytest.fixture(scope="session")
def edge(tiny_glm) -> Edge:
    return Edge(tiny_glm)


@pytest.fixture(scope="session")
def healthy_reference(tiny_glm):
    return reference(tiny_glm, HEALTHY_PROMPT, HEALTHY_TOKENS)


@contextmanager
def start_cloud(plan: str, **settings) -> Iterator[CloudServer]:
    settings = {"dtype": "float32", **settings}  # the references are fp32 (on a GPU too: device auto)
    server = serve(CloudSettings(plan=plan, host="127.0.0.1", port=0, threads=1, **settings))
    try:
        yield server
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def cloud(tiny_plan) -> Iterator[CloudServer]:
    with start_cloud(tiny_plan) as server:
        yield server


@contextmanager
def healthy_session(edge: Edge, port: int, expected) -> Iterator[Run]:
    """A session generating correctly beside whatever the block does; checked when the block ends."""
    run, done, failure = Run(edge, port, HEALTHY_PROMPT, HEALTHY_TOKENS), threading.Event(), []

    def target():
        try:
            run(pace=done)
        except BaseException as e:  # noqa: BLE001 -- reported by the test below
            failure.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not run.results and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.results, f"the healthy session did not start: {failure}"
    yield run
    assert thread.is_alive(), "the healthy session ended before the block: nothing ran beside it"
    done.set()
    thread.join(30)
    assert not failure, f"the healthy session failed: {failure[0]!r}"
    assert run.tokens == expected[0]
    assert torch.allclose(torch.tensor(run.logprobs), torch.tensor(expected[1]), atol=1e-5)
