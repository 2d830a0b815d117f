"""The reference attention kernels against dense attention written out longhand."""

from __future__ import annotations

import math
import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.kernels.attention import build_metadata, paged_attention, varlen_attention


def _dense(q, k, v, scale, mask):
    """q (Lq, H, D), k/v (Lk, H, D), mask (Lq, Lk) bool -> (Lq, H, D), softmax in float64."""
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 12)), min_size=1, max_size=4),
    block_size=st.sampled_from([1, 4, 16]),
    group=st.sampled_from([1, 2, 4]),
)
def test_paged_attention_equals_dense_causal(seed, sizes, block_size, group):
    """Sequences with (new, already cached) tokens, random block tables, GQA groups."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    kv_heads, dim = 2, 8
    heads = kv_heads * group
    q_lens = [n for n, _ in sizes]
    seq_lens = [n + c for n, c in sizes]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    cache = torch.zeros(2, num_blocks, block_size, kv_heads, dim)
    full_k = [torch.randn(s, kv_heads, dim, generator=gen) for s in seq_lens]
    full_v = [torch.randn(s, kv_heads, dim, generator=gen) for s in seq_lens]
    # earlier steps already stored the cached prefix of each sequence
    for k, v, s, n, table in zip(full_k, full_v, seq_lens, q_lens, tables):
        for pos in range(s - n):
            cache[0, table[pos // block_size], pos % block_size] = k[pos]
            cache[1, table[pos // block_size], pos % block_size] = v[pos]
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    k_new = torch.cat([k[s - n :] for k, s, n in zip(full_k, seq_lens, q_lens)])
    v_new = torch.cat([v[s - n :] for v, s, n in zip(full_v, seq_lens, q_lens)])
    attn = build_metadata(q_lens, seq_lens, tables, block_size, "cpu")
    out = paged_attention(q, k_new, v_new, cache, attn, 0.3)
    start = 0
    for k, v, s, n in zip(full_k, full_v, seq_lens, q_lens):
        mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]
        kk = k.repeat_interleave(group, dim=1)
        vv = v.repeat_interleave(group, dim=1)
        expected = _dense(q[start : start + n], kk, vv, 0.3, mask)
        torch.testing.assert_close(out[start : start + n], expected, atol=1e-5, rtol=1e-5)
        start += n


def test_slot_minus_one_is_not_written():
    cache = torch.zeros(2, 2, 4, 1, 2)
    attn = build_metadata([2], [2], [[1]], 4, "cpu")
    attn.slot_mapping[1] = -1
    k = torch.ones(2, 1, 2)
    paged_attention(torch.ones(2, 1, 2), k, k, cache, attn, 1.0)
    assert cache[0, 1, 0].eq(1).all() and cache[0, 1, 1].eq(0).all() and cache[:, 0].eq(0).all()


def test_varlen_attention_equals_block_diagonal_dense():
    gen = torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))
    lens = [5, 1, 9]
    cu = [0, 5, 6, 15]
    q, k, v = (torch.randn(15, 3, 8, generator=gen) for _ in range(3))
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    mask = seg[:, None] == seg[None, :]
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, 0.25), _dense(q, k, v, 0.25, mask), atol=1e-5, rtol=1e-5
    )
