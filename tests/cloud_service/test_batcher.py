"""The scheduler on its own: what one loop takes, and a failing step inside a batch fails only itself."""

from __future__ import annotations

import pytest
import torch

from cloud_service.batcher import Batcher, Limits
from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from runtime.artifacts import load_tier
from runtime.terminal import StepError

from .conftest import reference


def _first(edge, session: str, prompt: list[int]) -> tuple[pb.Frame, torch.Tensor]:
    hidden = edge.hidden(session, 0, prompt)
    return make_frame(session, 0, 0, None, params=pb.GenerationParams(max_tokens=4)), hidden


@pytest.fixture()
def idle_batcher(tiny_plan):
    """A batcher whose thread starts only when the test says, so the test decides what is queued."""
    batcher = Batcher(load_tier(tiny_plan, "cloud"), Limits(max_batch=4))
    yield batcher
    batcher.stop()


def test_one_loop_takes_at_most_max_batch_steps_and_one_per_session(idle_batcher, edge, tiny_glm):
    prompts = {f"s{i}": [(5 * i + j) % 96 for j in range(2 + i)] for i in range(6)}
    futures = {sid: idle_batcher.submit(*_first(edge, sid, p)) for sid, p in prompts.items()}
    again = idle_batcher.submit(*_first(edge, "s0", prompts["s0"]))  # the same seq 0, queued behind the first
    idle_batcher.start()

    results = {sid: f.result(30) for sid, f in futures.items()}
    sizes = [results[sid].timings_ms["batch_size"] for sid in prompts]
    assert sizes == [4, 4, 4, 4, 2, 2]  # s0..s3 in the first pass, s4, s5 in the second
    assert again.result(30) == results["s0"]  # not in the first pass (same session): answered as a repeat
    for sid, prompt in prompts.items():
        assert results[sid].tokens[0] == reference(tiny_glm, prompt, 1)[0][0]
    assert results["s5"].timings_ms["queue"] >= results["s0"].timings_ms["compute"]


def test_a_step_that_breaks_the_batch_fails_alone(idle_batcher, edge, tiny_glm):
    good = {"a": [1, 2, 3], "c": [7, 8, 9, 10]}
    futures = {sid: idle_batcher.submit(*_first(edge, sid, p)) for sid, p in good.items()}
    frame = make_frame("b", 0, 0, None, params=pb.GenerationParams(max_tokens=4))
    bad = idle_batcher.submit(frame, torch.randn(2, 32))  # too narrow: the batched forward raises
    idle_batcher.start()

    with pytest.raises(StepError) as info:
        bad.result(30)
    assert info.value.status == "INTERNAL" and "'b'" in str(info.value)
    for sid, prompt in good.items():
        result = futures[sid].result(30)
        assert result.tokens[0] == reference(tiny_glm, prompt, 1)[0][0]
        assert result.timings_ms["batch_size"] == 1  # retried one by one
    assert idle_batcher.stats()["sessions"] == 3  # "b" stays until its stream ends and frees it
    for sid in ("a", "b", "c"):
        idle_batcher.free(sid).result(5)
    assert idle_batcher.stats() == {"sessions": 0, "caches": 0, "queued": 0}


def test_steps_queued_at_shutdown_fail_unavailable(idle_batcher, edge):
    future = idle_batcher.submit(*_first(edge, "late", [1, 2]))
    idle_batcher.start()
    idle_batcher.stop()
    after = idle_batcher.submit(*_first(edge, "later", [1, 2]))
    with pytest.raises(StepError) as info:
        after.result(5)
    assert info.value.status == "UNAVAILABLE"
    assert future.done()
