"""SessionHistory: which rows a replay carries, through plain steps, drafts, verifications and rewinds."""

from __future__ import annotations

import pytest
import torch

from device_agent.replay import NoHistory, SessionHistory
from protos import splitglm_pb2 as pb
from protos.codecs import decode, encode, join_rows
from protos.frames import make_frame

C = 8


def rows(start: int, n: int) -> torch.Tensor:
    """Distinct rows: row p is filled with p (so a replay's rows name their positions)."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, C).contiguous()


def frame(seq: int, start: int, n: int, codec: str = "fp32") -> pb.Frame:
    params = pb.GenerationParams(max_tokens=20, seed=5) if seq == 0 else None
    return make_frame("s", seq, start, rows(start, n), codec, params=params)


def positions(replay: pb.Frame) -> list[int]:
    return decode(replay.hidden, C)[:, 0].int().tolist()


def history_after(steps: list[tuple[pb.Frame, pb.StepResult]]) -> SessionHistory:
    history = SessionHistory("s", steps[0][0].params)
    for f, r in steps:
        history.answered(f, r)
    return history


def test_plain_steps_replay_every_row_and_the_current_one():
    history = history_after([(frame(0, 0, 5), pb.StepResult(tokens=[1])),
                             (frame(1, 5, 1), pb.StepResult(tokens=[2])),
                             (frame(2, 6, 1), pb.StepResult(tokens=[3]))])
    current = frame(3, 7, 1)
    replay = history.replay(current)
    assert positions(replay) == list(range(8))
    assert (replay.session_id, replay.seq, replay.start_pos) == ("s-r1", 0, 0)
    assert replay.params.seed == 5 and replay.params.max_tokens == 20 - 3  # what is still to come
    assert list(replay.params.generated_tokens) == [1, 2, 3]  # the new edge's tails restore their state from them
    assert history.wire_seq(3) == 0 and history.wire_seq(4) == 1
    answer = pb.StepResult(tokens=[4])
    history.replayed(replay, answer)
    assert answer.next_pos == 8 and history.rows.length == 8 and history.tokens == [1, 2, 3, 4]


def test_a_draft_in_flight_is_left_out_and_the_owner_rewinds():
    """A round: row 5 (verified) gets draft d1, row 6 (d1) gets draft d2; the edge goes while row 7 (d2) waits."""
    history = history_after([(frame(0, 0, 5), pb.StepResult(tokens=[1])),
                             (frame(1, 5, 1), pb.StepResult(draft_tokens=[9], next_pos=6)),
                             (frame(2, 6, 1), pb.StepResult(draft_tokens=[8], next_pos=7))])
    replay = history.replay(frame(3, 7, 1))
    assert positions(replay) == list(range(6))  # the prompt and the verified token's row
    answer = pb.StepResult(tokens=[9])
    history.replayed(replay, answer)
    assert answer.next_pos == 6  # the owner's next frame is row 6 again, now of a verified token


def test_a_verification_commits_the_accepted_drafts_only():
    history = history_after([(frame(0, 0, 5), pb.StepResult(tokens=[1])),
                             (frame(1, 5, 1), pb.StepResult(draft_tokens=[9], next_pos=6)),
                             (frame(2, 6, 1), pb.StepResult(draft_tokens=[8], next_pos=7)),
                             (frame(3, 7, 1), pb.StepResult(tokens=[9, 4], next_pos=7))])  # d1 accepted, d2 not
    assert history.rows.length == 7 and not history.rows.drafts and history.tokens == [1, 9, 4]
    assert positions(history.replay(frame(4, 7, 1))) == list(range(8))


def test_a_rewind_below_a_multi_row_frame_keeps_its_first_rows():
    history = history_after([(frame(0, 0, 6), pb.StepResult(tokens=[1], next_pos=4))])
    assert history.rows.length == 4
    assert positions(history.replay(frame(1, 4, 1))) == list(range(5))


def test_rows_are_joined_as_sent_or_losslessly():
    int8 = [encode(rows(0, 3), "int8"), encode(rows(3, 2), "int8")]
    joined = join_rows(int8)
    assert joined.codec == pb.INT8 and torch.equal(decode(joined, C), torch.cat([decode(m, C) for m in int8]))
    mixed = [encode(rows(0, 3), "int8"), encode(rows(3, 2), "fp16")]
    assert torch.equal(decode(join_rows(mixed), C), torch.cat([decode(m, C) for m in mixed]))


def test_a_session_whose_first_frame_was_not_seen_cannot_be_replayed():
    history = SessionHistory("s", pb.GenerationParams(max_tokens=4), broken="its first frame did not go here")
    with pytest.raises(NoHistory, match="cannot be replayed"):
        history.replay(frame(3, 7, 1))
