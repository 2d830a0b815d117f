"""Triton attention over the paged KV cache (CUDA fast path; runs on CPU under TRITON_INTERPRET=1).

This module imports triton at the top, so nothing in the package imports it eagerly: the
backend is chosen once, and only then is this module imported (`import mistralpy` must work
on a box without triton). Layout contract: `mistralpy/kernels/attention.py`. One layer's cache
is `(2, num_blocks, block_size, num_kv_heads, head_dim)`, `[0]` keys and `[1]` values; token i
of a sequence sits in block `block_table[i // block_size]` at offset `i % block_size`.

Kernels:
- `store_kv`: scatter the step's new K/V rows into their cache slots (-1 = skip).
- `rope_store_kv`: RoPE on the step's q and k in place, then `store_kv`, in one launch.
- `paged_decode_attention`: one query per sequence, split-K ("flash-decoding") so a single
  long sequence fills the GPU; every query head of a KV group is handled by one program so
  each K/V tile is read once. The last split of a (sequence, KV head) to finish merges all
  splits' partials in the same launch. Fixed grid for fixed shapes: CUDA-graph capturable.
- `paged_prefill_attention`: varlen causal flash attention for new tokens that sit at the end
  of their sequence (chunked prefill, prefix-cache hits, mixed prefill+decode batches).
- `varlen_attention`: the same kernel over contiguous K/V (vision encoder, one image per seq).
Softmax runs in base 2 (scale folded with log2(e)); accumulation is always float32.

fp8 caches (float8 e4m3, `kernels.attention` describes the scales): `store_kv` quantizes as it
writes; decode and paged prefill load the e4m3 tiles and widen them to the query dtype in
registers (exact: every e4m3 value is a bf16/fp16 value), so no dequantized copy of the cache
exists. The layer's scales are not applied per element: k_scale folds into the logits' scale
(q . (k s) = s (q . k)) and v_scale into the output (sum p (v s) = s sum p v). They are read
from a device tensor, so a CUDA graph replays with whatever the tensor holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mistralpy.kernels.attention import (
    FP8_E4M3_MAX,
    is_fp8_cache,
    kv_scales_or_unit,
)
from mistralpy.kernels.triton_fused import rotated_heads

_LOG2E = 1.4426950408889634
# a constexpr: a jit function may read a module global only as one (plain floats fail to compile)
_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of the flash-attention (prefill / varlen) kernel."""

    block_m: int  # query rows per program (power of two, >= 16)
    block_n: int  # keys per inner-loop tile (power of two, >= 16)
    num_warps: int
    num_stages: int


class AttentionInputError(ValueError):
    """A tensor handed to a Triton attention entry point has the wrong shape, dtype or device."""


# --------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    """acc + a (M, K) @ b (K, N) in float32 (acc None: zero); accumulating inside the MMA
    saves a pass over acc. F32_DOT: exact fp32 matmul (fp32 inputs; and the CPU interpreter,
    whose bf16 dot is broken in triton 3.9: it multiplies raw uint16 bits)."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _kv_row_offsets(
    offs_n,
    mask,
    bt_row_ptr,
    kv_start,
    stride_blk,
    stride_row,
    PAGE: tl.constexpr,
    PAGED: tl.constexpr,
):
    """Element offsets (int64) of key positions `offs_n` in the K (or V) tensor of one head.
    Paged: through the sequence's block table; else contiguous rows starting at kv_start."""
    if PAGED:
        blk = tl.load(bt_row_ptr + offs_n // PAGE, mask=mask, other=0).to(tl.int64)
        return blk * stride_blk + (offs_n % PAGE).to(tl.int64) * stride_row
    else:
        return (kv_start + offs_n).to(tl.int64) * stride_row


@triton.jit
def _softmax_step(
    acc, m_i, l_i, q, k_t, v, qk_scale, mask, MASKED: tl.constexpr, F32_DOT: tl.constexpr
):
    """One online-softmax update: q (M, D), k_t (D, N), v (N, D), mask (M, N) or None.
    m_i, l_i (M,) are the running max / sum of scaled base-2 logits; acc (M, D) float32.
    qk_scale > 0 commutes with max, so scaling fuses into the exponent's FMA."""
    s = _dot(q, k_t, None, F32_DOT)
    if MASKED:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], F32_DOT)
    return acc, m_new, l_i


# --------------------------------------------------------------------------------------
# store_kv
# --------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,
    stride_c_blk,
    stride_c_row,
    kv_scale_ptr,
    PAGE: tl.constexpr,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
    FP8: tl.constexpr,
):
    """One program per new token: copy its (Hkv*D) K and V rows to the cache slot.
    FP8: store e4m3(clamp(x / scale, +-448)), the layer's (k, v) scales at kv_scale_ptr."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    # (slot broadcast to a block first: the interpreter mishandles scalar & block masks)
    mask = (offs < ROW) & ((offs * 0 + slot) >= 0)
    dst = (slot // PAGE) * stride_c_blk + (slot % PAGE) * stride_c_row + offs
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
    if FP8:
        k = _to_e4m3(k, tl.load(kv_scale_ptr), kc_ptr.dtype.element_ty)
        v = _to_e4m3(v, tl.load(kv_scale_ptr + 1), vc_ptr.dtype.element_ty)
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


@triton.jit
def _to_e4m3(x, scale, FP8_TY: tl.constexpr):
    """e4m3 of x / scale saturated to +-448, rounded to nearest even: the reference's
    `quantize_kv` bit for bit. The clamp comes first: a cast past 448 is NaN in e4m3fn (no
    inf). Division, not a multiply by 1/scale, as the reference. The rounding is done here in
    float32, so the cast only meets e4m3 values and any conversion path is exact (the CPU
    interpreter's truncating one turns 124 into 64 on its own)."""
    y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -_E4M3_MAX), _E4M3_MAX)
    # normal range: keep 3 of float32's 23 mantissa bits, ties to even (a carry may bump the
    # exponent, as rounding up should)
    bits = y.to(tl.uint32, bitcast=True)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    # subnormal range (|y| < 2^-6): multiples of 2^-9; adding 1.5 * 2^14, whose float32 ulp
    # is 2^-9, rounds to them (ties to even), and subtracting it back is exact; the sign is
    # put back so that -0.0 and tiny negatives give e4m3's -0 as the reference does
    sub = ((tl.abs(y) + 24576.0) - 24576.0).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
    r = tl.where(tl.abs(y) < 0.015625, sub, normal)
    return r.to(tl.float32, bitcast=True).to(FP8_TY)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
):
    """Write k, v (T, Hkv, D) into kv_cache (2, NB, BS, Hkv, D) at slot_mapping (T,) int;
    slots < 0 are skipped. An fp8 cache stores them quantized by kv_scale (2,) float32
    (None: 1.0). In place, no host sync."""
    page, hkv, d = _check_new_kv(k, v, kv_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    row = hkv * d
    fp8, scales = _kv_scales(kv_cache, kv_scale)
    _store_kv_kernel[(k.shape[0],)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), v.stride(0),
        kv_cache.stride(1), kv_cache.stride(2), scales,
        PAGE=page, ROW=row, ROW_PAD=triton.next_power_of_2(row), FP8=fp8,
    )  # fmt: skip


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, kv_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
    stride_c_blk, stride_c_row, stride_c_h,
    PAGE: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    """Program per new token: RoPE on its query and key heads in place, then its rotated K and
    its V rows to the cache slot (skipped if < 0), as `_store_kv_kernel` writes them."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D)
    c = tl.load(cos_ptr + t * stride_ct + offs_d).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + offs_d).to(tl.float32)
    q_row = q_ptr + t * stride_qt
    q, q_mask = rotated_heads(q_row, stride_qh, c, s, offs_d, HQ, HQ_PAD, D)
    tl.store(q_row + tl.arange(0, HQ_PAD)[:, None] * stride_qh + offs_d[None, :], q, mask=q_mask)
    offs_h = tl.arange(0, HK_PAD)
    k_row = k_ptr + t * stride_kt
    k, k_mask = rotated_heads(k_row, stride_kh, c, s, offs_d, HK, HK_PAD, D)
    tl.store(k_row + offs_h[:, None] * stride_kh + offs_d[None, :], k, mask=k_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    # (slot broadcast to a block first: the interpreter mishandles scalar & block masks)
    mask = k_mask & ((offs_h * 0 + slot) >= 0)[:, None]
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8:
        k = _to_e4m3(k, tl.load(kv_scale_ptr), kc_ptr.dtype.element_ty)
        v = _to_e4m3(v, tl.load(kv_scale_ptr + 1), vc_ptr.dtype.element_ty)
    dst = (slot // PAGE) * stride_c_blk + (slot % PAGE) * stride_c_row
    dst = dst + offs_h[:, None] * stride_c_h + offs_d[None, :]
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """`fused_ops.rope_qk` on q (T, Hq, D) and k (T, Hkv, D) in place (cos/sin (T, D)), then
    `store_kv` of the rotated k and v (T, Hkv, D): one launch instead of two. q, k, v may be
    strided views (the model's qkv split) with unit-stride rows; cos/sin unit-stride rows."""
    page, hkv, d = _check_new_kv(k, v, kv_cache, slot_mapping)
    t, hq = _check_query(q, kv_cache, "q")
    if t != k.shape[0] or cos.shape != (t, d) or sin.shape != (t, d):
        raise AttentionInputError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, cos/sin (T, D)")
    if max(x.stride(-1) for x in (q, k, v, cos, sin)) != 1:
        raise AttentionInputError("rope_store_kv: q, k, v, cos and sin need unit-stride rows")
    if t == 0:
        return
    fp8, scales = _kv_scales(kv_cache, kv_scale)
    _rope_store_kv_kernel[(t,)](
        q, k, v, cos, sin, kv_cache[0], kv_cache[1], slot_mapping, scales,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        PAGE=page, HQ=hq, HK=hkv, HQ_PAD=triton.next_power_of_2(hq),
        HK_PAD=triton.next_power_of_2(hkv), D=d, FP8=fp8, num_warps=4,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Decode: split-K over the context; the last split to finish merges the partials
# --------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    arrivals_ptr,
    kv_scale_ptr,
    qk_scale,
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_c_blk,
    stride_c_row,
    stride_c_h,
    stride_bt_b,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MERGE_CHUNK: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    F32_DOT: tl.constexpr,
    FP8: tl.constexpr,
):
    """Program (kv_head, split, b): all GROUP query heads of one KV head over one slice of
    the context. SINGLE_SPLIT: write the normalised output; else (out, lse) partials, and
    the program that arrives last (`_merge_splits_once`) writes the merged output.
    FP8: the cache is e4m3 with the layer's (k, v) scales at kv_scale_ptr.
    The slices divide this sequence's actual length (read here, on the device), so a grid
    fixed for the longest context still spreads a short one over all its programs."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    tiles_per_split = _tiles_per_split(seq_len, num_splits, BLOCK_N)
    start = split * tiles_per_split * BLOCK_N
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(seq_len - start, BLOCK_N))

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q_off = b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None], other=0.0)
    qk_scale, v_scale = _fold_kv_scales(qk_scale, kv_scale_ptr, FP8)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt_b
    kc_head = kc_ptr + kvh.to(tl.int64) * stride_c_h
    vc_head = vc_ptr + kvh.to(tl.int64) * stride_c_h
    for t in range(0, n_tiles):
        offs_n = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        rows = _kv_row_offsets(offs_n, n_mask, bt_row, 0, stride_c_blk, stride_c_row, PAGE, True)
        k_t = tl.load(kc_head + rows[None, :] + offs_d[:, None], mask=n_mask[None, :], other=0.0)
        v = tl.load(vc_head + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        acc, m_i, l_i = _softmax_step(
            acc, m_i, l_i, q, k_t.to(q.dtype), v.to(q.dtype), qk_scale, n_mask[None, :], True,
            F32_DOT,
        )  # fmt: skip

    acc = acc * v_scale
    if SINGLE_SPLIT:
        # l_i == 0 only for an empty (padding) sequence: write zeros there, never NaN.
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        o_off = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # Partials are (B, Hq, num_splits, D) and (B, Hq, num_splits), contiguous.
        row0 = (b.to(tl.int64) * tl.num_programs(0) + kvh) * GROUP * num_splits
        if n_tiles > 0:
            row = row0 + offs_g * num_splits + split
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)
            p_off = row[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(part_out_ptr + p_off, acc / l_i[:, None], mask=g_mask[:, None])
        n_valid = tl.cdiv(seq_len, tiles_per_split * BLOCK_N)  # splits that stored partials
        _merge_splits_once(
            part_out_ptr, part_lse_ptr, out_ptr + b.to(tl.int64) * stride_ob + kvh * GROUP * stride_oh,
            arrivals_ptr + b * tl.num_programs(0) + kvh, row0, n_valid, num_splits, stride_oh,
            GROUP, GROUP_P2, HEAD_DIM, MERGE_CHUNK,
        )  # fmt: skip


@triton.jit
def _merge_splits_once(
    part_out_ptr, part_lse_ptr, out_ptr, arrival_ptr, row0, n_valid, num_splits, stride_oh,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Count this split program in *arrival_ptr (int32); the one that arrives last (every
    split arrives, empty ones too) merges the GROUP heads' partials and writes out_ptr[g *
    stride_oh + d], then resets the counter to 0 for the next call or graph replay. The
    merge order does not depend on who is last: results are deterministic.
    Memory ordering as `triton_quant._q4k_store_rows`: every thread's partials are stored
    before the counter's release (CTA barrier, then a gpu-scope acq_rel atomic); the last
    program's acquire orders its reads (from L2, .cg) after all of them."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrival_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if arrived == num_splits - 1:
        offs_g = tl.arange(0, GROUP_P2)
        offs_d = tl.arange(0, HEAD_DIM)
        g_mask = offs_g < GROUP
        out = _merge_splits(
            part_out_ptr, part_lse_ptr, row0 + offs_g * num_splits, g_mask, n_valid, offs_d,
            GROUP_P2, HEAD_DIM, CHUNK,
        )  # fmt: skip
        o_off = offs_g[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        tl.store(arrival_ptr, 0)


@triton.jit
def _merge_splits(
    part_out_ptr, part_lse_ptr, rows_g, g_mask, n_valid, offs_d,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Merge splits [0, n_valid) of G heads by their log-sum-exp weights: head g's split s is
    row rows_g[g] + s of the partials. Returns (G, HEAD_DIM) float32 (zeros if n_valid == 0)."""
    m = tl.full([G], float("-inf"), tl.float32)
    l_sum = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, HEAD_DIM], tl.float32)
    for c in range(0, n_valid, CHUNK):
        offs_s = c + tl.arange(0, CHUNK)
        mask = g_mask[:, None] & (offs_s < n_valid)[None, :]  # (G, CHUNK)
        rows = rows_g[:, None] + offs_s[None, :]
        lse = tl.load(part_lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
        lse = tl.where(g_mask[:, None], lse, 0.0)  # padding heads: finite, never stored
        o = tl.load(
            part_out_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
            mask=mask[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )
        m_new = tl.maximum(m, tl.max(lse, 1))
        w = tl.exp2(lse - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        l_sum = l_sum * alpha + tl.sum(w, 1)
        m = m_new
    return acc / tl.maximum(l_sum, 1e-30)[:, None]


@triton.jit
def _fold_kv_scales(qk_scale, kv_scale_ptr, FP8: tl.constexpr):
    """(logit scale, output scale): qk_scale * k_scale and v_scale for an fp8 cache (scales
    read on the device, so a captured graph sees the tensor's current values), else
    (qk_scale, 1.0)."""
    if FP8:
        return qk_scale * tl.load(kv_scale_ptr), tl.load(kv_scale_ptr + 1)
    else:
        return qk_scale, 1.0


@triton.jit
def _tiles_per_split(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Key tiles per split for one sequence (>= 1, so an empty sequence has no valid split)."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits), 1)


@dataclass(frozen=True)
class DecodePlan:
    """Launch shape of decode: host-static for a given batch (bucket), so a CUDA graph
    captured with one plan replays with any seq_lens; each sequence's context is cut into
    num_splits equal runs of whole tiles on the device."""

    block_n: int  # keys per inner tile
    num_splits: int  # programs per (sequence, kv head)
    # 8 warps hold a 64-key tile without spilling (4 warps: 255 registers and a stack on
    # sm_90); the tuner weighs the two
    num_warps: int = 4
    num_stages: int = 3


def plan_decode(
    batch: int, num_kv_heads: int, max_context: int, num_sms: int, block_n: int = 64
) -> DecodePlan:
    """Pick a split count so batch * kv_heads * splits covers ~4 waves of the GPU's SMs
    (one long sequence must not run on 8 SMs), and no more splits than max_context has tiles."""
    tiles_total = max(1, triton.cdiv(max_context, block_n))
    target = max(1, triton.cdiv(4 * num_sms, batch * num_kv_heads))
    return DecodePlan(block_n, min(target, tiles_total))


@dataclass(frozen=True)
class DecodeScratch:
    """Split-K workspace of one decode launch shape (batch rows, heads, splits). The kernel
    leaves `arrivals` at 0, so one scratch serves every later call of that shape, eager or a
    CUDA-graph replay, with no memset; one stream at a time (as a model's layers run)."""

    part_out: torch.Tensor  # (B * Hq * num_splits, D) float32: each split's normalised output
    part_lse: torch.Tensor  # (B * Hq * num_splits,) float32: its base-2 log-sum-exp
    arrivals: torch.Tensor  # (B * Hkv,) int32: splits finished per (sequence, KV head)


def decode_scratch(
    batch: int, num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int, device
) -> DecodeScratch:
    """A zeroed-counter `DecodeScratch` for `paged_decode_attention` of this shape."""
    rows = batch * num_heads * num_splits
    return DecodeScratch(
        torch.empty((rows, head_dim), dtype=torch.float32, device=device),
        torch.empty((rows,), dtype=torch.float32, device=device),
        torch.zeros((batch * num_kv_heads,), dtype=torch.int32, device=device),
    )


def default_decode_plan(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor
) -> DecodePlan:
    """`plan_decode` for q (B, Hq, D) over block_tables' full width (never seq_lens)."""
    _, _, page, hkv, _ = kv_cache.shape
    return plan_decode(q.shape[0], hkv, block_tables.shape[1] * page, _num_sms(q.device))


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    kv_scale: torch.Tensor | None = None,
    plan: DecodePlan | None = None,
    scratch: DecodeScratch | None = None,
) -> torch.Tensor:
    """q (B, Hq, D) one new token per sequence -> (B, Hq, D) in q's dtype, attending over all
    seq_lens[b] cached tokens (the new token's K/V must already be stored). block_tables
    (B, max_blocks) int32, seq_lens (B,) int32 (0 = padding row, output zeros). Default plan:
    `default_decode_plan`, so the launch never depends on seq_lens. An fp8 cache is read with
    kv_scale (2,) float32 (None: 1.0). scratch: the split-K workspace (`decode_scratch` of
    this shape and plan; None: a fresh one, whose zeroed counters cost a memset)."""
    _check_cache(kv_cache)
    _, _, page, hkv, d = kv_cache.shape
    bsz, hq = _check_query(q, kv_cache, "q")
    if block_tables.shape[0] != bsz or seq_lens.shape != (bsz,):
        raise AttentionInputError("block_tables (B, max_blocks) and seq_lens (B,) must match q")
    plan = plan or default_decode_plan(q, kv_cache, block_tables)
    group = hq // hkv
    out = torch.empty_like(q)
    single = plan.num_splits == 1
    if single:
        scratch = DecodeScratch(out, out, out)  # never read: the merge is compiled out
    elif scratch is None:
        scratch = decode_scratch(bsz, hq, hkv, d, plan.num_splits, q.device)
    else:
        _check_scratch(scratch, bsz * hq * plan.num_splits, bsz * hkv, d)
    q = _rows_contiguous(q)
    fp8, scales = _kv_scales(kv_cache, kv_scale)
    group_p2 = triton.next_power_of_2(group)
    _decode_split_kernel[(hkv, plan.num_splits, bsz)](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, out, scratch.part_out,
        scratch.part_lse, scratch.arrivals, scales, scale * _LOG2E, plan.num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, group_p2), GROUP_P2=group_p2, HEAD_DIM=d, PAGE=page,
        BLOCK_N=plan.block_n, MERGE_CHUNK=_merge_chunk(plan.num_splits, group_p2 * d),
        SINGLE_SPLIT=single, F32_DOT=_f32_dot(q), FP8=fp8,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )  # fmt: skip
    return out


def _merge_chunk(num_splits: int, elems_per_split: int) -> int:
    """Splits merged per step: all of them in one when the (group, chunk, D) float32 tile
    stays within ~4k elements (32 registers a thread at 4 warps), else the most that fit."""
    cap = max(1, 4096 // elems_per_split)
    return min(triton.next_power_of_2(num_splits), 1 << (cap.bit_length() - 1))


def _check_scratch(scratch: DecodeScratch, rows: int, counters: int, d: int) -> None:
    if scratch.part_out.shape != (rows, d) or scratch.part_lse.shape != (rows,):
        raise AttentionInputError(f"decode scratch must hold ({rows}, {d}) partials")
    if scratch.arrivals.shape != (counters,) or scratch.arrivals.dtype != torch.int32:
        raise AttentionInputError(f"decode scratch must hold ({counters},) int32 counters")


# --------------------------------------------------------------------------------------
# Prefill / varlen: tiled flash attention, queries at the end of their sequence
# --------------------------------------------------------------------------------------


@triton.jit
def _flash_kv_loop(
    acc, m_i, l_i, q, pos_m, k_head, v_head, bt_row, kv_start, seq_len, lo, hi, qk_scale,
    stride_blk, stride_row, offs_d,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """Keys [lo, hi) in BLOCK_N tiles. MASKED: bound (and, if CAUSAL, key <= pos_m) masks;
    unmasked tiles are those every query row of the program may see in full."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_mask = offs_n < seq_len
            rows = _kv_row_offsets(
                offs_n, n_mask, bt_row, kv_start, stride_blk, stride_row, PAGE, PAGED
            )
            k_t = tl.load(k_head + rows[None, :] + offs_d[:, None], mask=n_mask[None, :], other=0.0)
            v = tl.load(v_head + rows[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            k_t, v = k_t.to(q.dtype), v.to(q.dtype)  # fp8 cache: widen in registers
            s_mask = n_mask[None, :]
            if CAUSAL:
                s_mask = s_mask & (offs_n[None, :] <= pos_m[:, None])
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k_t, v, qk_scale, s_mask, True, F32_DOT)
        else:
            rows = _kv_row_offsets(
                offs_n, offs_n < hi, bt_row, kv_start, stride_blk, stride_row, PAGE, PAGED
            )
            k_t = tl.load(k_head + rows[None, :] + offs_d[:, None]).to(q.dtype)
            v = tl.load(v_head + rows[:, None] + offs_d[None, :]).to(q.dtype)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k_t, v, qk_scale, None, False, F32_DOT)
    return acc, m_i, l_i


@triton.jit
def _flash_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, kv_scale_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_k_blk, stride_k_row, stride_k_h,
    stride_v_blk, stride_v_row, stride_v_h, stride_bt_b,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, F32_DOT: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    """Program (head, m_tile, seq): BLOCK_M new tokens of one query head. The q_len new tokens
    of a sequence are its last ones: row i sits at position seq_len - q_len + i. Paged: K/V via
    block tables; else K/V are contiguous rows of the same packed layout as q (seq_len=q_len).
    FP8: K/V are e4m3 with the layer's (k, v) scales at kv_scale_ptr.
    Heavy (late) m-tiles are launched first for a better causal tail."""
    head = tl.program_id(0)
    m_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    m0 = m_tile * BLOCK_M
    if m0 >= q_len:
        return
    if PAGED:
        seq_len = tl.load(seq_lens_ptr + b)
    else:
        seq_len = q_len
    ctx = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)  # fmt: skip
    qk_scale, v_scale = _fold_kv_scales(qk_scale, kv_scale_ptr, FP8)

    kvh = head // GROUP
    k_head = k_ptr + kvh.to(tl.int64) * stride_k_h
    v_head = v_ptr + kvh.to(tl.int64) * stride_v_h
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt_b
    if CAUSAL:
        full_end = (ctx + m0) // BLOCK_N * BLOCK_N  # keys below every row's position
        hi = ctx + tl.minimum(m0 + BLOCK_M, q_len)
    else:
        full_end = seq_len // BLOCK_N * BLOCK_N
        hi = seq_len
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    pos_m = ctx + offs_m
    acc, m_i, l_i = _flash_kv_loop(
        acc, m_i, l_i, q, pos_m, k_head, v_head, bt_row, q_start, seq_len, 0, full_end, qk_scale,
        stride_k_blk, stride_k_row, offs_d, PAGE, BLOCK_N, PAGED, False, CAUSAL, F32_DOT,
    )  # fmt: skip
    acc, m_i, l_i = _flash_kv_loop(
        acc, m_i, l_i, q, pos_m, k_head, v_head, bt_row, q_start, seq_len, full_end, hi, qk_scale,
        stride_k_blk, stride_k_row, offs_d, PAGE, BLOCK_N, PAGED, True, CAUSAL, F32_DOT,
    )  # fmt: skip
    out = acc / l_i[:, None] * v_scale
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


SHORT_QUERY_TOKENS = 1024  # prefills up to this many query tokens take the smaller tiles


def default_tile_config(head_dim: int, device: torch.device, max_query_len: int) -> TileConfig:
    """Tiles measured best on H100 bf16 (benchmarks/gpu_attention.py --sweep, 2026-11-24);
    small tiles on CPU keep the interpreter quick."""
    if device.type != "cuda":
        return TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:  # vision, 12,100 patches: 422 TFLOP/s (w4: 406)
        return TileConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    if max_query_len <= SHORT_QUERY_TOKENS:  # 1k prompt: 193 vs 173 TFLOP/s (less tail)
        return TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
    return TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)  # 8k causal: 375


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    kv_scale: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """q (T, Hq, D) packed new tokens of B sequences -> (T, Hq, D), causal over each
    sequence's cache (its new tokens are the last query_len of seq_lens[b], already stored).
    query_start_loc (B+1,) int32, seq_lens (B,) int32, block_tables (B, max_blocks) int32.
    An fp8 cache is read with kv_scale (2,) float32 (None: 1.0)."""
    _check_cache(kv_cache)
    _, _, page, hkv, d = kv_cache.shape
    _check_query(q, kv_cache, "q")
    bsz = seq_lens.shape[0]
    if query_start_loc.shape != (bsz + 1,) or block_tables.shape[0] != bsz:
        raise AttentionInputError("query_start_loc (B+1,) / block_tables (B, .) mismatch seq_lens")
    kc, vc = kv_cache[0], kv_cache[1]
    strides = (kc.stride(0), kc.stride(1), kc.stride(2))
    layout = _KVLayout(strides, strides, hkv, page, True)
    return _launch_flash(q, kc, vc, query_start_loc, seq_lens, block_tables, max_query_len, scale,
                         layout, True, config, _kv_scales(kv_cache, kv_scale))  # fmt: skip


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = False,
    scale: float | None = None,
    *,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) packed sequences [cu_seqlens[i], cu_seqlens[i+1]) ->
    (T, H, D); attention within each sequence only (non-causal for vision images)."""
    if q.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise AttentionInputError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v must be (T, H, D)")
    if q.shape[1] % k.shape[1]:
        raise AttentionInputError("query heads must be a multiple of key/value heads")
    _check_head_dim(q.shape[2])
    scale = q.shape[2] ** -0.5 if scale is None else scale
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    layout = _KVLayout(  # contiguous rows: no block stride, "block size" 1
        (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1)), k.shape[1], 1, False
    )
    return _launch_flash(q, k, v, cu_seqlens, cu_seqlens, cu_seqlens, max_seqlen, scale, layout,
                         causal, config, (False, q))  # fmt: skip


@dataclass(frozen=True)
class _KVLayout:
    """Where the flash kernel finds K and V rows."""

    k_strides: tuple[int, int, int]  # element strides of K: (block, row in block, head)
    v_strides: tuple[int, int, int]  # same for V
    num_kv_heads: int
    page: int  # tokens per block (1 when K/V are contiguous rows)
    paged: bool  # rows through block tables (cache) or packed like q (vision)


def _launch_flash(
    q, k, v, qsl, seq_lens, block_tables, max_query_len, scale, layout: _KVLayout, causal, config,
    fp8_scales: tuple[bool, torch.Tensor],
):  # fmt: skip
    """Shared launcher of `_flash_kernel`; returns (T, Hq, D) in q's dtype. fp8_scales: (K/V
    are e4m3, their (2,) scales) as `_kv_scales` returns them."""
    out = torch.empty_like(q)
    if q.shape[0] == 0 or max_query_len == 0:
        return out
    config = config or default_tile_config(q.shape[2], q.device, max_query_len)
    q = _rows_contiguous(q)
    grid = (q.shape[1], triton.cdiv(max_query_len, config.block_m), qsl.shape[0] - 1)
    bt_stride = block_tables.stride(0) if layout.paged else 0
    fp8, scales = fp8_scales
    _flash_kernel[grid](
        q, k, v, out, qsl, seq_lens, block_tables, scales, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *layout.k_strides,
        *layout.v_strides, bt_stride,
        GROUP=q.shape[1] // layout.num_kv_heads, HEAD_DIM=q.shape[2], PAGE=layout.page,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, PAGED=layout.paged, CAUSAL=causal,
        F32_DOT=_f32_dot(q), FP8=fp8, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------


def _check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise AttentionInputError(f"head_dim {d} must be a power of two >= 16")


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.stride(-1) != 1:
        raise AttentionInputError(
            f"kv_cache {tuple(kv_cache.shape)} must be (2, num_blocks, block_size, Hkv, D)"
            " with a contiguous last dim"
        )
    page = kv_cache.shape[2]
    if page & (page - 1):
        raise AttentionInputError(f"block_size {page} must be a power of two")
    _check_head_dim(kv_cache.shape[4])


def _check_new_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> tuple[int, int, int]:
    """Validate a step's new k, v (T, Hkv, D) and slot_mapping (T,) against the cache;
    returns its (block_size, Hkv, D)."""
    _check_cache(kv_cache)
    _, _, page, hkv, d = kv_cache.shape
    if k.shape != v.shape or k.shape[1:] != (hkv, d):
        raise AttentionInputError(f"k/v {tuple(k.shape)} do not match cache heads {(hkv, d)}")
    if slot_mapping.shape != (k.shape[0],):
        raise AttentionInputError("slot_mapping must be (T,), one slot per new token")
    return page, hkv, d


def _check_query(q: torch.Tensor, kv_cache: torch.Tensor, name: str) -> tuple[int, int]:
    """Validate q (N, Hq, D) against the cache; returns (N, Hq)."""
    hkv, d = kv_cache.shape[3], kv_cache.shape[4]
    if q.dim() != 3 or q.shape[2] != d or q.shape[1] % hkv:
        raise AttentionInputError(f"{name} {tuple(q.shape)} must be (N, k * {hkv}, {d})")
    if q.dtype != kv_cache.dtype and not is_fp8_cache(kv_cache):
        raise AttentionInputError(f"{name} dtype {q.dtype} differs from cache {kv_cache.dtype}")
    return q.shape[0], q.shape[1]


def _kv_scales(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> tuple[bool, torch.Tensor]:
    """(whether the cache is fp8, the (2,) float32 scales its kernels read). A non-fp8 cache
    passes itself: the kernels' FP8 branch that would read the pointer is compiled out."""
    if not is_fp8_cache(kv_cache):
        return False, kv_cache
    scales = kv_scales_or_unit(kv_cache, kv_scale)
    if scales.shape != (2,) or scales.dtype != torch.float32 or scales.device != kv_cache.device:
        raise AttentionInputError("kv_scale must be (2,) float32 on the cache's device")
    return True, scales


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride in its last dim and the middle dim packed (kernels index rows)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def _f32_dot(q: torch.Tensor) -> bool:
    return q.dtype == torch.float32 or q.device.type != "cuda"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter runs programs one by one: few splits suffice


__all__ = [
    "AttentionInputError",
    "DecodePlan",
    "DecodeScratch",
    "TileConfig",
    "decode_scratch",
    "default_decode_plan",
    "default_tile_config",
    "paged_decode_attention",
    "paged_prefill_attention",
    "plan_decode",
    "rope_store_kv",
    "store_kv",
    "varlen_attention",
]
