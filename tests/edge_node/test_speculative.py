"""Speculative split decoding: the edge's fast tail drafts, the cloud verifies several tokens per round trip.

Real processes: an in-process EdgeNode (its HTTP-owner scheduler, its MQTT relay), a real ``python -m
cloud_service``, a real Mosquitto for the device path. Lossless fp32 frames and the plan's int8 fast tail
(its drafts are mostly, not always, right), so every speculative generation must give exactly the tokens
of the non-speculative accurate path, greedy and sampled with a seed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from edge_node.node import EdgeNode
from edge_node.settings import EdgeSettings
from edge_node.speculation import Acceptance, RoundCosts, best_draft, expected_tokens
from protos import splitglm_pb2 as pb
from runtime.owner import Generation
from tests.edge_node.test_cloud_client import Letters, start_cloud
from tests.edge_node.test_relay import MqttDevice, MqttDownstream

PROMPT = [3, 17, 5, 9, 11, 40, 2]
TOKENS = 24
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 7}


@pytest.fixture(scope="module")
def cloud(spec_plan):
    proc, address = start_cloud(spec_plan)
    yield proc, address
    proc.stop()


def start_edge(plan: str, cloud: str, broker: str = "", **settings) -> EdgeNode:
    node = EdgeNode(EdgeSettings(plan=plan, broker=broker, cloud=cloud, http_host="127.0.0.1", http_port=0,
                                 connect_timeout_s=30, **settings))
    try:
        node.start()
    except BaseException:
        node.close()
        raise
    return node


@contextmanager
def edge_and_cloud(plan: str, **settings) -> Iterator[EdgeNode]:
    """An in-process edge (``start_edge``) in front of a real cloud process on ``plan``; the cloud must exit
    cleanly at the end."""
    proc, address = start_cloud(plan)
    try:
        node = start_edge(plan, address, **settings)
    except BaseException:
        proc.stop()
        raise
    try:
        yield node
    finally:
        node.close()
        code = proc.stop()
    assert code == 0, proc.output


def http(node: EdgeNode, speculate: int, on_token=None, **params) -> Generation:
    """One session the edge owns (as an HTTP one); ``on_token(index)`` after each emitted token."""
    gen = Generation(node.owner, node.tail("http"), PROMPT,
                     pb.GenerationParams(max_tokens=TOKENS, speculate=speculate, **params), node.codec, Letters())
    for i, _ in enumerate(gen):
        if on_token is not None:
            on_token(i)
    return gen


# ---- the maths ------------------------------------------------------------------------------------------------


def test_the_draft_count_maximises_expected_tokens_per_second():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    wan = RoundCosts(owner_ms=10, draft_ms=5, rtt_ms=60, verify_ms=20, verify_row_ms=1)
    g = best_draft(0.95, wan, 8)
    assert g >= 4  # a long round trip and good drafts: speculate deeply
    assert best_draft(0.2, wan, 8) <= 2  # bad drafts: little or nothing
    loopback_cpu = RoundCosts(owner_ms=20, draft_ms=25, rtt_ms=0.5, verify_ms=10, verify_row_ms=8)
    assert best_draft(0.9, loopback_cpu, 8) == 0  # drafting costs more than it saves


def test_acceptance_learns_from_verifications():
    acc = Acceptance(prior=0.8, prior_weight=4)
    assert acc.alpha == pytest.approx(0.8)
    for _ in range(30):
        acc.observe(drafted=4, accepted=0)  # every first draft rejected
    assert acc.alpha < 0.1
    for _ in range(60):
        acc.observe(drafted=4, accepted=4)
    assert acc.alpha > 0.9


# ---- HTTP sessions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drafts", [1, 4, 8])
def test_http_speculation_gives_the_accurate_tokens(spec_plan, cloud, drafts):
    node = start_edge(spec_plan, cloud[1], draft_tokens=drafts)
    try:
        for params in ({}, SAMPLED):
            plain = http(node, pb.SPECULATE_OFF, **params)
            spec = http(node, pb.SPECULATE_ON, **params)
            assert spec.tokens == plain.tokens and len(spec.tokens) == TOKENS
            assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
            s = spec.speculative
            assert s["round_trips"] > 0 and 0 <= s["accepted"] <= s["drafted"]
            assert s["drafted"] <= drafts * s["round_trips"]
            assert plain.speculative == {"drafted": 0, "accepted": 0, "round_trips": 0}
            assert set(spec.paths) == {pb.ACCURATE}
        metrics = node.metrics.exposition().decode()
        assert "splitglm_edge_speculative_acceptance_ratio_count" in metrics
        assert "splitglm_edge_speculative_tokens_per_round_trip_bucket" in metrics
    finally:
        node.close()


def test_drafts_rejected_at_every_position_still_give_the_right_tokens(spec_plan, cloud):
    node = start_edge(spec_plan, cloud[1], draft_tokens=4)
    honest = node.router.fast.draft
    node.router.fast.draft = lambda *a, **k: (honest(*a, **k) + 1) % node.spec.vocab_size  # a fast tail always wrong
    try:
        plain = http(node, pb.SPECULATE_OFF)
        spec = http(node, pb.SPECULATE_ON)
        assert spec.tokens == plain.tokens
        assert spec.speculative["drafted"] > 0 and spec.speculative["accepted"] == 0
        # one token a round trip, as without speculation: the prefill gives the first, the last is a plain step
        assert spec.speculative["round_trips"] == TOKENS - 2
    finally:
        node.close()


def test_the_cloud_killed_mid_speculation_finishes_on_the_fast_tail(spec_plan):
    proc, address = start_cloud(spec_plan)
    node = start_edge(spec_plan, address, draft_tokens=4, step_timeout_s=5)
    try:
        def kill(i: int) -> None:
            if i == 6:
                os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)

        gen = http(node, pb.SPECULATE_ON, on_token=kill)
        assert len(gen.tokens) == TOKENS and gen.degraded
        assert gen.paths[-1] == pb.FAST and pb.ACCURATE in gen.paths
        assert any(s["reason"].startswith("cloud_error") for s in gen.switches)
    finally:
        node.close()
        proc.stop()


# ---- device sessions over MQTT ----------------------------------------------------------------------------------


def test_device_speculation_gives_the_accurate_tokens(spec_plan, cloud, mosquitto, device_segment):
    node = start_edge(spec_plan, cloud[1], broker=mosquitto.url, draft_tokens=4)
    device = MqttDevice(mosquitto.url)
    try:
        runs = {}
        for speculate in (pb.SPECULATE_OFF, pb.SPECULATE_ON):
            for name, params in (("greedy", {}), ("sampled", SAMPLED)):
                downstream = MqttDownstream(device)
                gen = Generation(device_segment, downstream, PROMPT,
                                 pb.GenerationParams(max_tokens=TOKENS, speculate=speculate, **params), "fp32",
                                 Letters())
                list(gen)
                runs[speculate, name] = gen, downstream
        for name in ("greedy", "sampled"):
            plain, spec = runs[pb.SPECULATE_OFF, name][0], runs[pb.SPECULATE_ON, name][0]
            assert spec.tokens == plain.tokens and len(spec.tokens) == TOKENS
            assert spec.speculative["round_trips"] > 0
            answers = [r for r, _, _ in runs[pb.SPECULATE_ON, name][1].answers]
            assert any(r.draft_tokens for r in answers)  # the device ran drafts ...
            assert sum(len(r.tokens) for r in answers) == TOKENS  # ... but only verified tokens came back as such
    finally:
        device.close()
        node.close()
