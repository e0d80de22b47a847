"""The edge's OpenAI-compatible gateway through a real HTTP server, with real segments of the tiny model.

The node behind the app is built from real parts (``tests/local_chain.py``):
the owner segment, real serialized frames, edge + cloud segments and the
cloud's ``TailSessions``; its tokenizer is a real character-level
transformers tokenizer. Clients are the official ``openai`` client and raw
httpx (for the exact SSE bytes).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from edge_node.http_api import create_app
from tests.local_chain import TestNode, char_tokenizer, greedy_tokens, serve

K1, K2 = 1, 3
PROMPT = "The cat sat on"


@pytest.fixture()
def node(tiny_glm):
    return TestNode(tiny_glm, char_tokenizer(), K1, K2)


@pytest.fixture()
def url(node):
    with serve(create_app(node)) as base:
        yield base


@pytest.fixture()
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def expected(node, prompt_ids, n, stop_ids=()) -> list[int]:
    return greedy_tokens(node.checkpoint, K1, K2, prompt_ids, n, stop_ids)


def chat_ids(node, messages) -> list[int]:
    return node.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def sse_events(response: httpx.Response) -> list[str]:
    """The data fields of a raw SSE body, checking the framing: every event is ``data: ...`` + a blank line."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


def test_completion_equals_chain_greedy(node, client):
    ids = node.tokenizer.encode(PROMPT)
    want = expected(node, ids, 10)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    assert node.generations[-1].tokens == want
    assert r.choices[0].text == node.tokenizer.decode(want)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.model == "tiny"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    info = r.model_extra["splitglm"]
    assert info["paths"] == ["accurate"] * 10 and info["path"] == "accurate" and info["switches"] == []
    assert 0 < info["timings_ms"]["ttft"] <= info["timings_ms"]["total"]
    assert info["budget_met"] is None and info["degraded"] is False
    assert node.open_sessions() == 0 and node.downstream.closed == [node.generations[-1].session_id]


def test_token_id_prompt_and_default_max_tokens(node, client):
    ids = [5, 17, 33, 2]
    r = client.completions.create(model="tiny", prompt=ids, temperature=0)
    assert node.generations[-1].tokens == expected(node, ids, 16)  # settings.default_max_tokens
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens == 4


def test_streamed_completion(node, client):
    ids = node.tokenizer.encode(PROMPT)
    want = node.tokenizer.decode(expected(node, ids, 12))
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["splitglm"]["paths"] == ["accurate"] * 12
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_chain_greedy(node, client, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = expected(node, chat_ids(node, messages), 9)
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=9, temperature=0, stream=stream
    )
    if stream:
        chunks = list(r)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
    else:
        text = r.choices[0].message.content
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        assert r.usage.prompt_tokens == len(chat_ids(node, messages))
    assert node.generations[-1].tokens == want
    assert text == node.tokenizer.decode(want)


def test_sse_format(node, url):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = sse_events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert len(final["splitglm"]["paths"]) == 5 and "usage" not in final  # no include_usage: no usage fields


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(node, client, stream):
    ids = node.tokenizer.encode(PROMPT)
    full = node.tokenizer.decode(expected(node, ids, 16))
    stop = full[5:7]
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "\x01never"], stream=stream
    )
    if stream:
        chunks = list(r)
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[: full.index(stop)] and stop not in text
    assert reason == "stop"


def test_eos_token_stops(node, client):
    ids = node.tokenizer.encode(PROMPT)
    full = expected(node, ids, 16)
    node.with_eos(full[4])
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
    want = full[: full.index(full[4]) + 1]
    assert node.generations[-1].tokens == want and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == "stop"
    assert list(node.generations[-1].params.stop_token_ids) == [full[4]]


def test_seeded_sampling_is_reproducible(node, client):
    kw = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.5, "top_p": 0.95}
    a = client.completions.create(model="tiny", seed=7, **kw).choices[0].text
    b = client.completions.create(model="tiny", seed=7, **kw).choices[0].text
    assert a == b
    assert node.generations[-1].params.seed == 7 and node.generations[-1].params.top_p == pytest.approx(0.95)
    greedy = node.tokenizer.decode(expected(node, node.tokenizer.encode(PROMPT), 12))
    texts = {client.completions.create(model="tiny", **kw).choices[0].text for _ in range(3)}  # random seeds
    assert texts - {greedy}, "temperature 1.5 never left the greedy path"


def test_latency_budget_and_policy(node, client):
    r = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=4,
        temperature=0,
        extra_body={"latency_budget_ms": 60_000, "policy": "accurate"},
    )
    gen = node.generations[-1]
    assert gen.params.latency_budget_ms == 60_000 and gen.params.policy == "accurate"
    assert gen.deadline_unix_ms == 0  # the budget is a soft target: late frames are not dropped
    info = r.model_extra["splitglm"]
    assert info["latency_budget_ms"] == 60_000 and info["budget_met"] is True
    node.downstream.delay_s = 0.01
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"latency_budget_ms": 1})
    assert r.model_extra["splitglm"]["budget_met"] is False and r.choices[0].finish_reason == "length"
    assert node.generations[-1].params.policy == "adaptive" and node.generations[-1].params.latency_budget_ms == 1


def test_cloud_failure_is_503(node, client, url):
    node.downstream.fail = (14, "cloud unreachable")
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 503 and "cloud unreachable" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:  # streamed: still a plain 503 when the first step fails
        list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], stream=True))
    assert e.value.status_code == 503
    assert node.open_sessions() == 0
    r = httpx.get(f"{url}/metrics")
    assert 'splitglm_edge_http_requests_total{api="completions",code="503"} 1.0' in r.text


@pytest.mark.parametrize("grpc_status, http_status", [(14, 503), (13, 503), (8, 429), (4, 504)])
def test_cloud_status_to_http_status(node, url, grpc_status, http_status):
    node.downstream.fail = (grpc_status, "no")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=30)
    assert r.status_code == http_status and r.json()["error"]["code"] == f"grpc_status_{grpc_status}"


def test_cloud_failure_mid_stream(node, client, url):
    node.downstream.fail, node.downstream.fail_after = (13, "cloud crashed"), 3
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="cloud crashed"):
        for c in stream:
            texts.append(c.choices[0].text)
    assert 1 <= len(texts) <= 3  # the tokens before the failure arrived
    body = {"prompt": PROMPT, "max_tokens": 10, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        data = sse_events(r)
    assert data[-1] == "[DONE]" and "cloud crashed" in json.loads(data[-2])["error"]["message"]
    assert node.open_sessions() == 0


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_client_disconnect_stops_a_stream(node, url):
    node.downstream.delay_s = 0.05  # 64 tokens would take over 3 s
    body = {"prompt": PROMPT, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    gen = node.generations[-1]
    assert wait_until(lambda: node.downstream.closed == [gen.session_id]), "the session was not closed"
    assert len(gen.tokens) < 30 and node.open_sessions() == 0
    assert wait_until(lambda: 'code="499"' in node.metrics.exposition().decode())


def test_client_disconnect_stops_a_plain_request(node, url):
    node.downstream.delay_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 64}, timeout=0.5)
    gen = node.generations[-1]
    assert wait_until(lambda: node.downstream.closed == [gen.session_id]), "the session was not closed"
    assert len(gen.tokens) < 30 and node.open_sessions() == 0


def test_concurrent_requests(node, client):
    prompts = ["alpha beta", "gamma", "delta epsilon zeta", "eta"]
    results: dict[str, str] = {}

    def ask(p):
        results[p] = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p in prompts:
        assert results[p] == node.tokenizer.decode(expected(node, node.tokenizer.encode(p), 8)), p
    assert node.open_sessions() == 0


READINESS = [  # (checks, HTTP status, status, reasons)
    ({"broker": True, "cloud": True, "fast_path": True}, 200, "ready", None),
    ({"broker": True, "cloud": False, "fast_path": True}, 200, "degraded", ["cloud_unavailable"]),
    ({"broker": False, "cloud": True, "fast_path": True}, 503, "unready", ["broker_subscription_lost"]),
    ({"broker": True, "cloud": False, "fast_path": False}, 503, "unready", ["cloud_unavailable", "no_path_to_tokens"]),
]


def test_probes(node, url):
    """/livez answers whatever the checks say; /readyz (and its old name /healthz) reads them."""
    try:
        for checks, code, status, reasons in READINESS:
            node.checks = dict(checks)
            assert httpx.get(f"{url}/livez").json() == {"status": "alive"}
            for path in ("/readyz", "/healthz"):
                r = httpx.get(f"{url}{path}")
                assert (r.status_code, r.json().get("status"), r.json().get("reasons")) == (code, status, reasons)
                assert r.json()["checks"] == checks
    finally:
        node.checks = {"broker": True, "cloud": True}


def test_metrics_count_requests(node, client, url):
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
        )
    )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'splitglm_edge_http_requests_total{api="completions",code="200"} 1.0' in text
    assert 'splitglm_edge_http_requests_total{api="chat",code="200"} 1.0' in text
    assert 'splitglm_edge_http_requests_total{api="completions",code="400"} 1.0' in text
    assert 'splitglm_edge_tokens_total{path="accurate"} 8.0' in text
    assert 'splitglm_edge_steps_total{path="accurate"} 8.0' in text
    assert 'splitglm_edge_time_to_first_token_seconds_count 2.0' in text
    assert 'splitglm_edge_e2e_request_latency_seconds_count 2.0' in text
    assert 'splitglm_edge_inter_token_latency_seconds_count 6.0' in text  # 5 + 3 tokens, less each first
    assert 'stage="ttft"' not in text and "process_cpu_seconds_total" in text and "python_info" in text
    assert 'splitglm_edge_step_seconds_count{kind="http"} 8.0' in text


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
