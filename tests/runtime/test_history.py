"""The split-point history the device and the edge share: commits, drafts settled at next_pos, rewinds, replays."""

from __future__ import annotations

import pytest
import torch

from protos import splitglm_pb2 as pb
from protos.codecs import CODECS, decode, encode
from runtime.history import Seqs, SplitHistory, remaining_params

C = 64


def rows(start: int, n: int) -> torch.Tensor:
    """Distinct rows: row p is filled with p (so a replay's rows name their positions)."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, C).contiguous()


def positions(t: torch.Tensor) -> list[int]:
    return t[:, 0].int().tolist()


def commit(h: SplitHistory, start: int, n: int, with_decoded: bool = True) -> None:
    x = rows(start, n)
    h.commit(start, encode(x, "fp32"), x if with_decoded else None)


@pytest.mark.parametrize("with_decoded", [True, False], ids=["edge", "device"])
def test_commits_append_and_a_retried_step_rewinds(with_decoded):
    h = SplitHistory()
    commit(h, 0, 5, with_decoded)
    commit(h, 5, 1, with_decoded)
    commit(h, 6, 1, with_decoded)
    assert h.length == 7 and positions(h.tensor()) == list(range(7))
    commit(h, 6, 1, with_decoded)  # position 6 again
    assert h.length == 7 and len(h.rows) == 3 and positions(h.tensor()) == list(range(7))
    with pytest.raises(ValueError, match="holds 7 positions; a step cannot start at 9"):
        commit(h, 9, 1, with_decoded)
    assert h.length == 7


def test_drafts_wait_and_are_settled_at_next_pos():
    h = SplitHistory()
    commit(h, 0, 5)
    for p in (5, 6, 7):  # draft rows
        h.draft(p, encode(rows(p, 1), "fp32"), rows(p, 1))
    assert h.length == 5 and len(h.drafts) == 3 and positions(h.tensor()) == list(range(5))
    with pytest.raises(ValueError, match="draft row at 9, expected 8"):
        h.draft(9, encode(rows(9, 1), "fp32"))
    h.settle(7)  # drafts at 5 and 6 accepted, 7 rejected
    assert h.length == 7 and not h.drafts and positions(h.tensor()) == list(range(7))
    h.draft(7, encode(rows(7, 1), "fp32"))
    h.settle(7)  # nothing accepted
    assert h.length == 7 and not h.drafts
    h.draft(7, encode(rows(7, 1), "fp32"))
    commit(h, 7, 1)  # a commit drops waiting drafts
    assert h.length == 8 and not h.drafts


@pytest.mark.parametrize("with_decoded", [True, False], ids=["edge", "device"])
def test_a_rewind_inside_a_frame_keeps_its_first_rows_as_they_decoded(with_decoded):
    h = SplitHistory()
    x = torch.randn(6, C)
    h.commit(0, encode(x, "int8"), decode(encode(x, "int8"), C) if with_decoded else None)
    commit(h, 6, 1, with_decoded)
    h.truncate(4)
    assert h.length == 4 and len(h.rows) == 1 and h.rows[0].codec == pb.FP32 and list(h.rows[0].shape) == [4, C]
    assert torch.equal(h.tensor(), decode(encode(x, "int8"), C)[:4])
    h.settle(2)  # a verification's next_pos below the committed rows rewinds too
    assert h.length == 2 and torch.equal(h.tensor(), decode(encode(x, "int8"), C)[:2])
    h.truncate(5)  # past the end: nothing
    assert h.length == 2


def test_the_replay_frame_carries_every_committed_row_and_what_is_still_to_come():
    h = SplitHistory()
    commit(h, 0, 5)
    commit(h, 5, 1)
    h.draft(6, encode(rows(6, 1), "fp32"))  # a draft row in flight is not replayed
    params = pb.GenerationParams(max_tokens=20, seed=5, temperature=0.5)
    out = h.replay_frame("s-r1", params, [7, 8, 9])
    assert (out.session_id, out.seq, out.start_pos) == ("s-r1", 0, 0)
    assert positions(decode(out.hidden, C)) == list(range(6))
    assert out.params.seed == 5 and out.params.temperature == 0.5 and out.params.max_tokens == 17
    assert list(out.params.generated_tokens) == [7, 8, 9]
    with_current = h.replay_frame("s", params, [7, 8, 9], current=encode(rows(6, 1), "fp32"))
    assert positions(decode(with_current.hidden, C)) == list(range(7))
    assert params.max_tokens == 20 and not params.generated_tokens  # the session's own params are untouched
    with pytest.raises(ValueError, match="no rows"):
        SplitHistory().replay_frame("s", params, [])


def test_remaining_params_never_asks_for_less_than_one_token():
    params = pb.GenerationParams(max_tokens=4, seed=9)
    assert remaining_params(params, [5]).max_tokens == 3 and remaining_params(params, [5]).seed == 9
    assert remaining_params(params, [5] * 4).max_tokens == 1 and remaining_params(params, [5] * 7).max_tokens == 1


def test_remaining_params_carry_every_token_before_the_replay():
    """A session replayed twice (a device to a new edge, then that edge's session to the fast tail): the second
    replay's params name the tokens before the first one, then those since."""
    first = remaining_params(pb.GenerationParams(max_tokens=10, presence_penalty=0.5), [4, 4, 7])
    second = remaining_params(first, [9, 1])
    assert list(first.generated_tokens) == [4, 4, 7] and first.max_tokens == 7
    assert list(second.generated_tokens) == [4, 4, 7, 9, 1] and second.max_tokens == 5
    assert second.presence_penalty == 0.5


@pytest.mark.parametrize("codec", CODECS)
def test_a_replay_decodes_bit_for_bit_to_what_the_frames_decoded_to(codec):
    """The frames' rows as they came (or as fp32 where they cannot be joined): the replay's receiver decodes
    exactly the tensor the edge's fast tail gets (``tensor()``: each frame decoded on arrival)."""
    torch.manual_seed(0)
    h, frames = SplitHistory(), [torch.randn(t, C) * 4 for t in (7, 1, 1, 1)]
    pos = 0
    for x in frames:
        msg = encode(x, codec)
        h.commit(pos, msg, decode(msg, C))
        pos += x.shape[0]
    draft = encode(torch.randn(1, C), codec)
    h.draft(pos, draft, decode(draft, C))
    h.settle(pos + 1)  # an accepted draft's row
    expected = h.tensor()
    assert expected.shape == (11, C)
    assert torch.equal(decode(h.replay_frame("s", pb.GenerationParams(max_tokens=4), []).hidden, C), expected)
    h.truncate(5)  # inside the first frame: its first rows as fp32, then nothing of the other codec
    assert torch.equal(decode(h.replay_frame("s", pb.GenerationParams(max_tokens=4), []).hidden, C), expected[:5])


def test_seqs_renumber_for_the_tail_that_took_the_session():
    seqs = Seqs()
    assert seqs.of(0) == 0 and seqs.sent == 0
    seqs.took()
    seqs.took()
    assert seqs.sent == 2  # the cloud's seq of the next frame (draft steps never reach it)
    seqs.restart(7)  # the owner's seq 7 is the new tail's seq 0
    assert (seqs.of(7), seqs.of(9), seqs.sent) == (0, 2, 0)
