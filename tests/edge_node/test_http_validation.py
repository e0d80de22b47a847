"""Invalid requests get a 4xx with OpenAI's error body, never a 500 (a table of bad bodies, then random ones)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_node.http_api import create_app
from tests.local_chain import TestNode, char_tokenizer

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def node(tiny_glm):
    return TestNode(tiny_glm, char_tokenizer(), 1, 3, max_prompt_tokens=100)


@pytest.fixture(scope="module")
def http(node):
    with TestClient(create_app(node), raise_server_exceptions=False) as client:
        yield client


def assert_error(r, status: int, param: str | None = None, words: str = ""):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error


BAD = [
    # (path, raw body, status, param, words in the message)
    (COMPLETIONS, b"{", 400, None, "not valid JSON"),
    (CHAT, b"", 400, None, "JSON"),
    (COMPLETIONS, b"[1, 2]", 400, None, "JSON object"),
    (COMPLETIONS, b'"prompt"', 400, None, "JSON object"),
    (COMPLETIONS, b"{}", 400, "prompt", "required"),
    (COMPLETIONS, b'{"prompt": 5}', 400, "prompt", "string"),
    (COMPLETIONS, b'{"prompt": ""}', 400, "prompt", "empty"),
    (COMPLETIONS, b'{"prompt": []}', 400, "prompt", "empty"),
    (COMPLETIONS, b'{"prompt": [[]]}', 400, "prompt", "empty"),
    (COMPLETIONS, b'{"prompt": ["a", "b"]}', 400, "prompt", "one prompt"),
    (COMPLETIONS, b'{"prompt": [1, -2]}', 400, "prompt", ">= 0"),
    (COMPLETIONS, b'{"prompt": [1, true]}', 400, "prompt", ""),
    (COMPLETIONS, b'{"prompt": [1, 96]}', 400, "prompt", "vocabulary"),
    (COMPLETIONS, b'{"prompt": [1, 2.5]}', 400, "prompt", ""),
    (COMPLETIONS, json.dumps({"prompt": "x" * 101}).encode(), 400, "prompt", "limit is 100"),
    (COMPLETIONS, b'{"prompt": "x", "model": "gpt-4"}', 404, "model", "does not exist"),
    (COMPLETIONS, b'{"prompt": "x", "model": 3}', 400, "model", ""),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens", ""),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 65}', 400, "max_tokens", "between 1 and 64"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens", "integer"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 5.5}', 400, "max_tokens", "integer"),
    (COMPLETIONS, b'{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens", ""),
    (COMPLETIONS, b'{"prompt": "x", "temperature": -0.1}', 400, "temperature", ""),
    (COMPLETIONS, b'{"prompt": "x", "temperature": 2.5}', 400, "temperature", ""),
    (COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    (COMPLETIONS, b'{"prompt": "x", "temperature": Infinity}', 400, "temperature", ""),
    (COMPLETIONS, b'{"prompt": "x", "temperature": "hot"}', 400, "temperature", ""),
    (COMPLETIONS, b'{"prompt": "x", "top_p": 0}', 400, "top_p", ""),
    (COMPLETIONS, b'{"prompt": "x", "top_p": 1.5}', 400, "top_p", ""),
    (COMPLETIONS, b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", "up to 4"),
    (COMPLETIONS, b'{"prompt": "x", "stop": 7}', 400, "stop", ""),
    (COMPLETIONS, b'{"prompt": "x", "stop": [null]}', 400, "stop", ""),
    (COMPLETIONS, b'{"prompt": "x", "seed": -1}', 400, "seed", ""),
    (COMPLETIONS, b'{"prompt": "x", "seed": 18446744073709551616}', 400, "seed", ""),
    (COMPLETIONS, b'{"prompt": "x", "stream": "yes"}', 400, "stream", ""),
    (COMPLETIONS, b'{"prompt": "x", "stream": 1}', 400, "stream", ""),
    (
        COMPLETIONS,
        b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": "y"}}',
        400,
        "stream_options.include_usage",
        "",
    ),
    (COMPLETIONS, b'{"prompt": "x", "stream": true, "stream_options": []}', 400, "stream_options", ""),
    (COMPLETIONS, b'{"prompt": "x", "n": 17}', 400, "n", "at most 16"),
    (COMPLETIONS, b'{"prompt": "x", "latency_budget_ms": 0}', 400, "latency_budget_ms", ""),
    (COMPLETIONS, b'{"prompt": "x", "latency_budget_ms": 4294967296}', 400, "latency_budget_ms", ""),
    (COMPLETIONS, b'{"prompt": "x", "policy": "cheap"}', 400, "policy", ""),
    (CHAT, b'{"messages": []}', 400, "messages", ""),
    (CHAT, b'{"messages": "hi"}', 400, "messages", ""),
    (CHAT, b'{"messages": [{"content": "hi"}]}', 400, "messages.0.role", "required"),
    (CHAT, b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "messages.0.role", ""),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content", ""),
    (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages.0.content", "text"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}, 7]}', 400, "messages.1", ""),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}', 400, None, ""),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}', 400, None, ""),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": "y" * 100}]}).encode(), 400, "prompt", "limit"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD)
def test_bad_request(http, path, body, status, param, words):
    assert_error(http.post(path, content=body, headers={"content-type": "application/json"}), status, param, words)


def test_wrong_routes_and_content_type(http):
    assert_error(http.post(COMPLETIONS, content=b"prompt=x"), 400)  # a form, not JSON
    assert_error(http.get(COMPLETIONS), 405)
    assert_error(http.post("/v1/embeddings", json={"input": "x"}), 404)


def test_unknown_fields_are_refused_by_name(http):
    body = {"prompt": "ab", "max_tokens": 2, "user": "me", "frequency_penalty": 0, "logit_bias": {}}
    assert http.post(COMPLETIONS, json=body).status_code == 200  # ignored, and refused ones at neutral values
    assert_error(http.post(COMPLETIONS, json={"prompt": "ab", "temprature": 1}), 400, "temprature", "unrecognized")
    body = {"messages": [{"role": "user", "content": "x", "name": "bob"}], "max_tokens": 2, "tools": []}
    assert http.post(CHAT, json=body).status_code == 200


def test_accepted_shapes(http, node):
    """The shapes OpenAI accepts and we serve: text parts, developer role, null fields, a list of one prompt."""
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None},
        ],
        "max_tokens": None,
        "temperature": None,
        "stop": None,
        "n": 1,
        "max_completion_tokens": 2,
    }
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ]
    want = node.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert node.generations[-1].prompt_ids == want
    for prompt in (["ab"], [[3, 4]], "ab", [3, 4]):
        r = http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 1})
        assert r.status_code == 200, (prompt, r.text)
    assert node.generations[-1].prompt_ids == [3, 4] and node.generations[-3].prompt_ids == [3, 4]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "seed", "stream", "stream_options", "n", "latency_budget_ms", "policy",
]  # fmt: skip
VALUES = JSON | st.sampled_from([0, 1, 2, 64, 65, "tiny", "fast", "ab", [1, 2], ["ab"], USER, True, 0.5, -1, None])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([COMPLETIONS, CHAT]), body=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_random_bodies_never_500(http, path, body):
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2  # keep the valid ones short
    r = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404), (body, r.status_code, r.text)
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif body.get("stream") is True:
        assert r.text.endswith("data: [DONE]\n\n")
    else:
        assert r.json()["usage"]["completion_tokens"] >= 1


def test_no_tokenizer_is_501_not_500(tiny_glm):
    node = TestNode(tiny_glm, None, 1, 3)
    with TestClient(create_app(node), raise_server_exceptions=False) as client:
        r = client.post(CHAT, json={"messages": USER})
        assert r.status_code == 501 and "no tokenizer" in r.json()["error"]["message"]
        assert client.post(COMPLETIONS, json={"prompt": [1, 2]}).status_code == 501
