"""The speculative acceptance rule (`kernels.sampling.verify_drafts`) against the target.

Oracle: the target's own distribution, computed independently in float64 from the logits.
Rejection sampling must emit tokens distributed exactly as sampling them one by one from the
target; greedy must emit the longest prefix equal to the argmax, then the argmax.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mistralpy.kernels.sampling import SamplingTensors, verify_drafts
from mistralpy.params import SamplingParams

V = 6
CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


def rows_tensors(params, k, vocab=V):
    return SamplingTensors.from_params(
        [params] * (k + 1), [[]] * (k + 1), [[]] * (k + 1), vocab, "cpu"
    )


def target(logits_row, temperature, top_k):
    """float64 softmax(l / T) restricted to the top_k largest logits."""
    scaled = np.asarray(logits_row, np.float64) / temperature
    keep = np.argsort(-scaled)[:top_k]
    p = np.zeros_like(scaled)
    p[keep] = np.exp(scaled[keep] - scaled[keep].max())
    return p / p.sum()


def chi_square(counts: Counter, p: np.ndarray, n: int) -> float:
    observed = np.array([counts.get(t, 0) for t in range(len(p))], np.float64)
    support = p > 0
    assert observed[~support].sum() == 0, "a token of probability 0 was emitted"
    expected = p[support] * n
    return float(((observed[support] - expected) ** 2 / expected).sum())


def test_greedy_accepts_longest_prefix_equal_to_argmax():
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0)
    for trial in range(50):
        k = trial % 5
        logits = torch.randn(k + 1, V, generator=gen)
        best = logits.argmax(dim=-1).tolist()
        drafts = [b if torch.rand(1, generator=gen) < 0.7 else (b + 1) % V for b in best[:k]]
        out, n = verify_drafts(
            logits, rows_tensors(params, k), None, torch.tensor(drafts, dtype=torch.int64)
        )
        expect = next((i for i in range(k) if drafts[i] != best[i]), k)
        assert n == expect
        assert out.token_ids[: n + 1].tolist() == best[: n + 1]


@pytest.fixture
def one_thread():
    """Thousands of tiny ops: intra-op threads only contend (20x slower on a busy host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_rejection_sampling_keeps_the_target_distribution(one_thread):
    """First emitted token ~ p0 whatever the draft; second ~ p1 given the first was draft 0.
    Drafts include a token truncated away by top_k (probability 0: never accepted)."""
    torch.manual_seed(1)
    temperature, top_k, k = 0.8, 5, 2
    logits = torch.randn(k + 1, V) * 1.5
    params = SamplingParams(temperature=temperature, top_k=top_k)
    st = rows_tensors(params, k)
    p = [target(row, temperature, top_k) for row in logits.tolist()]
    excluded = int(np.argmin(p[0]))
    gen = torch.Generator().manual_seed(2)
    draws = 15000
    firsts, seconds = Counter(), Counter()
    choices = [[int(np.argmax(p[0])), 3], [excluded, 1], [2, int(np.argmax(p[1]))]]
    for i in range(draws):
        drafts = torch.tensor(choices[i % 3])
        out, n = verify_drafts(logits, st, gen, drafts)
        emitted = out.token_ids[: n + 1].tolist()
        firsts[emitted[0]] += 1
        if i % 3 == 0 and emitted[0] == choices[0][0]:
            seconds[emitted[1]] += 1
    assert chi_square(firsts, p[0], draws) < CHI2_DF5_P001
    assert chi_square(seconds, p[1], sum(seconds.values())) < CHI2_DF5_P001


def test_grammar_mask_and_logprobs_per_row():
    """A masked-out draft is never accepted; each row reports the raw model log-probs."""
    k = 2
    logits = torch.randn(k + 1, V)
    params = SamplingParams(temperature=0.0, logprobs=True)
    allowed = torch.ones(k + 1, V, dtype=torch.bool)
    best = int(logits[0].argmax())
    allowed[0, best] = False
    out, n = verify_drafts(logits, rows_tensors(params, k), None, torch.tensor([best, 0]), allowed)
    assert n == 0
    masked = logits[0].clone()
    masked[best] = float("-inf")
    assert out.token_ids[0] == int(masked.argmax())
    expected = torch.log_softmax(logits.double(), dim=-1)[0, out.token_ids[0]]
    assert abs(float(out.logprobs[0]) - float(expected)) < 1e-5


def test_the_runners_greedy_shortcut_emits_what_the_general_rule_emits():
    """`model_runner._greedy_verify` (one argmax) against `verify_drafts` on random logits
    with ties (small integer values) and drafts that agree with the argmax for a while."""
    from mistralpy.runner.model_runner import _greedy_verify

    gen = torch.Generator().manual_seed(3)
    greedy = SamplingParams(temperature=0.0)
    for trial in range(200):
        k = trial % 6
        logits = torch.randint(0, 4, (k + 1, V), generator=gen).float()
        best = logits.argmax(dim=-1).tolist()
        agree = int(torch.randint(0, k + 1, (1,), generator=gen))
        drafts = best[:agree] + [int(t) for t in torch.randint(0, V, (k - agree,), generator=gen)]
        out, n = verify_drafts(
            logits, rows_tensors(greedy, k), None, torch.tensor(drafts, dtype=torch.int64)
        )
        want = out.token_ids[: n + 1].tolist()
        got = [t.token_id for t in _greedy_verify(drafts, logits)]
        assert got == want, (logits, drafts)
