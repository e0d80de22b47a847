"""SegmentBatcher: concurrent callers share forward passes; a bad item fails only its own caller."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from partitioner.runtime.batching import SegmentBatcher
from partitioner.runtime.segment import SegmentInput, SessionError
from partitioner.session.local import split_segments


def test_a_shared_pass_equals_separate_ones_and_spares_the_good_items(tiny_glm):
    _, edge, _ = split_segments(tiny_glm, 1, 3)
    _, alone, _ = split_segments(tiny_glm, 1, 3)
    width = edge.spec.hidden_size
    lock, sizes = threading.Lock(), []
    batcher = SegmentBatcher(edge, lock, max_batch=8, on_pass=sizes.append)
    hidden = {f"s{i}": torch.randn(3 + i, width, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    items = [SegmentInput(sid, 0, hidden=h) for sid, h in hidden.items()]
    items.append(SegmentInput("unknown", 5, hidden=torch.randn(1, width)))  # no such session: refused alone
    out: dict[str, object] = {}

    def call(item: SegmentInput) -> None:
        try:
            out[item.session_id] = batcher(item)
        except Exception as e:  # noqa: BLE001 -- what the caller got is the test
            out[item.session_id] = e

    threads = [threading.Thread(target=call, args=(item,)) for item in items]
    with lock:  # every caller queues before the first pass
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(batcher._pending) < len(items) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(10)
    assert sizes[0] == len(items)  # one pass took them all (then each again alone, after the bad one failed it)
    assert isinstance(out["unknown"], SessionError)
    for sid, h in hidden.items():
        expected = alone([SegmentInput(sid, 0, hidden=h)])[0]
        torch.testing.assert_close(out[sid], expected, rtol=1e-5, atol=1e-5)
    assert set(edge.sessions) == set(hidden)  # the refused item opened nothing


def test_max_batch_is_checked(tiny_glm):
    _, edge, _ = split_segments(tiny_glm, 1, 3)
    with pytest.raises(ValueError, match="max_batch"):
        SegmentBatcher(edge, threading.Lock(), max_batch=0)
