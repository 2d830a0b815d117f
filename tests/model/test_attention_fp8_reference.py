"""The CPU attention paths over an fp8 (e4m3) KV cache.

Oracles: dense float64 attention over the K/V as e4m3 stores them (quantized by torch's own
cast, independent of our clamp), and the float32 cache for the size of the fp8 error.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from mistralpy.kernels.attention import (
    FP8_E4M3_MAX,
    FP8_KV_DTYPE,
    build_metadata,
    cpu_paged_attention,
    dequantize_kv,
    paged_attention,
    quantize_kv,
)


def _seeded() -> torch.Generator:
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))


def _dense(q, k, v, scale, positions):
    """q (Lq, Hq, D), k/v (Lk, Hkv, D), query positions (Lq,) -> float64 (Lq, Hq, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(torch.arange(k.shape[0])[None, None, :] > positions[None, :, None], -math.inf)
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_quantize_saturates_instead_of_nan():
    """Past 448 * scale a value (inf included) saturates, never inf/NaN (e4m3fn has no inf;
    the clamp makes that hold whatever a cast does past 448)."""
    scale = torch.tensor(0.5)
    x = torch.tensor([1e4, -1e4, 224.1, -3e38, float("inf"), 1.0])
    got = dequantize_kv(quantize_kv(x, scale), scale)
    assert torch.isfinite(got).all()
    assert got.tolist() == [224.0, -224.0, 224.0, -224.0, 224.0, 1.0]


@pytest.mark.parametrize("decode", [True, False])
def test_fp8_cache_reads_back_what_it_stored(decode):
    """paged_attention (and its CPU decode twin) over an fp8 cache with scales != 1 equals
    dense attention over the e4m3-rounded K/V, and stays near the float32 cache's result."""
    g = _seeded()
    page, hkv, group, d = 4, 2, 2, 16
    q_lens = [1, 1] if decode else [5, 3]
    seq_lens = [9, 14] if decode else [5, 12]
    tables = [[3, 0, 5], [1, 6, 2, 4]]
    scales = torch.tensor([0.7, 1.6])
    full_k = [3 * torch.randn(n, hkv, d, generator=g) for n in seq_lens]
    full_v = [torch.randn(n, hkv, d, generator=g) for n in seq_lens]
    full_k[0][-1, 0, 0] = 1e5  # a new key past 448 * k_scale: saturates
    q = torch.randn(sum(q_lens), hkv * group, d, generator=g)
    k_new = torch.cat([k[n - ql :] for k, n, ql in zip(full_k, seq_lens, q_lens)])
    v_new = torch.cat([v[n - ql :] for v, n, ql in zip(full_v, seq_lens, q_lens)])
    caches = {dt: torch.zeros(2, 7, page, hkv, d, dtype=dt) for dt in (FP8_KV_DTYPE, torch.float32)}
    for k, v, n, ql, table in zip(full_k, full_v, seq_lens, q_lens, tables):  # cached prefixes
        prefix = build_metadata([n - ql], [n - ql], [table], page, "cpu")
        for cache in caches.values():
            paged_attention(q[:0], k[: n - ql], v[: n - ql], cache, prefix, 0.25, scales)
    attn = build_metadata(q_lens, seq_lens, tables, page, "cpu")
    fp8 = caches[FP8_KV_DTYPE]
    twin = fp8.clone()
    out = paged_attention(q, k_new, v_new, fp8, attn, 0.25, scales)
    assert torch.isfinite(out).all()
    assert fp8.float().abs().max() == FP8_E4M3_MAX
    start = 0
    for k, v, n, ql in zip(full_k, full_v, seq_lens, q_lens):
        # the oracle's rounding: torch's cast of the clamped values
        k8 = (k / scales[0]).clamp(-448, 448).to(FP8_KV_DTYPE).double() * scales[0]
        v8 = (v / scales[1]).clamp(-448, 448).to(FP8_KV_DTYPE).double() * scales[1]
        want = _dense(q[start : start + ql], k8, v8, 0.25, torch.arange(n - ql, n))
        torch.testing.assert_close(out[start : start + ql].double(), want, atol=1e-5, rtol=1e-5)
        start += ql
    ref32 = paged_attention(q, k_new, v_new, caches[torch.float32], attn, 0.25)
    rows = slice(q_lens[0], None)  # sequence 1: no saturated key, which float32 keeps
    assert ((out[rows] - ref32[rows]).norm() / ref32[rows].norm()) < 0.1
    if decode:
        attn.first_block_if_run = [None, None]
        ours = cpu_paged_attention(q, k_new, v_new, twin, attn, 0.25, scales)
        assert torch.equal(twin.view(torch.uint8), fp8.view(torch.uint8))
        torch.testing.assert_close(ours, out, atol=1e-6, rtol=1e-6)
