"""Bad frames and limits end their own stream with the right gRPC status; a healthy session beside them is untouched."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from protos import splitglm_pb2 as pb
from protos.frames import frame_to_bytes, make_frame

from .conftest import Run, Stream, healthy_session, reference, start_cloud

LIMITS = dict(max_sessions=3, max_tokens=300, max_positions=400, max_frame_bytes=256 << 10)


@pytest.fixture(scope="module")
def limited(tiny_plan):
    with start_cloud(tiny_plan, **LIMITS) as server:
        yield server


def _assert_status(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), error.details()


def test_garbage_frame_bytes_are_invalid_argument(cloud, edge, healthy_reference):
    with healthy_session(edge, cloud.port, healthy_reference):
        error = Stream(cloud.port, raw=True).error(b"\xff\xfe not a protobuf \x00")
        _assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "not a valid splitglm.v1.Frame")


def test_garbage_hidden_bytes_are_invalid_argument(cloud, edge, healthy_reference):
    run = Run(edge, cloud.port, [1, 2, 3], 4)
    frame = run.frame(0, 0, run.prompt)
    frame.hidden.values = b"\x13" * 100  # 3 x 64 fp32 values need 768 bytes
    with healthy_session(edge, cloud.port, healthy_reference):
        error = Stream(cloud.port).error(frame)
        _assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, run.session, "values")
    frame.hidden.values = b"\x00\x00\xc0\x7f" * (3 * 64)  # NaN
    error = Stream(cloud.port).error(frame)
    _assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "NaN")


def test_wrong_hidden_size_is_invalid_argument(cloud, edge, healthy_reference):
    frame = make_frame("narrow", 0, 0, torch.randn(3, 32), codec="fp32", params=pb.GenerationParams(max_tokens=4))
    with healthy_session(edge, cloud.port, healthy_reference):
        error = Stream(cloud.port).error(frame)
        _assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "64", "32")


def test_a_second_session_on_one_stream_is_invalid_argument(cloud, edge, healthy_reference):
    first, second = Run(edge, cloud.port, [1, 2], 4), Run(edge, cloud.port, [3, 4], 4)
    with healthy_session(edge, cloud.port, healthy_reference):
        stream = Stream(cloud.port)
        stream.step(first.frame(0, 0, first.prompt))
        error = stream.error(second.frame(0, 0, second.prompt))
        _assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "one stream per session", second.session)
    assert cloud.batcher.stats()["sessions"] == 0  # the stream's own session was freed as it ended


def test_unknown_session_is_not_found(cloud, edge, healthy_reference):
    run = Run(edge, cloud.port, [1, 2, 3], 4)
    run.frame(0, 0, run.prompt)
    with healthy_session(edge, cloud.port, healthy_reference):
        error = Stream(cloud.port).error(run.frame(1, 3, [7]))
        _assert_status(error, grpc.StatusCode.NOT_FOUND, "unknown session", run.session)


def test_out_of_order_seq_is_failed_precondition(cloud, edge, healthy_reference):
    run = Run(edge, cloud.port, [1, 2, 3], 8)
    with healthy_session(edge, cloud.port, healthy_reference):
        stream = Stream(cloud.port)
        token = stream.step(run.frame(0, 0, run.prompt)).tokens[0]
        error = stream.error(run.frame(2, 3, [token]))
        _assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "expects seq 1, got 2")
        stream = Stream(cloud.port)  # a step that skips positions
        skip = make_frame("skip", 0, 5, torch.randn(2, 64), codec="fp32", params=pb.GenerationParams(max_tokens=4))
        error = stream.error(skip)
        _assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "cannot start at position 5")


def test_too_many_sessions_is_resource_exhausted(limited, edge, healthy_reference):
    with healthy_session(edge, limited.port, healthy_reference):
        held = [Stream(limited.port) for _ in range(2)]
        for stream in held:
            run = Run(edge, limited.port, [1, 2], 4)
            stream.step(run.frame(0, 0, run.prompt))
        run = Run(edge, limited.port, [1, 2], 4)
        error = Stream(limited.port).error(run.frame(0, 0, run.prompt))
        _assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "too many sessions", "3")
        held.pop().end()  # a session leaves: a new one gets in
        run = Run(edge, limited.port, [1, 2], 4)
        stream = Stream(limited.port)
        assert len(stream.step(run.frame(0, 0, run.prompt)).tokens) == 1
        held.append(stream)
        for stream in held:
            stream.end()


def test_max_tokens_over_the_limit_is_resource_exhausted(limited, edge, healthy_reference):
    run = Run(edge, limited.port, [1, 2], max_tokens=301)
    with healthy_session(edge, limited.port, healthy_reference):
        error = Stream(limited.port).error(run.frame(0, 0, run.prompt))
        _assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_tokens 301", "300")


def test_too_many_positions_is_resource_exhausted(limited, edge, healthy_reference):
    prompt = [i % 96 for i in range(401)]
    run = Run(edge, limited.port, prompt, 4)
    with healthy_session(edge, limited.port, healthy_reference):
        error = Stream(limited.port).error(run.frame(0, 0, prompt))
        _assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "401x64", "at most 400 positions")

        run = Run(edge, limited.port, prompt[:399], 4)
        stream = Stream(limited.port)
        token = stream.step(run.frame(0, 0, run.prompt)).tokens[0]
        token = stream.step(run.frame(1, 399, [token])).tokens[0]  # position 399: the last one allowed
        error = stream.error(run.frame(2, 400, [token]))
        _assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "would hold 401 positions", "limit is 400")


def test_an_oversized_frame_is_resource_exhausted(limited, edge, healthy_reference):
    frame = make_frame("big", 0, 0, torch.randn(1100, 64), codec="fp32", params=pb.GenerationParams(max_tokens=4))
    assert len(frame_to_bytes(frame)) > LIMITS["max_frame_bytes"]
    with healthy_session(edge, limited.port, healthy_reference):
        error = Stream(limited.port).error(frame)
        _assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max")


def test_a_late_frame_is_deadline_exceeded_and_its_retry_works(cloud, edge, tiny_glm, healthy_reference):
    run = Run(edge, cloud.port, [9, 8, 7, 6], 6)
    expected = reference(tiny_glm, run.prompt, 6)[0]
    with healthy_session(edge, cloud.port, healthy_reference):
        stream = Stream(cloud.port)
        tokens = [stream.step(run.frame(0, 0, run.prompt)).tokens[0]]
        tokens.append(stream.step(run.frame(1, 4, tokens[-1:])).tokens[0])
        late = run.frame(2, 5, tokens[-1:], deadline_unix_ms=int(time.time() * 1e3) - 50)
        error = stream.error(late)
        _assert_status(error, grpc.StatusCode.DEADLINE_EXCEEDED, "after its deadline", run.session)

        retry = Stream(cloud.port)  # the session is still there: the same seq again, on a new stream
        late.deadline_unix_ms = int(time.time() * 1e3) + 60_000
        tokens.append(retry.step(late).tokens[0])
        for seq in range(3, 6):
            tokens.append(retry.step(run.frame(seq, seq + 3, tokens[-1:])).tokens[0])
        retry.end()
    assert tokens == expected


def test_a_step_past_step_timeout_is_deadline_exceeded(tiny_plan, edge):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with start_cloud(tiny_plan, step_timeout_s=0.05) as server:
        entered, hold = threading.Event(), threading.Event()  # the scheduler held: the step cannot be answered
        server.batcher.scheduler.call(lambda: (entered.set(), hold.wait(10)))  # in time, however busy the machine
        assert entered.wait(10)
        prompt = [i % 96 for i in range(300)]
        run = Run(edge, server.port, prompt, 4)
        try:
            error = Stream(server.port).error(run.frame(0, 0, prompt))
        finally:
            hold.set()
        _assert_status(error, grpc.StatusCode.DEADLINE_EXCEEDED, "step_timeout_s")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # the server goes on serving
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
