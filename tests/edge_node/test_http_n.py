"""n completions of one prompt on a real edge and cloud: the prompt is prefilled once, and forked.

An in-process EdgeNode (router, speculation, fast tail) in front of an in-process cloud service (its gRPC
server and batcher, so the test reads the cloud terminal's counts), with the official ``openai`` client.
Choices 1.. fork choice 0's prompt cache on the edge's own segment, on the cloud (a stream to the same
replica) or on the fast tail: the edge's and the cloud's prefill counters grow by P + 2 for n = 3, not 3P.
Forked choices equal separate requests seeded seed + i, with speculation on and off; a fork whose source
is gone prefills the prompt instead; a cloud replica killed mid-way (a real process) hands all three
choices over to another replica with the same tokens. Lossless fp32 frames throughout.
"""

from __future__ import annotations

import os
import signal

import openai
import pytest
import torch

from cloud_service.server import serve
from cloud_service.settings import CloudSettings
from edge_node.cloud import CloudStream
from protos import splitglm_pb2 as pb
from protos.frames import make_frame
from protos.status import STATUS_CODES
from runtime.owner import share_prefill
from tests.edge_node.test_cloud_client import start_cloud
from tests.edge_node.test_speculative import start_edge
from tests.local_chain import char_tokenizer

PROMPT = "The cat sat on the mat"
USER = [{"role": "user", "content": "Name three animals."}]
SAMPLED = {"model": "tiny", "max_tokens": 12, "temperature": 0.9, "seed": 21}


@pytest.fixture(scope="module")
def cloud(spec_plan):
    """A cloud service in this process (its terminal's counts are readable): the server."""
    server = serve(CloudSettings(plan=spec_plan, host="127.0.0.1", port=0, threads=1))
    yield server
    server.stop()


def edge_of(plan: str, cloud: str, **settings):
    """A running EdgeNode on ``cloud`` (replica addresses) with the character tokenizer; its openai client."""
    node = start_edge(plan, cloud, model_name="tiny", draft_tokens=3, **settings)
    node.tokenizer = char_tokenizer()  # the tiny plan has none; ids 0..95 match the tiny vocabulary
    return node, openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def edge(spec_plan, cloud):
    node, client = edge_of(spec_plan, f"127.0.0.1:{cloud.port}")
    yield node, client
    node.close()


def counts(node, cloud) -> dict[str, float]:
    """The prefill counters of the edge's owner, the cloud terminal and the fast tail."""
    sample = node.metrics.registry.get_sample_value
    cloud_counts, fast_counts = cloud.batcher.terminal.counts, node.router.fast.terminal.counts
    return {"edge": sample("splitglm_edge_prefill_positions_total"),
            "forks": sample("splitglm_edge_forked_sessions_total"),
            "cloud": cloud_counts["prefill_positions"], "cloud_forked": cloud_counts["forked_positions"],
            "fast": fast_counts["prefill_positions"]}  # fmt: skip


def grew(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in before}


def texts(response) -> list[str]:
    return [c.text if hasattr(c, "text") else c.message.content for c in response.choices]


@pytest.mark.parametrize("chat", [False, True])
def test_n_choices_prefill_the_prompt_once(edge, cloud, chat):
    node, client = edge
    before = counts(node, cloud)
    if chat:
        r = client.chat.completions.create(messages=USER, n=3, **SAMPLED, extra_body={"speculate": False})
    else:
        r = client.completions.create(prompt=PROMPT, n=3, **SAMPLED, extra_body={"speculate": False})
    p = r.usage.prompt_tokens  # the prompt, counted once
    assert [c.index for c in r.choices] == [0, 1, 2] and all(texts(r))
    info = r.model_extra["splitglm"]["choices"]
    assert r.usage.completion_tokens == sum(len(c["tokens"]) for c in info) >= 3
    assert grew(before, counts(node, cloud)) == {"edge": p + 2, "forks": 2, "cloud": p + 2,
                                                  "cloud_forked": 2 * (p - 1), "fast": 0}  # fmt: skip
    assert node.router.fast.sessions() == 0 and not node.router.sessions


def test_seeded_choices_equal_separate_requests_with_speculation_on_and_off(edge, cloud):
    node, client = edge
    alone = [texts(client.completions.create(prompt=PROMPT, **{**SAMPLED, "seed": 21 + i}))[0] for i in range(3)]
    for speculate in (False, True):
        before = counts(node, cloud)
        r = client.completions.create(prompt=PROMPT, n=3, **SAMPLED, extra_body={"speculate": speculate})
        assert texts(r) == alone, speculate  # choice i is the completion seeded seed + i
        assert grew(before, counts(node, cloud))["cloud"] == r.usage.prompt_tokens + 2
        drafted = [c["speculative"]["drafted"] for c in r.model_extra["splitglm"]["choices"]]
        assert all(drafted) if speculate else not any(drafted)


def test_choices_on_the_fast_path_fork_on_the_fast_tail(edge, cloud):
    node, client = edge
    alone = texts(client.completions.create(prompt=PROMPT, **SAMPLED, extra_body={"policy": "fast"}))[0]
    before = counts(node, cloud)
    r = client.completions.create(prompt=PROMPT, n=3, **SAMPLED, extra_body={"policy": "fast"})
    p = r.usage.prompt_tokens
    assert texts(r)[0] == alone and len(set(texts(r))) > 1
    assert all(c["path"] == "fast" for c in r.model_extra["splitglm"]["choices"])
    assert grew(before, counts(node, cloud)) == {"edge": p + 2, "forks": 2, "cloud": 0, "cloud_forked": 0,
                                                  "fast": p + 2}  # fmt: skip


def generations(node, n: int = 2, **params) -> list:
    """n generations of the prompt as the HTTP API makes them (choice i seeded 21 + i), sharing the prefill."""
    prompt = node.tokenizer.encode(PROMPT)
    gens = [node.generation(prompt, pb.GenerationParams(max_tokens=8, temperature=0.9, seed=21 + i, **params))
            for i in range(n)]  # fmt: skip
    share_prefill(gens)
    return gens


def test_a_fork_whose_source_is_gone_prefills_the_prompt(edge, cloud):
    """The router has closed the source: NOT_FOUND, and the owner prefills; the cloud has freed it: the router
    replays the fork's history (the source's prompt rows, then its own) on a new stream."""
    node, _ = edge
    prompt = node.tokenizer.encode(PROMPT)
    p = len(prompt)
    alone = [e.token for e in node.generation(prompt, pb.GenerationParams(max_tokens=8, temperature=0.9, seed=22,
                                                                          speculate=pb.SPECULATE_OFF))]  # fmt: skip
    source, fork = generations(node, speculate=pb.SPECULATE_OFF)
    it = iter(source)
    next(it)  # the prompt is in every tier's cache
    source.downstream.close(pb.Frame(session_id=source.session_id, close=True))  # ... and gone from the router
    assert [e.token for e in fork] == alone and not fork.forked and fork.prefilled == p + 1
    it.close()

    source, fork = generations(node, speculate=pb.SPECULATE_OFF)
    it = iter(source)
    next(it)
    cloud.batcher.free(source.session_id).result(10)  # ... and gone from the cloud
    before = counts(node, cloud)
    assert [e.token for e in fork] == alone and fork.forked and fork.prefilled == 1
    assert grew(before, counts(node, cloud))["cloud"] == p  # the fork's history, replayed
    assert len(list(it)) == 7 and source.degraded  # (its cloud session gone: the fast path finished it)

    fast = {"policy": "fast", "max_tokens": 8, "temperature": 0.9, "seed": 22}
    alone = [e.token for e in node.generation(prompt, pb.GenerationParams(**fast))]
    source, fork = generations(node, policy="fast")
    it = iter(source)
    next(it)
    node.router.fast.close(source.session_id)  # gone from the fast tail: NOT_FOUND, then a prefill
    assert [e.token for e in fork] == alone and not fork.forked and fork.prefilled == p + 1
    it.close()
    assert not node.router.sessions and node.router.fast.sessions() == 0


def test_only_the_edges_own_sessions_fork(edge):
    """A device session (MQTT) may not name another session to copy; an unknown source is NOT_FOUND, after
    which the same tail still starts the session from a whole prompt."""
    node, _ = edge
    source, _ = generations(node, speculate=pb.SPECULATE_OFF)
    it = iter(source)
    next(it)
    hidden = torch.zeros(3, node.spec.hidden_size)
    frame = make_frame("device-1", 0, 2, hidden[2:], "fp32", pb.GenerationParams(max_tokens=2))
    frame.fork_of = source.session_id
    refused = node.tail("mqtt").step(frame)
    assert refused.status == STATUS_CODES["INVALID_ARGUMENT"] and "own sessions" in refused.error
    tail = node.tail("http")
    frame.session_id, frame.fork_of = "http-1", "nobody"
    assert tail.step(frame).status == STATUS_CODES["NOT_FOUND"]
    whole = make_frame("http-1", 0, 0, hidden, "fp32", pb.GenerationParams(max_tokens=2))
    assert len(tail.step(whole).tokens) == 1
    tail.close(make_frame("http-1", 1, 3, None, close=True))
    assert len(list(it)) == 7 and not node.router.sessions


def test_a_replica_killed_mid_way_hands_all_choices_over(spec_plan, cloud, monkeypatch):
    """Replica B (a process) serves the three choices, the forks on the same stream's replica; it is killed
    at the 8th cloud step of the request: every choice moves to A by replaying its history, same tokens."""
    proc, b = start_cloud(spec_plan)
    node, client = edge_of(spec_plan, f"{b},127.0.0.1:{cloud.port}")
    try:
        kw = {"prompt": PROMPT, "n": 3, **SAMPLED, "max_tokens": 16, "extra_body": {"speculate": True}}
        want = texts(client.completions.create(**kw))
        step, calls, on_b = CloudStream.step, [], []

        def step_then_kill(stream, frame):
            calls.append(stream.target)
            if len(calls) == 8:
                on_b.append(node.cloud.replicas[0].sessions)
                os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
            return step(stream, frame)

        monkeypatch.setattr(CloudStream, "step", step_then_kill)
        before = cloud.batcher.terminal.counts["prefill_positions"]
        r = client.completions.create(**kw)
        assert texts(r) == want and len(calls) > 8
        assert on_b == [3]  # every choice was on B when it died: the forks followed choice 0
        moved = node.metrics.registry.get_sample_value("splitglm_edge_cloud_failovers_total", {"outcome": "moved"})
        assert moved == 3 and not any(c["degraded"] for c in r.model_extra["splitglm"]["choices"])
        assert cloud.batcher.terminal.counts["prefill_positions"] - before >= 3 * r.usage.prompt_tokens  # replays
    finally:
        node.close()
        proc.stop()
