"""The edge's HTTP limits through a real uvicorn server: body size, prompt length, context, rate and concurrency.

The node is ``tests/local_chain.py``'s TestNode (real segments of the tiny
model, a real character tokenizer, counted). Each refusal must be OpenAI's
error body with the right status, reach no model work (no tokenising where
the limit comes first, no generation) and count in
``splitglm_edge_http_refused_total{reason}``; an unexpected failure is a 500
that does not echo the exception.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from edge_node.http_api import create_app
from tests.local_chain import TestNode, char_tokenizer, serve

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


class CountingTokenizer:
    """The character tokenizer, counting the calls that tokenise."""

    def __init__(self):
        self.inner, self.calls = char_tokenizer(), 0

    def encode(self, *args, **kw):
        self.calls += 1
        return self.inner.encode(*args, **kw)

    def apply_chat_template(self, *args, **kw):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def refused(node: TestNode, reason: str) -> float:
    value = node.metrics.registry.get_sample_value("splitglm_edge_http_refused_total", {"reason": reason})
    return value or 0.0


def assert_refused(r: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param, error
    return error


@pytest.fixture()
def started(tiny_glm):
    """start(**settings) -> (node, httpx client) of a TestNode app served on a free port."""
    opened = []

    def start(**settings):
        node = TestNode(tiny_glm, CountingTokenizer(), 1, 3, **settings)
        context = serve(create_app(node))
        url = context.__enter__()
        opened.append(context)
        client = httpx.Client(base_url=url, timeout=30)
        opened.append(client)
        return node, client

    yield start
    for item in reversed(opened):
        item.__exit__(None, None, None)


def test_body_over_the_limit_is_413_declared_or_chunked(started):
    node, http = started(max_body_bytes=2048)
    body = json.dumps({"prompt": "ab", "max_tokens": 1, "user": "x" * 3000}).encode()
    error = assert_refused(http.post(COMPLETIONS, content=body, headers={"content-type": "application/json"}),
                           413, "request_too_large")
    assert "limit is 2048 bytes" in error["message"]

    def chunks():  # no Content-Length: the guard counts what arrives
        yield body[:1500]
        yield body[1500:]

    assert_refused(http.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"}),
                   413, "request_too_large")
    assert refused(node, "body_too_large") == 2 and node.generations == [] and node.tokenizer.calls == 0
    small = json.dumps({"prompt": "ab", "max_tokens": 1}).encode()
    assert http.post(COMPLETIONS, content=iter([small[:5], small[5:]]),
                     headers={"content-type": "application/json"}).status_code == 200  # a chunked body passes


def test_prompt_characters_are_limited_before_tokenising(started):
    node, http = started(max_prompt_chars=50)
    error = assert_refused(http.post(COMPLETIONS, json={"prompt": "a" * 51, "max_tokens": 1}), 400,
                           "prompt_too_long", "prompt")
    assert "51 characters; the limit is 50" in error["message"]
    messages = [{"role": "system", "content": "s" * 30}, {"role": "user", "content": "u" * 21}]
    assert_refused(http.post(CHAT, json={"messages": messages, "max_tokens": 1}), 400, "prompt_too_long", "messages")
    assert node.tokenizer.calls == 0 and node.generations == [] and refused(node, "prompt_too_long") == 2
    assert http.post(COMPLETIONS, json={"prompt": "a" * 50, "max_tokens": 1}).status_code == 200


def test_prompt_tokens_and_context_length_are_400(started):
    node, http = started(max_prompt_tokens=10, max_positions=20)
    assert_refused(http.post(COMPLETIONS, json={"prompt": [5] * 11, "max_tokens": 1}), 400,
                   "context_length_exceeded", "prompt")
    assert refused(node, "too_many_tokens") == 1
    error = assert_refused(http.post(COMPLETIONS, json={"prompt": [5] * 10, "max_tokens": 11}), 400,
                           "context_length_exceeded", "max_tokens")
    assert "maximum context length is 20 tokens" in error["message"] and "21" in error["message"]
    messages = [{"role": "user", "content": "abc"}]  # the chat template makes 21 tokens of it
    assert_refused(http.post(CHAT, json={"messages": messages, "max_tokens": 4}), 400, "context_length_exceeded",
                   "prompt")
    assert refused(node, "context_length") == 1 and refused(node, "too_many_tokens") == 2
    assert node.generations == []
    r = http.post(COMPLETIONS, json={"prompt": [5] * 10, "max_tokens": 10, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 20


def test_rate_per_client_is_429_with_retry_after(started):
    node, http = started(rate_per_key_per_min=3)
    assert [http.get("/v1/models").status_code for _ in range(3)] == [200] * 3
    r = http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 1})
    error = assert_refused(r, 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and "3 requests per minute" in error["message"]
    assert 15 <= int(r.headers["retry-after"]) <= 20  # one request's worth of the bucket: 60 s / 3
    assert refused(node, "rate_limit") == 1 and node.generations == []
    assert http.get("/livez").status_code == http.get("/readyz").status_code == 200  # not limited


def test_open_requests_per_client_are_429_and_freed_after(started):
    node, http = started(max_concurrent_per_key=1)
    node.downstream.delay_s = 0.05  # 20 steps: a second or so
    first: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: first.append(
        http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 20, "stream": True})))
    slow.start()
    try:
        while not node.generations:  # the slow request is being served
            slow.join(0.01)
            assert slow.is_alive() or node.generations, first
        r = http.get("/v1/models")
        assert_refused(r, 429, "too_many_concurrent_requests")
        assert r.headers["retry-after"] == "1" and refused(node, "concurrency") == 1
    finally:
        slow.join(30)
    assert first[0].status_code == 200 and first[0].text.endswith("data: [DONE]\n\n")
    assert http.get("/v1/models").status_code == 200  # the slot is free again


def test_limits_count_per_api_key(started, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# two clients\nkey-a\n\nkey-b\n")
    node, http = started(api_keys_file=keys, rate_per_key_per_min=2)
    a, b = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
    assert [http.get("/v1/models", headers=a).status_code for _ in range(3)] == [200, 200, 429]
    assert http.get("/v1/models", headers=b).status_code == 200  # key b has its own bucket


def test_repeated_failed_authentication_is_429_and_a_good_key_still_passes(started, tmp_path):
    from edge_node.guard import AUTH_FAILURES_PER_MIN

    keys = tmp_path / "keys"
    keys.write_text("key-a\n")
    node, http = started(api_keys_file=keys)
    wrong = {"Authorization": "Bearer guess"}
    codes = [http.get("/v1/models", headers=wrong).status_code for _ in range(AUTH_FAILURES_PER_MIN + 2)]
    assert codes[:AUTH_FAILURES_PER_MIN] == [401] * AUTH_FAILURES_PER_MIN and codes[-2:] == [429, 429]
    r = http.get("/v1/models", headers=wrong)
    assert_refused(r, 429, "rate_limit_exceeded")
    assert int(r.headers["Retry-After"]) >= 1 and refused(node, "auth_rate") >= 3
    assert http.get("/v1/models", headers={"Authorization": "Bearer key-a"}).status_code == 200


def test_a_500_does_not_echo_the_exception(started):
    node, http = started()

    def broken(prompt_ids, params, deadline_unix_ms=0):
        raise RuntimeError("secret-internal-detail /etc/passwd")

    node.generation = broken
    r = http.post(COMPLETIONS, json={"prompt": "ab", "max_tokens": 1})
    assert r.status_code == 500 and "secret" not in r.text and "RuntimeError" not in r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "internal error" in error["message"] and "log" in error["message"]
