"""Segment runtime: many sessions in one forward, independent caches, clear errors."""

from __future__ import annotations

import pytest
import torch

from runtime.checkpoint import load_spec
from runtime.segment import Segment, SegmentInput, SessionError


@pytest.fixture(scope="module")
def segment(tiny_glm) -> Segment:
    return Segment.from_checkpoint(tiny_glm, 1, 5)


def rows(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def alone(segment: Segment, session: str, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a session's steps one forward at a time, with no other session in the batch."""
    out, pos = [], 0
    for step in steps:
        out.append(segment([SegmentInput(session, pos, hidden=step)])[0])
        pos += step.shape[0]
    segment.close_session(session)
    return out


def test_mixed_batch_equals_sessions_run_alone(segment):
    C = segment.spec.hidden_size
    a = [rows(7, C, 1), rows(1, C, 2), rows(1, C, 3)]
    b = [rows(3, C, 4), rows(5, C, 5), rows(1, C, 6)]
    c = [rows(12, C, 7), rows(1, C, 8), rows(2, C, 9)]
    expected = [alone(segment, "x", s) for s in (a, b, c)]
    pos = [0, 0, 0]
    got = [[], [], []]
    for step in range(3):  # prefill of different lengths, then decode, all batched together
        items = [SegmentInput(name, pos[i], hidden=s[step]) for i, (name, s) in enumerate(zip("abc", (a, b, c)))]
        for i, out in enumerate(segment(items)):
            got[i].append(out)
            pos[i] += items[i].num_positions
    for g, e in zip(got, expected):
        for gs, es in zip(g, e):
            torch.testing.assert_close(gs, es, atol=1e-5, rtol=1e-5)
    assert [segment.cached_length(n) for n in "abc"] == pos
    segment.close_session("b")
    assert "b" not in segment.sessions and segment.cached_length("a") == pos[0]
    for n in "ac":
        segment.close_session(n)


def test_retried_step_gives_the_same_answer(segment):
    C = segment.spec.hidden_size
    prompt, step = rows(6, C, 10), rows(1, C, 11)
    segment([SegmentInput("r", 0, hidden=prompt)])
    first = segment([SegmentInput("r", 6, hidden=step)])[0]
    again = segment([SegmentInput("r", 6, hidden=step)])[0]  # the same step repeated (a retry)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert segment.cached_length("r") == 7
    segment.close_session("r")


def test_cache_grows_past_its_first_capacity(segment):
    C = segment.spec.hidden_size
    long = rows(150, C, 12)
    one_shot = alone(segment, "g", [long])[0]
    stepped = torch.cat(alone(segment, "g", [long[:100]] + [long[i : i + 1] for i in range(100, 150)]))
    torch.testing.assert_close(stepped, one_shot, atol=1e-5, rtol=1e-5)


def test_errors_are_clear(segment):
    C = segment.spec.hidden_size
    with pytest.raises(SessionError, match="unknown session"):
        segment([SegmentInput("nobody", 5, hidden=rows(1, C, 0))])
    segment([SegmentInput("e", 0, hidden=rows(2, C, 0))])
    with pytest.raises(SessionError, match="2 positions cached"):
        segment([SegmentInput("e", 3, hidden=rows(1, C, 0))])
    with pytest.raises(ValueError, match=r"must be \(T, 64\)"):
        segment([SegmentInput("e", 2, hidden=rows(1, C + 1, 0))])
    with pytest.raises(ValueError, match="give hidden states"):
        segment([SegmentInput("e", 2, input_ids=torch.tensor([1]))])
    with pytest.raises(SessionError, match="at most one step per session"):
        segment([SegmentInput("e", 2, hidden=rows(1, C, 0)), SegmentInput("e", 2, hidden=rows(1, C, 0))])
    assert segment.cached_length("e") == 2  # nothing above touched the session
    segment.close_session("e")


def test_segment_loads_only_its_own_weights(tiny_glm):
    spec = load_spec(tiny_glm)
    middle = Segment.from_checkpoint(tiny_glm, 2, 4)
    names = set(middle.state_dict())
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"2", "3"}
    assert not any(n.startswith(("embed_tokens", "lm_head", "norm")) for n in names)
    with pytest.raises(ValueError, match="not within"):
        Segment.from_checkpoint(tiny_glm, 3, spec.num_layers + 1)


def test_view_runs_part_of_a_segment_with_its_own_caches(tiny_glm):
    whole = Segment.from_checkpoint(tiny_glm, 0, 6, embed=True)
    part = whole.view(2, 5)
    alone_part = Segment.from_checkpoint(tiny_glm, 2, 5)
    h = rows(5, whole.spec.hidden_size, 3)
    torch.testing.assert_close(
        part([SegmentInput("v", 0, hidden=h)])[0], alone_part([SegmentInput("v", 0, hidden=h)])[0], atol=0, rtol=0
    )
    assert "v" in part.sessions and "v" not in whole.sessions
    assert part.layers["2"] is whole.layers["2"]  # shared weights, no copy
    with pytest.raises(ValueError, match="not within"):
        whole.view(4, 7)


def test_a_rewind_with_new_content_equals_a_fresh_run(segment):
    """Rejected speculative positions: the cache rewinds (a length change) and other rows follow."""
    C = segment.spec.hidden_size
    prompt, drafts, other = rows(6, C, 20), rows(4, C, 21), rows(2, C, 22)
    segment([SegmentInput("spec", 0, hidden=prompt)])
    segment([SegmentInput("spec", 6, hidden=drafts)])  # four drafted positions ...
    pages = list(segment.pool.sessions["spec"].pages)
    rewound = segment([SegmentInput("spec", 7, hidden=other)])[0]  # ... one accepted, then other content
    assert segment.pool.sessions["spec"].pages == pages  # a rewind moved nothing
    segment([SegmentInput("fresh", 0, hidden=torch.cat([prompt, drafts[:1]]))])
    fresh = segment([SegmentInput("fresh", 7, hidden=other)])[0]
    torch.testing.assert_close(rewound, fresh, atol=1e-5, rtol=1e-5)
    assert segment.cached_length("spec") == 9
    for name in ("spec", "fresh"):
        segment.close_session(name)


def test_a_full_pool_refuses_new_sessions_and_spares_running_ones(tiny_glm):
    from runtime.kv_pool import PoolExhausted

    small = Segment.from_checkpoint(tiny_glm, 1, 3)
    small.configure_pool(tokens=64, page_size=16)
    C = small.spec.hidden_size
    small.reserve("running", 48)
    before = small([SegmentInput("running", 0, hidden=rows(8, C, 30))])[0]
    with pytest.raises(PoolExhausted, match="free positions"):
        small([SegmentInput("new", 0, hidden=rows(30, C, 31))])
    assert set(small.sessions) == {"running"} and small.cached_length("running") == 8
    after = small([SegmentInput("running", 8, hidden=rows(1, C, 32))])[0]  # the running one goes on
    small.close_session("running")
    again = small([SegmentInput("running", 0, hidden=torch.cat([rows(8, C, 30), rows(1, C, 32)]))])[0]
    torch.testing.assert_close(again[:8], before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again[8:], after, atol=1e-5, rtol=1e-5)


def test_a_session_in_several_pool_runs_equals_one_in_a_single_run(tiny_glm):
    """Two sessions growing in turn take interleaved pages; attention reads each run in place, exactly."""
    seg = Segment.from_checkpoint(tiny_glm, 1, 3)
    seg.configure_pool(tokens=512, page_size=4)
    C = seg.spec.hidden_size
    a, b = rows(40, C, 40), rows(40, C, 41)
    seg([SegmentInput("a", 0, hidden=a[:6]), SegmentInput("b", 0, hidden=b[:6])])
    out = []
    for pos in range(6, 40):  # in turn, one position a step: each growth finds the other's pages in the way
        out.append(seg([SegmentInput("a", pos, hidden=a[pos : pos + 1])])[0])
        seg([SegmentInput("b", pos, hidden=b[pos : pos + 1])])
    assert len(seg.pool.sessions["a"].runs) > 1  # the case under test: a's pages are not one run
    alone = Segment.from_checkpoint(tiny_glm, 1, 3)
    expected = alone([SegmentInput("a", 0, hidden=a)])[0][6:]
    torch.testing.assert_close(torch.cat(out), expected, atol=1e-5, rtol=1e-5)
