"""Triton attention over an fp8 (e4m3) KV cache, on CPU through TRITON_INTERPRET=1.

Oracles: the float64 reference over the dequantized fp8 cache (tight: the kernels must read
exactly what is stored) and the same kernel over the bf16 cache the fp8 one was made from
(loose: what fp8 storage costs, printed with -s). Scales differ from 1 so that a kernel
dropping or inverting one fails.
"""

from __future__ import annotations

import pytest
import torch

from mistralpy.kernels.attention import (
    FP8_E4M3_MAX,
    FP8_KV_DTYPE,
    AttentionMetadata,
    dequantize_kv,
    quantize_kv,
)
from mistralpy.kernels.attention import paged_attention as reference_paged_attention

# first: it sets TRITON_INTERPRET before triton is imported (or reruns in a fresh process)
from tests.kernels import test_triton_attention as bf16_cases  # isort: skip
from tests.kernels.test_triton_attention import PagedCase, make_case, paged_ref
from tests.triton_interp import rerun_in_interpreter

ta = bf16_cases.ta  # the kernel module, built for the interpreter (a fixture)

# max |err| / max |reference| over the dequantized cache, per query dtype (as the bf16 tests)
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
FP8_VS_BF16_REL = 0.1  # ||fp8 - bf16|| / ||bf16||: e4m3 keeps 3 mantissa bits (~3% per value)


@pytest.mark.skipif(bf16_cases.FRESH, reason="the cases below run in this process")
def test_cases_in_fresh_interpreter_process():
    rerun_in_interpreter(__file__)


def random_scales(g) -> torch.Tensor:
    """(k_scale, v_scale) in [0.25, 2): off 1.0, so a dropped or inverted scale shows."""
    return 0.25 + 1.75 * torch.rand(2, generator=g)


def to_fp8(c: PagedCase, scales: torch.Tensor) -> PagedCase:
    """The case with its cache quantized to e4m3 by scales (2,)."""
    cache = quantize_kv(c.kv_cache, scales.view(2, 1, 1, 1, 1))
    return PagedCase(c.q, cache, c.query_start_loc, c.seq_lens, c.block_tables,
                     c.max_query_len, c.scale)  # fmt: skip


def dequantized(c: PagedCase, scales: torch.Tensor) -> PagedCase:
    """The fp8 case with its cache read back to float32 (what the kernels must see)."""
    cache = dequantize_kv(c.kv_cache, scales.view(2, 1, 1, 1, 1))
    return PagedCase(c.q, cache, c.query_start_loc, c.seq_lens, c.block_tables,
                     c.max_query_len, c.scale)  # fmt: skip


def check(out, ref, dtype, what: str) -> None:
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    bound = TOL[dtype] * ref.abs().max().item()
    assert err <= bound, f"{what}: max abs err {err:.3g} > {bound:.3g}"


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp8_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


# ----------------------------------------------------------------------------- store


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 3e38 / k_scale: inf, then 448
def test_store_kv_quantizes_saturates_and_skips(ta):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    nb, page, hkv, d, t = 5, 16, 2, 64, 12
    scales = random_scales(g)
    cache = torch.zeros(2, nb, page, hkv, d, dtype=FP8_KV_DTYPE)
    k = (4 * torch.randn(t, hkv, d, generator=g)).to(torch.bfloat16)
    v = (4 * torch.randn(t, hkv, d, generator=g)).to(torch.bfloat16)
    k[0, 0, :4] = torch.tensor([1e4, -1e4, 449.0 * scales[0], 3e38])  # past 448 * k_scale
    v[1, 1, :2] = torch.tensor([-3e38, 1e5])
    slots = torch.randperm(nb * page, generator=g)[:t]
    slots[5] = -1
    ta.store_kv(k, v, cache, slots, kv_scale=scales)
    keep = slots >= 0
    expect = torch.zeros_like(cache)
    expect[0].view(-1, hkv, d)[slots[keep]] = quantize_kv(k[keep], scales[0])
    expect[1].view(-1, hkv, d)[slots[keep]] = quantize_kv(v[keep], scales[1])
    # bit for bit: the kernel rounds to nearest even as torch's cast does
    assert torch.equal(fp8_bits(cache), fp8_bits(expect))
    flat = cache.view(2, -1, hkv, d).float()
    assert flat[0, slots[0], 0, :4].tolist() == [448, -448, 448, 448]
    assert flat[1, slots[1], 1, :2].tolist() == [-448, 448]
    assert not flat.isnan().any()


def test_store_kv_rounds_every_e4m3_midpoint_as_torch(ta):
    """Values at, just above and just below each midpoint of two e4m3 values, subnormals and
    signed zeros included: ties go to even, a carry bumps the exponent (124 -> 128)."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_KV_DTYPE).float()
    grid = codes[torch.isfinite(codes)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids.nextafter(grid[1:]), mids.nextafter(grid[:-1]),
                   torch.tensor([-0.0, 124.05, 449.0, -1e9, 2.0**-10, -(2.0**-11)])])  # fmt: skip
    x = torch.cat([x, x.new_zeros(-x.numel() % 64)]).view(-1, 1, 64)
    scales = torch.tensor([1.0, 0.75])
    cache = torch.zeros(2, x.shape[0], 1, 1, 64, dtype=FP8_KV_DTYPE)
    ta.store_kv(x, x * 0.75, cache, torch.arange(x.shape[0]), kv_scale=scales)
    assert torch.equal(fp8_bits(cache[0]).flatten(), fp8_bits(quantize_kv(x, 1.0)).flatten())
    assert torch.equal(fp8_bits(cache[1]).flatten(),
                       fp8_bits(quantize_kv(x * 0.75, scales[1])).flatten())  # fmt: skip


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("hkv", "group", "d", "page", "dtype"),
    [(2, 4, 64, 16, torch.float32), (1, 4, 128, 32, torch.bfloat16)],
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_reads_the_stored_values(ta, hkv, group, d, page, dtype, num_splits):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seq_lens = [1, page + 1, int(torch.randint(2, 120, (1,), generator=g))]
    bf16 = make_case(g, [1] * len(seq_lens), seq_lens, hkv, group, d, page, dtype)
    scales = random_scales(g)
    c = to_fp8(bf16, scales)
    plan = ta.DecodePlan(16, num_splits)
    out = ta.paged_decode_attention(
        c.q, c.kv_cache, c.block_tables, c.seq_lens, c.scale, kv_scale=scales, plan=plan
    )
    check(out, paged_ref(dequantized(c, scales)), dtype, "fp8 decode vs dequantized reference")
    base = ta.paged_decode_attention(
        bf16.q, bf16.kv_cache, bf16.block_tables, bf16.seq_lens, bf16.scale, plan=plan
    )
    err = rel_error(out, base)
    print(f"fp8 vs {dtype} KV decode: rel err {err:.4f}")
    assert err < FP8_VS_BF16_REL


# ----------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_prefill_reads_the_stored_values(ta, dtype):
    """Whole prompt, chunk on a cached prefix, a decode row: all read the e4m3 cache."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    page = 16
    query_lens = [21, 1, int(torch.randint(2, 30, (1,), generator=g))]
    prefix = [0, 40, int(torch.randint(1, 50, (1,), generator=g))]
    seq_lens = [ql + p for ql, p in zip(query_lens, prefix)]
    bf16 = make_case(g, query_lens, seq_lens, 2, 2, 64, page, dtype)
    scales = random_scales(g)
    c = to_fp8(bf16, scales)
    args = (c.query_start_loc, c.seq_lens, c.block_tables, c.max_query_len, c.scale)
    out = ta.paged_prefill_attention(c.q, c.kv_cache, *args, kv_scale=scales)
    check(out, paged_ref(dequantized(c, scales)), dtype, "fp8 prefill vs dequantized reference")
    err = rel_error(out, ta.paged_prefill_attention(bf16.q, bf16.kv_cache, *args))
    print(f"fp8 vs {dtype} KV prefill: rel err {err:.4f}")
    assert err < FP8_VS_BF16_REL


# ----------------------------------------------------------------------------- one step


STEPS = {  # (query_lens, seq_lens) of a decode step, a fresh prefill, a chunk on a prefix
    "decode": ([1, 1], [23, 40]),
    "fresh": ([6, 17], [6, 17]),
    "chunked": ([6, 17], [6, 30]),
}


@pytest.mark.parametrize("kind", list(STEPS))
def test_fp8_step_matches_the_cpu_reference(ta, kind):
    """Store then attend (the CUDA backend's step, its Triton kernels on the interpreter)
    equals `kernels.attention.paged_attention` on the same fp8 cache, a new key past
    448 * k_scale included (saturated, never inf/NaN). A fresh prefill attends over the
    unrounded K/V (flash SDPA): close, not equal."""
    from mistralpy.kernels.cuda_attention import CudaPagedAttention

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    page, hkv, d = 16, 2, 64
    query_lens, seq_lens = STEPS[kind]
    c = to_fp8(make_case(g, query_lens, seq_lens, hkv, 2, d, page, torch.float32), torch.ones(2))
    slots = [
        int(c.block_tables[b, pos // page]) * page + pos % page
        for b, (ql, n) in enumerate(zip(query_lens, seq_lens))
        for pos in range(n - ql, n)
    ]
    k = torch.randn(sum(query_lens), hkv, d, generator=g)
    v = torch.randn(sum(query_lens), hkv, d, generator=g)
    scales = random_scales(g)
    unrounded = kind == "fresh"
    if not unrounded:  # (flash SDPA would see the raw outliers)
        k[0, 0, 0] = 1e6 * scales[0]
        v[-1, 1, 3] = -1e6 * scales[1]
    attn = AttentionMetadata(
        query_start_loc=c.query_start_loc, seq_lens=c.seq_lens, block_tables=c.block_tables,
        slot_mapping=torch.tensor(slots), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
    )  # fmt: skip
    ref_cache = c.kv_cache.clone()
    out = CudaPagedAttention()(c.q, k, v, c.kv_cache, attn, c.scale, scales)
    ref = reference_paged_attention(c.q, k, v, ref_cache, attn, c.scale, scales)
    assert torch.isfinite(out).all()
    assert torch.equal(fp8_bits(c.kv_cache), fp8_bits(ref_cache))
    if unrounded:
        assert rel_error(out, ref) < FP8_VS_BF16_REL
        return
    flat = c.kv_cache.view(2, -1, hkv, d).float()
    assert flat[0, slots[0], 0, 0] == FP8_E4M3_MAX and flat[1, slots[-1], 1, 3] == -FP8_E4M3_MAX
    check(out, ref.double(), torch.float32, f"fp8 {kind} step vs the CPU reference")


def test_rejects_bad_scales(ta):
    cache = torch.zeros(2, 4, 16, 2, 64, dtype=FP8_KV_DTYPE)
    with pytest.raises(ta.AttentionInputError, match="kv_scale"):
        ta.store_kv(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), cache,
                    torch.zeros(1, dtype=torch.int64), kv_scale=torch.ones(2, dtype=torch.float64))  # fmt: skip
