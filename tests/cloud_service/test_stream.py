"""The gRPC cloud tier computes what the split model computes in one process, batched or not."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_service.server import SERVICE
from protos.frames import make_frame

from .conftest import Run, Stream, reference, start_cloud


def test_greedy_tokens_equal_the_split_model_in_one_process(cloud, edge, tiny_glm):
    prompt = [5, 17, 33, 2, 80, 41, 9]
    run = Run(edge, cloud.port, prompt, max_tokens=12)()
    tokens, logprobs = reference(tiny_glm, prompt, 12)
    assert run.tokens == tokens
    assert torch.allclose(torch.tensor(run.logprobs), torch.tensor(logprobs), atol=1e-5)
    assert run.results[-1].finished and not any(r.finished for r in run.results[:-1])
    assert [r.seq for r in run.results] == list(range(12))
    assert {r.session_id for r in run.results} == {run.session}
    assert all(set(r.timings_ms) == {"queue", "compute", "batch_size"} for r in run.results)


def test_concurrent_sessions_are_batched_and_equal_each_run_alone(cloud, edge):
    prompts = [[(7 * i + j) % 96 for j in range(1 + 3 * i)] for i in range(8)]  # 1 to 22 tokens
    temperatures = [0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 1.0, 0.5]
    alone = [Run(edge, cloud.port, p, 16, t, seed=i)() for i, (p, t) in enumerate(zip(prompts, temperatures))]
    assert all(r.timings_ms["batch_size"] == 1 for run in alone for r in run.results)

    start, lockstep = threading.Barrier(len(prompts)), threading.Barrier(len(prompts))
    together = [Run(edge, cloud.port, p, 16, t, seed=i) for i, (p, t) in enumerate(zip(prompts, temperatures))]
    threads = [threading.Thread(target=run, args=(start, None, lockstep)) for run in together]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    for one, many in zip(alone, together):
        assert many.tokens == one.tokens
        assert torch.allclose(torch.tensor(many.logprobs), torch.tensor(one.logprobs), atol=1e-5)
    sizes = [r.timings_ms["batch_size"] for run in together for r in run.results]
    assert max(sizes) > 1, f"the server never batched: {sizes}"
    assert cloud.batcher.stats()["sessions"] == 0


def test_a_repeated_seq_is_answered_again_without_resampling(cloud, edge, tiny_glm):
    prompt, n = [11, 22, 33, 44], 8
    run = Run(edge, cloud.port, prompt, n, temperature=1.5, seed=7)
    stream = Stream(cloud.port)
    first = stream.step(run.frame(0, 0, prompt))
    second = stream.step(run.frame(1, len(prompt), [first.tokens[0]]))
    again = stream.step(run.frame(1, len(prompt), [first.tokens[0]]))
    assert again == second  # same token, log-probability and timings: the stored answer
    tokens, pos = [first.tokens[0], second.tokens[0]], len(prompt) + 1
    for seq in range(2, n):
        tokens.append(stream.step(run.frame(seq, pos, [tokens[-1]])).tokens[0])
        pos += 1
    stream.end()
    assert tokens == reference(tiny_glm, prompt, n, temperature=1.5, seed=7)[0]  # the repeat drew nothing


def _open(cloud, edge, session_prompt=(1, 2, 3)) -> tuple[Stream, Run]:
    run = Run(edge, cloud.port, list(session_prompt), 4)
    stream = Stream(cloud.port)
    stream.step(run.frame(0, 0, run.prompt))
    return stream, run


def test_sessions_are_freed_on_close_and_on_stream_end(cloud, edge):
    assert cloud.batcher.stats() == {"sessions": 0, "caches": 0, "queued": 0}
    closing, run_a = _open(cloud, edge)
    ending, run_b = _open(cloud, edge)
    assert cloud.batcher.stats()["sessions"] == 2 and cloud.batcher.stats()["caches"] == 2

    closing.send(make_frame(run_a.session, 1, 3, None, close=True))
    assert closing.end() == []  # a close frame gets no answer; the stream ends OK
    assert cloud.batcher.stats()["sessions"] == 1 and run_a.session not in cloud.batcher.segment.sessions

    assert ending.end() == []
    assert cloud.batcher.stats() == {"sessions": 0, "caches": 0, "queued": 0}


def test_idle_sessions_are_freed_after_the_ttl(tiny_plan, edge):
    with start_cloud(tiny_plan, session_ttl_s=0.3, max_sessions=1) as cloud:
        idle, run = _open(cloud, edge)
        assert cloud.batcher.stats()["sessions"] == 1
        deadline = time.monotonic() + 5
        while cloud.batcher.stats()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cloud.batcher.stats() == {"sessions": 0, "caches": 0, "queued": 0}
        error = idle.error(run.frame(1, 3, [4]))  # its stream still open, the session gone
        assert error.code() == grpc.StatusCode.NOT_FOUND and "unknown session" in error.details()
        other, _ = _open(cloud, edge)  # the one slot is free again
        other.end()


def test_health_serving_then_not_serving_when_draining(tiny_plan):
    with start_cloud(tiny_plan) as cloud, grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        cloud.drain()
        for name in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
