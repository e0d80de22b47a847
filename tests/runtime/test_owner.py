"""The owner's decode loop and the terminal's bookkeeping, in one process (no network)."""

from __future__ import annotations

import pytest
import torch

from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from runtime.local import Chain, split_segments
from runtime.owner import Generation, StepFailed, TextStream, stage_breakdown
from runtime.step import Sampled
from runtime.terminal import StepError, TailSessions
from tests.local_chain import LocalDownstream


class Tokenizer:
    """Decodes token ids as letters: enough to test text release and stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def params(**kw) -> pb.GenerationParams:
    return pb.GenerationParams(**{"max_tokens": 12, **kw})


def test_generation_equals_chain_greedy(tiny_glm):
    device, edge, cloud = split_segments(tiny_glm, 1, 2)
    prompt = [3, 17, 5, 9, 11]
    expected = [t for t, _ in Chain(split_segments(tiny_glm, 1, 2)).generate(prompt, 12)]
    downstream = LocalDownstream(edge, cloud)
    gen = Generation(device, downstream, prompt, params(), "fp32", Tokenizer())
    events = list(gen)
    assert [e.token for e in events] == expected
    assert gen.tokens == expected and gen.finish_reason == "length"
    assert downstream.closed == [gen.session_id]
    assert device.sessions == {} and edge.sessions == {} and cloud.sessions == {}
    assert gen.text == Tokenizer().decode(expected)


def test_stop_token_ends_generation(tiny_glm):
    device, edge, cloud = split_segments(tiny_glm, 1, 2)
    prompt = [3, 17, 5, 9, 11]
    expected = [t for t, _ in Chain(split_segments(tiny_glm, 1, 2)).generate(prompt, 12)]
    stop = expected[3]
    gen = Generation(device, LocalDownstream(edge, cloud), prompt, params(stop_token_ids=[stop]), "fp32", Tokenizer())
    tokens = [e.token for e in gen]
    assert tokens == expected[: expected.index(stop) + 1]
    assert gen.finish_reason == "stop"


def test_repeated_frame_is_answered_without_recomputing(tiny_glm):
    _, edge, cloud = split_segments(tiny_glm, 0, 1)
    tails = TailSessions()
    frame = make_frame("s", 0, 0, torch.randn(4, edge.spec.hidden_size), "fp32", params=params(temperature=1.0))
    assert tails.accept(frame) is None
    first = tails.answer(frame, Sampled([3], [-0.5]))
    assert tails.accept(frame) is first  # a retry of seq 0: the same answer, not a new sample
    with pytest.raises(StepError) as e:
        tails.accept(make_frame("s", 5, 4, None))
    assert e.value.status == "FAILED_PRECONDITION"
    with pytest.raises(StepError) as e:
        tails.accept(make_frame("other", 3, 0, None))
    assert e.value.status == "NOT_FOUND"
    with pytest.raises(StepError) as e:
        tails.accept(make_frame("noparams", 0, 0, None))
    assert e.value.status == "INVALID_ARGUMENT"


def test_tail_limits():
    tails = TailSessions(max_sessions=1, max_tokens=8)
    tails.accept(make_frame("a", 0, 0, None, params=params(max_tokens=8)))
    with pytest.raises(StepError) as e:
        tails.accept(make_frame("b", 0, 0, None, params=params(max_tokens=8)))
    assert e.value.status == "RESOURCE_EXHAUSTED"
    tails.close("a")
    with pytest.raises(StepError) as e:
        tails.accept(make_frame("b", 0, 0, None, params=params(max_tokens=9)))
    assert e.value.status == "RESOURCE_EXHAUSTED" and "max_tokens" in str(e.value)


def test_error_answer_raises_and_closes(tiny_glm):
    device, edge, cloud = split_segments(tiny_glm, 1, 2)

    class Failing(LocalDownstream):
        def step(self, frame):
            return pb.StepResult(session_id=frame.session_id, seq=frame.seq, error="boom", status=8)

    downstream = Failing(edge, cloud)
    with pytest.raises(StepFailed) as e:
        list(Generation(device, downstream, [1, 2], params(), "fp32", Tokenizer()))
    assert e.value.status == 8 and downstream.closed and device.sessions == {}


@pytest.mark.parametrize(
    "tokens, stop, pieces, stopped_at",
    [
        ([0, 1, 2, 3], ["cd"], ["", "a", "b", ""], 4),  # one character held back; "abcd" stops at "cd"
        ([0, 1, 2], ["x"], ["a", "b", "c"], None),
        ([0, 1, 2, 3], ["bcz"], ["", "", "a", "bcd"], None),  # held back while it could still be a stop string
    ],
)
def test_text_stream(tokens, stop, pieces, stopped_at):
    stream = TextStream(Tokenizer(), stop)
    got = []
    for i, t in enumerate(tokens):
        piece, stopped = stream.push(t)
        got.append(piece)
        if stopped:
            assert i + 1 == stopped_at
            break
    else:
        assert stopped_at is None
        got[-1] += stream.flush()
    assert got == pieces[: len(got)]
    assert "".join(got) == stream.text


def test_stage_breakdown_splits_each_wait_into_its_tiers():
    relayed = {"owner": 20.0, "downstream": 60.0, "edge_queue": 1.0, "edge_compute": 19.0, "tail": 36.0,
               "edge_total": 57.0, "queue": 0.5, "compute": 33.5, "batch_size": 1.0}  # fmt: skip
    assert stage_breakdown([relayed, {**relayed, "owner": 30.0}]) == {
        "owner": 25.0, "owner_edge_link": 3.0, "edge": 20.0, "cloud": 34.0, "edge_cloud_link": 2.0,
    }  # fmt: skip
    # the edge owns the session and steps the cloud itself: no relay timings
    owned = {"owner": 40.0, "downstream": 35.0, "queue": 1.0, "compute": 31.0, "batch_size": 2.0}
    assert stage_breakdown([owned]) == {"owner": 40.0, "cloud": 32.0, "edge_cloud_link": 3.0}
    # the edge's fast tail answered: no cloud in the step
    fast = {**relayed, "tail": 11.0, "edge_total": 32.0, "compute": 10.5}
    del fast["queue"], fast["batch_size"]
    assert stage_breakdown([fast]) == {"owner": 20.0, "owner_edge_link": 28.0, "edge": 20.0, "tail": 11.0}
    assert stage_breakdown([]) == {}


def test_generation_keeps_step_timings(tiny_glm):
    device, edge, cloud = split_segments(tiny_glm, 1, 2)
    gen = Generation(device, LocalDownstream(edge, cloud), [3, 17, 5], params(max_tokens=5), "fp32", Tokenizer())
    list(gen)
    assert len(gen.step_timings) == 5
    assert all(t["owner"] > 0 and t["downstream"] > 0 for t in gen.step_timings)
    assert set(gen.stage_breakdown()) >= {"owner"}
