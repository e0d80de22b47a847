"""Speculative verification on the cloud: g drafts and the committed token in one step, the longest agreeing
prefix accepted plus the cloud's own next token; idempotent repeats; drafts validated."""

from __future__ import annotations

import grpc
import pytest
import torch

from protos import splitglm_pb2 as pb
from protos.frames import make_frame

from .conftest import Stream, reference
from .test_errors import _assert_status

PROMPT = [5, 17, 33, 2, 80, 41, 9]


def verify_frame(edge, session: str, seq: int, pos: int, committed: int, drafts: list[int]) -> pb.Frame:
    hidden = edge.hidden(session, pos, [committed, *drafts])  # (g + 1, C) rows at positions pos..
    frame = make_frame(session, seq, pos, hidden, codec="fp32")
    frame.draft_tokens.extend(drafts)
    return frame


def test_verification_accepts_the_agreeing_prefix_and_adds_its_own_token(cloud, edge, tiny_glm):
    tokens, logprobs = reference(tiny_glm, PROMPT, 12)
    session, P = "verify", len(PROMPT)
    stream = Stream(cloud.port)
    params = pb.GenerationParams(max_tokens=12)
    first = stream.step(make_frame(session, 0, 0, edge.hidden(session, 0, PROMPT), codec="fp32", params=params))
    assert list(first.tokens) == tokens[:1]
    right = stream.step(verify_frame(edge, session, 1, P, tokens[0], tokens[1:4]))  # three right drafts
    assert list(right.tokens) == tokens[1:5] and (right.drafted, right.accepted) == (3, 3)
    assert torch.allclose(torch.tensor(list(right.logprobs)), torch.tensor(logprobs[1:5]), atol=1e-5)
    wrong = (tokens[6] + 1) % 96
    half = verify_frame(edge, session, 2, P + 4, tokens[4], [tokens[5], wrong, 3])  # right, wrong, whatever
    answer = stream.step(half)
    assert list(answer.tokens) == tokens[5:7] and (answer.drafted, answer.accepted) == (3, 1)
    assert stream.step(half) == answer  # a repeated verification: the same answer, nothing recomputed
    # the cache was rewound to the accepted positions: the next step starts after them, with other rows
    after = stream.step(verify_frame(edge, session, 3, P + 6, tokens[6], []))
    assert list(after.tokens) == tokens[7:8] and after.drafted == 0
    stream.end()
    edge.close(session)


@pytest.mark.parametrize("case, words", [
    ("many", "the limit is 8"), ("vocab", "not in the vocabulary"), ("rows", "this one carries 3"),
])  # fmt: skip
def test_bad_drafts_are_invalid_argument(cloud, edge, case, words):
    session = f"bad-{case}"
    stream = Stream(cloud.port)
    params = pb.GenerationParams(max_tokens=40)
    stream.step(make_frame(session, 0, 0, edge.hidden(session, 0, PROMPT), codec="fp32", params=params))
    P = len(PROMPT)
    if case == "many":
        frame = verify_frame(edge, session, 1, P, 1, [2] * 9)
    elif case == "vocab":
        frame = verify_frame(edge, session, 1, P, 1, [2, 3])
        frame.draft_tokens[1] = 96  # (the rows were computed for a valid id)
    else:
        frame = verify_frame(edge, session, 1, P, 1, [2, 3])
        del frame.draft_tokens[-1]
    error = stream.error(frame)
    _assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, words)
    edge.close(session)
