"""The CUDA engine against the PyTorch segment, and its CUDA graphs against its own eager passes.

On a GPU everything runs natively (bf16 and fp32, graphs). Without one, the fp32 tests run the very same
engine code eagerly on CPU tensors under Triton's interpreter (slow, so on the tiny model only), and the
tests that need a GPU (graphs, bf16, bit-identity) skip.
"""

from __future__ import annotations

import pytest
import torch

from runtime.kv_pool import PoolExhausted
from runtime.sampling import SamplingParams
from runtime.segment import Sampled, Segment, SegmentInput
from tests.runtime.driving import drive

ON_CUDA = torch.cuda.is_available()
ops = pytest.importorskip("runtime.triton_ops")
if not ops.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)
if not ON_CUDA and type(ops._rms_norm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET was set (see tests/conftest.py)", allow_module_level=True)

from runtime.cuda import CudaEngine  # noqa: E402

DEVICE = "cuda" if ON_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU (run through the device tool)")


def engine_of(segment: Segment, dtype=torch.float32, graphs=False, **kw) -> CudaEngine:
    return CudaEngine(segment, dtype=dtype, device=DEVICE, graphs=graphs and ON_CUDA, pool_tokens=4096,
                      max_positions=1024, prefill_chunk=kw.pop("prefill_chunk", 16), **kw)


def cloud_segment(path) -> Segment:
    from runtime.checkpoint import load_spec

    return Segment.from_checkpoint(path, 2, load_spec(path).num_layers, head=True)


def greedy(run, session: str, prompt: torch.Tensor, steps: int, width: int, seed: int = 0) -> list[int]:
    """Drive a head segment: prompt rows, then `steps` decode steps fed by rows derived from each token."""
    table = torch.randn(1000, width, generator=torch.Generator().manual_seed(seed))  # token -> next input row
    out = run([SegmentInput(session, 0, hidden=prompt, sample=tuple(SamplingParams().rows(len(prompt))))])[0]
    tokens, pos = [out.tokens[-1]], prompt.shape[0]
    for _ in range(steps):
        row = table[tokens[-1] % 1000][None]
        out = run([SegmentInput(session, pos, hidden=row, sample=tuple(SamplingParams().rows(pos + 1)))])[0]
        tokens.append(out.tokens[-1])
        pos += 1
    return tokens


def test_fp32_engine_equals_the_pytorch_segment(tiny_checkpoint):
    reference = cloud_segment(tiny_checkpoint)
    engine = engine_of(cloud_segment(tiny_checkpoint))
    C = reference.spec.hidden_size
    prompt = torch.randn(40, C, generator=torch.Generator().manual_seed(1))  # 3 chunk passes of 16
    want = reference([SegmentInput("s", 0, hidden=prompt)])[0]
    got = engine([SegmentInput("s", 0, hidden=prompt)])[0]
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=1e-4)
    step = torch.randn(3, C, generator=torch.Generator().manual_seed(2))  # a short pass of 3 rows
    torch.testing.assert_close(engine([SegmentInput("s", 40, hidden=step)])[0].cpu(),
                               reference([SegmentInput("s", 40, hidden=step)])[0], atol=2e-4, rtol=1e-4)
    engine.close_session("s")
    reference.close_session("s")
    assert greedy(engine, "g", prompt, 8, C) == greedy(reference, "g", prompt, 8, C)
    assert engine.sessions.keys() == {"g"} and engine.cached_length("g") == 48


def test_mixed_sessions_equal_sessions_run_alone(tiny_glm):
    engine = engine_of(cloud_segment(tiny_glm), mixed_passes=False)  # (a mixed pass's rows: cuBLAS, tested below)
    C = engine.spec.hidden_size
    g = torch.Generator().manual_seed(3)
    prompts = {sid: torch.randn(n, C, generator=g) for sid, n in (("a", 5), ("b", 20), ("c", 1))}
    alone = {}
    for sid, rows in prompts.items():
        alone[sid] = engine([SegmentInput(sid, 0, hidden=rows)], last_only=True)[0]
        engine.close_session(sid)
    together = engine([SegmentInput(sid, 0, hidden=rows) for sid, rows in prompts.items()], last_only=True)
    for sid, got in zip(prompts, together):
        tol = 0 if ON_CUDA else 1e-5  # bit-identical on the GPU (batch-invariant kernels)
        torch.testing.assert_close(got, alone[sid], atol=tol, rtol=tol)


def test_a_rewind_with_new_content_equals_a_fresh_run(tiny_glm):
    engine = engine_of(cloud_segment(tiny_glm))
    C = engine.spec.hidden_size
    g = torch.Generator().manual_seed(4)
    prompt, first, other = (torch.randn(n, C, generator=g) for n in (6, 4, 2))
    engine([SegmentInput("r", 0, hidden=prompt)])
    engine([SegmentInput("r", 6, hidden=first)])  # four speculative positions ...
    rewound = engine([SegmentInput("r", 7, hidden=other)])[0]  # ... of which one is kept; other content after it
    engine([SegmentInput("f", 0, hidden=torch.cat([prompt, first[:1]]))])
    fresh = engine([SegmentInput("f", 7, hidden=other)])[0]
    torch.testing.assert_close(rewound, fresh, atol=1e-5, rtol=1e-5)
    assert engine.cached_length("r") == 9


def test_a_full_pool_refuses_new_sessions_only(tiny_glm):
    segment = cloud_segment(tiny_glm)
    engine = CudaEngine(segment, dtype=torch.float32, device=DEVICE, graphs=False, pool_tokens=64, max_positions=256,
                        page_size=16)
    C = engine.spec.hidden_size
    engine.reserve("running", 48)
    before = engine([SegmentInput("running", 0, hidden=torch.ones(8, C))], last_only=True)[0]
    with pytest.raises(PoolExhausted):
        engine.reserve("new", 40)
    with pytest.raises(PoolExhausted):
        engine([SegmentInput("new2", 0, hidden=torch.ones(30, C))])
    assert set(engine.sessions) == {"running"}
    engine.close_session("running")
    again = engine([SegmentInput("running", 0, hidden=torch.ones(8, C))], last_only=True)[0]
    torch.testing.assert_close(again, before, atol=0, rtol=0)


@needs_cuda
def test_graphs_replay_what_the_eager_passes_compute(tiny_checkpoint):
    eager = engine_of(cloud_segment(tiny_checkpoint), dtype=torch.bfloat16, graphs=False)
    graphed = engine_of(cloud_segment(tiny_checkpoint), dtype=torch.bfloat16, graphs=True)
    C = eager.spec.hidden_size
    prompt = torch.randn(24, C, generator=torch.Generator().manual_seed(5))
    assert greedy(graphed, "s", prompt, 40, C) == greedy(eager, "s", prompt, 40, C)
    assert graphed.stats["graph_replays"] > 40 and graphed.stats["captures"] >= 2


@needs_cuda
def test_sampled_tokens_do_not_depend_on_the_batch(tiny_glm):
    """A seeded session draws the same tokens alone and beside 7 others (mixed lengths, one joining late): the
    batch invariance of separate passes (a mixed pass's decode rows go through cuBLAS, not the skinny products)."""
    engine = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=True, mixed_passes=False)
    C = engine.spec.hidden_size
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    table = torch.randn(1000, C, generator=torch.Generator().manual_seed(6))

    def next_row(token: int) -> torch.Tensor:
        return table[token % 1000][None]

    g = torch.Generator().manual_seed(7)
    mine = torch.randn(9, C, generator=g)
    alone = drive(engine, {"me": mine}, 32, params, next_row)["me"]
    others = {f"o{i}": torch.randn(3 + 5 * i, C, generator=g) for i in range(6)}
    crowded = drive(engine, {"me": mine, **others}, 32, params, next_row, {"late": torch.randn(30, C, generator=g)}, 10)
    assert crowded["me"] == alone


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_demo_model_graphs_equal_eager_passes(demo_checkpoint, gpl3_text, temperature):
    """The demo model in bf16 on the GPU: 32+ tokens of CUDA graphs equal the eager passes' at batch 1, and at
    batch 8 with mixed prompt lengths and a session joining mid-way (mixed passes among them); without mixed
    passes, every session equals itself run alone (batch invariance)."""
    from runtime.checkpoint import load_spec, load_tokenizer

    L = load_spec(demo_checkpoint).num_layers
    make = lambda graphs, mixed=True: CudaEngine(  # noqa: E731
        Segment.from_checkpoint(demo_checkpoint, 0, L, embed=True, head=True), dtype=torch.bfloat16, graphs=graphs,
        pool_tokens=1 << 15, prefill_chunk=64, mixed_passes=mixed)
    graphed, eager, separate = make(True), make(False), make(True, mixed=False)
    ids = load_tokenizer(demo_checkpoint)(gpl3_text[:20000], return_tensors="pt").input_ids[0]
    prompts = {f"p{i}": ids[300 * i : 300 * i + n] for i, n in enumerate((12, 40, 7, 90, 3, 150, 25))}
    late = {"late": ids[3000:3070]}
    params = SamplingParams(temperature=temperature, seed=3)
    next_id = lambda token: torch.tensor([token])  # noqa: E731
    one = {"p0": prompts["p0"]}
    assert drive(graphed, one, 40, params, next_id) == drive(eager, one, 40, params, next_id)
    batch_g = drive(graphed, prompts, 40, params, next_id, late, 12)
    batch_e = drive(eager, prompts, 40, params, next_id, late, 12)
    assert batch_g == batch_e and graphed.stats["mixed_passes"] > 0
    batch_s = drive(separate, prompts, 40, params, next_id, late, 12)
    for sid in ("p1", "p5", "late"):  # a session's tokens do not depend on who shares its steps
        alone = drive(separate, {sid: {**prompts, **late}[sid]}, 40 if sid != "late" else 28, params, next_id)
        assert alone[sid] == batch_s[sid]
    assert graphed.stats["graph_replays"] > 0 and eager.stats["graph_replays"] == 0


@needs_cuda
def test_a_verification_step_equals_one_step_per_position(tiny_glm):
    engine = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=True)
    C = engine.spec.hidden_size
    g = torch.Generator().manual_seed(8)
    prompt, drafts = torch.randn(12, C, generator=g), torch.randn(5, C, generator=g)
    engine([SegmentInput("v", 0, hidden=prompt)], last_only=True)
    sample = tuple(SamplingParams().rows(13, 5))
    at_once = engine([SegmentInput("v", 12, hidden=drafts, sample=sample)])[0]
    one_by_one = [engine([SegmentInput("v", 12 + i, hidden=drafts[i : i + 1], sample=sample[i : i + 1])])[0]
                  for i in range(5)]
    assert isinstance(at_once, Sampled)
    assert at_once.tokens == [o.tokens[0] for o in one_by_one]
    assert at_once.logprobs == [o.logprobs[0] for o in one_by_one]


# ---- logit processing: rows that are not plain are sampled after the pass (sample_batch) -----------------

PROCESSED = {
    "mask": SamplingParams(),  # greedy under a grammar-like mask
    "pen": SamplingParams(temperature=0.8, seed=5, top_k=20, presence_penalty=0.5, frequency_penalty=0.3,
                          repetition_penalty=1.3, logit_bias=((3, 5.0), (7, -100.0))),  # verifies 2 drafts a step
    "top": SamplingParams(temperature=0.7, top_p=0.9, seed=9, min_p=0.05, top_logprobs=5),
    "plain": SamplingParams(temperature=0.9, seed=2),  # sampled inside the pass, beside the others
}


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """(V,) bools as the (ceil(V / 32),) int32 bitmask a grammar gives (bit j of word w: id 32 w + j)."""
    bits = torch.zeros(-(-allowed.shape[0] // 32) * 32, dtype=torch.int64)
    bits[: allowed.shape[0]] = allowed.long()
    words = (bits.view(-1, 32) << torch.arange(32)).sum(dim=-1)  # (W,) in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def processed_steps(run, vocab: int, width: int, sessions=tuple(PROCESSED), steps: int = 6) -> list[dict]:
    """Sessions of ``PROCESSED`` stepping together (a 20-row prompt, then ``steps`` steps); each step's answers.

    "pen" verifies two drafts a step (3 rows) and keeps only its first token, so its next step rewinds."""
    from dataclasses import replace

    from runtime.generation import TokenState

    states = {sid: TokenState(PROCESSED[sid]) for sid in sessions}  # counts the tokens for the penalties
    masks = torch.Generator().manual_seed(99)
    table = torch.randn(vocab, width, generator=torch.Generator().manual_seed(6))  # token -> its next input row

    def item(sid: str, start: int, hidden: torch.Tensor, drafts=()) -> SegmentInput:
        rows = states[sid].rows(start + hidden.shape[0] - len(drafts), drafts)
        if sid == "mask":
            rows = tuple(replace(r, mask=pack(torch.rand(vocab, generator=masks) < 0.3)) for r in rows)
        return SegmentInput(sid, start, hidden=hidden, sample=rows)

    prompts = {sid: torch.randn(20, width, generator=torch.Generator().manual_seed(list(PROCESSED).index(sid)))
               for sid in sessions}
    answers = [dict(zip(sessions, run([item(sid, 0, prompts[sid]) for sid in sessions])))]
    pos = dict.fromkeys(sessions, 20)
    for _ in range(steps):
        batch = []
        for sid in sessions:
            states[sid].commit(answers[-1][sid].tokens[:1])
            last = states[sid].tokens[-1]
            drafts = ((last * 7 + 1) % vocab, (last * 11 + 2) % vocab) if sid == "pen" else ()
            batch.append(item(sid, pos[sid], table[[last, *drafts]], drafts))
            pos[sid] += 1
        answers.append(dict(zip(sessions, run(batch))))
    return answers


def assert_same_answers(got: list[dict], want: list[dict], atol: float) -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for sid in w:
            assert g[sid].tokens == w[sid].tokens, (step, sid)
            torch.testing.assert_close(torch.tensor(g[sid].logprobs), torch.tensor(w[sid].logprobs), atol=atol, rtol=0)
            assert [ids for ids, _ in g[sid].top] == [ids for ids, _ in w[sid].top], (step, sid)
            for (_, a), (_, b) in zip(g[sid].top, w[sid].top):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


def test_processed_rows_equal_the_pytorch_segments(tiny_checkpoint):
    """Masks, penalties + bias + top-k (in a verification), min-p + top log-probs and a plain row in one step,
    and in a chunked prompt step: the engine's answers equal the PyTorch segment's."""
    reference = cloud_segment(tiny_checkpoint)
    engine = engine_of(cloud_segment(tiny_checkpoint), graphs=True)  # graphs on a GPU, eager passes on a CPU
    V, C = reference.spec.vocab_size, reference.spec.hidden_size
    want = processed_steps(reference, V, C)
    got = processed_steps(engine, V, C)
    assert_same_answers(got, want, atol=5e-4)
    assert all(len(step["top"].top[0][0]) == 5 for step in got) and not any(i for i, _ in got[-1]["plain"].top)
    assert len(got[-1]["pen"].tokens) == 3
    assert engine.stats["eager_samplings"] == 0  # the decode steps' processed rows took the static sampling


@needs_cuda
def test_processed_rows_leave_the_graphs_alone(tiny_glm):
    """bf16 with CUDA graphs: processed answers equal the eager passes' bit for bit, the plain session beside
    them draws what it draws alone, and a plain step after them still replays its graph."""
    graphed = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=True)
    eager = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=False)
    V, C = graphed.spec.vocab_size, graphed.spec.hidden_size
    mixed = processed_steps(graphed, V, C)
    assert_same_answers(mixed, processed_steps(eager, V, C), atol=0)
    for sid in PROCESSED:
        graphed.close_session(sid)
    alone = processed_steps(graphed, V, C, sessions=("plain",))
    assert [s["plain"].tokens for s in alone] == [s["plain"].tokens for s in mixed]
    replays, captures = graphed.stats["graph_replays"], graphed.stats["captures"]
    graphed([SegmentInput("plain", 26, hidden=torch.randn(1, C), sample=tuple(PROCESSED["plain"].rows(27)))])
    assert graphed.stats["graph_replays"] == replays + 1 and graphed.stats["captures"] == captures
    # processed decode steps replay a layers graph and a sampling graph each, captured once per shape
    for _ in range(2):
        for sid in PROCESSED:
            graphed.close_session(sid)
        before = dict(graphed.stats)
        processed_steps(graphed, V, C, steps=3)
    assert graphed.stats["captures"] == before["captures"] and graphed.stats["eager_samplings"] == 0
    assert graphed.stats["eager_passes"] == before["eager_passes"]
    chunks, steps = 2 * len(PROCESSED), 2 * 3  # two chunks per prompt; a layers and a sampling graph per step
    assert graphed.stats["graph_replays"] == before["graph_replays"] + chunks + steps


def test_rows_past_the_static_buffers_are_sampled_eagerly_alike(tiny_checkpoint):
    """A row with more logit_bias pairs than the sampling buffers hold is sampled eagerly (counted), a row
    within them by the static sampling; both answer as the PyTorch segment does, in one step."""
    reference = cloud_segment(tiny_checkpoint)
    engine = engine_of(cloud_segment(tiny_checkpoint), graphs=True)
    C = reference.spec.hidden_size
    wide = SamplingParams(temperature=0.8, seed=1, logit_bias=tuple((t, 0.25 * (t % 7)) for t in range(70)))
    narrow = SamplingParams(temperature=0.8, seed=2, logit_bias=((5, 3.0),), top_logprobs=2)
    hidden = {sid: torch.randn(n, C, generator=torch.Generator().manual_seed(n)) for sid, n in (("w", 18), ("n", 19))}
    answers = {}
    for name, run in (("reference", reference), ("engine", engine)):
        prompts = [SegmentInput(sid, 0, hidden=h, sample=tuple(p.rows(len(h)))) for (sid, h), p in
                   zip(hidden.items(), (wide, narrow))]
        run(prompts)
        steps = [SegmentInput(sid, len(h), hidden=h[-1:], sample=tuple(p.rows(len(h) + 1))) for (sid, h), p in
                 zip(hidden.items(), (wide, narrow))]
        answers[name] = run(steps)
    assert engine.stats["eager_samplings"] == 1
    for got, want in zip(answers["engine"], answers["reference"], strict=True):
        assert got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=5e-4, rtol=0)
        assert [ids for ids, _ in got.top] == [ids for ids, _ in want.top]


# ---- mixed passes: a prompt's chunk rides in the pass of the steps decoding beside it --------------------------

DECODING = {  # sessions decoding while prompts arrive, and how each samples
    "greedy": SamplingParams(),
    "sampled": SamplingParams(temperature=0.9, top_p=0.95, seed=4),
    "verify": SamplingParams(temperature=0.7, seed=8),  # verifies 2 drafts a step (3 rows), keeps one token
    "processed": SamplingParams(temperature=0.8, seed=5, presence_penalty=0.5, top_logprobs=3),  # static sampling
    "logits": None,  # 2 rows a step, their logits kept, nothing sampled
}
ARRIVING = (  # per step after the decoding sessions' 3-row prompts: (prompts arriving, last_only)
    ((("p12", 12, SamplingParams(top_logprobs=2)),), False),  # one chunk, processed rows: sampled eagerly
    ((("p40", 40, SamplingParams(temperature=0.8, seed=6)), ("p20", 20, None)), False),  # 3 chunks; a 2nd long step
    ((("p24", 24, None),), True),  # logits, of the last row only
)
MIXED_KW = dict(decode_rows=4)  # (prefill_chunk 16): steps of <= 4 rows share a pass, longer ones are chunked


def mixed_steps(run, vocab: int, width: int, sessions=tuple(DECODING), arriving=ARRIVING) -> list[dict]:
    """The ``sessions`` of DECODING stepping together (a 3-row prompt, then a step per ``arriving`` entry, its
    prompts in the same call); each call's answers by session."""
    from runtime.generation import TokenState

    states = {sid: TokenState(DECODING[sid]) for sid in sessions if DECODING[sid] is not None}
    table = torch.randn(vocab, width, generator=torch.Generator().manual_seed(6))  # token -> its next input row
    rows = {sid: torch.Generator().manual_seed(20 + i) for i, sid in enumerate(DECODING)}  # (alone as together)
    pos, answers = dict.fromkeys(sessions, 0), []
    for step, (prompts, last_only) in enumerate((((), False), *arriving)):
        batch = []
        for sid in sessions:
            drafts = ()
            if step == 0 or sid == "logits":
                hidden = torch.randn(3 if step == 0 else 2, width, generator=rows[sid])
            else:
                states[sid].commit(answers[-1][sid].tokens[:1])
                last = states[sid].tokens[-1]
                drafts = ((last * 7 + 1) % vocab, (last * 11 + 2) % vocab) if sid == "verify" else ()
                hidden = table[[last, *drafts]]
            n = hidden.shape[0]
            sample = states[sid].rows(pos[sid] + n - len(drafts), drafts) if sid in states else ()
            batch.append(SegmentInput(sid, pos[sid], hidden=hidden, sample=sample))
            pos[sid] += 2 if sid == "logits" else (n if step == 0 else 1)  # a verification keeps one token
        for name, n, params in prompts:
            hidden = torch.randn(n, width, generator=torch.Generator().manual_seed(n))
            batch.append(SegmentInput(name, 0, hidden=hidden, sample=tuple(params.rows(n)) if params else ()))
        answers.append(dict(zip([item.session_id for item in batch], run(batch, last_only), strict=True)))
    return answers


def assert_same_steps(got: list[dict], want: list[dict], atol: float, sessions=None) -> None:
    """Each step's answers alike: the same tokens and top ids, log-probabilities and logits within ``atol``."""
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for sid in sessions or w:
            if isinstance(w[sid], torch.Tensor):
                assert g[sid].shape == w[sid].shape, (step, sid)
                torch.testing.assert_close(g[sid].cpu().float(), w[sid].cpu().float(), atol=atol, rtol=0)
            else:
                assert_same_answers([{sid: g[sid]}], [{sid: w[sid]}], atol)


def close_all(engine) -> None:
    for sid in list(engine.sessions):
        engine.close_session(sid)


def test_a_mixed_pass_equals_separate_passes(tiny_glm):
    """Greedy, sampled, verifying, processed and logits-only sessions decode while prompts arrive (one chunk with
    processed rows; three chunks beside a second long step; logits with last_only): with mixed passes the engine
    answers as with separate passes (1e-4) and as the PyTorch segment, and every decoding session gets what it
    gets alone."""
    reference = cloud_segment(tiny_glm)
    mixed = engine_of(cloud_segment(tiny_glm), graphs=True, mixed_passes=True, **MIXED_KW)
    separate = engine_of(cloud_segment(tiny_glm), graphs=True, mixed_passes=False, **MIXED_KW)
    V, C = reference.spec.vocab_size, reference.spec.hidden_size
    got = mixed_steps(mixed, V, C)
    assert mixed.stats["mixed_passes"] == len(ARRIVING) and mixed.stats["eager_samplings"] == 0
    assert_same_steps(got, mixed_steps(separate, V, C), atol=1e-4)
    assert separate.stats["mixed_passes"] == 0
    assert_same_steps(got, mixed_steps(reference, V, C), atol=5e-4)
    assert len(got[1]["p12"].top[0][0]) == 2 and got[3]["p24"].shape == (1, V) and got[2]["p20"].shape == (20, V)
    quiet = tuple(((), last_only) for _, last_only in ARRIVING)
    for sid in DECODING:
        alone = mixed_steps(reference, V, C, sessions=(sid,), arriving=quiet)
        assert_same_steps(got, alone, atol=5e-4, sessions=(sid,))


def test_a_mixed_pass_of_an_edge_segment_gives_the_rows_of_separate_passes(tiny_glm):
    """No head (the edge's layers from the embedding): the rows of decode steps and of a prompt chunk that share
    a pass equal those of separate passes and the PyTorch segment's."""
    def segment():
        return Segment.from_checkpoint(tiny_glm, 0, 2, embed=True)

    reference, mixed = segment(), engine_of(segment(), mixed_passes=True, **MIXED_KW)
    separate = engine_of(segment(), mixed_passes=False, **MIXED_KW)
    ids = torch.Generator().manual_seed(30)
    calls = [[SegmentInput("a", 0, input_ids=torch.randint(96, (3,), generator=ids)),
              SegmentInput("b", 0, input_ids=torch.randint(96, (2,), generator=ids))],
             [SegmentInput("a", 3, input_ids=torch.randint(96, (1,), generator=ids)),
              SegmentInput("b", 2, input_ids=torch.randint(96, (4,), generator=ids)),
              SegmentInput("long", 0, input_ids=torch.randint(96, (40,), generator=ids))]]
    for items in calls:
        want, alike = reference(items), separate(items)
        for got, ref, sep in zip(mixed(items), want, alike, strict=True):
            torch.testing.assert_close(got.cpu(), sep.cpu(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.cpu(), ref, atol=2e-4, rtol=1e-4)
    assert mixed.stats["mixed_passes"] == 1 and separate.stats["mixed_passes"] == 0


def test_a_scheduler_step_runs_its_decode_rows_and_a_chunk_in_one_pass(tiny_glm):
    """Through the scheduler: three sessions' decode steps and a 48-position prompt queued together run as three
    mixed passes (decode rows + one chunk each), with the tokens of separate passes."""
    from runtime.scheduler import Scheduler

    params = {"s0": SamplingParams(), "s1": SamplingParams(temperature=0.9, seed=1), "s2": SamplingParams(top_k=5)}
    answers, counted = {}, {}
    for on in (True, False):
        engine = engine_of(cloud_segment(tiny_glm), mixed_passes=on, **MIXED_KW)  # (a 16-row chunk is long)
        C, g = engine.spec.hidden_size, torch.Generator().manual_seed(31)
        scheduler = Scheduler(engine, max_batch=8, name="mixed-test")  # started once everything is queued
        futures = [f for step in range(3) for f in scheduler.submit_all(
            [SegmentInput(sid, step, hidden=torch.randn(1, C, generator=g), sample=tuple(p.rows(step + 1)))
             for sid, p in params.items()])]
        futures.append(scheduler.submit(SegmentInput("long", 0, hidden=torch.randn(48, C, generator=g),
                                                     sample=tuple(SamplingParams(temperature=0.8, seed=3).rows(48)))))
        scheduler.start()
        answers[on] = [f.result(timeout=600) for f in futures]
        scheduler.stop()
        counted[on] = (engine.stats["mixed_passes"], scheduler.stats["steps"])
    assert counted == {True: (3, 3), False: (0, 3)}
    assert_same_steps([dict(enumerate(answers[True]))], [dict(enumerate(answers[False]))], atol=1e-4)


@needs_cuda
def test_mixed_passes_replay_their_graphs_in_bf16(tiny_glm):
    """bf16 with CUDA graphs: the mixed passes' answers equal their eager passes' bit for bit and, within bf16's
    rounding, those of separate passes (cuBLAS products for the decode rows instead of the skinny ones: the same
    tokens, log-probabilities and logits within 0.05); each mixed shape is captured once."""
    graphed = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=True, mixed_passes=True, **MIXED_KW)
    eager = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=False, mixed_passes=True, **MIXED_KW)
    separate = engine_of(cloud_segment(tiny_glm), dtype=torch.bfloat16, graphs=True, mixed_passes=False, **MIXED_KW)
    V, C = graphed.spec.vocab_size, graphed.spec.hidden_size
    got = mixed_steps(graphed, V, C)
    assert_same_steps(got, mixed_steps(eager, V, C), atol=0)
    assert_same_steps(got, mixed_steps(separate, V, C), atol=0.05)
    close_all(graphed)
    before = dict(graphed.stats)
    assert_same_steps(mixed_steps(graphed, V, C), got, atol=0)
    assert graphed.stats["captures"] == before["captures"] and graphed.stats["eager_passes"] == 0
    assert graphed.stats["mixed_passes"] == before["mixed_passes"] + len(ARRIVING) == 2 * len(ARRIVING)
