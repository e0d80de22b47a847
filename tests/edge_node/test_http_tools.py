"""Tool calling over HTTP with the official ``openai`` client (sync, async, streamed) against a running edge in
front of a real cloud process, on the demo model (whose chat template has no tool support: the fallback prompt).

The edge drafts with its fast tail (speculative rounds) under the tools' grammar; the cloud verifies. A named or
``required`` call's arguments parse and validate (``jsonschema``) against its function's schema, whole and
streamed (the deltas reassemble to the same call); ``auto`` answers text or a valid call; a follow-up turn with
the assistant's calls and a ``tool`` message is answered; bad tools get 400s naming the param.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from partitioner.plan.demo import demo_plan
from tests.edge_node.test_speculative import edge_and_cloud

pytestmark = pytest.mark.slow
MAX_TOKENS = 80
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Tokyo"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two whole numbers",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999},
                                                    "y": {"type": "integer", "minimum": 0, "maximum": 999}},
                   "required": ["x", "y"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def edge(demo_checkpoint):
    """An edge (drafting up to 4 tokens a round) in front of a real cloud process, on lossless fp32 frames."""
    plan = str(demo_plan(demo_checkpoint, codecs=("fp32", "fp32")))
    with edge_and_cloud(plan, draft_tokens=4, step_timeout_s=60, model_name="smollm2") as node:
        yield node


@pytest.fixture(scope="module")
def client(edge):
    return openai.OpenAI(base_url=f"{edge.url}/v1", api_key="x", max_retries=0, timeout=120)


def valid_call(call) -> dict:
    """A call of the answer, checked: OpenAI's shape, a known function, arguments that validate; its arguments."""
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def reassemble(chunks) -> tuple[str, list[dict], str]:
    """What a client builds from a streamed choice: its content, its calls (index-keyed: the first delta has
    id, type, name and arguments ""; the others add arguments) and its finish_reason."""
    content, calls, finish = "", {}, None
    for c in chunks:
        for choice in c.choices:
            delta, finish = choice.delta, choice.finish_reason or finish
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.id is not None:
                    assert tc.index not in calls and tc.type == "function" and tc.function.arguments == ""
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.function.name is None and tc.type is None
                    calls[tc.index]["arguments"] += tc.function.arguments
    return content, [calls[i] for i in sorted(calls)], finish


def test_a_named_call_validates_whole_and_streamed(client):
    kw = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": MAX_TOKENS,
          "temperature": 0}  # fmt: skip
    r = client.chat.completions.create(logprobs=True, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = valid_call(call)
    assert len(choice.logprobs.content) == r.usage.completion_tokens  # every token's, the call's included
    chunks = list(client.chat.completions.create(stream=True, logprobs=True, **kw))
    content, calls, finish = reassemble(chunks)
    assert (content, finish) == ("", "tool_calls")
    streamed = [c.token for ch in chunks for x in ch.choices if x.logprobs for c in x.logprobs.content]
    assert streamed == [c.token for c in choice.logprobs.content]  # a token's log-probs in one chunk each
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", arguments)]
    assert calls[0]["arguments"] == call.function.arguments and calls[0]["id"].startswith("call_")


def test_required_calls_validate_with_the_async_client(client, edge):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="x", max_retries=0, timeout=120) as aio:
            kw = {"model": "smollm2", "tools": TOOLS, "tool_choice": "required", "max_tokens": MAX_TOKENS,
                  "temperature": 0.8, "seed": 7}  # fmt: skip
            whole = await aio.chat.completions.create(
                messages=[{"role": "user", "content": "Add 12 and 30."}], n=2, parallel_tool_calls=False, **kw)
            stream = await aio.chat.completions.create(messages=ASK, stream=True, parallel_tool_calls=False, **kw)
            return whole, [c async for c in stream]

    whole, chunks = asyncio.run(main())
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:  # one parser per choice
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1  # not parallel
        valid_call(choice.message.tool_calls[0])
    content, [call], finish = reassemble(chunks)
    assert finish == "tool_calls" and content == ""
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def well_formed(choice) -> None:
    """An answer that may hold calls: text, or calls that validate (unless cut by max_tokens)."""
    if choice.message.tool_calls:
        assert choice.finish_reason in ("tool_calls", "length")
        for call in choice.message.tool_calls if choice.finish_reason == "tool_calls" else []:
            valid_call(call)
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert "<tool_call>" not in (choice.message.content or "")  # a started call is read as a call


MARKER = {str(t): 10 for t in (44, 19324, 79, 4350, 46)}  # the demo vocabulary's "<", "tool", "_", "call", ">"
AUTO = {  # the demo model answers text when left alone; biased towards the marker's tokens, it starts a call
    "sampled": {"temperature": 1.0, "seed": 1},
    "biased": {"temperature": 0, "logit_bias": MARKER, "parallel_tool_calls": False},
}


@pytest.mark.parametrize("case", list(AUTO))
def test_auto_answers_text_or_a_valid_call(client, case):
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=MAX_TOKENS,
                                       **AUTO[case])  # fmt: skip
    well_formed(r.choices[0])
    if case == "biased":  # once "<tool_call>" is written, the grammar makes it a valid call
        assert r.choices[0].finish_reason == "tool_calls" and len(r.choices[0].message.tool_calls) == 1


FOLLOW_UP = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
]


def test_a_follow_up_turn_with_a_tool_result_is_answered(client, edge):
    ids = httpx.post(f"{edge.url}/tokenize", json={"messages": FOLLOW_UP}).json()["tokens"]
    text = httpx.post(f"{edge.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in text and "<tool_response>\n21 degrees, sunny\n</tool_response>" in text  # the fallback's rendering
    kw = {"model": "smollm2", "messages": FOLLOW_UP, "tools": TOOLS, "max_tokens": MAX_TOKENS, "temperature": 0}
    r = client.chat.completions.create(**kw)
    well_formed(r.choices[0])
    assert r.usage.prompt_tokens > len(ids)  # the tools listed in the system message
    r = client.chat.completions.create(tool_choice="none", **kw)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    assert r.usage.prompt_tokens == len(ids)  # "none": the tools are not shown


def bad_function(**changes) -> dict:
    return {"type": "function", "function": {**WEATHER["function"], **changes}}


BAD = [  # (fields, param, code)
    ({"tools": [bad_function(name="get weather")]}, "tools[0].function.name", "invalid_value"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "invalid_value"),
    ({"tools": [ADD, bad_function(parameters={"type": "frob"})]}, "tools[1].function.parameters", "invalid_grammar"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "invalid_value"),
    ({"tools": TOOLS, "tool_choice": 3}, "tool_choice", None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", None),
    ({"tools": TOOLS, "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {}}}},
     "response_format", "conflicting_fields"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "conflicting_fields"),
    ({"messages": [*FOLLOW_UP[:2], {**FOLLOW_UP[2], "tool_call_id": "call_9"}]}, "messages[2].tool_call_id",
     "invalid_value"),
    ({"messages": [*FOLLOW_UP[:1], {**FOLLOW_UP[1], "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{x: 1}"}}]}]}, "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    ({"messages": [{**ASK[0], "tool_call_id": "call_1"}]}, "messages.0.tool_call_id", "invalid_value"),
]  # fmt: skip


@pytest.mark.parametrize("fields, param, code", BAD)
def test_bad_tools_get_a_400_naming_the_param(client, fields, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", max_tokens=4, **{"messages": ASK, **fields})
    assert e.value.body["param"] == param, e.value.body
    assert code is None or e.value.body["code"] == code, e.value.body


def test_json_output_with_tool_choice_none(client):
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=MAX_TOKENS, temperature=0, response_format={
                                           "type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMAS[
                                               "get_weather"]}})  # fmt: skip
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS["get_weather"])
