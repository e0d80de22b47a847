"""Constrained decoding (``runtime.grammar``) with the demo model's real vocabulary (49152 ids).

The limits refuse a grammar with a reason, the cache compiles a grammar once, a speculative round's masks
(``masks(drafts)``) equal consuming the drafts one at a time and leave the state where it was, forks are
independent, and ``TokenState`` carries the grammar through drafts, commits, forks and replays.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch

from protos import splitglm_pb2 as pb
from runtime.generation import TokenState
from runtime.grammar import GrammarError, GrammarLimits, Grammars, Vocabulary
from runtime.sampling import SamplingParams, sample_processed
from runtime.sampling import allowed as unpack
from runtime.terminal import StepError, token_state

EOS = 2
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
ANSWER = '{"name": "Ann", "age": 30}'


@pytest.fixture(scope="module")
def vocab(demo_checkpoint) -> Vocabulary:
    return Vocabulary.load(demo_checkpoint, 49152)


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    from runtime.checkpoint import load_tokenizer

    return load_tokenizer(demo_checkpoint)


@pytest.fixture(scope="module")
def answer_ids(tokenizer) -> list[int]:
    return tokenizer.encode(ANSWER, add_special_tokens=False)


def allowed(mask: torch.Tensor) -> set[int]:
    """The ids a (words,) bitmask allows."""
    return set(torch.nonzero(unpack(mask[None], 49152)[0]).flatten().tolist())


def person(grammars: Grammars):
    return grammars.matcher("json_schema", json.dumps(PERSON))


def stepwise_masks(grammars: Grammars, ids: list[int]) -> list[torch.Tensor]:
    """The mask before each of ``ids`` and after the last, consuming them one at a time."""
    m, out = person(grammars), []
    for t in ids:
        out.append(m.mask())
        m.consume([t])
    return out + [m.mask()]


# ---- limits and the cache ------------------------------------------------------------------------------------


DEEP = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "array"}}}}}


@pytest.mark.parametrize(("limits", "kind", "text", "reason"), [
    (GrammarLimits(max_bytes=64), "json_schema", json.dumps(PERSON), "bytes; the limit is 64"),
    (GrammarLimits(max_depth=4), "json_schema", json.dumps(DEEP), "nests 5 levels; the limit is 4"),
    (GrammarLimits(), "json_schema", '{"type": "object",', "not valid JSON"),
    (GrammarLimits(), "json_schema", "[1, 2]", "a JSON schema is an object"),
    (GrammarLimits(), "json_schema", '{"type": "no-such-type"}', "cannot be used"),
    (GrammarLimits(), "yaml", "a: 1", "not one of json_object, json_schema, lark, regex"),
    (GrammarLimits(max_compile_ms=0.0), "json_schema", json.dumps(PERSON), "ms to compile; the limit is 0 ms"),
])  # fmt: skip
def test_a_refused_grammar_names_the_reason(vocab, limits, kind, text, reason):
    grammars = Grammars(vocab, limits)
    with pytest.raises(GrammarError, match=reason):
        grammars.matcher(kind, text)
    with pytest.raises(GrammarError):  # refused again: nothing of it was cached
        grammars.matcher(kind, text)


def test_the_second_compile_is_a_cache_hit_and_a_fresh_matcher(vocab, answer_ids):
    grammars = Grammars(vocab)
    first = person(grammars)
    initial = first.mask()
    first.consume(answer_ids[:5])
    assert grammars.compiled == 1
    second = person(grammars)
    assert grammars.compiled == 1  # from the cache ...
    assert torch.equal(second.mask(), initial)  # ... in the grammar's initial state, not the first one's
    grammars.matcher("json_object", "")
    assert grammars.compiled == 2
    small = Grammars(vocab, GrammarLimits(cache=1))
    for text in ('"a"', '"b"', '"a"'):  # a cache of one: the third compiles again
        small.matcher("regex", text)
    assert small.compiled == 3


def test_a_tier_without_a_tokenizer_cannot_load_a_vocabulary(tmp_path, demo_checkpoint):
    with pytest.raises(GrammarError, match="tokenizer.json"):
        Vocabulary.load(tmp_path, 49152)
    assert Vocabulary.load(demo_checkpoint, 49152) is Vocabulary.load(demo_checkpoint, 49152)  # built once


def test_a_byte_level_vocabulary_saved_with_a_sequence_decoder_reads_the_same_bytes(demo_checkpoint, answer_ids):
    """transformers 5.17 saves the demo GGUF's tokenizer with a Sequence decoder (ByteFallback, Fuse, Replace,
    ByteLevel); llguidance must still read ``Ġ`` as a space, or no mask allows one (seen on the GPU host)."""
    spec = json.loads((Path(demo_checkpoint) / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"},
                                                     "content": " "}, spec["decoder"]]}
    seq = Vocabulary(json.dumps(spec), 49152, [EOS])
    plain = Vocabulary.load(demo_checkpoint, 49152)
    assert seq.tokenizer.decode_bytes(answer_ids) == plain.tokenizer.decode_bytes(answer_ids) == ANSWER.encode()
    m = person(Grammars(seq))
    for t in answer_ids:  # ' "Ann"' and ' 30' start with a space
        assert t in allowed(m.mask())
        m.consume([t])


# ---- the matcher ------------------------------------------------------------------------------------------------


def test_a_schema_allows_the_answer_and_then_only_the_stop_token(vocab, answer_ids):
    m = person(Grammars(vocab))
    for t in answer_ids:
        assert t in allowed(m.mask())
        m.consume([t])
    assert allowed(m.mask()) == {EOS} and m.accepting()
    bad = person(Grammars(vocab))
    bad.consume(answer_ids[:1])
    with pytest.raises(GrammarError, match="not allowed"):
        bad.consume([answer_ids[0]])  # '{"' twice


@pytest.mark.parametrize("at", [0, 3, 6, 9])
def test_masks_of_drafts_equal_consuming_them_one_at_a_time(vocab, answer_ids, at):
    grammars = Grammars(vocab)
    want = stepwise_masks(grammars, answer_ids)
    m = person(grammars)
    m.consume(answer_ids[:at])
    drafts = answer_ids[at : at + 4]
    got = m.masks(drafts)
    assert len(got) == len(drafts) + 1
    for j, mask in enumerate(got):
        assert torch.equal(mask, want[at + j]), f"mask after {j} drafts from {at}"
    # the drafts were rolled back: the state is the committed one, and it goes on as a fresh one does
    assert torch.equal(m.mask(), want[at])
    for j, t in enumerate(answer_ids[at:]):
        assert torch.equal(m.mask(), want[at + j])
        m.consume([t])
    assert allowed(m.mask()) == {EOS}


def test_after_a_refused_draft_the_masks_repeat_and_nothing_moves(vocab, answer_ids):
    grammars = Grammars(vocab)
    want = stepwise_masks(grammars, answer_ids)
    m = person(grammars)
    m.consume(answer_ids[:3])
    refused = min(set(range(49152)) - allowed(want[4]))  # a token the grammar refuses inside the name
    got = m.masks([answer_ids[3], refused, answer_ids[4]])
    assert torch.equal(got[0], want[3]) and torch.equal(got[1], want[4])
    assert torch.equal(got[2], want[4]) and torch.equal(got[3], want[4])  # the last good mask, repeated
    assert torch.equal(m.mask(), want[3])


def test_a_fork_is_independent(vocab, answer_ids, tokenizer):
    grammars = Grammars(vocab)
    want = stepwise_masks(grammars, answer_ids)
    m = person(grammars)
    m.consume(answer_ids[:4])  # {"name": "
    fork = m.fork()
    fork.consume(answer_ids[4:])
    assert allowed(fork.mask()) == {EOS}
    assert torch.equal(m.mask(), want[4])  # the original did not move
    other = tokenizer.encode('Bob", "age": 7}', add_special_tokens=False)
    m.consume(other)
    assert allowed(m.mask()) == {EOS} and allowed(fork.mask()) == {EOS}
    assert torch.equal(person(grammars).mask(), want[0])


# ---- TokenState and replays -------------------------------------------------------------------------------------


def test_token_state_masks_drafts_commits_and_forks(vocab, answer_ids):
    grammars = Grammars(vocab)
    want = stepwise_masks(grammars, answer_ids)
    state = TokenState(SamplingParams(temperature=0.8, seed=1), person(grammars), generated=answer_ids[:2])
    rows = state.rows(40, drafts=answer_ids[2:5])
    assert [torch.equal(r.mask(), want[2 + j]) for j, r in enumerate(rows)] == [True] * 4  # (lazy masks)
    fork = state.fork()
    fork.commit(answer_ids[2:6])
    assert torch.equal(state.rows(40)[0].mask(), want[2])  # the fork's commits stay in the fork
    state.commit(answer_ids[2:4])
    assert torch.equal(state.rows(42)[0].mask(), want[4]) and torch.equal(fork.rows(44)[0].mask(), want[6])
    assert not state.plain and TokenState(SamplingParams()).plain


def test_a_replay_restores_the_grammar_state_from_the_generated_tokens(vocab, answer_ids):
    grammars = Grammars(vocab)
    want = stepwise_masks(grammars, answer_ids)
    grammar = pb.Grammar(kind="json_schema", text=json.dumps(PERSON))
    replayed = token_state(pb.GenerationParams(max_tokens=8, grammar=grammar, generated_tokens=answer_ids[:7]),
                           grammars)
    assert torch.equal(replayed.rows(50)[0].mask(), want[7]) and replayed.tokens == answer_ids[:7]
    with pytest.raises(StepError, match="do not follow the grammar") as refused:
        token_state(pb.GenerationParams(max_tokens=8, grammar=grammar, generated_tokens=answer_ids[1:3]), grammars)
    assert refused.value.status == "INVALID_ARGUMENT"
    with pytest.raises(StepError, match="nests") as deep:
        token_state(pb.GenerationParams(max_tokens=8, grammar=pb.Grammar(kind="json_schema", text=json.dumps(DEEP))),
                    Grammars(vocab, GrammarLimits(max_depth=2)))
    assert deep.value.status == "INVALID_ARGUMENT"


@pytest.mark.parametrize("seed", range(3))
def test_sampling_under_the_mask_from_random_logits_gives_valid_json(vocab, tokenizer, seed):
    """No model: random logits, the grammar's mask and the sampler alone produce an answer that validates."""
    grammars = Grammars(vocab)
    state = TokenState(SamplingParams(temperature=1.0, seed=seed, frequency_penalty=0.5), person(grammars))
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for position in range(100):
        logits = torch.randn(1, 49152, generator=generator) * rng.uniform(1, 4)
        token = int(sample_processed(logits, state.rows(position)).tokens[0])
        if token == EOS:
            break
        state.commit([token])
    assert token == EOS
    jsonschema.validate(json.loads(tokenizer.decode(state.tokens)), PERSON)


def test_annotations_are_left_at_the_edge_and_property_names_kept():
    from runtime.grammar import without_annotations

    schema = {"title": "T", "description": "prompt words", "type": "object", "$comment": "c",
              "properties": {"description": {"type": "string", "description": "more prompt words", "maxLength": 5},
                             "n": {"type": "integer", "examples": [1], "enum": [{"description": "a value"}, 2]}},
              "required": ["description"], "$defs": {"title": {"title": "x", "type": "boolean"}}}
    assert without_annotations(schema) == {
        "type": "object", "properties": {"description": {"type": "string", "maxLength": 5},
                                         "n": {"type": "integer", "enum": [{"description": "a value"}, 2]}},
        "required": ["description"], "$defs": {"title": {"type": "boolean"}}}
    assert "prompt words" not in json.dumps(without_annotations(schema))


def test_masks_computed_together_equal_each_computed_alone(vocab, answer_ids):
    """``masks_together`` (llguidance's threads) and ``resolve_masks`` over sessions' lazy masks give each
    matcher's own ``mask()``; a session with drafts still gets its masks after each draft."""
    from runtime.generation import TokenState
    from runtime.grammar import masks_together
    from runtime.sampling import SamplingParams, resolve_masks

    grammars = Grammars(vocab)
    matchers = []
    for at in (0, 2, 5, 5, 9):
        m = person(grammars)
        m.consume(answer_ids[:at])
        matchers.append(m)
    want = [m.mask() for m in matchers]
    got = masks_together(matchers)
    assert len({tuple(w.tolist()) for w in want}) > 2  # the states differ
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    states = [TokenState(SamplingParams(), m.fork()) for m in matchers]
    rows = [r for s in states[:-1] for r in s.rows(10)] + list(states[-1].rows(10, answer_ids[9:11]))
    masks = resolve_masks(rows)
    assert all(torch.equal(g, w) for g, w in zip(masks[:4], want[:4], strict=True))
    assert [tuple(m.tolist()) for m in masks[4:]] == [tuple(m.tolist()) for m in matchers[4].masks(answer_ids[9:11])]


def test_the_mask_computed_after_a_commit_is_the_one_the_next_rows_carry(vocab, answer_ids):
    """With the background computation after each commit (the default) a state gives, step by step, with
    drafts and forks, the masks of one that computes them only when asked; the step's rows carry the mask
    already computed (no matcher work left for the step)."""
    grammars = Grammars(vocab)
    want = stepwise_masks(grammars, answer_ids)
    eager = TokenState(SamplingParams(), person(grammars), prefetch=False)
    ahead = TokenState(SamplingParams(), person(grammars))
    for at, t in enumerate(answer_ids[:8]):
        for state in (eager, ahead):
            (row,) = state.rows(at)
            assert torch.equal(row.mask(), want[at])
            state.commit([t])
        assert ahead.rows(at + 1)[0].mask.group.masks is not None  # computed before the step asked
        drafts = answer_ids[at + 1 : at + 3]
        got = [r.mask() for r in ahead.fork().rows(at + 1, drafts)]
        assert all(torch.equal(g, w) for g, w in zip(got, want[at + 1 : at + 4], strict=True))
    assert eager.tokens == ahead.tokens
