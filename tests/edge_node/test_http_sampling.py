"""Issue 23's sampling fields over HTTP, with the official ``openai`` client against a running edge (the tiny
model split in one process): each field reaches GenerationParams; greedy tokens and log-probs under penalties
and logit_bias equal a reference on the chained segments' logits; log-probs in OpenAI's shapes (plain,
streamed, async); JSON mode under a grammar; n completions (choice i seeded seed + i, the prompt prefilled
once where the tiers fork sessions, n prefills where they do not); bad values get 400s naming the field.
The last test runs a real EdgeNode (router, speculation) against a real cloud process.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import jsonschema
import openai
import pytest
import torch

from protos import splitglm_pb2 as pb
from runtime.grammar import Grammars, Vocabulary
from runtime.local import Chain, split_segments
from runtime.owner import share_prefill
from tests.edge_node.test_router import cloud, exact_plan, start_edge  # noqa: F401 -- fixtures
from tests.local_chain import CHARS, TestNode, char_tokenizer

EOS = 0  # "\n" ends a generation here (the tiny model has no end-of-text token)
USER = [{"role": "user", "content": "Give me JSON."}]
PROMPT = "The cat sat"
BOOLEAN = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
           "additionalProperties": False}  # fmt: skip


def byte_level(chars: list[str]) -> dict[str, int]:
    """GPT-2's byte-level spelling of each character (llguidance reads a vocabulary's tokens in it)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in kept}
    spelling.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in spelling)})
    return {"".join(spelling[b] for b in c.encode()): i for i, c in enumerate(chars)}


def char_grammars() -> Grammars:
    """Grammars over the character tokenizer's ids (its tokenizer.json spelled byte-level for llguidance)."""
    spec = json.loads(char_tokenizer().backend_tokenizer.to_str())
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    spec["model"]["vocab"] = byte_level(CHARS)
    spec["decoder"] = level
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [spec["pre_tokenizer"], level]}
    return Grammars(Vocabulary(json.dumps(spec), len(CHARS), [EOS]))


@pytest.fixture(scope="module")
def node(tiny_glm):
    node = TestNode(tiny_glm, char_tokenizer(), 1, 3, max_positions=512).with_eos(EOS)
    node.grammars = node.downstream.terminal.tails.grammars = char_grammars()  # the edge's and the tail's
    node.downstream.forks_sessions = True  # its terminal starts a session from another's cache (Frame.fork_of)
    return node


@pytest.fixture(scope="module")
def chain(tiny_glm):
    return Chain(split_segments(tiny_glm, 1, 3))


def reference(chain, prompt: list[int], steps: int, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """Greedy tokens and their log-probs, from the chained segments' logits processed by each field's
    definition: a generated token's logit / repetition (if > 0, else times it), minus presence once and
    frequency per time generated; plus its bias. Ends after the end-of-text id."""
    logits = chain.step("ref", 0, torch.tensor(prompt))[-1]
    tokens, logprobs = [], []
    try:
        for i in range(steps):
            x = logits.float().clone()
            for t, count in Counter(tokens).items():
                x[t] = (x[t] / repetition if x[t] > 0 else x[t] * repetition) - presence - frequency * count
            for t, b in (bias or {}).items():
                x[t] += b
            token = int(x.argmax())
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(x, -1)[token]))
            if token == EOS:
                break
            logits = chain.step("ref", len(prompt) + i, torch.tensor([token]))[-1]
    finally:
        chain.close("ref")
    return tokens, logprobs


def last(node, count: int = 1):
    return node.generations[-count:]


FIELDS = [  # (chat?, request fields, GenerationParams fields they become)
    (False, {"top_k": 5}, {"top_k": 5}),
    (True, {"top_k": -1}, {"top_k": 0}),
    (False, {"min_p": 0.25}, {"min_p": 0.25}),
    (True, {"presence_penalty": 0.5, "frequency_penalty": -1.5}, {"presence_penalty": 0.5, "frequency_penalty": -1.5}),
    (False, {"repetition_penalty": 1.25}, {"repetition_penalty": 1.25}),
    (True, {"logit_bias": {"7": 5.5, "9": -100}}, {"logit_bias": {7: 5.5, 9: -100.0}}),
    (False, {"seed": 2**64 - 1}, {"seed": 2**64 - 1}),
    (False, {"logprobs": 3}, {"top_logprobs": 3}),
    (False, {"logprobs": 0}, {"top_logprobs": 0}),
    (True, {"logprobs": True, "top_logprobs": 4}, {"top_logprobs": 4}),
    (True, {"response_format": {"type": "json_object"}}, {"grammar": {"kind": "json_object", "text": ""}}),
    (True, {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": BOOLEAN,
                                                                       "strict": True}}},
     {"grammar": {"kind": "json_schema", "text": json.dumps(BOOLEAN, separators=(",", ":"))}}),
    (True, {"response_format": {"type": "text"}}, {"grammar": {"kind": "", "text": ""}}),
]


@pytest.mark.parametrize("chat, fields, want", FIELDS)
def test_each_field_reaches_the_generation_params(node, client, chat, fields, want):
    if chat:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=fields)
    else:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body=fields)
    params = last(node)[0].params
    for name, value in want.items():
        got = getattr(params, name)
        if name == "logit_bias":
            got = dict(got)
        elif name == "grammar":
            got = {"kind": got.kind, "text": got.text}
        assert got == (pytest.approx(value) if isinstance(value, float) else value), name


PENALTIES = {
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 0.7},
    "negative frequency": {"frequency_penalty": -0.4},
    "repetition": {"repetition_penalty": 1.8},
    "bias": {"logit_bias": {"5": 2.5, "17": -100}},
    "all": {"presence_penalty": 0.3, "frequency_penalty": 0.4, "repetition_penalty": 1.3, "logit_bias": {"40": 1.5}},
}
NAMES = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}


@pytest.mark.parametrize("case", sorted(PENALTIES))
def test_penalties_and_bias_equal_the_reference_on_the_logits(node, client, chain, case):
    fields = PENALTIES[case]
    prompt = node.tokenizer.encode(PROMPT)
    kw = {NAMES[k]: v for k, v in fields.items() if k in NAMES}
    bias = {int(t): b for t, b in fields.get("logit_bias", {}).items()}
    want, want_logprobs = reference(chain, prompt, 24, bias=bias, **kw)
    plain, _ = reference(chain, prompt, 24)
    assert want != plain  # the field changes the tokens here
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1,
                                  extra_body=fields)
    assert last(node)[0].tokens == want
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want_logprobs, abs=1e-4)


def test_a_large_bias_forces_its_token_and_a_ban_keeps_it_out(node, client, chain):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0.9, seed=4,
                                  logit_bias={"42": 100})  # fmt: skip
    assert r.choices[0].text == CHARS[42] * 6
    greedy, _ = reference(chain, node.tokenizer.encode(PROMPT), 8)
    banned = {str(t): -100 for t in set(greedy)}
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logit_bias=banned)
    assert not set(last(node)[0].tokens) & set(greedy)


def test_chat_logprobs_shape_and_values(node, client, chain):
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=5)  # fmt: skip
    gen = last(node)[0]
    want, want_logprobs = reference(chain, gen.prompt_ids, 8)
    content = r.choices[0].logprobs.content
    assert gen.tokens == want and [c.token for c in content] == [CHARS[t] for t in want]
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c, logprob in zip(content, want_logprobs):
        assert c.logprob == pytest.approx(logprob, abs=1e-4) and c.bytes == list(c.token.encode())
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert c.top_logprobs[0].token == c.token and tops[0] == pytest.approx(c.logprob)  # greedy: the best
        assert all(t.bytes == list(t.token.encode()) for t in c.top_logprobs)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, logprobs=True)
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert r.choices[0].logprobs is None and last(node)[0].params.top_logprobs == 0


def test_completion_logprobs_shape(node, client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=9, logprobs=3)
    lp, gen = r.choices[0].logprobs, last(node)[0]
    assert lp.tokens == [CHARS[t] for t in gen.tokens] and "".join(lp.tokens) == r.choices[0].text
    assert lp.token_logprobs == pytest.approx(gen.logprobs)
    assert lp.text_offset == list(range(len(gen.tokens)))  # one character per token here
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(logprob) and len(top) in (3, 4)  # the best 3, and the sampled one
        best = list(top.values())[:3]
        assert best == sorted(best, reverse=True)
        if len(top) == 4:  # the sampled token was not among the best: it comes last
            assert list(top)[-1] == token and logprob <= best[-1]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=0)
    assert all(len(top) == 1 for top in r.choices[0].logprobs.top_logprobs)


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = {"model": "tiny", "max_tokens": 8, "temperature": 0.8, "seed": 5}
    whole = client.chat.completions.create(messages=USER, logprobs=True, top_logprobs=2, **kw)
    chunks = list(client.chat.completions.create(messages=USER, logprobs=True, top_logprobs=2, stream=True, **kw))
    content = [c for ch in chunks for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [c.model_dump() for c in content] == [c.model_dump() for c in whole.choices[0].logprobs.content]
    whole = client.completions.create(prompt=PROMPT, logprobs=2, **kw).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(prompt=PROMPT, logprobs=2, stream=True, **kw)
             if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    assert [t for p in parts for t in p.top_logprobs] == whole.top_logprobs


def test_logprobs_with_the_async_client(url):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            r = await client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, logprobs=True,
                                                     top_logprobs=20, n=2)  # fmt: skip
            stream = await client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=5,
                                                     stream=True)  # fmt: skip
            return r, [c async for c in stream]

    r, chunks = asyncio.run(main())
    assert [len(c.top_logprobs) for choice in r.choices for c in choice.logprobs.content] == [20] * \
        r.usage.completion_tokens
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(c.choices[0].text for c in chunks if c.choices) and 1 <= len(tokens) <= 4


def test_json_schema_output_parses_and_validates(node, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": BOOLEAN}}
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, temperature=temperature,
                                           seed=3, response_format=fmt)  # fmt: skip
        assert r.choices[0].finish_reason == "stop" and last(node)[0].tokens[-1] == EOS
        jsonschema.validate(json.loads(r.choices[0].message.content), BOOLEAN)
    chunks = client.chat.completions.create(model="tiny", messages=USER, max_tokens=30, temperature=1.0, seed=3,
                                            response_format=fmt, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_json_cut_by_max_tokens_finishes_with_length(node, client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})  # no answer fits 3 tokens
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    assert len(last(node)[0].tokens) == 3


def deep(levels: int) -> dict:
    """An array schema nesting ``levels`` arrays."""
    return {"type": "array"} if levels == 0 else {"type": "array", "items": deep(levels - 1)}


@pytest.mark.parametrize("schema, reason", [
    ({"type": "frob"}, "Invalid type: frob"),
    ({"type": "string", "pattern": "(?<=a)b"}, "regex parse error"),
    ({"$ref": "#/nope"}, "/nope"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    (deep(40), "nests 41 levels; the limit is 32"),
])  # fmt: skip
def test_a_bad_schema_is_a_400_naming_the_reason(node, client, schema, reason):
    sessions = len(node.generations)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})  # fmt: skip
    assert reason in e.value.body["message"] and e.value.body["param"] == "response_format"
    assert e.value.body["code"] == "invalid_grammar" and len(node.generations) == sessions  # nothing was sent


def prefilled(node) -> int:
    return node.downstream.terminal.counts["prefill_positions"]


@pytest.mark.parametrize("stream", [False, True])
def test_n_completions_fork_one_prefill(node, client, stream):
    prompt = node.tokenizer.encode(PROMPT)
    kw = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0.9, "seed": 21}
    alone = [client.completions.create(**{**kw, "seed": 21 + i}).choices[0].text for i in range(3)]
    before = prefilled(node)
    if stream:
        chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw))
        texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
        finals = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        assert sorted(finals) == [0, 1, 2]
        assert chunks[-1].usage.completion_tokens == sum(len(g.tokens) for g in last(node, 3))
    else:
        r = client.completions.create(n=3, **kw)
        texts = [c.text for c in r.choices]
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert r.usage.prompt_tokens == len(prompt)  # the prompt once, every completion's tokens
        assert r.usage.completion_tokens == sum(len(g.tokens) for g in last(node, 3)) > 6
        assert len(r.model_extra["splitglm"]["choices"]) == 3
    assert texts == alone  # choice i is the completion seeded seed + i
    assert [g.forked for g in last(node, 3)] == [False, True, True]
    assert prefilled(node) - before == len(prompt) + 2  # the prompt once, then each fork's last prompt row
    assert node.open_sessions() == 0


def test_n_without_forking_tiers_prefills_each(node, client, monkeypatch):
    monkeypatch.setattr(node.downstream, "forks_sessions", False)
    prompt = node.tokenizer.encode(PROMPT)
    before = prefilled(node)
    r = client.completions.create(model="tiny", prompt=PROMPT, n=2, max_tokens=3, temperature=0.9, seed=21)
    assert [g.forked for g in last(node, 2)] == [False, False] and prefilled(node) - before == 2 * len(prompt)
    assert [c.text for c in r.choices] == [client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, temperature=0.9, seed=21 + i).choices[0].text for i in range(2)]


def test_a_fork_of_a_closed_source_prefills_the_prompt_itself(node):
    """The owner's protocol: a fork copies its source's cache only while the source is open."""
    prompt = node.tokenizer.encode(PROMPT)

    def pair(**params):
        gens = [node.generation(prompt, pb.GenerationParams(max_tokens=4, seed=s, temperature=0.7, **params))
                for s in (1, 2)]  # fmt: skip
        share_prefill(gens)
        return gens

    alone = [e.token for e in node.generation(prompt, pb.GenerationParams(max_tokens=4, seed=2, temperature=0.7))]
    source, fork = pair()
    list(source)  # ran to its end: its session is closed
    assert [e.token for e in fork] == alone and not fork.forked
    source, fork = pair()
    it = iter(source)
    next(it)  # the prompt is in every tier's cache
    assert [e.token for e in fork] == alone and fork.forked
    assert len(list(it)) == 3 and node.open_sessions() == 0


def test_greedy_n_gives_identical_chat_choices(node, client):
    r = client.chat.completions.create(model="tiny", messages=USER, n=4, max_tokens=5, temperature=0,
                                       logprobs=True)  # fmt: skip
    assert len({c.message.content for c in r.choices}) == 1 and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(len(g.tokens) for g in last(node, 4))
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, n=2, max_tokens=5, temperature=0,
                                                 stream=True))  # fmt: skip
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == r.choices[0].message.content


BAD = [  # (chat?, fields, param, words)
    (False, {"top_k": -2}, "top_k", "greater than or equal to -1"),
    (True, {"min_p": 1.5}, "min_p", "less than or equal to 1"),
    (False, {"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    (True, {"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    (False, {"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    (False, {"repetition_penalty": 2.5}, "repetition_penalty", "less than or equal to 2"),
    (False, {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    (True, {"logit_bias": {"5": 101}}, "logit_bias.5", "less than or equal to 100"),
    (False, {"logit_bias": {"96": 1}}, "logit_bias", "outside the vocabulary"),
    (False, {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    (False, {"n": 0}, "n", "greater than or equal to 1"),
    (True, {"n": 17}, "n", "at most 16"),
    (False, {"logprobs": 6}, "logprobs", "less than or equal to 5"),
    (False, {"logprobs": True}, "logprobs", "integer"),
    (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    (True, {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    (True, {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    (True, {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    (True, {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "required"),
    (True, {"response_format": {"type": "json_object", "x": 1}}, "response_format.x", "unrecognized"),
    (False, {"best_of": 2}, "best_of", "not served"),
]  # fmt: skip


@pytest.mark.parametrize("chat, fields, param, words", BAD)
def test_bad_values_get_a_400_naming_the_field(client, chat, fields, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            client.chat.completions.create(model="tiny", messages=USER, max_tokens=2, extra_body=fields)
        else:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body=fields)
    assert e.value.body["param"] == param and words in e.value.message, e.value.body


@pytest.fixture(scope="module")
def edge(exact_plan, cloud):  # noqa: F811 -- test_router's fixtures: a real cloud process on the exact plan
    node = start_edge(exact_plan, cloud, model_name="tiny")
    node.tokenizer = char_tokenizer()  # the tiny plan has none; ids 0..95 match the tiny vocabulary
    try:
        yield openai.OpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0, timeout=60), node
    finally:
        node.close()


@pytest.mark.parametrize("speculate", [False, True])
def test_a_real_edge_and_cloud_sample_and_report_as_the_reference(edge, tiny_glm, speculate):
    """Through the router, the cloud's gRPC stream and (speculating) the fast tail's drafts: greedy tokens
    and log-probs under penalties and bias equal the reference within 1e-4 (fp32 frames); n choices too."""
    client, node = edge
    chain = Chain(split_segments(tiny_glm, 2, 4))
    fields = {"presence_penalty": 0.6, "frequency_penalty": 0.3, "logit_bias": {"40": 1.5}, "speculate": speculate}
    prompt = char_tokenizer().encode(PROMPT)
    want, want_logprobs = reference(chain, prompt, 16, presence=0.6, frequency=0.3, bias={40: 1.5})
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=2, n=2,
                                  extra_body=fields)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 2 * len(want)
    for choice in r.choices:  # greedy: both the reference
        assert choice.logprobs.tokens == [CHARS[t] for t in want]
        assert choice.logprobs.token_logprobs == pytest.approx(want_logprobs, abs=1e-4)
        assert all(len(top) in (2, 3) for top in choice.logprobs.top_logprobs)
    kw = {"model": "tiny", "messages": USER, "max_tokens": 8, "temperature": 0.8, "seed": 5, "logprobs": True,
          "top_logprobs": 3, "extra_body": {"speculate": speculate}}  # fmt: skip
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    content = [c for ch in chunks for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [c.token for c in content] == [c.token for c in whole.choices[0].logprobs.content]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [
        pytest.approx([t.logprob for t in c.top_logprobs], abs=1e-5) for c in whole.choices[0].logprobs.content]
