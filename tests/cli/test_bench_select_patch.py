"""``splitglm.bench.select_patch.lift_select_limit``: paho's loop waits on descriptors past select's FD_SETSIZE."""

from __future__ import annotations

import os
import resource
import select
import socket

import pytest

from splitglm.bench.select_patch import _poll_select


def test_poll_select_answers_like_select_and_past_1024():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1500:  # (the machine's default may be 1024: the hard limit is higher)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    a, b = socket.socketpair()
    high = os.dup2(a.fileno(), 1500)  # a descriptor number select() refuses
    far = socket.socket(fileno=high)
    try:
        with pytest.raises(ValueError):
            select.select([far], [], [], 0)
        assert _poll_select([far], [], [], 0) == ([], [], [])  # nothing to read yet
        b.sendall(b"x")
        assert _poll_select([far, a], [], [], 1.0)[0] == [far, a]  # both ends of the same socket: readable
        assert _poll_select([], [far], [], 0)[1] == [far]  # writable
        assert _poll_select([b], [], [], 0.05) == ([], [], [])  # times out
        b.close()
        assert _poll_select([far], [], [], 1.0)[0] == [far]  # the peer closed: readable (EOF)
        far.close()
        with pytest.raises(ValueError):  # a closed socket: as select does
            _poll_select([far], [], [], 0)
    finally:
        for s in (a, b, far):
            s.close()
