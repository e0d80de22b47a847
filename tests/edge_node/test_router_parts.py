"""The router's parts on their own: the split-point history and the edge's fast tail (real tiny-model segments)."""

from __future__ import annotations

import pytest
import torch

from edge_node.fast_tail import FastTail
from edge_node.settings import EdgeSettings, SettingsError
from protos import splitglm_pb2 as pb
from protos.codecs import encode
from runtime.artifacts import load_tier
from runtime.history import SplitHistory
from runtime.segment import SegmentInput
from tests.edge_node.test_router import PROMPT, exact_plan  # noqa: F401 -- fixture


def test_history_appends_and_rewinds():
    h = SplitHistory()
    a, b, c = torch.randn(4, 8), torch.randn(1, 8), torch.randn(1, 8)
    h.commit(0, encode(a, "fp32"), a)
    h.commit(4, encode(b, "fp32"), b)
    assert h.length == 5 and torch.equal(h.tensor(), torch.cat([a, b]))
    h.commit(4, encode(c, "fp32"), c)  # a retried step: position 4 again
    assert h.length == 5 and torch.equal(h.tensor(), torch.cat([a, c]))
    with pytest.raises(ValueError, match="holds 5 positions"):
        h.commit(7, encode(c, "fp32"), c)


def test_a_session_replayed_mid_generation_continues_like_one_that_never_moved(exact_plan):  # noqa: F811
    """Step by step on the fast tail, versus the same history replayed in one step at token 4: the same tokens."""
    edge, fast = load_tier(exact_plan, "edge"), FastTail.load(exact_plan)
    params = pb.GenerationParams(max_tokens=10)
    rows, tokens, pos = [], [], 0  # the split-point history, the tokens
    ids = torch.tensor(PROMPT)
    for seq in range(10):
        hidden = edge([SegmentInput("a", pos, input_ids=ids)])[0]  # (T, C)
        rows.append(hidden)
        r = fast.step("a", seq, pos, hidden, params if seq == 0 else None)
        assert not r.error and r.path == pb.FAST and r.timings_ms["compute"] > 0
        tokens.append(r.tokens[0])
        pos, ids = pos + hidden.shape[0], torch.tensor(list(r.tokens))
    assert r.finished and fast.step("a", 10, pos, rows[-1]).status == 8  # max_tokens reached: RESOURCE_EXHAUSTED

    history = torch.cat(rows[:5])  # the prompt and tokens 0..3: replayed, it answers token 4
    rest = pb.GenerationParams(max_tokens=6)
    replayed = [fast.step("b", 0, 0, history, rest).tokens[0]]
    pos = history.shape[0]
    for seq, hidden in enumerate(rows[5:], start=1):
        replayed.append(fast.step("b", seq, pos, hidden).tokens[0])
        pos += 1
    assert replayed == tokens[4:]
    assert fast.step("b", 3, 0, history).status == 9  # out of order: FAILED_PRECONDITION
    fast.close("a")
    fast.close("b")
    assert fast.sessions() == 0 and fast.segment.sessions == {}


def test_policy_settings(exact_plan):  # noqa: F811
    s = EdgeSettings.load(["--plan", exact_plan, "--policy", "accurate", "--policy-margin", "0.5"])
    assert (s.policy, s.policy_margin) == ("accurate", 0.5)
    assert EdgeSettings(plan=exact_plan).policy == "adaptive"
    with pytest.raises(SettingsError, match="policy"):
        EdgeSettings.load(["--plan", exact_plan, "--policy", "auto"])
