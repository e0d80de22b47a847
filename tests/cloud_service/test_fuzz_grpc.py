"""The cloud's gRPC server fuzzed: random and mutated frames end their stream with a refusal status, never a crash
or a hang, hold nothing after the stream, and a healthy session beside them generates exactly.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from splitglm.fuzz.cloud import GrpcTarget
from tests.cloud_service.conftest import healthy_session, start_cloud

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
FRAME_LIMIT = 1 << 16
TTL_S = 1.0


@pytest.fixture(scope="module")
def server(tiny_plan):
    with start_cloud(tiny_plan, session_ttl_s=TTL_S, max_frame_bytes=FRAME_LIMIT) as server:
        yield server


@pytest.fixture()
def target(server):
    target = GrpcTarget(f"127.0.0.1:{server.port}", 64, server.batcher.stats, FRAME_LIMIT, TTL_S)
    yield target
    target.close()


def test_random_and_mutated_frames_get_refusal_statuses_and_leave_nothing(target):
    @settings(FUZZ, max_examples=400)
    @given(target.strategy())
    def fuzz(example):
        target.check(example)

    fuzz()
    target.finish()  # no session left once the streams ended; the healthy session's tokens unchanged


def test_a_session_generating_beside_the_fuzzing_is_exact(target, server, edge, healthy_reference):
    @settings(FUZZ, max_examples=60)
    @given(target.strategy())
    def fuzz(example):
        target.check(example)

    with healthy_session(edge, server.port, healthy_reference):
        fuzz()
