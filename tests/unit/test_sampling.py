"""Batched sampler vs direct, independent float64 computations on fresh random logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mistralpy.kernels.sampling import (
    SamplingTensors,
    apply_penalties,
    sample,
    truncation_threshold,
)
from mistralpy.params import SamplingParams

V = 24


def tensors(params, vocab=V, prompt=None, output=None):
    prompt = prompt or [[] for _ in params]
    output = output or [[] for _ in params]
    return SamplingTensors.from_params(params, prompt, output, vocab, "cpu")


def tie_heavy_logits(draw, rows, vocab):
    """Logits drawn from a few values so that ties (the hard case for top-k/p) are common."""
    # Distinct levels are >= 0.25 apart: "tied" means exactly equal, never equal-after-rounding.
    levels = [q / 4 for q in draw(st.lists(st.integers(-16, 16), min_size=2, max_size=6))]
    idx = draw(
        st.lists(st.integers(0, len(levels) - 1), min_size=rows * vocab, max_size=rows * vocab)
    )
    return np.array([levels[i] for i in idx], dtype=np.float32).reshape(rows, vocab)


@st.composite
def logits_and_params(draw):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, 40))
    if draw(st.booleans()):
        logits = tie_heavy_logits(draw, rows, vocab)
    else:
        seed = draw(st.integers(0, 2**31))
        scale = draw(st.sampled_from([0.5, 2.0, 8.0]))
        logits = (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(
            np.float32
        )
    params = [
        SamplingParams(
            temperature=draw(st.sampled_from([0.5, 1.0, 1.7])),
            top_k=draw(st.sampled_from([0, -1, 1, 2, 5, vocab, vocab + 3])),
            top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 0.1, 1e-3])),
            min_p=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        )
        for _ in range(rows)
    ]
    return logits, params


def oracle_kept(row: np.ndarray, p: SamplingParams) -> tuple[set[int], float]:
    """Tokens kept by top_k -> top_p -> min_p, directly from the definitions (float64).

    Also returns the distance of the closest top_p / min_p decision to its boundary, so that
    examples decided by float32 rounding can be skipped.
    """
    x = row.astype(np.float64) / p.temperature
    keep = np.ones_like(x, dtype=bool)
    if p.top_k > 0:
        kth = np.sort(x)[::-1][min(p.top_k, len(x)) - 1]
        keep &= x >= kth
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    margin = math.inf
    if p.top_p < 1.0:
        for t in np.flatnonzero(keep):
            mass_above = probs[probs > probs[t]].sum()
            margin = min(margin, abs(mass_above - p.top_p))
            keep[t] = mass_above < p.top_p
    if p.min_p > 0:
        bound = p.min_p * probs.max()
        margin = min(
            margin, float(np.min(np.abs(probs[keep] - bound) / bound)) if keep.any() else 1
        )
        keep &= probs >= bound
    return set(np.flatnonzero(keep).tolist()), margin


@settings(max_examples=300, deadline=None)
@given(logits_and_params())
def test_truncation_keeps_exactly_the_defined_sets(case):
    logits, params = case
    st_ = tensors(params, vocab=logits.shape[1])
    scaled = torch.from_numpy(logits) / st_.temperatures[:, None]
    kept = (scaled >= truncation_threshold(scaled, st_)).numpy()
    for b, p in enumerate(params):
        expected, margin = oracle_kept(logits[b], p)
        assume(margin > 1e-5)
        assert set(np.flatnonzero(kept[b]).tolist()) == expected


@settings(max_examples=100, deadline=None)
@given(logits_and_params(), st.integers(0, 2**31))
def test_sampled_token_is_always_in_kept_set(case, seed):
    logits, params = case
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(params))]
    out = sample(torch.from_numpy(logits), tensors(params, vocab=logits.shape[1]), gens)
    for b, p in enumerate(params):
        expected, margin = oracle_kept(logits[b], p)
        assume(margin > 1e-5)
        assert int(out.token_ids[b]) in expected


def test_greedy_is_argmax_of_penalised_logits_per_row():
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    params = [SamplingParams(temperature=0.0 if b % 2 else 0.8, top_k=3) for b in range(6)]
    out = sample(logits, tensors(params), [None] * 6)
    greedy_rows = [b for b in range(6) if b % 2]
    assert torch.equal(out.token_ids[greedy_rows], logits[greedy_rows].argmax(-1))
    all_greedy = sample(logits, tensors([SamplingParams(temperature=0.0)] * 6), [None] * 6)
    assert torch.equal(all_greedy.token_ids, logits.argmax(-1))


def test_penalties_match_direct_formulas():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    prompt = [rng.integers(0, V, 7).tolist() for _ in range(3)]
    output = [rng.integers(0, V, 9).tolist() for _ in range(3)]
    output[2], prompt[1] = [], []  # empty histories count nothing
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.7, logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5),
    ]
    got = apply_penalties(torch.from_numpy(logits), tensors(params, V, prompt, output)).numpy()
    for b, p in enumerate(params):
        expect = logits[b].astype(np.float64).copy()
        for t, v in p.logit_bias.items():
            expect[t] += v
        for t in set(prompt[b]) | set(output[b]):
            r = p.repetition_penalty
            expect[t] = expect[t] / r if expect[t] > 0 else expect[t] * r
        for t in set(output[b]):
            expect[t] -= p.frequency_penalty * output[b].count(t) + p.presence_penalty
        np.testing.assert_allclose(got[b], expect, rtol=1e-5, atol=1e-5)


def test_logit_bias_steers_greedy_and_sampling():
    logits = torch.randn(2, V)
    params = [
        SamplingParams(temperature=0.0, logit_bias={5: 100.0}),
        SamplingParams(temperature=1.0, logit_bias={t: -100.0 for t in range(V) if t != 9}),
    ]
    out = sample(logits, tensors(params), [None, None])
    assert out.token_ids.tolist() == [5, 9]


def test_allowed_mask_is_respected():
    torch.manual_seed(3)
    logits = torch.randn(64, V) * 4
    allowed = torch.rand(64, V) < 0.3
    allowed[:, 0] = True
    params = [SamplingParams(temperature=0.0 if b < 8 else 1.0) for b in range(64)]
    out = sample(logits, tensors(params), [None] * 64, allowed_mask=allowed)
    assert allowed[torch.arange(64), out.token_ids].all()
    masked = logits.masked_fill(~allowed, float("-inf"))
    assert torch.equal(out.token_ids[:8], masked[:8].argmax(-1))


def test_logprobs_are_log_softmax_of_penalised_unmasked_logits():
    torch.manual_seed(4)
    logits = torch.randn(4, V) * 2
    params = [
        SamplingParams(logprobs=True, top_logprobs=5, frequency_penalty=1.0),
        SamplingParams(logprobs=True, temperature=0.3, top_p=0.5),
        SamplingParams(top_logprobs=2, temperature=0.0),
        SamplingParams(),
    ]
    output = [[1, 1, 2], [], [], []]
    st_ = tensors(params, output=output)
    out = sample(logits, st_, [None] * 4)
    reference = torch.log_softmax(apply_penalties(logits, st_).double(), dim=-1)
    chosen = reference[torch.arange(4), out.token_ids]
    torch.testing.assert_close(out.logprobs.double(), chosen, rtol=1e-5, atol=1e-5)
    assert out.top_logprob_ids.shape == (4, 5)
    expect_vals, _ = reference.sort(dim=-1, descending=True)
    torch.testing.assert_close(
        out.top_logprob_values.double(), expect_vals[:, :5], atol=1e-5, rtol=0
    )
    assert sample(logits, tensors([SamplingParams()] * 4), [None] * 4).logprobs is None


def run_steps(rows: list[tuple[SamplingParams, int | None]], steps: int, seed_logits: int):
    """Sample `steps` tokens for each row with fresh per-row generators; (B, steps) list."""
    gens = [None if s is None else torch.Generator().manual_seed(s) for _, s in rows]
    params = [p for p, _ in rows]
    logits_gen = torch.Generator().manual_seed(seed_logits)
    base = torch.randn(steps, V, generator=logits_gen) * 2  # same "model" for every row
    picks = []
    for t in range(steps):
        logits = base[t].expand(len(rows), V).contiguous()
        picks.append(sample(logits, tensors(params), gens).token_ids.tolist())
    return [list(col) for col in zip(*picks)]


def test_seeded_rows_reproduce_across_batch_compositions():
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = run_steps([(seeded, 1234)], 12, seed_logits=7)[0]
    others = [
        (SamplingParams(temperature=0.7), None),
        (SamplingParams(temperature=0.0), 5),
        (SamplingParams(top_k=3, seed=9), 9),
    ]
    mixed = run_steps(others[:2] + [(seeded, 1234)] + others[2:], 12, seed_logits=7)
    assert mixed[2] == alone
    other_seed = run_steps([(seeded, 4321)], 12, seed_logits=7)[0]
    assert other_seed != alone


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.1),
    ],
)
def test_sampling_frequencies_follow_filtered_softmax(params):
    torch.manual_seed(11)
    vocab, n = 10, 40_000
    row = torch.randn(vocab) * 1.5
    out = sample(row.expand(n, vocab).contiguous(), tensors([params] * n, vocab), [None] * n)
    kept, _ = oracle_kept(row.numpy(), params)
    scaled = row.double() / params.temperature
    probs = torch.zeros(vocab, dtype=torch.float64)
    idx = torch.tensor(sorted(kept))
    probs[idx] = torch.softmax(scaled[idx], dim=0)
    freq = torch.bincount(out.token_ids, minlength=vocab).double() / n
    sigma = (probs * (1 - probs) / n).sqrt().clamp_min(1e-12)
    z = ((freq - probs).abs() / sigma)[probs > 0]
    assert (freq[probs == 0] == 0).all()
    assert z.max() < 5.0, (freq, probs)
