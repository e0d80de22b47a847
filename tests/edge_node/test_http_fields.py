"""Issue 23's HTTP part: every OpenAI field served, ignored or refused by name (never dropped silently),
``max_completion_tokens``, ``stream_options`` only with ``stream``, ``/tokenize``, ``/detokenize``,
``max_model_len`` and ``X-Request-ID`` on every response; with the official ``openai`` client and httpx."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest

from edge_node import schemas
from edge_node.http_api import create_app
from edge_node.schemas import ChatRequest, CompletionRequest, field_status
from runtime.logs import ContextFilter, json_formatter
from tests.edge_node.test_relay import wait_until
from tests.local_chain import TestNode, char_tokenizer, serve

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
README = DOCS.parents[1] / "README.md"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def node(tiny_glm):
    return TestNode(tiny_glm, char_tokenizer(), 1, 3, max_positions=512, max_prompt_tokens=100)


def docs_table() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `(\w+)` \| (\w[\w ]*?) \| (\w[\w ]*?) \|", DOCS.read_text(), re.M)
    return {name: (completions, chat) for name, completions, chat in rows}


def test_docs_table_agrees_with_the_code():
    table = docs_table()
    names = {*CompletionRequest.model_fields, *ChatRequest.model_fields, *schemas.IGNORED,
             *schemas.REFUSED_COMPLETIONS, *schemas.REFUSED_CHAT}  # fmt: skip
    assert set(table) == names
    for name, statuses in table.items():
        assert statuses == (field_status(CompletionRequest, name), field_status(ChatRequest, name)), name


def readme_table() -> dict[str, tuple[str, str]]:
    """The README's API table: each field's (completions, chat) status."""
    section = README.read_text().split("## The HTTP API", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| ([\w ]+) \| ([\w ]+) \|$", section, re.M)
    return {name: (completions, chat) for names, completions, chat in rows for name in re.findall(r"`(\w+)`", names)}


def test_readme_table_agrees_with_the_code():
    assert readme_table() == docs_table()


REFUSED = [  # (chat?, field, value, words)
    (False, "best_of", 2, "not served"),
    (False, "echo", True, "not served"),
    (False, "suffix", "x", "not served"),
    (False, "frobnicate", 1, "unrecognized"),
    (False, "top_logprobs", 2, "unrecognized"),
    (False, "response_format", {"type": "json_object"}, "unrecognized"),
    (False, "tools", [{"type": "function", "function": {"name": "f"}}], "unrecognized"),
    (False, "parallel_tool_calls", False, "unrecognized"),
    (True, "audio", {"voice": "x"}, "not served"),
    (True, "guided_json", {}, "unrecognized"),
]


def ask(client, chat: bool, **extra):
    if chat:
        return client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=extra)
    return client.completions.create(model="tiny", prompt="ab", max_tokens=2, extra_body=extra)


@pytest.mark.parametrize("chat, field, value, words", REFUSED)
def test_refused_fields_are_named(client, url, chat, field, value, words):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, chat, **{field: value})
    assert field in e.value.message and words in e.value.message
    assert e.value.body["param"] == field
    assert e.value.body["code"] == ("unknown_field" if words == "unrecognized" else "unsupported_field")


def test_refused_with_the_async_client(url):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError, match="top_logprobs"):
                await client.chat.completions.create(model="tiny", messages=USER, top_logprobs=3, max_tokens=2)
            with pytest.raises(openai.BadRequestError, match="best_of"):
                await client.completions.create(model="tiny", prompt="ab", best_of=3, max_tokens=2)

    asyncio.run(main())


def test_message_fields(client):
    with pytest.raises(openai.BadRequestError, match="messages.0.tool_call_id"):
        client.chat.completions.create(model="tiny", messages=[{**USER[0], "tool_call_id": "c1"}], max_tokens=2)
    messages = [{**USER[0], "name": "bob"}, {"role": "assistant", "content": "yo", "refusal": None, "tool_calls": []}]
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].message.content


def test_ignored_and_neutral_fields_are_accepted(client):
    r = client.chat.completions.create(
        model="tiny", messages=USER, max_completion_tokens=2, user="u", store=False, metadata={"a": "b"},
        service_tier="auto", n=1, logprobs=False, top_logprobs=0, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={}, tools=[], tool_choice="none", parallel_tool_calls=True, response_format={"type": "text"},
        extra_body={"top_k": -1, "min_p": 0, "repetition_penalty": 1, "safety_identifier": "s"},
    )  # fmt: skip
    assert r.usage.completion_tokens == 2
    r = client.completions.create(model="tiny", prompt="ab", max_tokens=2, n=1, best_of=1, echo=False, user="u")
    assert r.usage.completion_tokens == 2


def test_structured_output_without_a_vocabulary_is_a_400(node, client):
    """This edge's character tokenizer is one llguidance cannot read, and it has no grammars of its own."""
    sessions = len(node.generations)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert e.value.body["code"] == "structured_output_unavailable" and e.value.body["param"] == "response_format"
    assert "cannot serve structured output" in e.value.message and len(node.generations) == sessions


@pytest.mark.parametrize("chat", [False, True])
def test_max_completion_tokens(client, chat):
    r = ask(client, chat, max_tokens=None, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3
    assert ask(client, chat, max_tokens=2, max_completion_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        ask(client, chat, max_completion_tokens=3)  # max_tokens=2 as well


@pytest.mark.parametrize("chat", [False, True])
def test_stream_options_need_stream(client, chat):
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        ask(client, chat, stream_options={"include_usage": True})
    kw = {"model": "tiny", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    chunks = list(client.chat.completions.create(messages=USER, **kw) if chat
                  else client.completions.create(prompt="ab", **kw))  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 2


def test_tokenize_detokenize_round_trip(node, url):
    r = httpx.post(f"{url}/tokenize", json={"prompt": "The cat"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"tokens": node.tokenizer.encode("The cat"), "count": len(body["tokens"]), "max_model_len": 512}
    assert httpx.post(f"{url}/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "The cat"}
    chat = httpx.post(f"{url}/tokenize", json={"messages": USER, "model": "tiny"}).json()
    want = node.tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat["tokens"] == want and chat["count"] == len(want)
    for path, bad, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
                             ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "add_special_tokens"),
                             ("/detokenize", {"tokens": [10**6]}, "tokens"), ("/detokenize", {"tokens": [-1]}, None)]:
        r = httpx.post(f"{url}{path}", json=bad)
        assert r.status_code == 400 and (param is None or r.json()["error"]["param"] == param), (path, bad, r.text)


def test_max_model_len(client):
    assert client.models.list().data[0].model_extra["max_model_len"] == 512
    assert client.models.retrieve("tiny").model_extra["max_model_len"] == 512


def test_request_id_echoed(url, caplog):
    caplog.set_level("INFO", logger="edge_node")
    caplog.handler.addFilter(ContextFilter())  # (the filter of the process's handler: runtime.logs)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 1}, headers={"X-Request-ID": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    assert wait_until(lambda: any(getattr(rec, "path", "") == "/v1/completions" for rec in caplog.records), 5)
    mine = [rec for rec in caplog.records if getattr(rec, "request_id", "") == "abc-1"]
    linking = [rec for rec in mine if r.json()["id"] in rec.getMessage()]  # completion id, request id, session
    assert len(linking) == 1 and linking[0].session_id in linking[0].getMessage()
    assert {rec.session_id for rec in mine} == {linking[0].session_id}  # the access line too
    line = json.loads(json_formatter().format(mine[-1]))  # the access line as --log-format json writes it
    assert (line["logger"], line["path"], line["status"], line["request_id"]) == ("edge_node.access",
                                                                                  "/v1/completions", 200, "abc-1")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "nope": 1}, headers={"X-Request-ID": "abc-2"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "abc-2"
    fresh = {httpx.get(f"{url}/v1/models", headers={"X-Request-ID": bad}).headers["x-request-id"]
             for bad in ("has space", "x" * 129, "")}  # fmt: skip
    assert len(fresh) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", f) for f in fresh)
    assert all(httpx.get(f"{url}{path}").headers["x-request-id"] for path in ("/livez", "/readyz"))


def test_request_id_on_guard_refusals(tiny_glm, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    node = TestNode(tiny_glm, char_tokenizer(), 1, 3, api_keys_file=keys, rate_per_key_per_min=1)
    with serve(create_app(node)) as base:
        r = httpx.post(f"{base}/tokenize", json={"prompt": "a"}, headers={"X-Request-ID": "r401"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "r401"
        auth = {"Authorization": "Bearer k1"}
        assert httpx.post(f"{base}/tokenize", json={"prompt": "a"}, headers=auth).status_code == 200
        r = httpx.post(f"{base}/detokenize", json={"tokens": [1]}, headers={**auth, "X-Request-ID": "r429"})
        assert r.status_code == 429 and r.headers["x-request-id"] == "r429"
