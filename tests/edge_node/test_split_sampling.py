"""The whole sampling state across the split: penalties, logit bias, top-k / min-p, log-probs and a grammar.

Real processes: ``python -m cloud_service`` replicas and an in-process EdgeNode, driven like the edge's HTTP
sessions (``runtime.owner.Generation``). The tiny random GLM gets a byte-level tokenizer of its 96 ids (one
character each; "\\n" = id 0 is its end of text), which the plan ships to every tier that samples, so the
cloud, the fast tail and the edge's drafter all compile the same JSON schema. Lossless fp32 frames, so:

- speculation on and off give the same tokens (the drafts are sampled with the session's whole state);
- a session that moves to another cloud replica, then to the fast tail, keeps its penalties and its
  grammar state (the replay carries the tokens generated so far): the undisturbed run's tokens;
- a replay of a session from its history at a new edge (a device whose edge went) continues it exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import jsonschema
import pytest

from edge_node.fast_tail import FastTail
from partitioner.plan.export import cached_plan, fixed_plan
from protos import splitglm_pb2 as pb
from runtime.grammar import Grammars, tier_grammars
from runtime.history import remaining_params
from runtime.local import Chain
from runtime.owner import Generation, StepFailed
from runtime.sampling import SamplingParams
from tests.edge_node.test_cloud_client import Letters, start_cloud
from tests.edge_node.test_replicas import kill_holder, sample
from tests.edge_node.test_speculative import start_edge

CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # the 96 ids: "\n", then printable ASCII
EOS = 0
PROMPT = [3, 17, 5, 9, 11, 40, 2]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"enum": ["ada", "bo"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "yz"]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "tags"],
    "additionalProperties": False,
}
GRAMMAR = {"grammar": pb.Grammar(kind="json_schema", text=json.dumps(SCHEMA)), "stop_token_ids": [EOS]}
PENALTIES = {"presence_penalty": 0.6, "frequency_penalty": 0.4, "repetition_penalty": 1.3}
SAMPLED = {"temperature": 0.9, "seed": 7}
TOKENS = 80  # more than any answer of SCHEMA takes


def byte_level_tokenizer():
    """One token per character of CHARS, as a byte-level BPE (what llguidance reads), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from splitglm.fuzz.stack import CHAT_TEMPLATE

    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    rest = [b for b in range(256) if b not in kept]  # GPT-2's byte-level alphabet: these stand as chr(256 + n)
    stand_in = {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(rest)}}
    tok = Tokenizer(models.BPE(vocab={stand_in[ord(c)]: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def model(tiny_glm, tmp_path_factory) -> str:
    """The tiny glm with the byte-level tokenizer and "\\n" as its end of text."""
    folder = tmp_path_factory.mktemp("grammar-model") / "model"
    shutil.copytree(tiny_glm, folder)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**config, "eos_token_id": EOS}))
    byte_level_tokenizer().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def plans(model, tmp_path_factory) -> dict[str, str]:
    """Splits 2, 4, fp32 frames; "int8": the default fast tail (drafts mostly right), "exact": a copy of the
    cloud tier (its drafts and fast-path tokens are the cloud's)."""
    root = tmp_path_factory.mktemp("grammar-plans")
    return {name: str(cached_plan(model, fixed_plan((2, 4), ("fp32", "fp32"), fast_tail=tail), root))
            for name, tail in (("int8", None), ("exact", "none"))}


@pytest.fixture(scope="module")
def cloud(plans):
    proc, address = start_cloud(plans["int8"])
    yield address
    assert proc.stop() == 0, proc.output


class Recorder:
    """A Downstream that keeps every StepResult of the tail it wraps."""

    def __init__(self, tail):
        self.tail, self.results = tail, []

    def step(self, frame: pb.Frame) -> pb.StepResult:
        result = self.tail.step(frame)
        self.results.append(result)
        return result

    def close(self, frame: pb.Frame) -> None:
        self.tail.close(frame)


def run(node, speculate: int, prompt=PROMPT, on_token=None, params: pb.GenerationParams | None = None,
        **fields) -> tuple[Generation, Recorder]:
    """One session the edge owns; ``on_token(index)`` after each emitted token."""
    params = params or pb.GenerationParams(**{"max_tokens": TOKENS, **fields})
    params.speculate = speculate
    tail = Recorder(node.tail("http"))
    gen = Generation(node.owner, tail, list(prompt), params, node.codec, Letters())
    for i, _ in enumerate(gen):
        if on_token is not None:
            on_token(i)
    return gen, tail


def answer(gen: Generation) -> dict:
    """The generation's text as JSON, checked against SCHEMA; it must have ended with the end of text."""
    assert gen.finish_reason == "stop" and gen.tokens[-1] == EOS
    value = json.loads("".join(CHARS[t] for t in gen.tokens[:-1]))
    jsonschema.validate(value, SCHEMA)
    return value


def check_top_logprobs(results: list[pb.StepResult], k: int) -> int:
    """Every answered token has k alternatives, most likely first, its own logprob where it is among them."""
    checked = 0
    for result in results:
        assert len(result.top_logprobs) == len(result.tokens)
        for token, logprob, top in zip(result.tokens, result.logprobs, result.top_logprobs):
            assert len(top.tokens) == len(top.logprobs) == k
            assert list(top.logprobs) == sorted(top.logprobs, reverse=True)
            if token in top.tokens:
                assert top.logprobs[list(top.tokens).index(token)] == pytest.approx(logprob, abs=1e-5)
                checked += 1
    return checked


# ---- speculation ----------------------------------------------------------------------------------------------


CASES = {
    "greedy+grammar": GRAMMAR,
    "sampled+penalties+bias+top_k": {**SAMPLED, "presence_penalty": 0.8, "frequency_penalty": 0.5, "top_k": 12,
                                     "logit_bias": {5: 3.0, 9: -100.0}},
    "sampled+grammar+penalties+min_p+top_logprobs": {**SAMPLED, **GRAMMAR, **PENALTIES, "min_p": 0.02,
                                                     "top_logprobs": 5},
}


@pytest.mark.parametrize("case", list(CASES))
def test_speculation_gives_the_plain_tokens_under_every_sampling_field(plans, cloud, case):
    node = start_edge(plans["int8"], cloud, draft_tokens=4)
    fields = CASES[case]
    try:
        (plain, plain_steps), (spec, spec_steps) = (run(node, s, **fields) for s in (pb.SPECULATE_OFF,
                                                                                       pb.SPECULATE_ON))
        assert spec.tokens == plain.tokens
        assert spec.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
        s = spec.speculative
        assert s["round_trips"] > 0 and s["drafted"] > 0
        if "grammar" in fields:
            answer(spec)
            # drafted under the grammar, drafts are mostly right (drafted without it, nearly none would be)
            assert s["accepted"] >= 0.5 * s["drafted"], s
        else:
            assert len(spec.tokens) == TOKENS
            assert 9 not in spec.tokens  # a bias of -100 forbids it
            unprocessed, _ = run(node, pb.SPECULATE_OFF, **SAMPLED)
            assert unprocessed.tokens != spec.tokens  # the fields took effect
        if fields.get("top_logprobs"):
            check_top_logprobs(spec_steps.results, 5)
            spec_top = [list(t.logprobs) for r in spec_steps.results for t in r.top_logprobs]
            plain_top = [list(t.logprobs) for r in plain_steps.results for t in r.top_logprobs]
            assert len(spec_top) == len(spec.tokens)
            assert [v for row in spec_top for v in row] == pytest.approx([v for row in plain_top for v in row],
                                                                         abs=1e-4)
    finally:
        node.close()


def test_greedy_top_logprobs_rank_the_chosen_token_first(plans, cloud):
    node = start_edge(plans["int8"], cloud, draft_tokens=3)
    try:
        gen, steps = run(node, pb.SPECULATE_ON, max_tokens=20, top_logprobs=3)
        assert check_top_logprobs(steps.results, 3) == len(gen.tokens) == 20
        assert all(t.tokens[0] == token for r in steps.results for token, t in zip(r.tokens, r.top_logprobs))
    finally:
        node.close()


def test_a_grammar_that_cannot_be_used_is_refused_and_the_edge_goes_on(plans, cloud):
    node = start_edge(plans["int8"], cloud, draft_tokens=2)
    bad = pb.Grammar(kind="json_schema", text="{not json")
    try:
        for speculate in (pb.SPECULATE_ON, pb.SPECULATE_OFF):  # refused by the drafter, then by the cloud
            with pytest.raises(StepFailed, match="not valid JSON") as refused:
                run(node, speculate, max_tokens=8, grammar=bad)
            assert refused.value.status == 3  # INVALID_ARGUMENT: no other tail is tried
        answer(run(node, pb.SPECULATE_ON, **GRAMMAR)[0])
    finally:
        node.close()


# ---- moves and replays ------------------------------------------------------------------------------------------


def test_moves_to_another_replica_and_to_the_fast_tail_keep_the_state(model, plans):
    """Sampled, under the grammar and every penalty, speculating: the local chain's tokens undisturbed, with exact
    drafts every one accepted; then the cloud replica holding the session is killed (another one replays it),
    and that one too (the fast tail replays it): the same tokens."""
    fields = {**SAMPLED, **GRAMMAR, **PENALTIES, "top_k": 30, "top_logprobs": 2}
    chain = Chain.from_checkpoint(model, 2, 4)
    sampling = SamplingParams(temperature=0.9, seed=7, top_k=30, presence_penalty=0.6, frequency_penalty=0.4,
                              repetition_penalty=1.3)
    reference = [t for t, _ in chain.generate(PROMPT, TOKENS, sampling, (EOS,), GRAMMAR["grammar"])]
    procs = [start_cloud(plans["exact"]) for _ in range(2)]
    node = start_edge(plans["exact"], ",".join(a for _, a in procs), draft_tokens=3, step_timeout_s=20)
    try:
        undisturbed, _ = run(node, pb.SPECULATE_ON, **fields)
        assert undisturbed.tokens == reference
        answer(undisturbed)
        s = undisturbed.speculative
        assert s["drafted"] > 0 and s["accepted"] == s["drafted"]  # the drafter's state is the cloud's

        tail = {}
        node_tail = node.tail

        def keep(kind):
            tail["routed"] = node_tail(kind)
            return tail["routed"]

        node.tail = keep
        killed = []

        def kill(i: int) -> None:
            if not killed and i >= 4:
                killed.append(kill_holder(node, procs, tail["routed"]))
            elif len(killed) == 1 and i >= 12:
                for proc, address in procs:
                    if address not in killed:
                        os.kill(proc.popen.pid, signal.SIGKILL)
                        proc.popen.wait(10)
                        killed.append(address)

        moved, steps = run(node, pb.SPECULATE_ON, on_token=kill, **fields)
        assert len(killed) == 2
        assert sample(node, "splitglm_edge_cloud_failovers_total", {"outcome": "moved"}) == 1
        assert moved.degraded and moved.switches[0]["reason"].startswith("cloud_error:")
        assert pb.ACCURATE in moved.paths and moved.paths[-1] == pb.FAST
        assert moved.tokens == reference  # the penalties' counts and the grammar's state went along
        check_top_logprobs(steps.results, 2)
    finally:
        node.close()
        for proc, _ in procs:
            proc.stop()


@pytest.mark.parametrize("speculate", [pb.SPECULATE_OFF, pb.SPECULATE_ON])
def test_a_replayed_session_continues_exactly(plans, cloud, speculate):
    """What a new edge gets when a device replays its session (``device_agent.replay``): the rows of the
    prompt and of the tokens so far, and params with ``remaining_params``. Here the owner runs those tokens
    as the prompt (the same rows); the continuation is the undisturbed run's rest."""
    node = start_edge(plans["int8"], cloud, draft_tokens=3)
    params = pb.GenerationParams(max_tokens=TOKENS, **SAMPLED, **GRAMMAR, **PENALTIES)
    try:
        whole, _ = run(node, speculate, params=params)
        answer(whole)
        for k in (1, len(whole.tokens) // 2):
            replayed, _ = run(node, speculate, prompt=PROMPT + whole.tokens[:k],
                              params=remaining_params(params, whole.tokens[:k]))
            assert whole.tokens[:k] + replayed.tokens == whole.tokens
    finally:
        node.close()


# ---- where each tier's vocabulary comes from ---------------------------------------------------------------------


def test_every_tier_that_samples_gets_the_vocabulary(plans, tmp_path):
    from runtime.artifacts import MANIFEST

    for tier in ("cloud", "fast_tail", "edge"):
        assert os.path.isfile(os.path.join(plans["int8"], tier, "tokenizer.json"))
    assert not os.path.isfile(os.path.join(plans["int8"], "cloud", "chat_template.jinja"))  # the vocabulary only
    assert isinstance(FastTail.load(plans["int8"]).grammars, Grammars)

    old = tmp_path / "old-plan"  # a plan exported before the sampling tiers got the vocabulary
    shutil.copytree(plans["int8"], old)
    for tier in ("cloud", "fast_tail"):
        (old / tier / "tokenizer.json").unlink()
        manifest = json.loads((old / tier / MANIFEST).read_text())
        del manifest["files"]["tokenizer.json"]
        (old / tier / MANIFEST).write_text(json.dumps(manifest))
    assert tier_grammars([old / "cloud"], 96) is None  # the cloud then refuses grammars
    assert isinstance(FastTail.load(old).grammars, Grammars)  # the fast tail takes the edge's tokenizer
