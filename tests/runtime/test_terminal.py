"""The terminal's shared pieces on their own: the one status mapping, the one reserve, the one report."""

from __future__ import annotations

import pytest

from protos import splitglm_pb2 as pb
from protos.errors import CorruptPayloadError, SizeLimitError
from runtime.kv_pool import KVPool, PoolExhausted
from runtime.owner import Generation
from runtime.report import report
from runtime.scheduler import QueueFull, SchedulerClosed
from runtime.step import SessionError
from runtime.terminal import StepError, Wording, status_of


@pytest.mark.parametrize(("error", "status"), [
    (StepError("NOT_FOUND", "no such session"), "NOT_FOUND"),
    (CorruptPayloadError("NaN in values"), "INVALID_ARGUMENT"),
    (SizeLimitError("too many positions"), "RESOURCE_EXHAUSTED"),
    (SessionError("expects position 3"), "FAILED_PRECONDITION"),
    (PoolExhausted("no room"), "RESOURCE_EXHAUSTED"),
    (QueueFull("4096 steps wait"), "RESOURCE_EXHAUSTED"),
])  # fmt: skip
def test_a_refusal_keeps_its_message(error, status):
    assert status_of(error) == (status, str(error))


def test_a_stopped_scheduler_is_unavailable_and_a_bug_internal():
    assert status_of(SchedulerClosed("stopped"), closed="the edge is shutting down") == (
        "UNAVAILABLE", "the edge is shutting down")
    assert status_of(KeyError("x"), failed="edge e1: step failed", log="the edge's log") == (
        "INTERNAL", "edge e1: step failed (KeyError; see the edge's log)")
    assert status_of(KeyError("x")) == ("INTERNAL", "step failed (KeyError)")


def test_wording_names_the_frame_and_prefixes_every_message():
    frame = pb.Frame(session_id="s{1}", seq=3)
    cloud = Wording(failed="step {seq} of session {session} failed on the cloud", log="the cloud's log")
    assert cloud.status(ValueError(), frame) == (
        "INTERNAL", "step 3 of session 's{1}' failed on the cloud (ValueError; see the cloud's log)")
    fast = Wording(prefix="edge fast tail: ")
    assert fast.status(PoolExhausted("full"), frame) == ("RESOURCE_EXHAUSTED", "edge fast tail: full")


def test_reserve_all_closes_only_the_sessions_it_opened_when_the_pool_is_full():
    pool = KVPool(1, 1, 4, tokens=64, page_size=16, grow="exact")
    pool.reserve_all([("running", None, 20)])
    pool.sessions["running"].length = 20
    with pytest.raises(PoolExhausted):
        pool.reserve_all([("running", 4, 32), ("new", 0, 48)])
    assert list(pool.sessions) == ["running"] and pool.sessions["running"].length == 4  # the rewind stays
    assert pool.reserve_all([("new", 0, 32)]) == ["new"] and pool.free_positions == 0


def test_one_report_for_the_device_and_the_edge():
    gen = Generation(None, None, [1], pb.GenerationParams(latency_budget_ms=50, policy="auto"), "fp32", None)
    gen.tokens, gen.paths, gen.ttft_ms, gen.total_ms = [5, 6, 7], [pb.ACCURATE, pb.FAST, 0], 1.23456, 40.00049
    answer = report(gen, 50.0)
    assert answer["paths"] == ["accurate", "fast", "unspecified"] and answer["path"] == "mixed"
    assert answer["timings_ms"] == {"ttft": 1.235, "per_token": 19.383, "total": 40.0}
    assert answer["actual_ms"] == 40.0 and answer["budget_met"] is True and answer["policy"] == "auto"
    late = report(gen, 30.0, total_ms=60.0, ttft_ms=2.0)  # an HTTP request counts from its arrival
    assert late["budget_met"] is False and late["timings_ms"]["ttft"] == 2.0 and late["actual_ms"] == 60.0
    assert report(gen, None)["budget_met"] is None


def test_sessions_prefetch_their_masks_unless_the_segment_computes_them_while_its_layers_run():
    from runtime.terminal import Limits, Terminal

    class Layers:  # a stand-in segment: the terminal only asks it what it is
        masks_while_running = False

    class Engine(Layers):
        masks_while_running = True

    frame = pb.Frame(session_id="s", seq=0, params=pb.GenerationParams(max_tokens=4))
    for segment, prefetch in ((Layers(), True), (Engine(), False)):
        tails = Terminal(segment, Limits()).tails
        tails.accept(frame)
        assert tails.prefetch is prefetch and tails.sessions["s"].state.prefetch is prefetch
