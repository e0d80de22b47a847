"""A fork (n > 1) reads its source session's cache: only the peer that opened the source may fork it."""

from __future__ import annotations

import queue

import grpc
import pytest

from protos import splitglm_pb2 as pb
from protos import splitglm_pb2_grpc as rpc
from protos.frames import make_frame

from .conftest import Run


class Call:
    """One session's stream on a given channel (an edge's streams to one replica share its channel)."""

    def __init__(self, channel: grpc.Channel):
        self.requests: queue.Queue = queue.Queue()
        self.responses = rpc.SegmentServiceStub(channel).Stream(iter(self.requests.get, None))

    def step(self, frame: pb.Frame) -> pb.StepResult:
        self.requests.put(frame)
        return next(self.responses)

    def end(self) -> None:
        self.requests.put(None)
        list(self.responses)


def test_only_the_peer_that_opened_a_session_may_fork_it(cloud, edge):
    prompt = [4, 8, 15, 16, 23, 42]
    # another peer: its own connection (channels in one process share connections unless told otherwise)
    mine = grpc.insecure_channel(f"127.0.0.1:{cloud.port}")
    other = grpc.insecure_channel(f"127.0.0.1:{cloud.port}", options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        source = Run(edge, cloud.port, prompt, max_tokens=4)
        opened = Call(mine)
        first = opened.step(source.frame(0, 0, prompt))

        fork = "fork-" + source.session
        row = edge.hidden(fork, 0, prompt)[-1:]  # only the last prompt row travels, as the edge sends a fork
        frame = make_frame(fork, 0, len(prompt) - 1, row, codec="fp32", params=pb.GenerationParams(max_tokens=4))
        frame.fork_of = source.session
        stranger = Call(other)
        with pytest.raises(grpc.RpcError) as refused:
            stranger.step(frame)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "for this peer" in refused.value.details()

        forked = Call(mine).step(frame)
        assert not forked.error and forked.tokens[0] == first.tokens[0]  # greedy: the same first token
        opened.end()
    finally:
        mine.close()
        other.close()
