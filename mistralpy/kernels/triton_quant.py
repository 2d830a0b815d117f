"""Fused dequantize-matmul Triton kernels for CUDA (imported lazily, never by `import mistralpy`).

- q4k and q8_0 read the GGUF block bytes in place (no second copy of the weight): q4_K
  blocks are 144 bytes, so their 128 code bytes stay 16-byte aligned; q8_0 blocks (34 bytes)
  are read with 2-byte alignment. The fp16 super-scales are read through an fp16 view of the
  same buffer.
- every other format (and fp8) goes through a generic kernel over a `GroupAffine`
  repack made at load time: int8 codes (N, K) + float32 scale/offset per group
  (w = codes * scale + offset); fp8 passes its e4m3 bytes as codes with a per-row scale.
  This copy costs 8 bits + 64 bits/group per weight, more than the native formats, but
  still far less than bf16 and exact up to float rounding.

Each kernel has a batch-1 GEMV form (per-row dot products with the scales factored out of
the inner sum) and a `tl.dot` GEMM form for M > 1 (weight tiles dequantized to bf16 in
registers (fp16 for fp16 activations), M padded to 16; 64-row M tiles for prefill-sized batches). The q4_K GEMM permutes
the reduction order instead of the weight: the low and high nibbles of each 32-byte chunk
meet the matching 32-element slices of x, so no shuffles are needed. On CUDA sm80+ the q4_K
products of 2-32 rows go to `cuda_q4k` (tensor cores fed from registers) when the tuner
finds it faster; this file's swap kernel keeps 33-64 rows and GPUs without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from mistralpy.kernels import cuda_q4k
from mistralpy.kernels.quant_matmul import QuantMatmul

NATIVE_FORMATS = ("q4k", "q8_0")


@triton.jit
def _q4k_words_scale_min(w1, w2, w3, s):
    """6-bit (scale, min) of sub-block s from a q4_K header's scale words w1..w3 (int32, bytes
    4..15 of the block, same shape as s): byte i of the 12 scale bytes is word 1 + i // 4,
    bits 8 (i % 4)."""
    sh = 8 * (s % 4)
    low = s < 4
    b_s = (tl.where(low, w1, w2) >> sh) & 255  # scale byte s
    b_s4 = (tl.where(low, w2, w3) >> sh) & 255  # scale byte s + 4
    b_sm4 = (w1 >> sh) & 255  # scale byte s - 4 (used for s >= 4)
    sc = tl.where(low, b_s & 63, (b_s4 & 15) | ((b_sm4 >> 6) << 4))
    mn = tl.where(low, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q4k_header(wi_ptr, wbase, ok, s_lo):
    """From the 16-byte headers (four int32 words at word index wbase, masked by ok) of the
    q4_K blocks: d, dmin and the 6-bit (scale, min) of sub-blocks s_lo and s_lo + 1."""
    w0 = tl.load(wi_ptr + wbase, mask=ok, other=0)
    w1 = tl.load(wi_ptr + wbase + 1, mask=ok, other=0)
    w2 = tl.load(wi_ptr + wbase + 2, mask=ok, other=0)
    w3 = tl.load(wi_ptr + wbase + 3, mask=ok, other=0)
    return _q4k_header_words(w0, w1, w2, w3, s_lo)


@triton.jit
def _q4k_d_dmin(w0):
    """A q4_K header's fp16 super-scales d and dmin (its first int32 word) as float32."""
    d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return d, dmin


@triton.jit
def _q4k_header_words(w0, w1, w2, w3, s_lo):
    """`_q4k_header` from the header's four int32 words."""
    d, dmin = _q4k_d_dmin(w0)
    sc_lo, m_lo = _q4k_words_scale_min(w1, w2, w3, s_lo)
    sc_hi, m_hi = _q4k_words_scale_min(w1, w2, w3, s_lo + 1)
    return d, dmin, sc_lo, m_lo, sc_hi, m_hi


@triton.jit
def _q4k_chunk_header(hdr, c):
    """`_q4k_header` for chunk c (sub-blocks 2c, 2c + 1) from the blocks' headers hdr
    (BN, J, 4) int32, read by one 16-byte load per header."""
    w02, w13 = tl.split(tl.reshape(hdr, (hdr.shape[0], hdr.shape[1], 2, 2)))
    w0, w2 = tl.split(w02)
    w1, w3 = tl.split(w13)
    d, dmin = _q4k_d_dmin(w0)
    sc_lo, mn_lo, sc_hi, mn_hi = _q4k_pair_scale_min(w1, w2, w3, c + 0 * w1)
    return d, dmin, sc_lo, mn_lo, sc_hi, mn_hi


@triton.jit
def _q4k_pair_scale_min(w1, w2, w3, c):
    """The 6-bit (scale, min) of sub-blocks 2c and 2c + 1 (c = 0..3, same shape as the
    words) from the header's scale words w1..w3, by whole-word masks: the scales of
    sub-blocks 0-3 are the low 6 bits of w1's bytes, those of 4-7 the low nibbles of w3's
    with w1's top 2 bits above; mins likewise from w2 and w3's high nibbles."""
    low = c < 2
    sc = tl.where(low, w1 & 0x3F3F3F3F, (w3 & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030))
    mn = tl.where(low, w2 & 0x3F3F3F3F, ((w3 >> 4) & 0x0F0F0F0F) | ((w2 >> 2) & 0x30303030))
    sh = 16 * (c % 2)
    sc_lo, sc_hi = (sc >> sh) & 255, (sc >> (sh + 8)) & 255
    mn_lo, mn_hi = (mn >> sh) & 255, (mn >> (sh + 8)) & 255
    f = tl.float32
    return sc_lo.to(f), mn_lo.to(f), sc_hi.to(f), mn_hi.to(f)


@triton.jit
def _q4k_tile(wb_ptr, wi_ptr, rows, rmask, b0, nblk, bend, BB: tl.constexpr):
    """Decode BB q4_K blocks (from b0, those below bend) of rows (BN,): codes lo/hi
    (BN, 4BB, 32) float32 and their scale/min products (BN, 4BB), for chunk j = 4 * block + c
    holding sub-blocks 2c, 2c+1; rows are nblk blocks long. The 16-byte header is read as
    four int32 words through wi_ptr (the same buffer)."""
    J: tl.constexpr = BB * 4
    j = tl.arange(0, J)
    blk = b0 + j // 4
    c = j % 4
    ok = rmask[:, None] & (blk < bend)[None, :]
    base = rows[:, None].to(tl.int64) * (nblk * 144) + blk[None, :] * 144  # (BN, J)
    lane = tl.arange(0, 32)
    qp = wb_ptr + base[:, :, None] + 16 + c[None, :, None] * 32 + lane[None, None, :]
    qb = tl.load(qp, mask=ok[:, :, None], other=0).to(tl.int32)
    s_lo = tl.zeros_like(base).to(tl.int32) + 2 * c[None, :]
    d, dmin, sc_lo, m_lo, sc_hi, m_hi = _q4k_header(wi_ptr, base // 4, ok, s_lo)
    q_lo = (qb & 15).to(tl.float32)
    q_hi = (qb >> 4).to(tl.float32)
    return q_lo, q_hi, d * sc_lo, dmin * m_lo, d * sc_hi, dmin * m_hi


@triton.jit
def _q4k_split_program(N, K, split_blocks, BN: tl.constexpr):
    """This GEMV program's split s, row m of x, output rows (BN,) and their mask, blocks per
    row and its block range [b_start, b_end) on the grid (N / BN, splits, M)."""
    s = tl.program_id(1)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    nblk = K // 256
    b_start = s * split_blocks
    return (
        s,
        tl.program_id(2),
        rows,
        rows < N,
        nblk,
        b_start,
        tl.minimum(b_start + split_blocks, nblk),
    )


@triton.jit
def _q4k_store_rows(
    y_ptr, ws_ptr, cnt_ptr, out, s, m, rows, rmask, N, stride_ym, PARTIAL: tl.constexpr
):  # fmt: skip
    """Store a GEMV program's sums (BN,) float32 as y[m, rows]. PARTIAL (split-K over grid
    axis 1): store them to the float32 workspace ws_ptr[s, m, rows], then count this split in
    cnt_ptr[m, row tile]; the program that arrives last adds the partials in order s = 0, 1,
    ... (deterministic), writes y and resets the counter to 0 for the next call or graph
    replay. No extra kernel: the reduction stays inside this launch."""
    if not PARTIAL:
        tl.store(y_ptr + m * stride_ym + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        nsplit, num_m = tl.num_programs(1), tl.num_programs(2)
        tl.store(ws_ptr + (s * num_m + m) * N + rows, out, mask=rmask)
        # every thread's partial is stored before the counter's release (CTA barrier, then a
        # gpu-scope acq_rel atomic); the last program's acquire orders its reads after it
        tl.debug_barrier()
        cnt = cnt_ptr + m * tl.num_programs(0) + tl.program_id(0)
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if arrived == nsplit - 1:
            total = tl.zeros_like(out)
            for t in range(0, nsplit):
                part = ws_ptr + (t * num_m + m) * N + rows
                total += tl.load(part, mask=rmask, other=0.0, cache_modifier=".cg")  # L2
            tl.store(y_ptr + m * stride_ym + rows, total.to(y_ptr.dtype.element_ty), mask=rmask)
            tl.store(cnt, 0)


@triton.jit
def _q8_words(xf):
    """Float32 x (G, 8, 4), G groups of 32 values -> int8 codes (round half away from zero)
    packed 4 per int32 word, little-endian (G, 8); per group (G,): the scale with x ~ scale *
    code, the exact float32 sum and the residual sum(x) - scale sum(code). The activation
    side of `_q4k_gemv_dp4a_kernel` (as llama.cpp's q8_1 blocks, plus the residual)."""
    amax = tl.max(tl.max(tl.abs(xf), axis=2), axis=1)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    v = xf * inv[:, None, None]
    q = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)  # float-to-int truncates toward 0
    shift = 8 * tl.arange(0, 4)
    words = tl.sum((q & 255) << shift[None, None, :], axis=2)  # disjoint bits: sum == or
    scale = amax / 127.0
    total = tl.sum(tl.sum(xf, axis=2), axis=1)
    code_sum = tl.sum(tl.sum(q, axis=2), axis=1).to(tl.float32)
    return words, scale, total, total - scale * code_sum


@triton.jit
def _q8_quant_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, BG: tl.constexpr):
    """Program (m, p): groups [p BG, (p + 1) BG) of 32 values of row m of x -> words
    xq[m, 8 g + w] and (scale, sum, residual) xs[m, g, :] (`_q8_words`)."""
    m = tl.program_id(0)
    g = tl.program_id(1) * BG + tl.arange(0, BG)
    ok = g < K // 32
    w = tl.arange(0, 8)
    offs = g[:, None, None] * 32 + w[None, :, None] * 4 + tl.arange(0, 4)[None, None, :]
    xf = tl.load(x_ptr + m * stride_xm + offs, mask=ok[:, None, None], other=0.0)
    words, scale, total, residual = _q8_words(xf.to(tl.float32))
    tl.store(xq_ptr + m * (K // 4) + g[:, None] * 8 + w[None, :], words, mask=ok[:, None])
    xs = xs_ptr + m * (K // 32 * 3) + 3 * g
    tl.store(xs, scale, mask=ok)
    tl.store(xs + 1, total, mask=ok)
    tl.store(xs + 2, residual, mask=ok)


@triton.jit
def _dot4(a, b):
    """Portable dp4a: sum over the 4 bytes of a (unsigned) times those of b (signed)."""
    acc = (a & 255) * ((b << 24) >> 24)
    acc += ((a >> 8) & 255) * ((b << 16) >> 24)
    acc += ((a >> 16) & 255) * ((b << 8) >> 24)
    return acc + ((a >> 24) & 255) * (b >> 24)


@triton.jit
def _nibble_dots(codes, x_lo, x_hi, ASM: tl.constexpr):
    """Per int32 word of q4 code bytes: (dot of its 4 low nibbles with the 4 int8 of x_lo,
    16 x the dot of its 4 high nibbles with those of x_hi: masked in place, not shifted).
    ASM: 4 instructions (2 dp4a) per word on CUDA; else the same integers from plain ops
    (Triton's CPU interpreter has no PTX)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi;
            and.b32 lo, $2, 0x0F0F0F0F;
            and.b32 hi, $2, 0xF0F0F0F0;
            dp4a.u32.s32 $0, lo, $3, 0;
            dp4a.u32.s32 $1, hi, $4, 0;
            }""",
            constraints="=r,=r,r,r,r",
            args=[codes, x_lo, x_hi],
            dtype=(tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    else:
        return _dot4(codes & 0x0F0F0F0F, x_lo), _dot4(codes & -0x0F0F0F10, x_hi)


@triton.jit
def _q4k_gemv_dp4a_kernel(
    x_ptr, xq_ptr, xs_ptr, wi_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_xm, stride_ym,
    split_blocks, BN: tl.constexpr, BB: tl.constexpr, PARTIAL: tl.constexpr,
    STAGES: tl.constexpr, X_INLINE: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Batch-1 q4_K GEMV with integer dot products, as llama.cpp's mmvq: x in int8 groups of
    32 (one scale and one float sum per group, `_q8_words`) meets the 4-bit codes through
    dp4a, 4 multiply-adds per instruction, with no code ever converted to float; a
    sub-block adds d sc (dx dot(q, xq) + 8 r) - dmin m sum(x), r the group's residual: the
    int8 error then enters as sum((q - 8) e), not sum(q e) (codes centred as in the
    `group_affine` oracle: half the error). About 2 SASS instructions per weight in the main
    loop against ~6.3 for the float-code GEMVs it replaced, which were instruction-bound on
    H100 (benchmarks/sass_count.py; BENCHMARKS.md has their figures, git their code). The int8 rounding of x costs ~0.5% relative error in y
    (q4_K's own is ~5%).
    X_INLINE: each program quantizes the x slices it reads (no extra launch; the work
    repeats per row tile); else x comes quantized by `_q8_quant_kernel` in xq (words) and
    xs (scale, sum, residual per group). Grid (N / BN, splits, M); PARTIAL: split-K partials
    summed in the kernel (`_q4k_store_rows`)."""
    s, m, rows, rmask, nblk, b_start, b_end = _q4k_split_program(N, K, split_blocks, BN)
    J: tl.constexpr = BB * 4  # 64-weight chunks (32 code bytes = 8 words) per step
    j = tl.arange(0, J)
    w8 = tl.arange(0, 8)
    # rows past N and blocks past b_end are read clamped to the last valid ones (unmasked
    # loads: no predicates, no zero fills) and contribute nothing: their rows are not stored,
    # and the x group scales, read masked, are 0 for their blocks
    row_words = tl.minimum(rows, N - 1).to(tl.int64) * (nblk * 36)  # a block is 36 words
    acc = tl.zeros((BN, J), dtype=tl.float32)
    c = j % 4
    code_words = (4 + c * 8)[None, :, None] + w8[None, None, :]  # (1, J, 8) in a block
    hdr_words = tl.arange(0, 4)[None, None, :]
    for b0 in tl.range(b_start, b_end, BB, num_stages=STAGES):
        ok_j = b0 + j // 4 < b_end
        blk = tl.minimum(b0 + j // 4, b_end - 1)
        wbase = row_words[:, None] + blk[None, :] * 36  # (BN, J) header word
        codes = tl.load(wi_ptr + wbase[:, :, None] + code_words)  # (BN, J, 8)
        hdr = tl.load(wi_ptr + wbase[:, :, None] + hdr_words)  # (BN, J, 4)
        g_lo = blk * 8 + 2 * c  # x group (= sub-block) of the low nibbles; high: g_lo + 1
        if X_INLINE:
            e = tl.arange(0, 4)
            xo = (g_lo * 32)[:, None, None] + w8[None, :, None] * 4 + e[None, None, :]
            xm = ok_j[:, None, None]
            x_row = x_ptr + m * stride_xm
            lo = tl.load(x_row + xo, mask=xm, other=0.0).to(tl.float32)
            hi = tl.load(x_row + xo + 32, mask=xm, other=0.0).to(tl.float32)
            xw_lo, xd_lo, xs_lo, xr_lo = _q8_words(lo)
            xw_hi, xd_hi, xs_hi, xr_hi = _q8_words(hi)
            xw_lo = tl.broadcast_to(xw_lo[None], codes.shape)
            xw_hi = tl.broadcast_to(xw_hi[None], codes.shape)
            xd_lo, xs_lo, xr_lo = xd_lo[None], xs_lo[None], xr_lo[None]
            xd_hi, xs_hi, xr_hi = xd_hi[None], xs_hi[None], xr_hi[None]
        else:
            # read at the codes' shape (rows broadcast through the pointers, L1 hits) so the
            # x words arrive in the codes' register layout: no shared-memory round trip
            zero = tl.zeros((BN, J), dtype=tl.int32)
            xw = xq_ptr + m * (K // 4) + (g_lo * 8 + zero)[:, :, None] + w8[None, None, :]
            xw_lo = tl.load(xw)  # (BN, J, 8)
            xw_hi = tl.load(xw + 8)
            xs = xs_ptr + m * (K // 32 * 3) + 3 * (g_lo + zero)
            okx = ok_j[None, :] & (zero == 0)
            xd_lo = tl.load(xs, mask=okx, other=0.0)
            xs_lo = tl.load(xs + 1, mask=okx, other=0.0)
            xr_lo = tl.load(xs + 2, mask=okx, other=0.0)
            xd_hi = tl.load(xs + 3, mask=okx, other=0.0)
            xs_hi = tl.load(xs + 4, mask=okx, other=0.0)
            xr_hi = tl.load(xs + 5, mask=okx, other=0.0)
        dots_lo, dots_hi16 = _nibble_dots(codes, xw_lo, xw_hi, ASM)
        dot_lo = tl.sum(dots_lo, axis=2).to(tl.float32)  # (BN, J)
        dot_hi = tl.sum(dots_hi16, axis=2).to(tl.float32) * 0.0625
        d, dmin, sc_lo, mn_lo, sc_hi, mn_hi = _q4k_chunk_header(hdr, c[None, :])
        acc += d * (sc_lo * (xd_lo * dot_lo + 8.0 * xr_lo))
        acc += d * (sc_hi * (xd_hi * dot_hi + 8.0 * xr_hi))
        acc -= dmin * (mn_lo * xs_lo + mn_hi * xs_hi)
    out = tl.sum(acc, axis=1)
    _q4k_store_rows(y_ptr, ws_ptr, cnt_ptr, out, s, m, rows, rmask, N, stride_ym, PARTIAL)


@triton.jit
def _magic_nibble(words, SHIFT: tl.constexpr):
    """The 4-bit codes at bits [19 - SHIFT, 23 - SHIFT) of int32 `words` as float32
    1 + q / 16: moved to mantissa bits 19-22 under the exponent of 1.0 (a shift and one
    LOP3; no int-to-float conversion). Arithmetic right shifts only smear bits above 27,
    which the mask drops."""
    if SHIFT >= 0:
        moved = words << SHIFT
    else:
        moved = words >> (-SHIFT)
    return ((moved & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _q4k_gemm_program(M, N, K, split_blocks, BN: tl.constexpr, BM: tl.constexpr):
    """This decode-GEMM program's row tile and split on the grid (N / BN, splits): its tile
    index, split s, weight rows (BN,) and their mask, rows of x (BM,) and their mask, blocks
    per row and its block range [b_start, b_end) (as `_q4k_split_program` for the GEMV)."""
    pid_n, s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    ms = tl.arange(0, BM)
    nblk = K // 256
    b_start = s * split_blocks
    b_end = tl.minimum(b_start + split_blocks, nblk)
    return pid_n, s, rows, rows < N, ms, ms < M, nblk, b_start, b_end


@triton.jit
def _q4k_store_tile(
    y_ptr, ws_ptr, cnt_ptr, acc, s, pid_n, rows, rmask, ms, mmask, N, stride_ym,
    BM: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    """Store a GEMM program's tile acc (BN, BM) float32 as y[ms, rows]; PARTIAL: split-K
    partials go to ws (split, BM, N) float32 and the last program of a row tile to arrive
    sums them in order (as `_q4k_store_rows`)."""
    omask = rmask[:, None] & mmask[None, :]
    yp = y_ptr + ms[None, :] * stride_ym + rows[:, None]
    if not PARTIAL:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        nsplit = tl.num_programs(1)
        tile = ms[None, :] * N + rows[:, None]
        tl.store(ws_ptr + s * BM * N + tile, acc, mask=omask)
        tl.debug_barrier()
        cnt = cnt_ptr + pid_n
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if arrived == nsplit - 1:
            total = tl.zeros_like(acc)
            for t in range(0, nsplit):
                total += tl.load(ws_ptr + t * BM * N + tile, mask=omask, other=0.0,
                                 cache_modifier=".cg")  # fmt: skip
            tl.store(yp, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.store(cnt, 0)


@triton.jit
def _q4k_gemm_swap_kernel(
    x_ptr, wi_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym, split_blocks,
    BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr, PARTIAL: tl.constexpr,
    STAGES: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """q4_K GEMM for decode-sized batches (2 <= M <= BM <= 64): acc (BN, BM) = W[rows] x^T.
    The weight's rows fill the matrix unit's M side (64+ rows, what wgmma wants) and the
    few rows of x its N side (16 is the smallest tile), so a batch of 2-64 rows pads only
    x, and each program reads its weight tile once for every row of x (an x-major GEMM
    reads it once per 16 rows).
    Codes are read as int32 words (8 codes each: byte e of word w of chunk c holds the
    codes of k = 64c + 4w + e (low nibble) and k + 32 (high)) and never rearranged: the
    reduction order is permuted instead, one tl.dot per byte position e and nibble, each
    meeting x at the matching strided columns. A code becomes a float by `_magic_nibble`
    (f = 1 + q / 16), and w = 16 s f - (16 s + m) is one FMA, so a weight costs a shift,
    a LOP3, an FMA and half a pack to bf16. Grid (N / BN, splits); PARTIAL: split-K
    partials go to ws (split, BM, N) float32 and the last program of a row tile to arrive
    sums them in order (as `_q4k_store_rows`)."""
    pid_n, s, rows, rmask, ms, mmask, nblk, b_start, b_end = _q4k_gemm_program(
        M, N, K, split_blocks, BN, BM
    )
    J: tl.constexpr = BB * 4  # 64-weight chunks per step
    j = tl.arange(0, J)
    c = j % 4
    w8 = tl.arange(0, 8)
    # rows past N are read clamped to the last row (no predicated loads) and never stored
    row_words = tl.minimum(rows, N - 1).to(tl.int64) * (nblk * 36)  # a block is 36 words
    code_words = (4 + c * 8)[None, :, None] + w8[None, None, :]  # (1, J, 8) in a block
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for b0 in tl.range(b_start, b_end, BB, num_stages=STAGES):
        blk = b0 + j // 4
        ok_j = blk < b_end
        wbase = row_words[:, None] + tl.minimum(blk, b_end - 1)[None, :] * 36  # (BN, J)
        codes = tl.load(wi_ptr + wbase[:, :, None] + code_words)  # (BN, J, 8)
        hdr = tl.load(wi_ptr + wbase[:, :, None] + tl.arange(0, 4)[None, None, :])
        d, dmin, sc_lo, mn_lo, sc_hi, mn_hi = _q4k_chunk_header(hdr, c[None, :])
        # blocks past b_end (a ragged last step) get zero scales: their weights are 0
        a_lo = tl.where(ok_j[None, :], 16.0 * d * sc_lo, 0.0)
        a_hi = tl.where(ok_j[None, :], 16.0 * d * sc_hi, 0.0)
        b_lo = (a_lo + tl.where(ok_j[None, :], dmin * mn_lo, 0.0))[:, :, None]
        b_hi = (a_hi + tl.where(ok_j[None, :], dmin * mn_hi, 0.0))[:, :, None]
        a_lo, a_hi = a_lo[:, :, None], a_hi[:, :, None]
        xcol = (tl.minimum(blk, b_end - 1) * 256 + c * 64)[:, None] + w8[None, :] * 4  # (J, 8)
        xp = x_ptr + xcol[:, :, None] + ms[None, None, :] * stride_xm  # (J, 8, BM)
        xmask = mmask[None, None, :] & ok_j[:, None, None]
        for e in tl.static_range(4):
            x_lo = tl.load(xp + e, mask=xmask, other=0.0).to(DOT)
            x_hi = tl.load(xp + (e + 32), mask=xmask, other=0.0).to(DOT)
            w_lo = a_lo * _magic_nibble(codes, 19 - 8 * e) - b_lo
            w_hi = a_hi * _magic_nibble(codes, 15 - 8 * e) - b_hi
            acc += tl.dot(tl.reshape(w_lo.to(DOT), (BN, J * 8)), tl.reshape(x_lo, (J * 8, BM)))
            acc += tl.dot(tl.reshape(w_hi.to(DOT), (BN, J * 8)), tl.reshape(x_hi, (J * 8, BM)))
    _q4k_store_tile(y_ptr, ws_ptr, cnt_ptr, acc, s, pid_n, rows, rmask, ms, mmask, N,
                    stride_ym, BM, PARTIAL)  # fmt: skip


@triton.jit
def _q4k_dequant_kernel(wb_ptr, wi_ptr, out_ptr, N, K, BN: tl.constexpr, BB: tl.constexpr):
    """Rows [pid0 BN, +BN) x blocks [pid1 BB, +BB) of a q4_K weight -> out (N, K) in out's
    dtype: the first half of prefill-sized products (dequantize, then a dense GEMM)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    nblk = K // 256
    b0 = tl.program_id(1) * BB
    q_lo, q_hi, s_lo, m_lo, s_hi, m_hi = _q4k_tile(wb_ptr, wi_ptr, rows, rmask, b0, nblk, nblk, BB)
    J: tl.constexpr = BB * 4
    j = tl.arange(0, J)
    lane = tl.arange(0, 32)
    col = ((b0 + j // 4) * 256 + (j % 4) * 64)[None, :, None] + lane[None, None, :]
    op = out_ptr + rows[:, None, None].to(tl.int64) * K + col
    ok = rmask[:, None, None] & (col < K)
    ty = out_ptr.dtype.element_ty
    tl.store(op, (s_lo[:, :, None] * q_lo - m_lo[:, :, None]).to(ty), mask=ok)
    tl.store(op + 32, (s_hi[:, :, None] * q_hi - m_hi[:, :, None]).to(ty), mask=ok)


@triton.jit
def _q8_0_tile(wb_ptr, wh_ptr, rows, rmask, g0, ngrp, BG: tl.constexpr):
    """Decode BG q8_0 blocks of rows (BN,): codes (BN, BG, 32) float32, scales (BN, BG)."""
    g = g0 + tl.arange(0, BG)
    ok = rmask[:, None] & (g < ngrp)[None, :]
    base = rows[:, None].to(tl.int64) * (ngrp * 34) + g[None, :] * 34  # (BN, BG)
    lane = tl.arange(0, 32)
    qp = wb_ptr + base[:, :, None] + 2 + lane[None, None, :]
    q = tl.load(qp, mask=ok[:, :, None], other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = tl.load(wh_ptr + base // 2, mask=ok, other=0.0).to(tl.float32)
    return q, d


@triton.jit
def _q8_0_gemv_kernel(
    x_ptr, wb_ptr, wh_ptr, y_ptr, N, K, stride_xm, stride_ym,
    BN: tl.constexpr, BG: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    ngrp = K // 32
    lane = tl.arange(0, 32)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for g0 in range(0, ngrp, BG):
        q, d = _q8_0_tile(wb_ptr, wh_ptr, rows, rmask, g0, ngrp, BG)
        g = g0 + tl.arange(0, BG)
        xp = x_ptr + m * stride_xm + g[:, None] * 32 + lane[None, :]
        x = tl.load(xp, mask=(g < ngrp)[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(d * tl.sum(q * x[None, :, :], axis=2), axis=1)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _q8_0_gemm_kernel(
    x_ptr, wb_ptr, wh_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask, mmask = rows < N, ms < M
    ngrp = K // 32
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    kk = tl.arange(0, BG * 32)
    for g0 in range(0, ngrp, BG):
        q, d = _q8_0_tile(wb_ptr, wh_ptr, rows, rmask, g0, ngrp, BG)
        w = tl.reshape((d[:, :, None] * q).to(DOT), (BN, BG * 32))
        k = g0 * 32 + kk
        xp = x_ptr + ms[:, None] * stride_xm + k[None, :]
        x = tl.load(xp, mask=mmask[:, None] & (k < K)[None, :], other=0.0).to(DOT)
        acc += tl.dot(x, tl.trans(w))
    yp = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _affine_tile(c_ptr, s_ptr, o_ptr, rows, rmask, k, K, G, IS_FP8: tl.constexpr):
    """Dense float32 tile (BN, BK) of w = codes * scale[k // G] + offset[k // G]."""
    ok = rmask[:, None] & (k < K)[None, :]
    cp = c_ptr + rows[:, None].to(tl.int64) * K + k[None, :]
    if IS_FP8:
        w = tl.load(cp, mask=ok, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        w = tl.load(cp, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    gp = rows[:, None].to(tl.int64) * (K // G) + k[None, :] // G
    s = tl.load(s_ptr + gp, mask=ok, other=0.0)
    o = tl.load(o_ptr + gp, mask=ok, other=0.0)
    return w * s + o


@triton.jit
def _affine_gemv_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, y_ptr, N, K, G, stride_xm, stride_ym,
    BN: tl.constexpr, BK: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    acc = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        w = _affine_tile(c_ptr, s_ptr, o_ptr, rows, rmask, k, K, G, IS_FP8)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _affine_gemm_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, y_ptr, M, N, K, G, stride_xm, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IS_FP8: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask, mmask = rows < N, ms < M
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        w = _affine_tile(c_ptr, s_ptr, o_ptr, rows, rmask, k, K, G, IS_FP8).to(DOT)
        xp = x_ptr + ms[:, None] * stride_xm + k[None, :]
        x = tl.load(xp, mask=mmask[:, None] & (k < K)[None, :], other=0.0).to(DOT)
        acc += tl.dot(x, tl.trans(w))
    yp = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & rmask[None, :])


def _bm(m: int) -> int:
    """M tile of the tl.dot kernels: 16 (the smallest tl.dot tile) for decode batches."""
    return 16 if m <= 16 else 64


class _TritonMatmul(QuantMatmul):
    """Shared launch logic: GEMV for M == 1, tl.dot GEMM for M > 1."""

    gemv_bn = 4
    gemm_bn = 32
    gemm_warps = 2
    # Triton's CPU interpreter mis-computes bf16 tl.dot; it runs the tests in float32.
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    # The launches each subclass defines: (grid, x (M, K), y (M, N) written in place[, BM]).
    _gemv: Callable[[tuple[int, int] | None, Tensor, Tensor], None]
    _gemm: Callable[[tuple[int, int], Tensor, Tensor, int], None]

    def _dot(self, x: Tensor):
        """tl.dot operand dtype: fp16 for fp16 activations, else bf16 (fp32 range)."""
        if self.interpret:
            return tl.float32
        return tl.float16 if x.dtype == torch.float16 else tl.bfloat16

    def _out(self, x: Tensor) -> Tensor:
        return torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)

    def _gemv_max_m(self) -> int:
        return 1

    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        y = self._out(x)
        m = x.shape[0]
        if m <= self._gemv_max_m():
            grid = (triton.cdiv(self.out_features, self.gemv_bn), 1)
            self._gemv(grid, x, y)
        else:
            bm = _bm(m)
            grid = (triton.cdiv(self.out_features, self.gemm_bn), triton.cdiv(m, bm))
            self._gemm(grid, x, y, bm)
        return y


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of the q4_K batch-1 kernel (`_q4k_gemv_dp4a_kernel`)."""

    bn: int  # output rows per program
    bb: int  # 256-weight blocks per loop step
    warps: int
    split: int = 1  # split-K programs per row tile (partials summed in the kernel)
    stages: int = 1  # software pipelining depth of the block loop
    x_inline: bool = False  # each program quantizes x itself (no separate launch)
    max_m: int = 1  # rows of x served by the GEMV (one program column per row), GEMM above
    cuda: bool = False  # `cuda_q4k.q4k_gemv` (sm80+): bn = warps x rows per warp, bb = unroll;
    # x_inline does not apply (x is always quantized by its own launch)


def gemv_config_of(data: dict) -> GemvConfig:
    """A GemvConfig from its JSON fields (the kernel tuning cache)."""
    return GemvConfig(**data)


def q4k_gemv_config(n: int, k: int) -> GemvConfig:
    """Untimed default (CPU interpreter, or when no timing is wanted): 8-row tiles, split-K
    for long rows (down_proj) so every SM has enough bytes in flight."""
    return GemvConfig(8, 1, 1, split=4 if k >= 16384 else 1)


# Triton batch-1 GEMV launch configs that `tune_q4k_gemv` times per weight shape at load below
# sm80 (the CUDA GEMV's take over on sm80+): the dp4a
# kernel's best per 24B shape in a 36-config sweep on H100 (benchmarks/quant_gpu.py
# --sections words --words-candidates dp4a, 2026-12-05: 8-row tiles with x quantized by its
# own kernel for the large shapes, split-K 4 with x quantized inline for qkv and o) and
# their neighbours (split 2 / 8, 2 blocks per step). (A variant loading the next step's codes
# during this step's arithmetic was a candidate too; the tuner never picked it on H100,
# session 9, and it went.)
Q4K_GEMV_CANDIDATES = tuple(
    GemvConfig(bn, bb, warps, split=split, x_inline=inline)
    for bn, bb, warps, split, inline in (
        (8, 1, 1, 1, False), (8, 1, 1, 2, False), (8, 1, 1, 4, False), (8, 1, 1, 8, False),
        (8, 2, 1, 1, False), (8, 2, 1, 4, False), (4, 1, 1, 1, False), (16, 1, 1, 4, False),
        (16, 1, 1, 1, True), (16, 1, 1, 4, True), (16, 1, 1, 8, True), (8, 1, 1, 4, True),
        (8, 1, 1, 8, True),
    )
)  # fmt: skip
# The CUDA GEMV's launch shapes (sm80+), as (rows per warp, blocks in flight per lane,
# warps): the best of each 24B shape in a 14-shape sweep on H100 and the runners-up the
# tuner picked in the engine run (`benchmarks/quant_gpu.py --sections words
# --words-candidates cuda`, BENCHMARKS.md session 11).
Q4K_GEMV_CUDA_CANDIDATES = tuple(
    GemvConfig(rw * warps, unroll, warps, cuda=True)
    for rw, unroll, warps in ((2, 2, 4), (4, 2, 4), (1, 5, 2), (1, 5, 4))
)
_TUNE_STREAM_BYTES = 256 << 20  # weights cycled while timing: well above the 50 MB L2


def _stream_ms(kernels: list, x: Tensor) -> float:
    """Milliseconds per call of each of `kernels` (one per copy of a weight) on x, replayed
    in a CUDA graph: together they stream from HBM as a decode step does."""
    import triton.testing

    fn = lambda: [kern(x) for kern in kernels]  # noqa: E731
    return triton.testing.do_bench_cudagraph(fn, rep=10) / len(kernels)


def tune_q4k_gemv(packed: Tensor, shape: tuple[int, int]) -> GemvConfig:
    """The fastest batch-1 GEMV config among `Q4K_GEMV_CANDIDATES` for this q4_K weight
    shape. CUDA only; run once per distinct shape at load (`mistralpy.quant.tuning.KernelTuning`).

    Timed as decode runs it: CUDA-graph replays over enough copies of the weight to stream
    from HBM (a 17 MB qkv weight timed alone sits in L2 and would favour other configs).
    A candidate whose result on this weight strays from dequantize + matmul by more than
    the int8 rounding of x can explain (2% of the output's norm) is never picked."""

    n, k = shape
    copies = max(1, min(16, -(-_TUNE_STREAM_BYTES // packed.numel())))
    weights = [packed] + [packed.clone() for _ in range(copies - 1)]
    x = torch.randn(1, k, device=packed.device, dtype=torch.bfloat16)

    best, best_t = q4k_gemv_config(n, k), float("inf")
    want = x.float() @ TritonQ4KMatmul(packed, shape).dequantize(torch.float32).T
    # Where the CUDA GEMV runs (sm80+) only its configs are timed: it was 3-12% faster than
    # the Triton kernel's best on every 24B shape (H100, BENCHMARKS.md).
    cuda = cuda_q4k.supported(packed.device)
    for cfg in Q4K_GEMV_CUDA_CANDIDATES if cuda else Q4K_GEMV_CANDIDATES:
        if cfg.split > 1 and k // 256 // cfg.split < 2:  # splits of under 2 blocks per row
            continue
        try:
            got = TritonQ4KMatmul(packed, shape, cfg)(x).float()
            if not (got - want).norm() <= 0.02 * want.norm():
                continue
            t = _stream_ms([TritonQ4KMatmul(w, shape, cfg) for w in weights], x)
        except Exception:  # noqa: BLE001 - a config that does not compile is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    return best


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of `_q4k_gemm_swap_kernel` for one M bucket (BM rows of x)."""

    bn: int  # weight rows per program (the matrix unit's M side: 64+ for wgmma)
    bb: int = 1  # 256-weight blocks per loop step
    warps: int = 4
    stages: int = 2  # software pipelining depth of the block loop
    split: int = 1  # split-K programs per row tile (partials summed in the kernel)
    mma: bool = False  # `cuda_q4k.q4k_mma` (CUDA, sm80+; buckets <= 32): bn = 16 warps x tiles


# M buckets of the decode GEMM (rows of x padded to the next); above the last one a
# product is prefill-sized: dequantize to bf16, then a dense GEMM. The swap kernel pads x
# to at least 16 rows (the matrix unit's smallest N); the mma kernel's x tiles are 8 rows,
# so small batches get buckets of their own.
Q4K_GEMM_BUCKETS = (2, 4, 8, 16, 32, 64)


def gemm_configs_of(data: dict) -> dict[int, GemmConfig]:
    """`tune_q4k_gemm`'s picks from their JSON form (the kernel tuning cache)."""
    return {int(bm): GemmConfig(**fields) for bm, fields in data.items()}


def q4k_gemm_config(n: int, k: int, bm: int) -> GemmConfig:
    """Untimed default of the decode GEMM: 128-row weight tiles; split-K where the row
    tiles alone would leave most SMs idle (o, qkv and down at 24B have 40-48 tiles)."""
    tiles = -(-n // 128)
    split = 1 if tiles >= 256 else 8 if k // 256 >= 64 else 4
    return GemmConfig(128, 1, 4, 2, split)


def q4k_gemm_candidates(n: int, k: int) -> list[GemmConfig]:
    """Launch configs `tune_q4k_gemm` times for a weight shape: 64-256-row tiles, split-K
    between none and 16 where it leaves >= 2 blocks per split and keeps the grid under 4096
    programs (and none where the row tiles alone fill under half the H100's 132 SMs). The
    splits share one compiled kernel per tile shape: more of them cost only timing."""
    out = []
    for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 8)):
        tiles = -(-n // bn)
        for split in (1, 2, 4, 8, 16):
            if split == 1 and tiles < 66:
                continue
            if split > 1 and (k // 256 // split < 2 or tiles * split > 4096):
                continue
            out.append(GemmConfig(bn, 1, warps, 2, split))
    return out


Q4K_MMA_MAX_M = 32  # x tiles of 8 rows held in registers: 4 at most


def q4k_gemm_mma_candidates(n: int, k: int) -> list[GemmConfig]:
    """Launch configs of the CUDA tensor-core GEMM (`cuda_q4k`): 1-2 16-row weight tiles per
    warp, 4 or 8 warps per program, and per tile shape the three smallest split-K factors
    (of 1-16, leaving >= 2 blocks per split) that give >= 264 programs, two per H100 SM
    (the best of every 24B shape at 1-32 rows was among them, H100 sweep, BENCHMARKS.md)."""
    out = []
    for tiles, warps in ((1, 4), (2, 4), (1, 8)):
        bn = 16 * tiles * warps
        row_tiles = -(-n // bn)
        splits = [s for s in (1, 2, 4, 8, 16) if s == 1 or k // 256 // s >= 2]
        wide = [s for s in splits if row_tiles * s >= 264] or splits[-1:]
        out += [GemmConfig(bn, 1, warps, 1, s, mma=True) for s in wide[:3]]
    return out


def tune_q4k_gemm(packed: Tensor, shape: tuple[int, int]) -> dict[int, GemmConfig]:
    """The fastest decode-GEMM config per M bucket for this q4_K weight shape, timed as
    `tune_q4k_gemv` times (CUDA-graph replays streaming copies of the weight from HBM). A
    candidate whose output strays from the dequantize + matmul product by more than bf16
    rounding explains (1% of its norm) is never picked."""

    n, k = shape
    copies = max(1, min(16, -(-_TUNE_STREAM_BYTES // packed.numel())))
    weights = [packed] + [packed.clone() for _ in range(copies - 1)]
    exact = TritonQ4KMatmul(packed, shape).dequantize(torch.float32)
    chosen: dict[int, GemmConfig] = {}
    # Where the CUDA mma kernel runs (sm80+, <= 32 rows) only its configs are timed: it was
    # 1.0-2.3x faster than the swap kernel at 8-32 rows on every 24B shape but one (o at 32
    # rows: 3% slower; H100, BENCHMARKS.md). The swap kernel runs buckets under 16 padded to
    # 16 rows: its best config there is timed again below 16 rather than every candidate.
    for bm in sorted(Q4K_GEMM_BUCKETS, key=lambda b: (b < 16, -b)):
        x = torch.randn(bm, k, device=packed.device, dtype=torch.bfloat16)
        want = x.float() @ exact.T
        best, best_t = q4k_gemm_config(n, k, bm), float("inf")
        if bm <= Q4K_MMA_MAX_M and cuda_q4k.supported(packed.device):
            candidates = q4k_gemm_mma_candidates(n, k)
        elif bm < 16 and 16 in chosen:
            candidates = [chosen[16]]
        else:
            candidates = q4k_gemm_candidates(n, k)
        for cfg in candidates:
            try:
                got = TritonQ4KMatmul(packed, shape, gemm={bm: cfg})(x).float()
                if not (got - want).norm() <= 0.01 * want.norm():
                    continue
                t = _stream_ms([TritonQ4KMatmul(w, shape, gemm={bm: cfg}) for w in weights], x)
            except Exception:  # noqa: BLE001 - a config that does not compile is skipped
                continue
            if t < best_t:
                best, best_t = cfg, t
        chosen[bm] = best
    del exact
    return chosen


class TritonQ4KMatmul(_TritonMatmul):
    """q4_K straight from GGUF bytes (N, K / 256 * 144)."""

    gemm_bb = 1

    def __init__(
        self,
        packed: Tensor,
        shape: tuple[int, int],
        gemv: GemvConfig | None = None,
        gemm: dict[int, GemmConfig] | None = None,
    ):
        self.out_features, self.in_features = shape
        self.wb, self.wi = packed, packed.view(torch.int32)
        self.gemv = gemv or q4k_gemv_config(*shape)
        gemm = gemm or {}
        self.gemm = {bm: gemm.get(bm) or q4k_gemm_config(*shape, bm) for bm in Q4K_GEMM_BUCKETS}
        # split-K scratch per (device, rows of x): float32 partials (split, m, N) and int32
        # arrival counters (m, row tiles), made on first use; the kernel leaves the counters
        # at 0, so eager calls and CUDA-graph replays reuse them without a memset. One
        # instance serves one stream at a time (as a model's layers do).
        self._split_scratch: dict[tuple[torch.device, str, int], tuple[Tensor, Tensor]] = {}
        self._x8_scratch: dict[tuple[torch.device, int], tuple[Tensor, Tensor]] = {}

    def _gemv_max_m(self) -> int:
        return self.gemv.max_m

    def _scratch(self, device: torch.device, m: int, split: int, tiles: int, kind: str = "gemv"):
        """(workspace (>= split, m, N) float32, counters (m * tiles,) int32 zeros), one per
        kernel kind and m (a CUDA graph keeps the pointers it captured)."""
        key = (device, kind, m)
        ws_cnt = self._split_scratch.get(key)
        if ws_cnt is None or ws_cnt[0].shape[0] < split or ws_cnt[1].numel() < m * tiles:
            ws = torch.empty(split, m, self.out_features, device=device, dtype=torch.float32)
            ws_cnt = ws, torch.zeros(m * tiles, device=device, dtype=torch.int32)
            self._split_scratch[key] = ws_cnt
        return ws_cnt

    def _quantized_x(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (M, K) -> int8 groups for the dp4a GEMV: (words (M, K / 4) int32, (scale, sum,
        residual) (M, K / 32, 3) float32), in buffers kept per (device, M) like the split-K
        scratch (one stream at a time)."""
        m, k = x.shape
        key = (x.device, m)
        bufs = self._x8_scratch.get(key)
        if bufs is None:
            bufs = (
                torch.empty(m, k // 4, device=x.device, dtype=torch.int32),
                torch.empty(m, k // 32, 3, device=x.device, dtype=torch.float32),
            )
            self._x8_scratch[key] = bufs
        groups_per_program = 32
        grid = (m, triton.cdiv(k // 32, groups_per_program))
        _q8_quant_kernel[grid](x, *bufs, k, x.stride(0), BG=groups_per_program, num_warps=4)
        return bufs

    def _gemv(self, grid, x, y):
        cfg, nblk, m = self.gemv, self.in_features // 256, x.shape[0]
        if cfg.cuda:
            xq, xs = self._quantized_x(x)
            cuda_q4k.q4k_gemv(self.wb, xq, xs, y, rows_per_warp=cfg.bn // cfg.warps,
                              unroll=cfg.bb, warps=cfg.warps)  # fmt: skip
            return
        split_blocks = triton.cdiv(triton.cdiv(nblk, cfg.split), cfg.bb) * cfg.bb
        split = triton.cdiv(nblk, split_blocks)
        tiles = triton.cdiv(self.out_features, cfg.bn)
        ws, cnt = self._scratch(y.device, m, split, tiles) if split > 1 else (y, y)
        xq, xs = (x, x) if cfg.x_inline else self._quantized_x(x)
        _q4k_gemv_dp4a_kernel[(tiles, split, m)](
            x, xq, xs, self.wi, y, ws, cnt, self.out_features, self.in_features,
            x.stride(0), y.stride(0), split_blocks, BN=cfg.bn, BB=cfg.bb,
            PARTIAL=split > 1, STAGES=cfg.stages, X_INLINE=cfg.x_inline,
            ASM=not self.interpret, num_warps=cfg.warps,
        )  # fmt: skip

    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        m = x.shape[0]
        if m > Q4K_GEMM_BUCKETS[-1]:
            return x @ self.dequantize(x.dtype).T
        y = self._out(x)
        if m <= self.gemv.max_m:
            self._gemv(None, x, y)
        else:
            self._gemm_decode(x, y)
        return y

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The whole weight (N, K) in `dtype`: prefill-sized products run as a dense GEMM
        on it (the dequantize pass costs ~ (0.56 + 2 + 2) bytes per weight, small beside
        the GEMM's 2 M flops per weight once M is in the hundreds)."""
        n, k = self.out_features, self.in_features
        w = torch.empty(n, k, dtype=dtype, device=self.wb.device)
        bn, bb = 32, 2
        grid = (triton.cdiv(n, bn), triton.cdiv(k // 256, bb))
        _q4k_dequant_kernel[grid](self.wb, self.wi, w, n, k, BN=bn, BB=bb, num_warps=4)
        return w

    def _gemm_decode(self, x: Tensor, y: Tensor) -> None:
        m = x.shape[0]
        bm = next(b for b in Q4K_GEMM_BUCKETS if b >= m)
        cfg = self.gemm[bm]
        nblk = self.in_features // 256
        split_blocks = triton.cdiv(triton.cdiv(nblk, cfg.split), cfg.bb) * cfg.bb
        split = triton.cdiv(nblk, split_blocks)
        tiles = triton.cdiv(self.out_features, cfg.bn)
        if cfg.mma:
            ws, cnt = self._scratch(y.device, m, split, tiles, "mma") if split > 1 else (y, y)
            cuda_q4k.q4k_mma(
                self.wb,
                x,
                y,
                ws,
                cnt,
                row_tiles=cfg.bn // (16 * cfg.warps),
                warps=cfg.warps,
                split_blocks=split_blocks,
            )
            return
        bm = max(bm, 16)
        ws, cnt = self._scratch(y.device, bm, split, tiles, "gemm") if split > 1 else (y, y)
        _q4k_gemm_swap_kernel[(tiles, split)](
            x, self.wi, y, ws, cnt, m, self.out_features, self.in_features,
            x.stride(0), y.stride(0), split_blocks, BM=bm, BN=cfg.bn, BB=cfg.bb,
            PARTIAL=split > 1, STAGES=cfg.stages, DOT=self._dot(x), num_warps=cfg.warps,
        )  # fmt: skip


class TritonQ8_0Matmul(_TritonMatmul):
    """q8_0 straight from GGUF bytes (N, K / 32 * 34)."""

    gemv_bg = 16  # H100-tuned, as for q4k
    gemv_warps = 1
    gemm_bn, gemm_bg = 16, 8

    def __init__(self, packed: Tensor, shape: tuple[int, int]):
        self.out_features, self.in_features = shape
        self.wb, self.wh = packed, packed.view(torch.float16)

    def _gemv(self, grid, x, y):
        _q8_0_gemv_kernel[grid](
            x, self.wb, self.wh, y, self.out_features, self.in_features, x.stride(0), y.stride(0),
            BN=self.gemv_bn, BG=self.gemv_bg, num_warps=self.gemv_warps,
        )  # fmt: skip

    def _gemm(self, grid, x, y, bm):
        _q8_0_gemm_kernel[grid](
            x, self.wb, self.wh, y, x.shape[0], self.out_features, self.in_features,
            x.stride(0), y.stride(0), BM=bm, BN=self.gemm_bn, BG=self.gemm_bg, DOT=self._dot(x), num_warps=self.gemm_warps,
        )  # fmt: skip


class TritonAffineMatmul(_TritonMatmul):
    """Generic: int8 (or e4m3 byte) codes (N, K), float32 scale/offset (N, K / group)."""

    gemv_bk = 256
    gemm_bk = 64

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor, group: int, fp8: bool):
        self.out_features, self.in_features = codes.shape
        self.codes = codes.contiguous().view(torch.uint8)
        self.scale, self.offset = scale.float().contiguous(), offset.float().contiguous()
        self.group, self.fp8 = group, fp8

    def _gemv(self, grid, x, y):
        _affine_gemv_kernel[grid](
            x, self.codes, self.scale, self.offset, y, self.out_features, self.in_features,
            self.group, x.stride(0), y.stride(0), BN=self.gemv_bn, BK=self.gemv_bk,
            IS_FP8=self.fp8, num_warps=4,
        )  # fmt: skip

    def _gemm(self, grid, x, y, bm):
        _affine_gemm_kernel[grid](
            x, self.codes, self.scale, self.offset, y, x.shape[0], self.out_features,
            self.in_features, self.group, x.stride(0), y.stride(0), BM=bm, BN=self.gemm_bn,
            BK=self.gemm_bk, IS_FP8=self.fp8, DOT=self._dot(x), num_warps=4,
        )  # fmt: skip


@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, rows_per_prog, BK: tl.constexpr):
    """Rows [p R, p R + R) of x (R = rows_per_prog) -> e4m3 codes q and one float32 scale
    s[p] = their absmax / 448 (R = 1: per token; R = M: one scale for the whole tensor)."""
    p = tl.program_id(0)
    m0 = p * rows_per_prog
    m1 = tl.minimum(m0 + rows_per_prog, M)
    amax = tl.zeros((BK,), dtype=tl.float32)
    for m in range(m0, m1):
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(s_ptr + p, scale)
    for m in range(m0, m1):
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -448.0, 448.0)
            tl.store(q_ptr + m * K + k, q.to(tl.float8e4nv), mask=k < K)


def _fp8_quantize(x: Tensor, rows_per_prog: int, scales: int) -> tuple[Tensor, Tensor]:
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(scales, 1, dtype=torch.float32, device=x.device)
    bk = min(4096, triton.next_power_of_2(k))
    _fp8_quant_kernel[(scales,)](
        x, q, scale, m, k, x.stride(0), rows_per_prog, BK=bk, num_warps=8 if bk >= 2048 else 4
    )
    return q, scale


def fp8_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Fused `quant_matmul.fp8_quantize_rows`: x (M, K) -> (codes (M, K) e4m3, scale (M, 1))."""
    return _fp8_quantize(x, 1, x.shape[0])


def fp8_quantize_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """Fused `quant_matmul.fp8_quantize_tensor`: one program (meant for small M) -> codes
    (M, K) e4m3 and scale (1, 1) float32."""
    return _fp8_quantize(x, x.shape[0], 1)


def fp8_weight_parts(packed: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """mistralpy fp8 rows (N, K + 4) -> (codes (N, K) float8_e4m3fn contiguous, scale (N,))."""
    k = shape[1]
    codes = packed[:, :k].contiguous().view(torch.float8_e4m3fn)
    return codes, packed[:, k:].contiguous().view(torch.float32).reshape(-1)


def build(
    fmt: str,
    packed: Tensor,
    shape: tuple[int, int],
    affine,
    gemv: GemvConfig | None = None,
    gemm: dict[int, GemmConfig] | None = None,
) -> QuantMatmul | None:
    """Kernel for format name `fmt` given its GGUF bytes, or (other formats) its
    GroupAffine form `affine` (codes, scale, offset, group); None for nothing suitable.
    gemv / gemm: the q4k launch configs (`tune_q4k_gemv`, `tune_q4k_gemm`), else the
    untimed defaults."""
    if fmt == "q4k":
        return TritonQ4KMatmul(packed, shape, gemv, gemm)
    if fmt == "q8_0":
        return TritonQ8_0Matmul(packed, shape)
    if fmt == "fp8":
        codes, scale = fp8_weight_parts(packed, shape)
        return TritonAffineMatmul(
            codes.view(torch.uint8), scale[:, None], torch.zeros_like(scale[:, None]), shape[1],
            fp8=True,
        )  # fmt: skip
    if affine is None:
        return None
    return TritonAffineMatmul(affine.codes, affine.scale, affine.offset, affine.group, False)


FP8_GEMV_BLOCK_K = 1024
# (block_n, num_warps) candidates; `tune_fp8_gemv` times them per weight on the GPU.
FP8_GEMV_CONFIGS = ((16, 8), (8, 8), (8, 4), (4, 4))


def fp8_gemv(
    x: Tensor, codes: Tensor, scale: Tensor, config: tuple[int, int] = FP8_GEMV_CONFIGS[0]
) -> Tensor | None:
    """Weight-only fp8 GEMV for one row: x (1, K) @ (codes (N, K) e4m3 * scale (N,)[:, None]).T
    -> (1, N) in x's dtype, in one kernel (no activation quantization, no separate scale
    multiply). None when the shape does not fit the kernel (K not a multiple of its block)."""
    n, k = codes.shape
    if x.shape != (1, k) or k % FP8_GEMV_BLOCK_K or x.stride(1) != 1:
        return None
    block_n, warps = config
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    from mistralpy.kernels.triton_gemv import _gemv_kernel  # the same loop, with row scales

    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, codes, scale, y, n, k, codes.stride(0),
        BLOCK_N=block_n, BLOCK_K=FP8_GEMV_BLOCK_K, HAS_SCALE=True, num_warps=warps,
    )  # fmt: skip
    return y


def fp8_gemv_config_of(data: list | None) -> tuple[int, int] | None:
    """`tune_fp8_gemv`'s pick from its JSON form (the kernel tuning cache)."""
    return None if data is None else (int(data[0]), int(data[1]))


def tune_fp8_gemv(codes: Tensor, scale: Tensor, baseline) -> tuple[int, int] | None:
    """The fastest `fp8_gemv` config for this weight at one row, or None when `baseline`
    (the W8A8 path, a callable of x) is faster or the shape does not fit. CUDA only; runs once
    per layer at load (a few ms), timed with CUDA graphs so launch gaps count as in decode."""
    import triton.testing

    k = codes.shape[1]
    if not codes.is_cuda or k % FP8_GEMV_BLOCK_K:
        return None
    x = torch.randn(1, k, device=codes.device, dtype=torch.bfloat16)
    best, best_t = None, triton.testing.do_bench_cudagraph(lambda: baseline(x), rep=5)
    for config in FP8_GEMV_CONFIGS:
        t = triton.testing.do_bench_cudagraph(lambda c=config: fp8_gemv(x, codes, scale, c), rep=5)
        if t < best_t:
            best, best_t = config, t
    return best
