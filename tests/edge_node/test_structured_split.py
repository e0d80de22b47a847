"""Structured output across the real split: fifty JSON schemas (``tests.schemas50``) through an edge and a cloud.

The demo model's plan with lossless fp32 frames: an in-process ``EdgeNode`` (the owner of HTTP sessions, with
the plan's int8 fast tail drafting) in front of a real ``python -m cloud_service`` over gRPC. Each schema
travels as ``GenerationParams.grammar`` (json_schema); the cloud compiles it against the vocabulary the plan
ships and masks every token it samples, the fast tail masks every draft. For each schema, greedy and sampled
(seeded), with speculation off and on:

- an answer that ended with the stop token parses as JSON and validates against its schema (``jsonschema``);
- an answer cut by ``max_tokens`` (finish "length": possible where a string or a number's digits are
  unbounded) is counted apart, never as valid;
- speculation on and off give identical tokens.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from partitioner.plan.demo import demo_plan
from protos import splitglm_pb2 as pb
from runtime.owner import StepFailed
from tests.edge_node.test_speculative import edge_and_cloud
from tests.schemas50 import UNBOUNDED, schemas

MAX_TOKENS = 64
CONCURRENT = 32  # generations at once (the cloud's max_batch: its steps batch them all)
PROMPT = "Reply with a short JSON value."  # short: a prefill costs as much as a few tokens (the grammar does the rest)
MODES = {"greedy": {}, "sampled": {"temperature": 0.8, "top_p": 0.95}}  # sampled: seeded 23 + the schema's index


def test_the_fifty_schemas_are_valid_varied_and_compile(demo_checkpoint):
    from runtime.grammar import Grammars, Vocabulary

    pairs = schemas()
    assert len(pairs) == 50 and len({name for name, _ in pairs}) == 50 and UNBOUNDED <= {n for n, _ in pairs}
    text = json.dumps([s for _, s in pairs])
    for feature in ('"minItems"', '"maxItems"', '"enum"', '"minimum"', '"maximum"', '"boolean"', '"maxLength"',
                    '"pattern"', '"anyOf"', '"$ref"', '"number"', '"integer"', '"required": []'):
        assert feature in text, feature
    grammars = Grammars(Vocabulary.load(demo_checkpoint, 49152))
    for _, schema in pairs:
        jsonschema.Draft202012Validator.check_schema(schema)
        grammars.matcher("json_schema", json.dumps(schema)).mask()
    assert grammars.compiled == 50


@pytest.fixture(scope="module")
def edge(demo_checkpoint):
    """An edge (drafting 4 tokens a round when asked to speculate) in front of a real cloud process."""
    plan = str(demo_plan(demo_checkpoint, codecs=("fp32", "fp32")))
    with edge_and_cloud(plan, draft_tokens=4, step_timeout_s=60) as node:
        yield node


def generate(node, schema: dict, speculate: int, **sampling):
    """One edge-owned generation under ``schema`` (as the HTTP API runs it)."""
    prompt = node.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False)
    params = pb.GenerationParams(
        max_tokens=MAX_TOKENS, speculate=speculate, stop_token_ids=list(node.spec.eos_token_ids),
        grammar=pb.Grammar(kind="json_schema", text=json.dumps(schema)), **sampling)  # fmt: skip
    gen = node.generation(list(prompt), params)
    list(gen)
    return gen


def outcome(gen, schema: dict, eos: set[int]) -> str:
    """'valid', 'length' (cut by max_tokens: counted apart) or why the answer is wrong."""
    if gen.finish_reason == "length":
        return "length" if len(gen.tokens) == MAX_TOKENS else f"length after {len(gen.tokens)} tokens"
    if gen.finish_reason != "stop" or gen.tokens[-1] not in eos or eos & set(gen.tokens[:-1]):
        return f"finish {gen.finish_reason!r} with tokens {gen.tokens}"
    try:
        jsonschema.validate(json.loads(gen.text), schema)
    except (ValueError, jsonschema.ValidationError) as e:
        return f"invalid: {gen.text!r}: {str(e).splitlines()[0]}"
    return "valid"


@pytest.fixture(scope="module")
def answers(edge) -> dict[str, tuple[list, float]]:
    """{mode: ([(plain, speculative) per schema], seconds)}: the 200 generations of both modes at once, so the
    cloud batches CONCURRENT sessions' steps (each generation's tokens depend on its seed alone)."""
    jobs = [(mode, i, schema, speculate) for mode in MODES for i, (_, schema) in enumerate(schemas())
            for speculate in (pb.SPECULATE_OFF, pb.SPECULATE_ON)]

    def run(job):
        mode, i, schema, speculate = job
        return generate(edge, schema, speculate, **({**MODES[mode], "seed": 23 + i} if MODES[mode] else {}))

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        gens = iter(list(pool.map(run, jobs)))
    seconds = time.perf_counter() - started
    return {mode: ([(next(gens), next(gens)) for _ in range(50)], seconds) for mode in MODES}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_every_answer_validates_and_speculation_changes_no_token(edge, answers, mode, record_property):
    eos = set(edge.spec.eos_token_ids)
    counts = {"valid": 0, "length": 0}
    wrong, differ, lengths, round_trips = [], [], [], 0
    pairs, seconds = answers[mode]
    for (name, schema), (plain, spec) in zip(schemas(), pairs):
        round_trips += spec.speculative["round_trips"]
        assert set(plain.paths) == {pb.ACCURATE} and set(spec.paths) == {pb.ACCURATE}, name  # no fallback
        if spec.tokens != plain.tokens or spec.finish_reason != plain.finish_reason:
            differ.append(f"{name}: plain {plain.tokens} / speculative {spec.tokens}")
        elif spec.logprobs != pytest.approx(plain.logprobs, abs=1e-4):
            differ.append(f"{name}: log-probs differ")
        result = outcome(plain, schema, eos)
        if result in counts:
            counts[result] += 1
            lengths += [name] if result == "length" else []
        else:
            wrong.append(f"{name}: {result}")
    record_property("outcomes", {**counts, "length_schemas": lengths, "seconds_both_modes": round(seconds, 1)})
    valid, cut = counts["valid"], counts["length"]
    print(f"{mode}: {valid} valid, {cut} cut by max_tokens {lengths}, both modes {seconds:.0f} s")
    assert not wrong, "\n".join(wrong)
    assert not differ, "\n".join(differ)
    assert counts["valid"] + counts["length"] == 50
    assert counts["valid"] >= 40  # the cut ones are the exception (unbounded strings and digits)
    assert round_trips > 0  # the speculative runs did verify drafts


@pytest.mark.slow
def test_a_schema_the_library_cannot_take_fails_the_generation_with_the_reason(edge):
    with pytest.raises(StepFailed, match="INVALID_ARGUMENT: .*no-such-type") as refused:
        generate(edge, {"type": "no-such-type"}, pb.SPECULATE_OFF)
    assert refused.value.status == 3  # INVALID_ARGUMENT
