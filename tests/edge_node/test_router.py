"""The edge's router between a real in-process EdgeNode and a real ``python -m cloud_service``, with delay injected on
the edge-to-cloud link by a real TCP proxy (``splitglm.linkproxy.DelayProxy``).

The plan's fast tail is "none" (an exact copy of the cloud tier) and both links
carry lossless fp32 frames, so every path -- accurate, fast, or switched mid-way
by replaying the split-point history -- must give the chained model's greedy
tokens. Sessions are driven like the edge's HTTP sessions: ``runtime.owner``'s
Generation over the edge segment [0, k2) and ``node.tail("http")``.
"""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest

from edge_node.node import EdgeNode
from edge_node.settings import EdgeSettings
from partitioner.plan.export import cached_plan, fixed_plan
from protos import splitglm_pb2 as pb
from runtime.local import Chain, split_segments
from runtime.owner import Generation, StepFailed
from runtime.sampling import SamplingParams
from splitglm.linkproxy import DelayProxy
from tests.edge_node.test_cloud_client import Letters, start_cloud
from tests.edge_node.test_relay import wait_until

PROMPT = [3, 17, 5, 9, 11, 40, 2]
WARM_TOKENS = 30  # per path: enough steps for the estimates to leave their seeds (20 samples)


@pytest.fixture(scope="module")
def exact_plan(tiny_glm, tmp_path_factory) -> str:
    """Tiny plan, splits 2,4, fp32 frames, and a fast tail that is an exact copy of the cloud tier."""
    plan = fixed_plan((2, 4), ("fp32", "fp32"), fast_tail="none")
    return str(cached_plan(tiny_glm, plan, tmp_path_factory.mktemp("router-plans")))


@pytest.fixture(scope="module")
def cloud(exact_plan):
    proc, address = start_cloud(exact_plan)
    yield address
    assert proc.stop() == 0, proc.output


@pytest.fixture(scope="module")
def reference(tiny_glm):
    """The chained segments' greedy tokens: what every path must give here."""
    chain = Chain(split_segments(tiny_glm, 2, 4))
    return [t for t, _ in chain.generate(PROMPT, 40)]


@pytest.fixture()
def proxy(cloud):
    host, port = cloud.rsplit(":", 1)
    p = DelayProxy(host, int(port), rtt_ms=0).start()
    yield p
    p.stop()


def start_edge(plan: str, cloud: str, **settings) -> EdgeNode:
    settings = {"speculate": False, **settings}  # one cloud step a token here (test_speculative drafts)
    node = EdgeNode(EdgeSettings(plan=plan, broker="", cloud=cloud, http_host="127.0.0.1", http_port=0,
                                 connect_timeout_s=30, **settings))
    try:
        node.start()
    except BaseException:
        node.close()
        raise
    return node


@pytest.fixture()
def edge(exact_plan, proxy):
    node = start_edge(exact_plan, proxy.address)
    yield node
    node.close()


def generate(node: EdgeNode, max_tokens: int, on_token=None, **params) -> Generation:
    """One greedy session of the edge, like an HTTP one; ``on_token(index)`` after each token."""
    gen = Generation(node.segment, node.tail("http"), PROMPT, pb.GenerationParams(max_tokens=max_tokens, **params),
                     node.codec, Letters(), lock=node.segment_lock)
    for i, _ in enumerate(gen):
        if on_token is not None:
            on_token(i)
    return gen


def names(gen: Generation) -> list[str]:
    return [{pb.ACCURATE: "accurate", pb.FAST: "fast"}[p] for p in gen.paths]


def warm_up(node: EdgeNode, tokens: int = WARM_TOKENS) -> None:
    """Real steps on both paths, so the estimates are measurements, not the seeds."""
    assert names(generate(node, tokens, policy="accurate")) == ["accurate"] * tokens
    assert names(generate(node, tokens, policy="fast")) == ["fast"] * tokens
    assert node.estimates.accurate.snapshot()["step"]["samples"] >= tokens - 1


def counter(node: EdgeNode, name: str, **labels) -> float:
    return node.metrics.registry.get_sample_value(f"splitglm_edge_router_{name}", labels) or 0.0


def test_budget_chooses_the_path_and_policies_are_honoured(edge, proxy, reference):
    proxy.set_rtt(80)  # every cloud step pays 80 ms; the fast tail at the edge pays none
    warm_up(edge)
    accurate_step = edge.estimates.accurate.get("step", "mean")
    assert 75 < accurate_step < 400 and edge.estimates.fast.get("step", "high") < 40

    loose = generate(edge, 8, latency_budget_ms=20_000)
    assert names(loose) == ["accurate"] * 8 and loose.switches == [] and not loose.degraded
    assert loose.policy == "adaptive" and loose.total_ms <= 20_000
    assert 0.5 * loose.total_ms < loose.predicted_ms < 2 * loose.total_ms  # the prediction is a real estimate

    tight = generate(edge, 8, latency_budget_ms=400)  # the cloud needs ~8 x 80 ms: only the fast path fits
    assert names(tight) == ["fast"] * 8 and tight.switches == [] and not tight.degraded
    assert tight.total_ms <= 400 and tight.predicted_ms < 400

    per_token = generate(edge, 8, token_budget_ms=50)  # 50 ms x 8 tokens: the same tight budget
    assert names(per_token) == ["fast"] * 8

    assert names(generate(edge, 8)) == ["accurate"] * 8  # no budget: accurate
    forced = generate(edge, 8, latency_budget_ms=400, policy="accurate")  # the policy beats the budget
    assert names(forced) == ["accurate"] * 8 and forced.policy == "accurate" and forced.total_ms > 400
    assert names(generate(edge, 8, policy="fast")) == ["fast"] * 8

    for gen in (loose, tight, per_token, forced):
        assert gen.tokens == reference[:8]  # the exact fast tail gives the cloud's tokens
    assert counter(edge, "decisions_total", path="fast", policy="adaptive") == 2
    assert counter(edge, "decisions_total", path="accurate", policy="adaptive") == 2
    assert counter(edge, "switches_total", reason="deadline") == 0

    body = urllib.request.urlopen(f"{edge.url}/metrics", timeout=5).read().decode()
    assert 'splitglm_edge_router_step_seconds{path="accurate",stat="high"}' in body
    assert 'splitglm_edge_router_rtt_seconds{path="accurate",stat="mean"}' in body
    assert 'splitglm_edge_router_decisions_total{path="fast",policy="adaptive"} 2.0' in body
    rtt = float(body.split('splitglm_edge_router_rtt_seconds{path="accurate",stat="mean"} ')[1].split()[0])
    assert 0.05 < rtt < 0.5  # the proxy's 80 ms, measured


def test_a_slower_link_mid_generation_switches_to_fast_with_the_same_tokens(edge, proxy, reference):
    proxy.set_rtt(20)
    warm_up(edge)
    budget, n = 4000, 30  # accurate needs ~30 x 20 ms: it fits, with room

    def slow_down(i: int) -> None:
        if i == 3:
            proxy.set_rtt(400)  # from token 4 on each cloud step takes 400 ms: 26 more would blow the budget

    gen = generate(edge, n, slow_down, latency_budget_ms=budget)
    assert len(gen.switches) == 1, gen.switches
    switch = gen.switches[0]
    k = switch["token"]
    assert switch["to"] == "fast" and switch["reason"] == "deadline" and 5 <= k <= 9
    assert names(gen) == ["accurate"] * k + ["fast"] * (n - k)
    assert gen.tokens == reference[:n]  # replaying the history on the exact fast tail changes nothing
    assert not gen.degraded and gen.total_ms <= budget
    assert counter(edge, "switches_total", reason="deadline") == 1
    assert edge.estimates.accurate.get("step", "high") > 300  # the slow steps were observed
    assert edge.estimates.fast.snapshot()["replay"]["samples"] == 1
    assert edge.router.fast.sessions() == 0  # the session was freed on the fast tail


def test_a_link_that_stops_answering_times_out_within_the_budget(edge, proxy, reference):
    proxy.set_rtt(10)
    warm_up(edge)
    budget, n = 2500, 20

    def freeze(i: int) -> None:
        if i == 2:
            proxy.set_rtt(60_000)  # the cloud's answers stop coming back

    gen = generate(edge, n, freeze, latency_budget_ms=budget)
    assert [s["token"] for s in gen.switches] == [3]
    assert gen.switches[0]["reason"].startswith("cloud_error:") and "DEADLINE_EXCEEDED" in gen.switches[0]["reason"]
    assert gen.degraded and names(gen) == ["accurate"] * 3 + ["fast"] * (n - 3)
    assert gen.tokens == reference[:n]
    assert gen.total_ms <= 1.1 * budget  # the wait for the cloud was cut to what the budget left
    assert counter(edge, "switches_total", reason="cloud_error") == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_killing_the_cloud_mid_generation_still_completes_the_answer(exact_plan, tiny_glm, temperature):
    """Also sampled: a token's draw is keyed by its position, so the fast tail draws what the cloud would have."""
    chain = Chain(split_segments(tiny_glm, 2, 4))
    sampling = SamplingParams(temperature=temperature, seed=7)
    reference = [t for t, _ in chain.generate(PROMPT, 20, sampling)]
    if temperature:  # the draws matter: sampling leaves the greedy path
        assert reference != [t for t, _ in chain.generate(PROMPT, 20)]
    proc, address = start_cloud(exact_plan)
    node = start_edge(exact_plan, address, step_timeout_s=10)
    try:
        def kill(i: int) -> None:
            if i == 5:
                os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)

        n = 20
        gen = generate(node, n, kill, temperature=temperature, seed=7)  # no budget: accurate until the cloud dies
        assert len(gen.tokens) == n and gen.finish_reason == "length"
        assert gen.degraded and len(gen.switches) == 1 and gen.switches[0]["token"] == 6
        assert gen.switches[0]["reason"].startswith("cloud_error:") and "UNAVAILABLE" in gen.switches[0]["reason"]
        assert names(gen) == ["accurate"] * 6 + ["fast"] * (n - 6)
        assert gen.tokens == reference[:n]

        after = generate(node, 6, temperature=temperature, seed=7)  # the cloud is down: all fast, degraded
        assert names(after) == ["fast"] * 6 and after.degraded and after.switches[0]["token"] == 0
        assert after.tokens == reference[:6]
        assert counter(node, "switches_total", reason="cloud_error") == 2
        assert node.router.fast.sessions() == 0
    finally:
        node.close()
        proc.stop()


def test_the_deployment_policy_applies_to_sessions_that_name_none(exact_plan, proxy):
    node = start_edge(exact_plan, proxy.address, policy="fast")
    try:
        default = generate(node, 4)
        assert names(default) == ["fast"] * 4 and default.policy == "fast" and default.predicted_ms > 0
        asked = generate(node, 4, policy="accurate")
        assert names(asked) == ["accurate"] * 4 and asked.policy == "accurate"
        with pytest.raises(StepFailed) as e:  # a policy the router does not know is the request's fault
            generate(node, 4, policy="auto")
        assert e.value.status == 3 and "unknown routing policy 'auto'" in str(e.value)
    finally:
        node.close()


def test_the_link_probe_follows_the_link_while_sessions_avoid_the_cloud(exact_plan, proxy):
    node = start_edge(exact_plan, proxy.address, probe_interval_s=0.05)
    accurate = node.estimates.accurate
    try:
        proxy.set_rtt(10)
        warm_up(node, tokens=22)
        proxy.set_rtt(300)  # congested: no session measures it, the probe does
        assert wait_until(lambda: accurate.get("step", "high") > 250, 15), accurate.snapshot()
        assert names(generate(node, 8, latency_budget_ms=1000)) == ["fast"] * 8  # 8 x 300 ms would not fit
        proxy.set_rtt(10)  # calm again: only the probe can tell, every budgeted session now goes fast
        assert wait_until(lambda: accurate.get("step", "high") < 100, 30), accurate.snapshot()
        assert names(generate(node, 8, latency_budget_ms=1000)) == ["accurate"] * 8
    finally:
        node.close()
