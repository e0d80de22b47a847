"""The cloud's gRPC health service reflects whether it can serve: NOT_SERVING once it drains (the streams already
open go on) and once the scheduler's loop has died."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_service.server import SERVICE
from tests.cloud_service.conftest import HEALTHY_PROMPT, Run, Stream, start_cloud
from tests.edge_node.test_relay import wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(port: int) -> set[int]:
    """What the health service says of the server ("") and of the segment service."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status for name in ("", SERVICE)}


def test_draining_says_not_serving_and_open_streams_go_on(tiny_plan, edge):
    with start_cloud(tiny_plan) as server:
        assert statuses(server.port) == {SERVING}
        run = Run(edge, server.port, HEALTHY_PROMPT, 3)
        stream = Stream(server.port)
        try:
            first = stream.step(run.frame(0, 0, HEALTHY_PROMPT))
            server.drain()
            assert statuses(server.port) == {NOT_SERVING}
            second = stream.step(run.frame(1, len(HEALTHY_PROMPT), [first.tokens[0]]))
            assert not second.error and len(second.tokens) == 1
            stream.end()
        finally:
            edge.close(run.session)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (the loop's traceback)
def test_a_dead_scheduler_loop_says_not_serving(tiny_plan, monkeypatch):
    with start_cloud(tiny_plan) as server:
        assert statuses(server.port) == {SERVING}
        scheduler = server.batcher.scheduler

        def broken():
            raise RuntimeError("a bug in the scheduler's loop")

        monkeypatch.setattr(scheduler, "_take", broken)
        scheduler.call(lambda: None)  # wakes the loop, which dies
        assert server.batcher.join(10)
        assert wait_until(lambda: statuses(server.port) == {NOT_SERVING}, 5)
