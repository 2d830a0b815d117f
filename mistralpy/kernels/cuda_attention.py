"""The CUDA attention backends: which kernel runs each kind of step.

Chosen once by the runner (`Mistral3ForConditionalGeneration.set_attention_backend`); imports
triton at the top, so only import it on CUDA. Contracts: `kernels.attention`.

- decode (one new token per sequence): Triton split-K paged decode. Its launch depends only on
  the batch rows and the block-table width, so a runner that pads both to fixed sizes can
  capture it in a CUDA graph.
- prefill with no cached prefix (every sequence's new tokens are all its tokens): PyTorch's
  flash SDPA per sequence on the fresh contiguous K/V (555 vs 375 TFLOP/s for our Triton
  prefill at 8k tokens on an H100); K/V are still stored in the cache for later steps. With
  an fp8 cache this step attends over the unrounded bf16 K/V (as vLLM's flash path does):
  they are at hand, and only later steps read the e4m3 copy.
- anything else (chunked prefill, prefix-cache hits, prefill mixed with decodes): the Triton
  varlen paged prefill kernel.
- vision encoder: flash SDPA per image (4-D inputs: the reference's 3-D call takes the math
  kernel on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralpy.kernels import triton_attention as ta
from mistralpy.kernels.attention import AttentionMetadata, kv_bytes_view, zeros_kv_cache


class CudaPagedAttention:
    """`PagedAttentionFn` for CUDA: store k, v (T, Hkv, D), attend q (T, Hq, D) -> (T, Hq, D).

    Decode launches use a plan tuned per (batch rows, block-table width) when `tune_decode`
    measured one (the runner tunes its graph buckets before capture), else the kernel's
    default, and a split-K scratch kept per launch shape (its counters stay zeroed, so a
    captured graph replays with the buffers it captured and no memset). Host-side lookups
    only: capturable. One instance serves one stream at a time (a model's layers in turn).
    """

    def __init__(self) -> None:
        self.decode_plans: dict[tuple[int, int], ta.DecodePlan] = {}
        # keyed by (device, batch rows, query heads, KV heads, head_dim, splits)
        self.decode_scratch: dict[tuple, ta.DecodeScratch] = {}

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ta.store_kv(k, v, kv_cache, attn.slot_mapping, kv_scale)
        return self._attend_stored(q, k, v, kv_cache, attn, scale, kv_scale)

    def rope_and_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`RopePagedAttentionFn`: RoPE on q, k (in place) and the K/V store in one launch
        (`ta.rope_store_kv`), then this step's attention as `__call__`."""
        ta.rope_store_kv(q, k, v, cos, sin, kv_cache, attn.slot_mapping, kv_scale)
        return self._attend_stored(q, k, v, kv_cache, attn, scale, kv_scale)

    def _attend_stored(self, q, k, v, kv_cache, attn: AttentionMetadata, scale, kv_scale):
        """Attention of q (T, Hq, D) once this step's k, v (T, Hkv, D) are in the cache."""
        if attn.max_query_len == 1 and q.shape[0] == attn.seq_lens.shape[0]:
            plan = self.decode_plans.get((q.shape[0], attn.block_tables.shape[1]))
            return self.decode(q, kv_cache, attn.block_tables, attn.seq_lens, scale, kv_scale, plan)
        if attn.query_lens_cpu == attn.seq_lens_cpu:
            return fresh_causal_attention(q, k, v, attn.query_lens_cpu, scale)
        return ta.paged_prefill_attention(
            q, kv_cache, attn.query_start_loc, attn.seq_lens, attn.block_tables,
            attn.max_query_len, scale, kv_scale=kv_scale,
        )  # fmt: skip

    def decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        kv_scale: torch.Tensor | None,
        plan: ta.DecodePlan | None,
    ) -> torch.Tensor:
        """`ta.paged_decode_attention` with this backend's scratch for the launch shape
        (plan None: the kernel's default)."""
        plan = plan or ta.default_decode_plan(q, kv_cache, block_tables)
        _, _, _, hkv, d = kv_cache.shape
        key = (q.device, q.shape[0], q.shape[1], hkv, d, plan.num_splits)
        scratch = self.decode_scratch.get(key)
        if scratch is None and plan.num_splits > 1:
            scratch = ta.decode_scratch(*key[1:], q.device)
            self.decode_scratch[key] = scratch
        return ta.paged_decode_attention(
            q, kv_cache, block_tables, seq_lens, scale, kv_scale=kv_scale, plan=plan,
            scratch=scratch,
        )  # fmt: skip

    def warm_up(self, kv_cache: torch.Tensor, num_heads: int, q_dtype: torch.dtype) -> None:
        """Compile the paged prefill kernel now, not in the first step that mixes prefill
        with decode rows (measured on an H200: that step took 1.31 s vs 0.59 s for the same
        work later). Triton compiles one variant per tile config (short and long queries)
        and per block-table stride that is or is not a multiple of 16 (it specializes integer
        arguments on that); each is launched once here, on a small scratch cache of the
        cache's dtype (queries in `q_dtype`, the model's: an fp8 cache compiles fp8 variants)."""
        _, _, page, hkv, d = kv_cache.shape
        dev, dtype = kv_cache.device, kv_cache.dtype
        for qlen in (16, ta.SHORT_QUERY_TOKENS + 16):
            seq = qlen + page  # one cached block before the new tokens
            blocks = -(-seq // page)
            scratch = zeros_kv_cache((2, blocks, page, hkv, d), dtype, dev)
            q = torch.zeros(qlen, num_heads, d, dtype=q_dtype, device=dev)
            qsl = torch.tensor([0, qlen], dtype=torch.int32, device=dev)
            lens = torch.tensor([seq], dtype=torch.int32, device=dev)
            for width in (blocks + (16 - blocks % 16) % 16, 16 * (blocks // 16 + 1) + 1):
                tables = torch.zeros(1, width, dtype=torch.int32, device=dev)
                tables[0, :blocks] = torch.arange(blocks, device=dev)
                ta.paged_prefill_attention(q, scratch, qsl, lens, tables, qlen, d**-0.5)

    def tune_decode(
        self,
        kv_caches: list[torch.Tensor],
        rows: int,
        width: int,
        num_heads: int,
        context: int,
        q_dtype: torch.dtype,
    ) -> ta.DecodePlan:
        """Time launch plans (tile, warps, split count) for decode of `rows` sequences of
        `context` tokens through (rows, width) block tables, as a decode step runs them: one
        launch per layer's cache in a captured CUDA graph (each layer's K/V is read once per
        replay, from HBM, and a sequence's blocks follow each other as the block manager
        hands them out), queries in `q_dtype`, the model's. Keeps the fastest; the default
        plan is a candidate, so tuning never loses at this context. Overwrites the caches'
        first blocks: call it before the cache holds anything."""
        _, num_blocks, page, hkv, d = kv_caches[0].shape
        per_seq = -(-context // page)
        dev = kv_caches[0].device
        blocks = torch.arange(rows * per_seq, device=dev, dtype=torch.int32) % num_blocks
        tables = torch.zeros(rows, width, dtype=torch.int32, device=dev)
        tables[:, :per_seq] = blocks.view(rows, per_seq)
        # random, not zero, K/V (drawn in float32 and cast: randn has no fp8 kernel; unit
        # scales read them back)
        used = torch.arange(min(rows * per_seq, num_blocks), device=dev)
        fill = torch.randn((2, used.numel(), *kv_caches[0].shape[2:]), device=dev)
        fill_bytes = kv_bytes_view(fill.to(kv_caches[0].dtype))
        for cache in kv_caches:
            kv_bytes_view(cache)[:, used] = fill_bytes
        del fill, fill_bytes
        lens = torch.full((rows,), context, dtype=torch.int32, device=dev)
        q = torch.randn(rows, num_heads, d, dtype=q_dtype, device=dev)
        unit = torch.ones(2, dtype=torch.float32, device=dev)  # an fp8 cache's scales
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        candidates = {ta.plan_decode(rows, hkv, width * page, sms)}
        for block_n in (64, 128):
            tiles = -(-context // block_n)
            for warps in (4, 8):
                for waves in (1, 2, 4):
                    splits = max(1, min(tiles, -(-waves * sms // (rows * hkv))))
                    candidates.add(ta.DecodePlan(block_n, splits, warps))

        def step_ms(plan: ta.DecodePlan) -> float:
            def step() -> None:
                for cache in kv_caches:
                    self.decode(q, cache, tables, lens, d**-0.5, unit, plan)

            step()  # compiles, and makes the scratch outside the capture
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            return _time_launches(graph.replay, repeats=5)

        best = min(sorted(candidates, key=str), key=step_ms)
        self.decode_plans[(rows, width)] = best
        return best


def cuda_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`PagedAttentionFn` with the default decode plans (see `CudaPagedAttention`)."""
    return CudaPagedAttention()(q, k, v, kv_cache, attn, scale, kv_scale)


def _time_launches(fn, repeats: int = 20) -> float:
    """Median time of `fn` over a few event-timed bursts (after a warm-up that compiles)."""
    fn()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1]


def fresh_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float
) -> torch.Tensor:
    """Causal GQA attention of packed whole sequences: q (T, Hq, D), k/v (T, Hkv, D),
    sequence i = the next lens[i] rows -> (T, Hq, D)."""
    return _per_segment_sdpa(q, k, v, lens, scale, causal=True)


def sdpa_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float
) -> torch.Tensor:
    """`VarlenAttentionFn` for CUDA: bidirectional attention within each segment of
    q, k, v (N, H, D) -> (N, H, D)."""
    lens = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    return _per_segment_sdpa(q, k, v, lens, scale, causal=False)


def _per_segment_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float, causal: bool
) -> torch.Tensor:
    """SDPA over each run of lens[i] rows, as (1, H, L, D) views: flash takes 4-D inputs with
    a unit last stride and reads GQA heads itself (enable_gqa), no copies of K/V."""
    if len(lens) == 1:  # the common case: no output copy
        out = _sdpa_4d(q, k, v, scale, causal)
        return out[0].transpose(0, 1)
    out = torch.empty_like(q)
    start = 0
    for n in lens:
        rows = slice(start, start + n)
        out[rows] = _sdpa_4d(q[rows], k[rows], v[rows], scale, causal)[0].transpose(0, 1)
        start += n
    return out


def _sdpa_4d(q, k, v, scale: float, causal: bool) -> torch.Tensor:
    """q (L, Hq, D), k/v (L, Hkv, D) -> (1, Hq, L, D)."""
    return F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
