"""The edge's gRPC client against a real ``python -m cloud_service``: exact tokens, clear failures, health."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from edge_node.cloud import CloudClient
from edge_node.metrics import EdgeMetrics
from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from runtime.artifacts import load_tier
from runtime.local import Chain, split_segments
from runtime.owner import Generation, StepFailed
from runtime.segment import SegmentInput
from tests.procs import Proc, free_port

PROMPT = [3, 17, 5, 9, 11, 40, 2]


class Letters:
    """Decodes ids as letters: enough for the owner's text stream."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def start_cloud(plan: str, port: int = 0) -> tuple[Proc, str]:
    proc = Proc.python("cloud", "cloud_service", "--plan", plan, "--host", "127.0.0.1", "--port", str(port),
                       "--threads", "1")
    try:
        return proc, proc.ready(120).removeprefix("grpc://")
    except BaseException:
        proc.stop()
        raise


@pytest.fixture(scope="module")
def owner(tiny_plan):
    """The edge tier's segment (embedding + [0, k2)), as the edge runs it for HTTP sessions."""
    return load_tier(tiny_plan, "edge")


def expected_tokens(tiny_glm, n: int, prompt=PROMPT) -> list[int]:
    return [t for t, _ in Chain(split_segments(tiny_glm, 2, 4)).generate(prompt, n)]


def test_generation_through_the_cloud_equals_chain(cloud, owner, tiny_glm):
    metrics = EdgeMetrics()
    client = CloudClient(cloud, step_timeout_s=30, metrics=metrics)
    try:
        assert client.healthy()
        client.wait_ready(5)
        gen = Generation(owner, client.tail(), PROMPT, pb.GenerationParams(max_tokens=10), "fp32", Letters(),
                         lock=threading.Lock())
        events = list(gen)
    finally:
        client.close()
    assert [e.token for e in events] == expected_tokens(tiny_glm, 10)
    assert all(e.path == pb.ACCURATE for e in events) and gen.finish_reason == "length"
    assert owner.sessions == {}
    sent = metrics.registry.get_sample_value("splitglm_edge_wire_bytes_total", {"link": "edge_cloud",
                                                                                "direction": "out"})
    assert sent == gen.frame_bytes


def test_concurrent_sessions_share_one_channel(cloud, owner, tiny_glm):
    """Several sessions at once, one stream each over one channel: each gets its own exact tokens."""
    prompts = [PROMPT, [7, 1, 8], [50, 60, 70, 80, 90]]
    client, lock, results = CloudClient(cloud), threading.Lock(), {}

    def run(i: int) -> None:
        gen = Generation(owner, client.tail(), prompts[i], pb.GenerationParams(max_tokens=8), "fp32", Letters(),
                         lock=lock)
        results[i] = [e.token for e in gen]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        client.close()
    assert results == {i: expected_tokens(tiny_glm, 8, p) for i, p in enumerate(prompts)}


def test_cloud_error_status_reaches_the_owner(cloud, owner):
    """A frame the cloud refuses (seq 3 of an unknown session) comes back as NOT_FOUND, and ends that stream."""
    client = CloudClient(cloud)
    try:
        tail = client.tail()
        hidden = owner([SegmentInput("lost", 0, input_ids=torch.tensor(PROMPT))])[0]
        result = tail.step(make_frame("lost", 3, 0, hidden, "fp32"))
        assert result.status == 5 and "NOT_FOUND" in result.error and not result.tokens
        assert (result.session_id, result.seq) == ("lost", 3)
        again = tail.step(make_frame("lost", 4, 0, hidden, "fp32"))
        assert again.status == 5  # the stream is dead: it keeps answering its failure
        with pytest.raises(StepFailed) as e:  # and the owner's loop turns it into StepFailed
            list(Generation(owner, client.tail(), PROMPT, pb.GenerationParams(max_tokens=0), "fp32", Letters()))
        assert e.value.status == 3
    finally:
        client.close()


def test_dead_cloud_is_unavailable_quickly(owner):
    client = CloudClient(f"127.0.0.1:{free_port()}", step_timeout_s=30)
    try:
        start = time.monotonic()
        assert not client.healthy(timeout_s=1.0)
        hidden = owner([SegmentInput("s", 0, input_ids=torch.tensor(PROMPT))])[0]
        result = client.tail().step(make_frame("s", 0, 0, hidden, "fp32", params=pb.GenerationParams(max_tokens=4)))
        assert result.status == 14 and "UNAVAILABLE" in result.error
        with pytest.raises(TimeoutError):
            client.wait_ready(0.5)
        assert time.monotonic() - start < 5
    finally:
        owner.close_session("s")
        client.close()


def test_hung_then_stopped_cloud(tiny_plan, owner, tiny_glm):
    """A frozen cloud: the step times out (DEADLINE_EXCEEDED), health is False; thawed it serves; stopped, False."""
    proc, address = start_cloud(tiny_plan)
    client = CloudClient(address, step_timeout_s=1.0)
    params = pb.GenerationParams(max_tokens=4)
    try:
        assert client.healthy()
        hidden = owner([SegmentInput("hung", 0, input_ids=torch.tensor(PROMPT))])[0]
        os.kill(proc.popen.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            result = client.tail().step(make_frame("hung", 0, 0, hidden, "fp32", params=params))
            assert result.status == 4 and "DEADLINE_EXCEEDED" in result.error
            assert 0.9 < time.monotonic() - start < 3
            assert not client.healthy(timeout_s=0.5)
        finally:
            os.kill(proc.popen.pid, signal.SIGCONT)
        client.wait_ready(10)
        gen = Generation(owner, client.tail(), PROMPT, params, "fp32", Letters())
        assert [e.token for e in gen] == expected_tokens(tiny_glm, 4)
        assert proc.stop() == 0
        assert not client.healthy(timeout_s=1.0)
        result = client.tail().step(make_frame("after", 0, 0, hidden, "fp32", params=params))
        assert result.status == 14
    finally:
        owner.close_session("hung")
        client.close()
        proc.stop()
