"""The scheduler: concurrent sessions share steps, prompts run in chunks, a bad item fails only itself."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from runtime.local import split_segments
from runtime.sampling import SamplingParams
from runtime.scheduler import Scheduler, SchedulerClosed
from runtime.segment import Sampled, SegmentInput, SessionError


def rows(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def wait_queued(scheduler: Scheduler, n: int) -> None:
    deadline = time.monotonic() + 10
    while scheduler.queued() < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_shared_step_equals_separate_ones_and_spares_the_good_items(tiny_glm, caplog):
    _, edge, _ = split_segments(tiny_glm, 1, 3)
    _, alone, _ = split_segments(tiny_glm, 1, 3)
    width = edge.spec.hidden_size
    lock, steps = threading.Lock(), []
    scheduler = Scheduler(edge, max_batch=8, lock=lock, on_step=steps.append).start()
    hidden = {f"s{i}": rows(3 + i, width, i) for i in range(4)}
    items = [SegmentInput(sid, 0, hidden=h) for sid, h in hidden.items()]
    items.append(SegmentInput("unknown", 5, hidden=torch.randn(1, width)))  # no such session: refused alone
    with lock:  # every step queues before the first one runs
        futures = [scheduler.submit(item) for item in items]
        wait_queued(scheduler, len(items))
    with pytest.raises(SessionError):
        futures[-1].result(10)
    for (sid, h), future in zip(hidden.items(), futures):
        expected = alone([SegmentInput(sid, 0, hidden=h)])[0]
        torch.testing.assert_close(future.result(10), expected, rtol=1e-5, atol=1e-5)
        assert future.timings["queue"] >= 0 and future.timings["compute"] > 0
    scheduler.stop()
    assert set(edge.sessions) == set(hidden)  # the refused item opened nothing
    assert "a step of 5 items failed" in caplog.text  # one step took them all, then each ran alone
    assert [s.sessions for s in steps] == [1, 1, 1, 1]


def test_a_long_prompt_runs_in_chunks_beside_running_sessions(tiny_glm):
    _, edge, _ = split_segments(tiny_glm, 1, 3)
    _, alone, _ = split_segments(tiny_glm, 1, 3)
    width = edge.spec.hidden_size
    lock, steps = threading.Lock(), []
    scheduler = Scheduler(edge, prefill_chunk=16, decode_rows=4, lock=lock, on_step=steps.append).start()
    scheduler(  # a running session
        [SegmentInput("run", 0, hidden=rows(5, width, 1))])
    prompt = rows(40, width, 2)
    decode = [rows(1, width, 10 + i) for i in range(3)]
    with lock:
        long = scheduler.submit(SegmentInput("long", 0, hidden=prompt))
        short = [scheduler.submit(SegmentInput("run", 5 + i, hidden=d)) for i, d in enumerate(decode)]
        wait_queued(scheduler, 4)
    got = long.result(10)
    for f in short:
        f.result(10)
    scheduler.stop()
    expected = alone([SegmentInput("long", 0, hidden=prompt)])[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [s.rows for s in steps[1:]] == [17, 17, 9]  # each decode step beside one chunk of 16, 16, then 8
    expected_run = alone([SegmentInput("run", 0, hidden=torch.cat([rows(5, width, 1), *decode]))])[0][5:]
    torch.testing.assert_close(torch.cat([f.result() for f in short]), expected_run, rtol=1e-5, atol=1e-5)


def test_a_chunked_prompt_samples_what_one_pass_samples(tiny_glm):
    *_, cloud = split_segments(tiny_glm, 1, 3)
    *_, alone = split_segments(tiny_glm, 1, 3)
    prompt = rows(37, cloud.spec.hidden_size, 3)
    sample = tuple(SamplingParams(temperature=1.0, seed=5).rows(37))
    scheduler = Scheduler(cloud, prefill_chunk=8).start()
    got = scheduler([SegmentInput("p", 0, hidden=prompt, sample=sample)])[0]
    scheduler.stop()
    expected = alone([SegmentInput("p", 0, hidden=prompt, sample=sample)])[0]
    assert isinstance(got, Sampled) and got.tokens == expected.tokens
    assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


def test_calls_close_sessions_and_stop_fails_what_is_queued(tiny_glm):
    _, edge, _ = split_segments(tiny_glm, 1, 3)
    lock = threading.Lock()
    scheduler = Scheduler(edge, lock=lock).start()
    scheduler([SegmentInput("a", 0, hidden=rows(2, edge.spec.hidden_size, 0))])
    scheduler.close_session("a")
    assert "a" not in edge.sessions
    with lock:
        queued = scheduler.submit(SegmentInput("b", 0, hidden=rows(2, edge.spec.hidden_size, 0)))
        stopper = threading.Thread(target=scheduler.stop)
        stopper.start()
        time.sleep(0.2)
    stopper.join(10)
    if not queued.done() or queued.exception() is None:  # it may have run before the stop
        assert queued.result().shape == (2, edge.spec.hidden_size)
    else:
        assert isinstance(queued.exception(), SchedulerClosed)
    with pytest.raises(SchedulerClosed):
        scheduler.submit(SegmentInput("c", 0, hidden=rows(1, edge.spec.hidden_size, 0))).result()
    scheduler.close_session("b")  # after the stop, calls run in the caller's thread
    assert "b" not in edge.sessions


def test_settings_are_checked(tiny_glm):
    _, edge, _ = split_segments(tiny_glm, 1, 3)
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(edge, max_batch=0)


class _Recording:
    """A segment of mixed passes (``mixed_passes``) that records each call's items and takes a while."""

    def __init__(self, mixed: bool = True):
        self.mixed_passes, self.calls = mixed, []

    def __call__(self, items, last_only=False):
        self.calls.append([item.num_positions for item in items])
        time.sleep(0.004)
        return [item.hidden for item in items]

    def close_session(self, session_id):
        pass


def _lockstep_with_a_prompt(segment) -> list[list[int]]:
    """Three sessions decoding in lockstep (each round resubmitted at once) while a 12-chunk prompt arrives."""
    scheduler = Scheduler(segment, max_batch=8, prefill_chunk=4, decode_rows=2, chunk_hold_ms=50).start()
    pos = dict.fromkeys("abc", 0)

    def round_():
        for f in scheduler.submit_all([SegmentInput(s, pos[s], hidden=torch.zeros(1, 4)) for s in pos]):
            f.result()
        for s in pos:
            pos[s] += 1

    for _ in range(12):  # the sessions' return gaps are learnt
        round_()
    prompt = scheduler.submit(SegmentInput("p", 0, hidden=torch.zeros(48, 4)))
    while not prompt.done():
        round_()
    scheduler.stop()
    return [call for call in segment.calls if 4 in call]  # the calls that ran a chunk of the prompt


def test_a_chunk_waits_for_sessions_that_come_straight_back_with_mixed_passes():
    """With mixed passes, the prompt's chunks ride with the running sessions' steps instead of running alone
    just before those come back; without them (separate passes: nothing to share) the scheduler never waits."""
    held = _lockstep_with_a_prompt(_Recording(mixed=True))
    alone = [call for call in held if call == [4]]
    assert len(held) == 12 and len(alone) <= 2, held
    plain = _lockstep_with_a_prompt(_Recording(mixed=False))
    assert len(plain) == 12 and sum(call == [4] for call in plain) > len(alone), plain
