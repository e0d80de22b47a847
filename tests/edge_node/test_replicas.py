"""Cloud replicas: sessions spread over them; a replica killed mid-generation hands its sessions to another.

Real processes: two (or three) ``python -m cloud_service`` replicas of one plan, an in-process EdgeNode
with ``--cloud A,B``, a real Mosquitto for the device path. Lossless fp32 frames, so the replayed history
gives the new replica exactly what the killed one decoded: the tokens must equal an undisturbed run's.
"""

from __future__ import annotations

import os
import signal

import pytest

from edge_node.cloud import parse_targets
from protos import splitglm_pb2 as pb
from runtime.owner import Generation
from tests.edge_node.test_cloud_client import Letters, start_cloud
from tests.edge_node.test_relay import MqttDevice, MqttDownstream
from tests.edge_node.test_speculative import PROMPT, SAMPLED, TOKENS, start_edge

pytestmark = pytest.mark.slow  # three model processes


@pytest.fixture()
def replicas(spec_plan):
    procs = [start_cloud(spec_plan) for _ in range(2)]
    yield procs
    for proc, _ in procs:
        proc.stop()


def sample(node, name: str, labels: dict) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def kill_holder(node, procs, gen_tail) -> str:
    """kill -9 the replica that holds ``gen_tail``'s cloud stream; its address."""
    target = gen_tail.cloud.target
    proc = next(p for p, address in procs if address == target)
    os.kill(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait(10)
    return target


def test_replica_addresses_are_checked():
    assert parse_targets("a:1, b:2,dns:///cloud-headless:50051") == ["a:1", "b:2", "dns:///cloud-headless:50051"]
    for bad in ("", "a", "a:1,a:1", "a:0", "dns:///x"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_sessions_spread_over_the_replicas(spec_plan, replicas):
    addresses = [address for _, address in replicas]
    node = start_edge(spec_plan, ",".join(addresses), speculate=False)
    try:
        tails = [node.tail("http") for _ in range(4)]
        gens = [Generation(node.owner, tail, PROMPT, pb.GenerationParams(max_tokens=3), node.codec, Letters())
                for tail in tails]
        running = [iter(gen) for gen in gens]
        for it in running:
            next(it)  # each session's prefill: its stream is open now
        assert sorted(r.sessions for r in node.cloud.replicas) == [2, 2]
        for address in addresses:
            assert sample(node, "splitglm_edge_cloud_sessions", {"replica": address}) == 2
        for it in running:
            list(it)
        assert [r.sessions for r in node.cloud.replicas] == [0, 0]  # closed streams are no longer counted
    finally:
        node.close()


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("speculate", [pb.SPECULATE_OFF, pb.SPECULATE_ON])
def test_a_killed_replica_hands_its_sessions_over_with_the_same_tokens(spec_plan, mode, speculate):
    procs = [start_cloud(spec_plan) for _ in range(2)]
    node = start_edge(spec_plan, ",".join(a for _, a in procs), draft_tokens=3, step_timeout_s=20)
    params = SAMPLED if mode == "sampled" else {}
    try:
        reference = Generation(node.owner, node.tail("http"), PROMPT,
                               pb.GenerationParams(max_tokens=TOKENS, speculate=pb.SPECULATE_OFF, **params),
                               node.codec, Letters())
        list(reference)
        tail = node.tail("http")
        gen = Generation(node.owner, tail, PROMPT, pb.GenerationParams(max_tokens=TOKENS, speculate=speculate,
                                                                       **params), node.codec, Letters())
        killed = None
        for i, _ in enumerate(gen):
            if i == 5:
                killed = kill_holder(node, procs, tail)
        assert killed is not None and tail.cloud.target != killed  # the session lives on another replica
        assert gen.tokens == reference.tokens  # the same tokens, greedy or sampled with a seed
        assert not gen.degraded and set(gen.paths) == {pb.ACCURATE}
        assert sample(node, "splitglm_edge_cloud_failovers_total", {"outcome": "moved"}) == 1
    finally:
        node.close()
        for proc, _ in procs:
            proc.stop()


def test_device_sessions_move_too_and_the_fast_tail_takes_over_when_none_is_left(spec_plan, mosquitto,
                                                                                 device_segment):
    procs = [start_cloud(spec_plan) for _ in range(2)]
    node = start_edge(spec_plan, ",".join(a for _, a in procs), broker=mosquitto.url, speculate=False,
                      step_timeout_s=20)
    device = MqttDevice(mosquitto.url)
    try:
        def run(on_token=None) -> Generation:
            gen = Generation(device_segment, MqttDownstream(device), PROMPT, pb.GenerationParams(max_tokens=TOKENS),
                             "fp32", Letters())
            for i, _ in enumerate(gen):
                if on_token is not None:
                    on_token(i)
            return gen

        reference = run()
        held = {}

        def kill_one(i: int) -> None:
            if i == 4:
                (sid, state), = node.relay.sessions.items()
                held["killed"] = kill_holder(node, procs, state.tail)

        moved = run(kill_one)
        assert moved.tokens == reference.tokens and not moved.degraded
        assert sample(node, "splitglm_edge_cloud_failovers_total", {"outcome": "moved"}) == 1

        def kill_the_rest(i: int) -> None:
            if i == 4:
                for proc, address in procs:
                    if address != held["killed"]:
                        os.kill(proc.popen.pid, signal.SIGKILL)
                        proc.popen.wait(10)

        last = run(kill_the_rest)
        assert len(last.tokens) == TOKENS and last.degraded and last.paths[-1] == pb.FAST
        assert sample(node, "splitglm_edge_cloud_failovers_total", {"outcome": "none_left"}) == 1
    finally:
        device.close()
        node.close()
        for proc, _ in procs:
            proc.stop()
