"""CPU fast paths (`cpu_paged_attention`, `CPU_OPS`) against the reference kernels."""

from __future__ import annotations

import random

import pytest
import torch

from mistralpy.kernels.attention import cpu_paged_attention, paged_attention
from mistralpy.kernels.fused_ops import CPU_OPS, REFERENCE_OPS
from mistralpy.runner.batch import ScheduledBatch, SeqWork, build_forward_batch
from tests.seeds import fresh_seeds

SEEDS = fresh_seeds(6, "cpu_kernels")


def _step(rng: random.Random, block_size: int, num_blocks: int, decode: bool) -> ScheduledBatch:
    """A random step: 1-3 sequences, some with a run of blocks, some with shuffled ones."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = []
    for i in range(rng.randint(1, 3)):
        new = 1 if decode else rng.randint(1, 5)
        total = new + rng.randint(0, 3 * block_size)
        n = -(-total // block_size)
        if rng.random() < 0.5:  # one run b, b + 1, ... (read in place)
            start = rng.randrange(num_blocks - n + 1)
            table = list(range(start, start + n))
        else:
            table = [free.pop() for _ in range(n)]
        seqs.append(SeqWork(f"s{i}", [0] * new, total - new, table, [], None))
    return ScheduledBatch(seqs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decode", [True, False])
def test_cpu_paged_attention_equals_reference(seed, decode):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks, kv_heads, group, dim = rng.choice([1, 4, 16]), 64, 2, 4, 16
    batch = _step(rng, block_size, num_blocks, decode)
    attn = build_forward_batch(batch, block_size, torch.device("cpu")).attn
    tokens = sum(attn.query_lens_cpu)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen)
    q = torch.randn(tokens, kv_heads * group, dim, generator=gen)
    k, v = torch.randn(2, tokens, kv_heads, dim, generator=gen)
    ours_cache, ref_cache = cache.clone(), cache.clone()
    ours = cpu_paged_attention(q, k, v, ours_cache, attn, 0.25)
    ref = paged_attention(q, k, v, ref_cache, attn, 0.25)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(ours_cache, ref_cache)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ops_equal_reference(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    tokens, hq, hk, d = rng.randint(1, 5), 8, 2, rng.choice([8, 64, 128])
    # q and k as the strided views the attention module splits off its qkv output
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    cos, sin = torch.randn(2, tokens, d, generator=gen).to(dtype)
    for ours, ref in zip(CPU_OPS.rope_qk(q, k, cos, sin), REFERENCE_OPS.rope_qk(q, k, cos, sin)):
        assert torch.equal(ours, ref)  # the same products and sums, only regrouped ops
    gate_up = torch.randn(tokens, 2 * d, generator=gen).to(dtype)
    assert torch.equal(CPU_OPS.silu_and_mul(gate_up), REFERENCE_OPS.silu_and_mul(gate_up))
    x, residual = torch.randn(2, tokens, 4 * d, generator=gen).to(dtype)
    weight = torch.randn(4 * d, generator=gen).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}  # summation order
    torch.testing.assert_close(
        CPU_OPS.rms_norm(x, weight, 1e-5), REFERENCE_OPS.rms_norm(x, weight, 1e-5), **tol
    )
    ours = CPU_OPS.add_rms_norm(x, residual, weight, 1e-5)
    ref = REFERENCE_OPS.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(ours, ref, **tol)
