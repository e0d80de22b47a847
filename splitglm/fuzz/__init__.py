"""Fuzz targets: the receivers of untrusted input, the bad input each gets, and the properties each must keep.

Each target is a class with ``strategy()`` (a hypothesis strategy of its
inputs) and ``check(example)`` (feeds one input to the real receiver and
raises ``FuzzFailure`` where a property breaks), plus ``finish()`` (the
properties of a whole run: nothing leaked, a healthy session still works).
The tests (``make test``) run each for a few hundred inputs, derandomized;
``splitglm bench fuzz`` runs them for as many as it is asked, counting
failures instead of stopping at the first.

- ``frames.FrameDecoderTarget``: ``protos.frames`` / ``protos.codecs`` on random bytes and
  mutated frames of every codec;
- ``relay.RelayTarget``: the edge's MQTT handler (``edge_node.relay.FrameRelay``);
- ``readings.ReadingsTarget``: the device agent's sensor handler and its dead-letter topic;
- ``cloud.GrpcTarget``: the cloud's ``SegmentService.Stream``;
- ``gateway.HttpTarget``: the edge's HTTP API, with schemathesis against its OpenAPI schema.
- ``broker.BrokerTarget``: a secured broker under hostile clients (client-id collisions, failed CONNECTs,
  reconnect storms, wildcard and ``$share`` subscriptions, over-size, retained and QoS 2 messages).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

HANG_S = 20.0  # one input taking longer than this is a hang, seconds


class FuzzFailure(AssertionError):
    """A receiver broke a property on one input (or a run broke one at its end)."""


def expect(condition: bool, message: str) -> None:
    """Raise FuzzFailure(message) unless ``condition``."""
    if not condition:
        raise FuzzFailure(message)


@contextmanager
def no_hang(what: str, limit_s: float = HANG_S):
    """FuzzFailure if the block takes longer than ``limit_s`` seconds."""
    t0 = time.monotonic()
    yield
    elapsed = time.monotonic() - t0
    expect(elapsed <= limit_s, f"{what} took {elapsed:.1f} s (a hang: the limit is {limit_s:g} s)")
