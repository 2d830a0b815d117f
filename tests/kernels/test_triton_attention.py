"""Triton attention kernels vs a float64 PyTorch reference, on CPU through TRITON_INTERPRET=1.

Fresh random inputs every run: shuffled (non-contiguous) block tables, query/sequence lengths
including 1 and block-boundary values, GQA ratios, head_dim 64/128, block sizes 16/32 and
fp32/fp16/bf16. The reference gathers K/V through the block tables and runs an explicit
softmax in float64.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# triton decides interpreter-or-compiler when each @jit function is defined, its own standard
# library (tl.sum, tl.cdiv, ...) included, so TRITON_INTERPRET must be set before triton is
# first imported. If another module got there first, the cases run in a fresh subprocess.
FRESH = "triton" not in sys.modules
if FRESH:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (imported now, while TRITON_INTERPRET is set)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.triton_interp import rerun_in_interpreter  # noqa: E402

# Error bound relative to max |reference|, per storage precision: the kernels round P to the
# value dtype before the PV product (as flash attention does) and round the output once.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ROPE_TOL = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2}  # relative to max |x|: ~2 ulp


@pytest.mark.skipif(FRESH, reason="the cases below run in this process")
def test_cases_in_fresh_interpreter_process():
    rerun_in_interpreter(__file__)


@pytest.fixture(scope="module")
def ta():
    """The kernel module, its kernels built for the CPU interpreter."""
    if not FRESH:
        pytest.skip("triton was imported before TRITON_INTERPRET was set")
    import importlib

    mod = importlib.import_module("mistralpy.kernels.triton_attention")
    if type(mod._flash_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod


# ----------------------------------------------------------------------------- helpers


@dataclass
class PagedCase:
    q: torch.Tensor  # (T, Hq, D)
    kv_cache: torch.Tensor  # (2, NB, BS, Hkv, D)
    query_start_loc: torch.Tensor  # (B+1,) int32
    seq_lens: torch.Tensor  # (B,) int32
    block_tables: torch.Tensor  # (B, max_blocks) int32
    max_query_len: int
    scale: float


def make_case(g, query_lens, seq_lens, hkv, group, d, page, dtype, extra_cols=1) -> PagedCase:
    """Random cache + queries; each sequence's blocks are a random subset of a shuffled pool."""
    need = [-(-n // page) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(need) + extra_cols
    bt = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(need):
        bt[b, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    cache = torch.randn(2, num_blocks, page, hkv, d, generator=g).to(dtype)
    total = sum(query_lens)
    q = (2.0 * torch.randn(total, hkv * group, d, generator=g) * d**-0.5).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedCase(
        q, cache, qsl, torch.tensor(seq_lens, dtype=torch.int32), bt, max(query_lens), d**-0.5
    )


def attend_ref(q, k, v, positions, scale):
    """q (Lq, Hq, D), k/v (Lk, Hkv, D), positions (Lq,) or None (non-causal) -> float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if positions is not None:
        keys = torch.arange(k.shape[0])
        s = s.masked_fill(keys[None, None, :] > positions[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def paged_ref(c: PagedCase) -> torch.Tensor:
    """Gather each sequence's K/V through its block table; causal on absolute positions."""
    outs = []
    page = c.kv_cache.shape[2]
    for b in range(c.seq_lens.shape[0]):
        n = int(c.seq_lens[b])
        lo, hi = int(c.query_start_loc[b]), int(c.query_start_loc[b + 1])
        blocks = c.block_tables[b, : -(-n // page)].long()
        k = c.kv_cache[0, blocks].flatten(0, 1)[:n]
        v = c.kv_cache[1, blocks].flatten(0, 1)[:n]
        positions = torch.arange(n - (hi - lo), n)
        outs.append(attend_ref(c.q[lo:hi], k, v, positions, c.scale))
    return torch.cat(outs)


def assert_close(out, ref, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    bound = TOL[dtype] * ref.abs().max().item()
    assert err <= bound, f"max abs err {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------- store_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_scatters_and_skips_negative_slots(ta, dtype):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    nb, page, hkv, d, t = 7, 16, 2, 64, 20
    cache = torch.randn(2, nb, page, hkv, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    slots = torch.randperm(nb * page, generator=g)[:t]
    slots[torch.randperm(t, generator=g)[:5]] = -1
    expect = cache.clone()
    keep = slots >= 0
    expect[0].view(-1, hkv, d)[slots[keep]] = k[keep]
    expect[1].view(-1, hkv, d)[slots[keep]] = v[keep]
    ta.store_kv(k, v, cache, slots)
    assert torch.equal(cache, expect)


@pytest.mark.parametrize(
    ("dtype", "fp8"), [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)]
)
def test_rope_store_kv_matches_rope_then_store(ta, dtype, fp8):
    """One launch = reference rope_qk on q and k (in place, on the model's strided qkv
    views), then the reference store of the rotated k and v (fp8: quantized by the layer's
    scales); slots of -1 write nothing."""
    from mistralpy.kernels.attention import FP8_KV_DTYPE, quantize_kv
    from mistralpy.kernels.fused_ops import rope_qk

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    nb, page, hkv, group, d, t = 6, 16, 2, 3, 64, 9
    hq = hkv * group
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    angles = torch.rand(t, d // 2, generator=g) * 100
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(nb * page, generator=g)[:t]
    slots[torch.randperm(t, generator=g)[:3]] = -1
    scales = 0.25 + 1.75 * torch.rand(2, generator=g) if fp8 else None
    cache = torch.randn(2, nb, page, hkv, d, generator=g)
    cache = quantize_kv(cache, torch.ones(())) if fp8 else cache.to(dtype)

    want_q, want_k = rope_qk(q, k, cos, sin)
    want = cache.clone()
    ta.rope_store_kv(q, k, v, cos, sin, cache, slots, scales)
    # the same rounding steps; the interpreter's float32 -> bf16 cast truncates (1 ulp)
    for got, ref in ((q, want_q), (k, want_k)):
        err = (got.double() - ref.double()).abs().max().item()
        assert err <= ROPE_TOL[dtype] * ref.abs().max().item(), err
    keep = slots >= 0  # the cache holds exactly the rotated k (and v) the reference stores
    for i, x in enumerate((k, v)):
        rows = quantize_kv(x[keep], scales[i]) if fp8 else x[keep]
        want[i].view(-1, hkv, d)[slots[keep]] = rows
    assert cache.dtype == (FP8_KV_DTYPE if fp8 else dtype)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("hkv", "group", "d", "page", "dtype"),
    [
        (2, 4, 64, 16, torch.float32),
        (1, 8, 128, 32, torch.bfloat16),
        (2, 2, 64, 32, torch.float16),
        (4, 1, 64, 16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_matches_reference(ta, hkv, group, d, page, dtype, num_splits):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    # lengths: 1, exact block boundaries, +1 past one, and random ones
    seq_lens = [1, page, page + 1, 2 * page - 1, int(torch.randint(1, 200, (1,), generator=g))]
    c = make_case(g, [1] * len(seq_lens), seq_lens, hkv, group, d, page, dtype)
    # force the single-split and the split+reduce paths (3 splits: some empty for short rows)
    plan = None if num_splits is None else ta.DecodePlan(16, num_splits)
    out = ta.paged_decode_attention(c.q, c.kv_cache, c.block_tables, c.seq_lens, c.scale, plan=plan)
    assert_close(out, paged_ref(c), dtype)


def test_decode_padding_row_gives_zeros(ta):
    """seq_len 0 marks a padding row of a CUDA-graph batch bucket: zeros, never NaN."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    c = make_case(g, [1, 1], [37, 5], 2, 2, 64, 16, torch.float32)
    c.seq_lens[1] = 0
    for splits in (1, 2):
        plan = ta.DecodePlan(16, splits)
        out = ta.paged_decode_attention(
            c.q[:2], c.kv_cache, c.block_tables, c.seq_lens, c.scale, plan=plan
        )
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("hkv", "group", "d", "num_splits"),
    [(2, 4, 64, 5), (1, 8, 128, 13), (3, 3, 64, 4)],  # 13 splits of 8 x 128: merged 4 at a time
)
def test_decode_last_split_merges_and_resets_counters(ta, hkv, group, d, num_splits):
    """Split-K decode merges in the launch: with a reused scratch, the arrival counters are back
    at 0 after each call and two calls give bit-identical outputs (the merge order does not
    depend on which split finished last); rows shorter than the split count leave some splits
    empty, a padding row (seq_len 0) gives zeros."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seq_lens = [3, 16, 150, int(torch.randint(17, 300, (1,), generator=g)), 0]
    c = make_case(g, [1] * len(seq_lens), [max(n, 1) for n in seq_lens], hkv, group, d, 16,
                  torch.float32)  # fmt: skip
    c.seq_lens[-1] = 0
    plan = ta.DecodePlan(16, num_splits)
    scratch = ta.decode_scratch(len(seq_lens), hkv * group, hkv, d, num_splits, "cpu")
    runs = []
    for _ in range(2):
        runs.append(ta.paged_decode_attention(
            c.q, c.kv_cache, c.block_tables, c.seq_lens, c.scale, plan=plan, scratch=scratch
        ))  # fmt: skip
        assert torch.equal(scratch.arrivals, torch.zeros_like(scratch.arrivals))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][-1], torch.zeros_like(runs[0][-1]))
    c.seq_lens[-1] = 1  # the reference attends over >= 1 key: compare the real rows only
    assert_close(runs[0][:-1], paged_ref(c)[:-1], torch.float32)


def test_decode_rejects_scratch_of_another_shape(ta):
    g = torch.Generator().manual_seed(0)
    c = make_case(g, [1, 1], [40, 9], 2, 2, 64, 16, torch.float32)
    scratch = ta.decode_scratch(1, 4, 2, 64, 3, "cpu")
    with pytest.raises(ta.AttentionInputError, match="scratch"):
        ta.paged_decode_attention(c.q, c.kv_cache, c.block_tables, c.seq_lens, c.scale,
                                  plan=ta.DecodePlan(16, 3), scratch=scratch)  # fmt: skip


def test_plan_decode_fills_sms_for_one_long_sequence(ta):
    plan = ta.plan_decode(batch=1, num_kv_heads=8, max_context=131072, num_sms=132)
    assert 8 * plan.num_splits >= 2 * 132  # at least two waves of programs
    big_batch = ta.plan_decode(batch=128, num_kv_heads=8, max_context=1024, num_sms=132)
    assert big_batch.num_splits == 1
    short = ta.plan_decode(batch=1, num_kv_heads=8, max_context=100, num_sms=132)
    assert short.num_splits == 2  # never more splits than tiles


# ----------------------------------------------------------------------------- prefill


@pytest.mark.parametrize(
    ("hkv", "group", "d", "page", "dtype"),
    [
        (2, 4, 64, 16, torch.float32),
        (1, 4, 128, 32, torch.bfloat16),
        (2, 1, 64, 16, torch.float16),
    ],
)
def test_prefill_mixed_batch_matches_reference(ta, hkv, group, d, page, dtype):
    """Whole prompts, chunks on a cached prefix, a decode row and a block-boundary chunk."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    query_lens = [37, 1, 20, page, int(torch.randint(1, 40, (1,), generator=g))]
    prefix = [0, 50, 2 * page - 3, page, int(torch.randint(0, 60, (1,), generator=g))]
    seq_lens = [ql + p for ql, p in zip(query_lens, prefix)]
    c = make_case(g, query_lens, seq_lens, hkv, group, d, page, dtype)
    out = ta.paged_prefill_attention(
        c.q, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_tables, c.max_query_len, c.scale
    )
    assert_close(out, paged_ref(c), dtype)


@settings(max_examples=12, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 70)), min_size=1, max_size=3),
    block_m=st.sampled_from([16, 32]),
    block_n=st.sampled_from([16, 32]),
    page=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_prefill_any_lengths_and_tiles(ta, data, block_m, block_n, page, seed):
    """Property: any (query_len, cached prefix) mix and tile shape equals the reference."""
    g = torch.Generator().manual_seed(seed)
    query_lens = [ql for ql, _ in data]
    seq_lens = [ql + p for ql, p in data]
    c = make_case(g, query_lens, seq_lens, 2, 2, 64, page, torch.float32)
    cfg = ta.TileConfig(block_m, block_n, num_warps=4, num_stages=1)
    out = ta.paged_prefill_attention(
        c.q, c.kv_cache, c.query_start_loc, c.seq_lens, c.block_tables, c.max_query_len,
        c.scale, config=cfg,
    )  # fmt: skip
    assert_close(out, paged_ref(c), torch.float32)


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("dtype", "hkv"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_varlen_matches_reference(ta, causal, dtype, hkv):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    lens = [33, 1, 16, int(torch.randint(1, 50, (1,), generator=g))]
    t, h, d = sum(lens), 4, 64
    q = torch.randn(t, h, d, generator=g).to(dtype)
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out = ta.varlen_attention(q, k, v, cu, max(lens), causal=causal)
    refs = []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pos = torch.arange(hi - lo) if causal else None
        refs.append(attend_ref(q[lo:hi], k[lo:hi], v[lo:hi], pos, d**-0.5))
    assert_close(out, torch.cat(refs), dtype)


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("decode", [True, False])
def test_paged_attention_stores_then_attends(ta, decode):
    """The CUDA backend's step (store, then the Triton decode or prefill kernel) writes the new
    K/V at slot_mapping, then reads them back causally."""
    from mistralpy.kernels.attention import AttentionMetadata
    from mistralpy.kernels.cuda_attention import CudaPagedAttention

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    page, hkv, d = 16, 2, 64
    query_lens = [1, 1] if decode else [5, 18]
    seq_lens = [23, 40] if decode else [5, 30]
    c = make_case(g, query_lens, seq_lens, hkv, 2, d, page, torch.float32)
    slots = []
    for b, (ql, n) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(n - ql, n):
            slots.append(int(c.block_tables[b, pos // page]) * page + pos % page)
    k = torch.randn(sum(query_lens), hkv, d, generator=g)
    v = torch.randn(sum(query_lens), hkv, d, generator=g)
    attn = AttentionMetadata(
        query_start_loc=c.query_start_loc, seq_lens=c.seq_lens, block_tables=c.block_tables,
        slot_mapping=torch.tensor(slots), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
    )  # fmt: skip
    backend = CudaPagedAttention()
    backend.decode_plans[(2, c.block_tables.shape[1])] = ta.DecodePlan(16, 3)
    out = backend(c.q, k, v, c.kv_cache, attn, c.scale)
    flat = c.kv_cache.view(2, -1, hkv, d)
    assert torch.equal(flat[0, torch.tensor(slots)], k)
    assert_close(out, paged_ref(c), torch.float32)
    if decode:  # split-K (a tuned plan): the kept scratch is left reusable
        assert torch.equal(backend(c.q, k, v, c.kv_cache, attn, c.scale), out)
        (scratch,) = backend.decode_scratch.values()
        assert not scratch.arrivals.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_attention_with_rope_in_the_store_matches_reference(ta, dtype):
    """A decoder attention layer routed as on CUDA (RoPE fused into the K/V store, Triton
    attention) vs the reference route (reference rope_qk, then the reference paged attention):
    a prefill, then decode steps of two sequences; outputs and caches agree."""
    from mistralpy.kernels.attention import build_metadata, paged_attention
    from mistralpy.kernels.cuda_attention import CudaPagedAttention
    from mistralpy.model.config import TextConfig
    from mistralpy.model.layers import text_rope
    from mistralpy.model.mistral3 import MistralAttention

    torch.manual_seed(torch.seed() % 2**31)
    cfg = TextConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                     rope_theta=1e6, max_position_embeddings=256)  # fmt: skip
    ref_layer = MistralAttention(cfg, paged_attention).to(dtype)
    fused = MistralAttention(cfg, paged_attention).to(dtype)
    fused.load_state_dict(ref_layer.state_dict())
    backend = CudaPagedAttention()
    fused.attn_fn, fused.rope_attn_fn = backend, backend.rope_and_attend
    page, tables = 16, [[3, 0, 5], [1, 4, 2]]
    caches = [torch.zeros(2, 6, page, 2, 32, dtype=dtype) for _ in range(2)]
    lens = [0, 0]
    for query_lens in ([5, 19], [1, 1], [1, 1], [1, 1]):
        lens = [n + q for n, q in zip(lens, query_lens)]
        attn = build_metadata(query_lens, lens, tables, page, "cpu")
        pos = torch.cat([torch.arange(n - q, n) for n, q in zip(lens, query_lens)])
        cos, sin = text_rope(pos, cfg.rope_theta, cfg.head_dim, dtype)
        x = torch.randn(len(pos), cfg.hidden_size).to(dtype)
        with torch.inference_mode():
            want = ref_layer(x, cos, sin, caches[0], attn)
            got = fused(x, cos, sin, caches[1], attn)
        assert_close(got, want.double(), dtype)
        assert_close(caches[1], caches[0].double(), dtype)


def test_rejects_mismatched_inputs(ta):
    cache = torch.zeros(2, 4, 16, 2, 64)
    with pytest.raises(ta.AttentionInputError, match="q"):
        ta.paged_decode_attention(
            torch.zeros(1, 3, 64), cache, torch.zeros(1, 2, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 0.1,
        )  # fmt: skip
    with pytest.raises(ta.AttentionInputError, match="block_size"):
        ta.store_kv(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), torch.zeros(2, 4, 12, 2, 64),
                    torch.zeros(1, dtype=torch.int64))  # fmt: skip
