"""Tool calling (edge_node.tools, edge_node.tool_calls): validation, rendering, the answer's grammar against
the demo model's real vocabulary, and the calls read back, whole and streamed."""

from __future__ import annotations

import copy
import json
import random

import pytest

from edge_node.tool_calls import ToolCallParser, finish_reason, parse_tool_calls
from edge_node.tools import MAX_TOOLS, ToolError, call_text, template_supports_tools, tool_request
from runtime.grammar import GrammarError, GrammarLimits, Grammars, Vocabulary

EOS = 2  # the demo model's <|im_end|>
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                  "required": ["x", "y"], "additionalProperties": False}}}
NESTED = {"type": "function", "function": {  # local $refs, which must still resolve inside the call's JSON
    "name": "plot-points", "parameters": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
        "type": "object", "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/point"}}},
        "required": ["points"]}}}
TOOLS = [WEATHER, ADD, NESTED]
PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SUM = '<tool_call>\n{"name": "add", "arguments": {"x": 2, "y": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    from runtime.checkpoint import load_tokenizer

    return load_tokenizer(demo_checkpoint)


@pytest.fixture(scope="module")
def grammars(demo_checkpoint) -> Grammars:
    return Grammars(Vocabulary.load(demo_checkpoint, 49152))


def refused_param(*args, **kwargs) -> str:
    with pytest.raises(ToolError) as e:
        tool_request(*args, **kwargs)
    return e.value.param


def with_function(**changes) -> dict:
    return {"type": "function", "function": {**WEATHER["function"], **changes}}


# ---- validation ---------------------------------------------------------------------------------------------

def test_valid_tools_and_defaults(grammars):
    req = tool_request(TOOLS, grammars=grammars)
    assert [t.name for t in req.tools] == ["get_weather", "add", "plot-points"]
    assert (req.choice.mode, req.parallel, req.active) == ("auto", True, True)
    bare = tool_request([{"type": "function", "function": {"name": "now"}}], "required", False, grammars)
    assert bare.tools[0].parameters == {"type": "object", "properties": {}} and not bare.parallel
    assert tool_request(None).choice.mode == "none" and not tool_request([]).active
    assert tool_request(TOOLS, "none").grammar() is None
    named = tool_request(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert (named.choice.mode, named.choice.name) == ("function", "add")


@pytest.mark.parametrize("tools, choice, parallel, param", [
    ({"type": "function"}, None, None, "tools"),
    ([WEATHER] * (MAX_TOOLS + 1), None, None, "tools"),
    ([ADD, {"type": "custom", "custom": {"name": "x"}}], None, None, "tools[1].custom"),
    ([{"type": "retrieval", "function": ADD["function"]}], None, None, "tools[0].type"),
    ([with_function(name="bad name")], None, None, "tools[0].function.name"),
    ([with_function(name="x" * 65)], None, None, "tools[0].function.name"),
    ([with_function(description=3)], None, None, "tools[0].function.description"),
    ([with_function(parameters=[])], None, None, "tools[0].function.parameters"),
    ([with_function(strict="yes")], None, None, "tools[0].function.strict"),
    ([with_function(returns={})], None, None, "tools[0].function.returns"),
    ([WEATHER, ADD, WEATHER], None, None, "tools[2].function.name"),
    ([WEATHER], "always", None, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "add"}}, None, "tool_choice.function.name"),
    ([WEATHER], {"type": "allowed_tools", "allowed_tools": {}}, None, "tool_choice.allowed_tools"),
    (None, "required", None, "tool_choice"),
    ([], {"type": "function", "function": {"name": "add"}}, None, "tool_choice.function.name"),
    ([WEATHER], "auto", "yes", "parallel_tool_calls"),
])
def test_refusals_name_the_param(tools, choice, parallel, param):
    assert refused_param(tools, choice, parallel) == param


@pytest.mark.parametrize("schema", [{"type": "foo"}, {"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
                                    {"type": "string", "pattern": "(?<=a)b"}])
def test_a_schema_the_library_refuses_names_its_tool(grammars, schema):
    with pytest.raises(ToolError) as e:
        tool_request([ADD, with_function(parameters=schema)], "none", grammars=grammars)
    assert e.value.param == "tools[1].function.parameters" and e.value.message
    tool_request([ADD, with_function(parameters=schema)], "none")  # without a vocabulary: not compiled


def test_the_grammar_limits_hold_for_tools(demo_checkpoint):
    small = Grammars(Vocabulary.load(demo_checkpoint, 49152), GrammarLimits(max_bytes=3000, max_depth=8))
    deep: dict = {"type": "object"}
    for _ in range(8):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ToolError) as e:
        tool_request([ADD, with_function(parameters=deep)], grammars=small)
    assert e.value.param == "tools[1].function.parameters" and "nests" in e.value.message
    many = [with_function(name=f"f{i}") for i in range(10)]  # each small enough; together over max_bytes
    with pytest.raises(ToolError) as e:
        tool_request(many, grammars=small)
    assert e.value.param == "tools" and "limit" in e.value.message
    tool_request(many[:3], grammars=small)


# ---- rendering ----------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"x": 2, "y": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "20 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
]


def rendered(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


def test_fallback_lists_tools_writes_calls_and_merges_results(tokenizer):
    assert not template_supports_tools(tokenizer)
    req = tool_request(TOOLS)
    ids = req.render(tokenizer, CONVERSATION)
    system = req.render(tokenizer, [{"role": "system", "content": "Be brief."}, *CONVERSATION])
    expected = [
        {"role": "user", "content": "Weather in Paris and 2+3?"},
        {"role": "assistant", "content": PARIS + "\n" + SUM},
        {"role": "user", "content": "<tool_response>\n20 C, sunny\n</tool_response>\n"
                                    "<tool_response>\n5\n</tool_response>"},
    ]
    text = rendered(tokenizer, ids)
    prompt = text.split("<|im_end|>")[0]
    assert prompt.startswith("<|im_start|>system\n# Tools") and json.dumps(WEATHER["function"]["parameters"]) in prompt
    assert ids == tokenizer.apply_chat_template([{"role": "system", "content": prompt.split("\n", 1)[1]}, *expected],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
    assert rendered(tokenizer, system).startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_shows_no_tools_but_keeps_the_history(tokenizer):
    text = rendered(tokenizer, tool_request(TOOLS, "none").render(tokenizer, CONVERSATION))
    assert "# Tools" not in text and "You are a helpful AI assistant named SmolLM" in text
    assert PARIS in text and "<tool_response>\n5\n</tool_response>" in text


def test_a_conversation_without_tools_renders_as_the_template_does(tokenizer):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+3?"}]
    assert tool_request(None).render(tokenizer, plain) == tokenizer.apply_chat_template(
        plain, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "tool_call_id": "call_1", "content": "5"}], "messages[0].tool_call_id"),
    ([*CONVERSATION[:2], {"role": "tool", "tool_call_id": "call_9", "content": "5"}], "messages[2].tool_call_id"),
    ([*CONVERSATION[:2], {"role": "tool", "content": "5"}], "messages[2].tool_call_id"),
    ([*CONVERSATION[:2], {"role": "tool", "tool_call_id": "call_1"}], "messages[2].content"),
    ([CONVERSATION[0], {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": "{x: 2}"}}]}], "messages[1].tool_calls[0].function.arguments"),
    ([CONVERSATION[0], {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add"}}]}], "messages[1].tool_calls[0].function"),
    ([CONVERSATION[0], {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "add", "arguments": "{}"}}]}], "messages[1].tool_calls[0].id"),
    ([{**CONVERSATION[0], "tool_calls": CONVERSATION[1]["tool_calls"]}], "messages[0].tool_calls"),
])
def test_bad_tool_messages_name_the_field(tokenizer, messages, param):
    with pytest.raises(ToolError) as e:
        tool_request(TOOLS).render(tokenizer, messages)
    assert e.value.param == param


TOOL_TEMPLATE = (  # a small Hermes-style template that renders tools itself (as Qwen2.5's does)
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}\n</tool_call>{% endfor %}"
    "{% if m.role == 'tool' %} ({{ m.name }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_with_tool_support_renders_them(tokenizer):
    native = copy.deepcopy(tokenizer)
    native.chat_template = TOOL_TEMPLATE
    assert template_supports_tools(native)
    text = rendered(native, tool_request(TOOLS).render(native, CONVERSATION))
    assert text.startswith('<|im_start|>system\nTOOLS:{"type": "function", "function": {"name": "get_weather"')
    assert "# Tools" not in text and PARIS + SUM in text  # the arguments passed as objects (not strings)
    assert "<|im_start|>tool\n20 C, sunny (get_weather)<|im_end|>" in text
    no_tools = rendered(native, tool_request(TOOLS, "none").render(native, CONVERSATION))
    assert "TOOLS:" not in no_tools and "<|im_start|>tool\n5 (add)" in no_tools
    other = copy.deepcopy(tokenizer)
    other.chat_template = TOOL_TEMPLATE.replace("<tool_call>", "<call>").replace("</tool_call>", "</call>")
    assert not template_supports_tools(other)  # tools, but not in the format constrained and parsed here


# ---- the answer's grammar -----------------------------------------------------------------------------------

def accepts(grammars, req, tokenizer, text: str) -> bool:
    """Whether the answer's grammar allows ``text`` then end-of-text, token by token through the mask."""
    matcher = grammars.matcher(req.grammar().kind, req.grammar().text)
    for t in [*tokenizer.encode(text), EOS]:
        mask = matcher.mask()
        if not (int(mask[t // 32]) >> (t % 32)) & 1:
            return False
        try:
            matcher.consume([t])
        except GrammarError:
            return False
    return matcher.stopped or matcher.accepting()


def test_required_forces_a_call_that_follows_the_schema(grammars, tokenizer):
    req = tool_request(TOOLS, "required", grammars=grammars)
    assert accepts(grammars, req, tokenizer, PARIS)
    assert accepts(grammars, req, tokenizer, '<tool_call>\n{"name": "get_weather", "arguments": '
                                             '{"city": "Rome", "unit": "c"}}\n</tool_call>')
    assert accepts(grammars, req, tokenizer, PARIS + "\n" + SUM)  # parallel calls, one a line
    assert accepts(grammars, req, tokenizer, '<tool_call>\n{"name": "plot-points", "arguments": '
                                             '{"points": [{"x": 1.5}, {"x": 2}]}}\n</tool_call>')
    for bad in ["Paris is sunny.", PARIS + " and more", PARIS[:-3],
                PARIS.replace("get_weather", "get_time"),
                SUM.replace("3", '"3"'), SUM.replace("}}", ', "z": 1}}'),  # a wrong type; a property not allowed
                PARIS.replace('"city"', '"town"'), PARIS.replace('"name": ', '"name":'),
                '<tool_call>\n{"name": "plot-points", "arguments": {"points": [{"y": 1}]}}\n</tool_call>',
                '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>']:
        assert not accepts(grammars, req, tokenizer, bad), bad
    single = tool_request(TOOLS, "required", False, grammars)
    assert accepts(grammars, single, tokenizer, PARIS) and not accepts(grammars, single, tokenizer, PARIS + "\n" + SUM)


def test_a_named_function_allows_only_that_function(grammars, tokenizer):
    req = tool_request(TOOLS, {"type": "function", "function": {"name": "add"}}, grammars=grammars)
    assert accepts(grammars, req, tokenizer, SUM)
    assert not accepts(grammars, req, tokenizer, PARIS) and not accepts(grammars, req, tokenizer, SUM + "\n" + SUM)
    assert not accepts(grammars, req, tokenizer, "5")


def test_auto_allows_text_or_a_call_constrained_once_it_starts(grammars, tokenizer):
    req = tool_request(TOOLS, "auto", grammars=grammars)
    for good in ["It is sunny in Paris.", "Let me <b>check</b>: <tool", "", PARIS, PARIS + "\n" + SUM,
                 "I will look it up.\n" + PARIS]:
        assert accepts(grammars, req, tokenizer, good), good
    for bad in ["<tool_call>\nthe weather please", "Sure! <tool_call> get_weather(Paris)",
                PARIS.replace("Paris", "7").replace('"7"', "7"), PARIS + "\nDone."]:
        assert not accepts(grammars, req, tokenizer, bad), bad


def test_a_cached_grammar_compiles_once(grammars):
    req = tool_request(TOOLS, "auto", grammars=grammars)
    before = grammars.compiled
    tool_request(TOOLS, "auto", grammars=grammars)
    assert grammars.compiled == before and req.grammar() == tool_request(TOOLS, "auto").grammar()


# ---- reading the calls back ---------------------------------------------------------------------------------

def test_parse_content_calls_and_finish_reason():
    text = parse_tool_calls("It is sunny.")
    assert (text.content, text.tool_calls, finish_reason("stop", text)) == ("It is sunny.", [], "stop")
    calls = parse_tool_calls(PARIS + "\n" + SUM)
    assert calls.content is None and finish_reason("stop", calls) == "tool_calls"
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls.tool_calls] == \
        [("function", "get_weather", {"city": "Paris"}), ("function", "add", {"x": 2, "y": 3})]
    ids = [c["id"] for c in calls.tool_calls]
    assert all(i.startswith("call_") and len(i) == 29 for i in ids) and len(set(ids)) == 2
    both = parse_tool_calls("Let me check.\n\n" + PARIS)
    assert both.content == "Let me check." and len(both.tool_calls) == 1
    cut = parse_tool_calls(PARIS[:-20])
    assert not cut.complete and finish_reason("length", cut) == "length" and finish_reason("stop", cut) == "stop"
    assert parse_tool_calls("a < b, <tool").content == "a < b, <tool"  # a marker's start, then no marker
    assert parse_tool_calls(PARIS + "\n<tool").content is None  # another call cut (max_tokens) in its marker


def test_calls_written_by_call_text_read_back():
    args = {"q": 'a "quoted" } brace', "n": [1, {"k": None}], "ok": True, "e": "é\\n"}
    call = parse_tool_calls(call_text("search", args)).tool_calls[0]["function"]
    assert call["name"] == "search" and json.loads(call["arguments"]) == args


def test_a_call_not_in_streamed_order_is_read_whole():
    call = parse_tool_calls('<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>').tool_calls[0]
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>").tool_calls == []


def stream(text: str, pieces: list[str]) -> tuple[list[dict], ToolCallParser]:
    assert "".join(pieces) == text
    parser = ToolCallParser()
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    return deltas, parser


def reassemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What an OpenAI client builds from the deltas (index keyed; id, name once; arguments concatenated)."""
    content, calls = "", {}
    for d in deltas:
        assert len(d) == 1, d  # a delta is content or tool calls, never both
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:
                assert tc["index"] not in calls and tc["type"] == "function" and tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


TEXTS = ["It is sunny in Paris, 20 C.\n", "I will check.\n" + PARIS + "\n" + SUM,
         '<tool_call>\n{"name": "s", "arguments": {"q": "x}\\"{", "v": [1, 2.5e3, null, true]}}\n</tool_call>',
         "Hm <tool_cal not a call, then " + SUM, PARIS[:-14]]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_reassemble_to_the_whole_answer(tokenizer, text):
    whole = parse_tool_calls(text)
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
    splits = {"chars": list(text), "tokens": [tokenizer.decode([t]) for t in tokenizer.encode(text)],
              "random": [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])], "one": [text]}
    for how, pieces in splits.items():
        deltas, parser = stream(text, pieces)
        content, calls = reassemble(deltas)
        assert content == (whole.content or ""), how
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in whole.tool_calls], how
        assert [c["id"] for c in calls] == [c["id"] for c in parser.answer().tool_calls], how
        assert parser.answer().complete == whole.complete


def test_the_name_streams_before_the_arguments_end():
    parser = ToolCallParser()
    assert parser.feed('Sure.\n<tool_call>\n{"name": "get_weather", "argu') == [{"content": "Sure."}]
    start = parser.feed('ments": {"ci')
    assert start[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert start[1:] == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}]
    assert parser.feed('ty": "Paris"}}\n</tool_') == [{"tool_calls": [{"index": 0, "function": {
        "arguments": 'ty": "Paris"}'}}]}]
    assert parser.feed("call>") == [] and parser.finish() == []
    assert parser.answer().content == "Sure." and parser.answer().complete


def test_the_grammar_leaves_the_tools_descriptions_at_the_edge(grammars, tokenizer):
    described = {"type": "function", "function": {"name": "find", "description": "Find a PRIVATE-WORD", "parameters": {
        "type": "object", "title": "PRIVATE-TITLE", "properties": {
            "description": {"type": "string", "description": "the PRIVATE-WORD to look for", "maxLength": 8}},
        "required": ["description"]}}}
    req = tool_request([described], "required", grammars=grammars)
    text = req.grammar().text
    assert "PRIVATE" not in text and '"description"' in text  # the property stays, the words for readers go
    assert "PRIVATE-WORD" in tokenizer.decode(req.render(tokenizer, [{"role": "user", "content": "hi"}]))
    assert accepts(grammars, req, tokenizer, '<tool_call>\n{"name": "find", "arguments": {"description": "x"}}'
                                             '\n</tool_call>')
