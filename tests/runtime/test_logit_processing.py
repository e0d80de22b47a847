"""Logit processing against a reference written from the definitions, row by row in float64.

The reference (``reference``) follows the documented order: vLLM's repetition penalty (a seen token's logit
/ r when > 0, else * r), OpenAI's presence and frequency penalties (logit -= presence * (count > 0) +
frequency * count), ``logit_bias`` added, temperature (1 when greedy). The reported log-probabilities are
log_softmax of that. Then the grammar's bitmask, top-k (the k largest), min-p (p >= min_p * p_max) and the
top-p nucleus choose the token: the argmax when greedy, else the first token, by falling probability, whose
cumulative (nucleus-kept) mass exceeds ``uniform`` times the kept mass. Also ``TokenState``: the rows of a
speculative verification count the drafts before each position; a fork is independent.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from runtime.generation import TokenState
from runtime.sampling import (
    SampleRow,
    SamplingParams,
    draw_uniform,
    row_tensors,
    sample_batch,
    sample_processed,
    sample_rows,
)

V = 1003  # not a multiple of 32: the mask's last word is partial


def bitmask(allowed_ids, vocab: int = V) -> torch.Tensor:
    """(ceil(vocab / 32),) int32 bitmask with bit j of word w set for each allowed id 32 w + j."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed_ids:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def reference(logits: torch.Tensor, row: SampleRow) -> tuple[int, torch.Tensor]:
    """(token, reported log-probabilities (V,)) for one row of (V,) logits, straight from the definitions."""
    x = logits.double().clone()
    for t, count in row.seen:
        x[t] = x[t] / row.repetition if x[t] > 0 else x[t] * row.repetition
        x[t] -= row.presence * (count > 0) + row.frequency * count
    for t, b in row.bias:
        x[t] += b
    x = x / (row.temperature if row.temperature > 0 else 1.0)
    logprobs = torch.log_softmax(x, dim=-1)
    keep = torch.ones(V, dtype=torch.bool)
    if row.mask is not None:
        keep = torch.tensor([bool(int(row.mask[t // 32]) >> (t % 32) & 1) for t in range(V)])
    if row.top_k:
        allowed = sorted((float(x[t]) for t in range(V) if keep[t]), reverse=True)
        if len(allowed) > row.top_k:
            keep &= x >= allowed[row.top_k - 1]
    if row.min_p:
        p = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1)
        keep &= p >= row.min_p * p.max()
    x = x.masked_fill(~keep, float("-inf"))
    if row.temperature == 0:
        return int(x.argmax()), logprobs
    p = torch.softmax(x, dim=-1)
    order = sorted(range(V), key=lambda t: (-float(p[t]), t))
    kept, before = [], 0.0
    for t in order:  # the nucleus: the most likely tokens until their mass reaches top_p (at least one)
        if before < row.top_p or row.top_p >= 1:
            kept.append(t)
        before += float(p[t])
    total = sum(float(p[t]) for t in kept)
    cumulative = 0.0
    for t in kept:
        cumulative += float(p[t])
        if cumulative > row.uniform * total:
            return t, logprobs
    return kept[-1], logprobs


def random_row(rng: random.Random, plain: bool = False) -> SampleRow:
    temperature = rng.choice([0.0, rng.uniform(0.3, 1.5)])
    top_p = rng.choice([1.0, rng.uniform(0.2, 0.95)])
    if plain:
        return SampleRow(temperature, top_p, rng.random())
    allowed = rng.sample(range(V), rng.randint(1, V // 3))
    return SampleRow(
        temperature, top_p, rng.random(),
        top_k=rng.choice([0, 1, rng.randint(2, 60)]),
        min_p=rng.choice([0.0, rng.uniform(0.01, 0.3)]),
        presence=rng.uniform(-2, 2), frequency=rng.uniform(-2, 2), repetition=rng.uniform(0.5, 2),
        seen=tuple((t, rng.randint(1, 5)) for t in rng.sample(range(V), rng.randint(0, 40))),
        bias=tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(V), rng.randint(0, 10))),
        mask=rng.choice([None, bitmask(allowed)]),
        top_logprobs=rng.randint(0, 20),
    )  # fmt: skip


def random_logits(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # (R, V)


@pytest.mark.parametrize("seed", range(6))
def test_processed_sampling_equals_the_reference(seed):
    rng = random.Random(seed)
    rows = [random_row(rng) for _ in range(24)]
    logits = random_logits(seed, len(rows))
    out = sample_processed(logits, rows)
    tokens, logprobs, top = sample_batch(logits, rows)
    assert tokens == out.tokens.tolist()
    for i, row in enumerate(rows):
        want, want_logprobs = reference(logits[i], row)
        assert int(out.tokens[i]) == want, f"row {i}: {row}"
        if row.mask is not None:
            assert int(row.mask[want // 32]) >> (want % 32) & 1  # the grammar allows it
        assert float(out.logprobs[i]) == pytest.approx(float(want_logprobs[want]), abs=1e-4)
        assert logprobs[i] == pytest.approx(float(want_logprobs[want]), abs=1e-4)
        k = row.top_logprobs
        best = want_logprobs.topk(k) if k else None
        assert len(top[i][0]) == k and len(top[i][1]) == k
        if k:
            assert list(top[i][0]) == best.indices.tolist()
            assert list(top[i][1]) == pytest.approx(best.values.tolist(), abs=1e-4)


def test_the_processed_path_samples_across_the_whole_range_of_draws():
    """Many draws of one row: the reference and the sampler agree, and most of the nucleus is reached."""
    logits = random_logits(99, 1)[0] / 3  # a flat-ish distribution: many tokens in play
    chosen = set()
    for i in range(200):
        row = SampleRow(0.8, 0.9, i / 200 + 1 / 400, top_k=50, seen=((3, 2),), presence=0.5, top_logprobs=1)
        got = int(sample_processed(logits[None], [row]).tokens[0])
        assert got == reference(logits, row)[0]
        chosen.add(got)
    assert len(chosen) > 20


@pytest.mark.parametrize("seed", range(3))
def test_plain_rows_give_sample_rows_tokens_through_the_processed_path(seed):
    rng = random.Random(100 + seed)
    rows = [random_row(rng, plain=True) for _ in range(32)]
    assert all(r.plain for r in rows)
    logits = random_logits(100 + seed, len(rows))
    fast_tokens, fast_logprobs = sample_rows(logits, *row_tensors(rows, "cpu"))
    out = sample_processed(logits, rows)
    assert out.tokens.tolist() == fast_tokens.tolist()
    torch.testing.assert_close(out.logprobs, fast_logprobs, atol=1e-5, rtol=0)
    assert [reference(logits[i], r)[0] for i, r in enumerate(rows)] == fast_tokens.tolist()
    assert sample_batch(logits, rows)[0] == fast_tokens.tolist()


# ---- each field changes the tokens as its definition says -------------------------------------------------------


def two_leaders(first: float = 2.0, second: float = 1.0) -> torch.Tensor:
    """(1, V) logits where token 7 leads token 11 by ``first - second`` and the rest are far behind."""
    logits = torch.full((1, V), -5.0)
    logits[0, 7], logits[0, 11] = first, second
    return logits


def greedy(logits: torch.Tensor, **fields) -> int:
    return int(sample_processed(logits, [SampleRow(**fields)]).tokens[0])


def test_frequency_penalty_counts_each_generation_of_a_token():
    logits = two_leaders(2.0, 1.0)  # a margin of 1
    assert greedy(logits, seen=((7, 3),), frequency=0.3) == 7  # 3 * 0.3 = 0.9 < 1: still the leader
    assert greedy(logits, seen=((7, 3),), frequency=0.4) == 11  # 3 * 0.4 = 1.2 > 1: the next one
    assert greedy(logits, seen=((7, 1),), frequency=0.4) == 7  # one occurrence costs only 0.4


def test_presence_penalty_is_the_same_for_any_count():
    logits = two_leaders(2.0, 1.0)
    assert greedy(logits, seen=((7, 9),), presence=0.9) == 7
    assert greedy(logits, seen=((7, 1),), presence=1.1) == 11
    once = sample_processed(logits, [SampleRow(seen=((7, 1),), presence=0.5, top_logprobs=2)])
    often = sample_processed(logits, [SampleRow(seen=((7, 9),), presence=0.5, top_logprobs=2)])
    torch.testing.assert_close(once.top_logprobs, often.top_logprobs)


def test_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones():
    logits = two_leaders(2.0, 1.5)
    assert greedy(logits, seen=((7, 1),), repetition=1.2) == 7  # 2 / 1.2 = 1.67 > 1.5
    assert greedy(logits, seen=((7, 1),), repetition=1.5) == 11  # 2 / 1.5 = 1.33 < 1.5
    negative = torch.zeros(1, V)
    negative[0, 5] = -1.0
    row = SampleRow(seen=((5, 1),), repetition=2.0, top_logprobs=1)
    penalised = processed_logprob(negative, row, 5)
    plain = processed_logprob(negative, SampleRow(top_logprobs=1), 5)
    expected = torch.log_softmax(torch.cat([torch.tensor([-2.0]), torch.zeros(V - 1)]), dim=0)[0]
    assert penalised == pytest.approx(float(expected), abs=1e-5) and penalised < plain  # -1 * 2 = -2


def processed_logprob(logits: torch.Tensor, row: SampleRow, token: int) -> float:
    """The reported log-probability of ``token`` under ``row`` (forced by a bias-free mask)."""
    out = sample_processed(logits, [dataclasses.replace(row, mask=bitmask([token]))])
    assert int(out.tokens[0]) == token
    return float(out.logprobs[0])


def test_logit_bias_forces_and_forbids_tokens():
    logits = random_logits(5, 1)
    leader = int(logits.argmax())
    other = int(logits.argmin())
    assert greedy(logits, bias=((other, 100.0),)) == other
    for u in (0.01, 0.5, 0.99):
        row = SampleRow(1.0, 1.0, u, bias=((other, 100.0),))
        assert int(sample_processed(logits, [row]).tokens[0]) == other
    assert greedy(logits, bias=((leader, -100.0),)) != leader
    forbidden = sample_processed(logits.expand(50, V), [SampleRow(1.0, 1.0, i / 50, bias=((leader, -100.0),))
                                                        for i in range(50)])
    assert leader not in forbidden.tokens.tolist()


def test_the_grammar_mask_chooses_but_does_not_change_the_reported_logprobs():
    logits = random_logits(6, 1)
    leader = int(logits.argmax())
    allowed = [t for t in range(V) if t % 5 == 1 and t != leader]
    masked = sample_processed(logits, [SampleRow(mask=bitmask(allowed), top_logprobs=3)])
    free = sample_processed(logits, [SampleRow(top_logprobs=3)])
    assert int(masked.tokens[0]) == max(allowed, key=lambda t: float(logits[0, t]))
    assert int(free.tokens[0]) == leader
    torch.testing.assert_close(masked.top_logprobs, free.top_logprobs)
    assert int(masked.top_tokens[0, 0]) == leader  # the alternatives are those of the unmasked distribution


def test_top_k_and_min_p_truncate_what_is_drawn():
    logits = torch.full((1, V), -10.0)
    logits[0, :4] = torch.tensor([3.0, 2.9, 2.8, 0.0])
    top1 = {int(sample_processed(logits, [SampleRow(1.0, 1.0, i / 40, top_k=1)]).tokens[0]) for i in range(40)}
    assert top1 == {0}
    top3 = {int(sample_processed(logits, [SampleRow(1.0, 1.0, i / 40, top_k=3)]).tokens[0]) for i in range(40)}
    assert top3 == {0, 1, 2}
    # p(3) / p(0) = e^-3 ~ 0.05: min_p 0.1 drops it, min_p 0.01 keeps it
    dropped = {int(sample_processed(logits, [SampleRow(1.0, 1.0, 0.999, min_p=0.1)]).tokens[0])}
    kept = {int(sample_processed(logits, [SampleRow(1.0, 1.0, 0.999, min_p=0.01)]).tokens[0])}
    assert dropped <= {0, 1, 2} and kept == {3}


# ---- TokenState -------------------------------------------------------------------------------------------------


def test_a_repeated_greedy_token_gives_way_under_a_large_frequency_penalty():
    logits = two_leaders(2.0, 1.0)
    state = TokenState(SamplingParams(frequency_penalty=2.0))
    assert int(sample_processed(logits, state.rows(10)).tokens[0]) == 7
    state.commit([7])
    assert int(sample_processed(logits, state.rows(11)).tokens[0]) == 11
    assert TokenState(SamplingParams()).rows(10)[0].plain  # nothing on: the fast path


def test_verification_rows_count_the_drafts_before_each_position():
    params = SamplingParams(temperature=0.7, seed=3, frequency_penalty=0.5)
    state = TokenState(params, generated=[5, 5, 7])
    rows = state.rows(20, drafts=[7, 9])
    assert [dict(r.seen) for r in rows] == [{5: 2, 7: 1}, {5: 2, 7: 2}, {5: 2, 7: 2, 9: 1}]
    assert [r.uniform for r in rows] == [draw_uniform(3, p) for p in (20, 21, 22)]
    assert state.tokens == [5, 5, 7] and dict(state.counts) == {5: 2, 7: 1}  # the drafts are not committed
    state.commit([7, 9])
    assert dict(state.rows(22)[0].seen) == dict(rows[2].seen)  # as if the drafts had been generated


def test_a_forked_token_state_is_independent():
    state = TokenState(SamplingParams(presence_penalty=1.0), generated=[1, 2])
    fork = state.fork()
    fork.commit([3, 3])
    assert state.tokens == [1, 2] and dict(state.rows(5)[0].seen) == {1: 1, 2: 1}
    state.commit([4])
    assert fork.tokens == [1, 2, 3, 3] and dict(fork.rows(5)[0].seen) == {1: 1, 2: 1, 3: 2}
