"""``python -m cloud_service --tensor-parallel 2`` on CPU (gloo): the tokens of one rank, a clean stop, a
rank killed taking the replica down (health NOT_SERVING, exit 1), and the settings it refuses (exit 2)."""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_service.__main__ import main
from cloud_service.server import SERVICE
from tests.procs import Proc

from .conftest import Run, reference

FOLLOWER = re.compile(r"rank 1 of 2 runs as pid (\d+)")


def start_replica(plan: str, timeout_s: float = 20) -> tuple[Proc, int, int]:
    """A 2-rank cloud process: it, its gRPC port, its follower's pid."""
    proc = Proc.python("cloud-tp", "cloud_service", "--plan", plan, "--host", "127.0.0.1", "--port", "0",
                       "--threads", "1", "--grace-s", "1", "--tensor-parallel", "2", "--tp-timeout-s", str(timeout_s))
    url = proc.ready(60)
    return proc, int(url.rsplit(":", 1)[1]), int(proc.wait_for(FOLLOWER, 5).group(1))


def gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` has exited (reaped, or a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_two_ranks_serve_one_ranks_tokens_and_stop_cleanly(tiny_plan, edge, tiny_glm):
    proc, port, follower = start_replica(tiny_plan, timeout_s=3)
    try:
        proc.wait_for("each with 1 of 2 KV heads", 5)  # each rank holds one KV head
        tokens, logprobs = reference(tiny_glm, [4, 8, 15, 16, 23, 42], 6)
        for idle_s in (0, 4):  # idle past --tp-timeout-s: the follower waits for the next step without a limit
            time.sleep(idle_s)
            run = Run(edge, port, [4, 8, 15, 16, 23, 42], 6)()
            assert run.tokens == tokens
            torch.testing.assert_close(torch.tensor(run.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)
        assert proc.stop(timeout=20) == 0, proc.output
        assert gone(follower, 5)
        assert "replica is down" not in proc.output
    finally:
        proc.stop()


def test_a_killed_rank_takes_the_replica_down(tiny_plan):
    proc, port, follower = start_replica(tiny_plan)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE),
                                                              timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            os.kill(follower, signal.SIGKILL)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.popen.wait(20) == 1, proc.output
        assert "rank 1 (pid" in proc.output and "replica is down" in proc.output
    finally:
        proc.stop()


def test_a_follower_exits_when_rank_0_is_killed(tiny_plan):
    proc, _, follower = start_replica(tiny_plan)
    try:
        assert not gone(follower, 0.5)
        os.kill(proc.popen.pid, signal.SIGKILL)  # no clean stop: the follower must notice by itself
        assert gone(follower, 15), "the follower outlived rank 0"
    finally:
        proc.stop()
        if not gone(follower, 0):
            os.kill(follower, signal.SIGKILL)


def test_bad_tensor_parallel_settings_exit_2(tiny_plan, caplog, monkeypatch):
    assert main(["--plan", tiny_plan, "--tensor-parallel", "0"]) == 2
    assert "tensor-parallel" in caplog.text and "greater than or equal to 1" in caplog.text
    assert main(["--plan", tiny_plan, "--tensor-parallel", "3"]) == 2  # the tiny model has 4 query heads
    assert "tensor_parallel 3: 3 ranks do not divide the 4 query heads" in caplog.text
    assert main(["--plan", tiny_plan, "--tensor-parallel", "2", "--dtype", "fp8"]) == 2
    assert "tensor_parallel does not take fp8 weights yet" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--plan", tiny_plan, "--device", "cuda", "--tensor-parallel", "2"]) == 2
    assert "tensor_parallel 2: this machine has 1 GPU(s)" in caplog.text


@pytest.mark.parametrize("world", [8])
def test_heads_that_cannot_be_split_exit_2(tiny_plan, caplog, world):
    assert main(["--plan", tiny_plan, "--tensor-parallel", str(world)]) == 2
    assert f"{world} ranks do not divide the 4 query heads" in caplog.text
