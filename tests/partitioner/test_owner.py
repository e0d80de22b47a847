"""The owner's decode loop and the terminal's bookkeeping, in one process (no network)."""

from __future__ import annotations

import pytest
import torch

from partitioner.owner import Generation, StepFailed, TextStream
from partitioner.pipeline import Chain, split_segments
from partitioner.terminal import StepError, TailSessions
from protos import splitglm_pb2 as pb
from protos.frames import make_frame
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
    first = tails.answer("s", 0, torch.randn(edge.spec.vocab_size))
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
