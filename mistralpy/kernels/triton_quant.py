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
meet the matching 32-element slices of x, so no shuffles are needed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from mistralpy.kernels.quant_matmul import QuantMatmul

NATIVE_FORMATS = ("q4k", "q8_0")


@triton.jit
def _q4k_scale_min(wb_ptr, base, s):
    """6-bit (scale, min) of sub-block s (same shape as base) of the q4_K block at byte base."""
    sp = wb_ptr + base + 4
    t0 = tl.load(sp + s).to(tl.int32)
    t1 = tl.load(sp + s + 4).to(tl.int32)
    t2 = tl.load(sp + tl.where(s >= 4, s - 4, s)).to(tl.int32)
    sc = tl.where(s < 4, t0 & 63, (t1 & 15) | ((t2 >> 6) << 4))
    mn = tl.where(s < 4, t1 & 63, (t1 >> 4) | ((t0 >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _q4k_tile(wb_ptr, wh_ptr, rows, rmask, b0, nblk, BB: tl.constexpr):
    """Decode BB q4_K blocks of rows (BN,): codes lo/hi (BN, 4BB, 32) float32 and their
    scale/min products (BN, 4BB), for chunk j = 4 * block + c holding sub-blocks 2c, 2c+1."""
    J: tl.constexpr = BB * 4
    j = tl.arange(0, J)
    blk = b0 + j // 4
    c = j % 4
    ok = rmask[:, None] & (blk < nblk)[None, :]
    base = rows[:, None].to(tl.int64) * (nblk * 144) + blk[None, :] * 144  # (BN, J)
    lane = tl.arange(0, 32)
    qp = wb_ptr + base[:, :, None] + 16 + c[None, :, None] * 32 + lane[None, None, :]
    qb = tl.load(qp, mask=ok[:, :, None], other=0).to(tl.int32)
    d = tl.load(wh_ptr + base // 2, mask=ok, other=0.0).to(tl.float32)
    dmin = tl.load(wh_ptr + base // 2 + 1, mask=ok, other=0.0).to(tl.float32)
    s_lo = tl.zeros_like(base) + 2 * c[None, :]
    sc_lo, m_lo = _q4k_scale_min(wb_ptr, base, s_lo)
    sc_hi, m_hi = _q4k_scale_min(wb_ptr, base, s_lo + 1)
    q_lo = (qb & 15).to(tl.float32)
    q_hi = (qb >> 4).to(tl.float32)
    return q_lo, q_hi, d * sc_lo, dmin * m_lo, d * sc_hi, dmin * m_hi


@triton.jit
def _q4k_gemv_kernel(
    x_ptr, wb_ptr, wh_ptr, y_ptr, N, K, stride_xm, stride_ym,
    BN: tl.constexpr, BB: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(1)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    nblk = K // 256
    J: tl.constexpr = BB * 4
    j = tl.arange(0, J)
    lane = tl.arange(0, 32)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for b0 in range(0, nblk, BB):
        q_lo, q_hi, s_lo, m_lo, s_hi, m_hi = _q4k_tile(wb_ptr, wh_ptr, rows, rmask, b0, nblk, BB)
        blk = b0 + j // 4
        xo = blk * 256 + (j % 4) * 64
        xm = (blk < nblk)[:, None]
        xp = x_ptr + m * stride_xm + xo[:, None] + lane[None, :]
        x_lo = tl.load(xp, mask=xm, other=0.0).to(tl.float32)  # (J, 32)
        x_hi = tl.load(xp + 32, mask=xm, other=0.0).to(tl.float32)
        dot_lo = tl.sum(q_lo * x_lo[None, :, :], axis=2)  # (BN, J)
        dot_hi = tl.sum(q_hi * x_hi[None, :, :], axis=2)
        part = s_lo * dot_lo - m_lo * tl.sum(x_lo, axis=1)[None, :]
        part += s_hi * dot_hi - m_hi * tl.sum(x_hi, axis=1)[None, :]
        acc += tl.sum(part, axis=1)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _q4k_gemm_kernel(
    x_ptr, wb_ptr, wh_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)
    rmask, mmask = rows < N, ms < M
    nblk = K // 256
    J: tl.constexpr = BB * 4
    j = tl.arange(0, J)
    lane = tl.arange(0, 32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b0 in range(0, nblk, BB):
        q_lo, q_hi, s_lo, m_lo, s_hi, m_hi = _q4k_tile(wb_ptr, wh_ptr, rows, rmask, b0, nblk, BB)
        w_lo = s_lo[:, :, None] * q_lo - m_lo[:, :, None]
        w_hi = s_hi[:, :, None] * q_hi - m_hi[:, :, None]
        blk = b0 + j // 4
        xo = blk * 256 + (j % 4) * 64
        xmask = mmask[:, None, None] & (blk < nblk)[None, :, None]
        xp = x_ptr + ms[:, None, None] * stride_xm + xo[None, :, None] + lane[None, None, :]
        x_lo = tl.load(xp, mask=xmask, other=0.0).to(DOT)  # (BM, J, 32)
        x_hi = tl.load(xp + 32, mask=xmask, other=0.0).to(DOT)
        w_lo2 = tl.reshape(w_lo.to(DOT), (BN, J * 32))
        w_hi2 = tl.reshape(w_hi.to(DOT), (BN, J * 32))
        acc += tl.dot(tl.reshape(x_lo, (BM, J * 32)), tl.trans(w_lo2))
        acc += tl.dot(tl.reshape(x_hi, (BM, J * 32)), tl.trans(w_hi2))
    yp = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & rmask[None, :])


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
        raw = tl.load(cp, mask=ok, other=0).to(tl.float8e4nv, bitcast=True)
    else:
        raw = tl.load(cp, mask=ok, other=0).to(tl.int8, bitcast=True)
    gp = rows[:, None].to(tl.int64) * (K // G) + k[None, :] // G
    s = tl.load(s_ptr + gp, mask=ok, other=0.0)
    o = tl.load(o_ptr + gp, mask=ok, other=0.0)
    return raw.to(tl.float32) * s + o


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

    def _dot(self, x: Tensor):
        """tl.dot operand dtype: fp16 for fp16 activations, else bf16 (fp32 range)."""
        if self.interpret:
            return tl.float32
        return tl.float16 if x.dtype == torch.float16 else tl.bfloat16

    def _out(self, x: Tensor) -> Tensor:
        return torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        y = self._out(x)
        m = x.shape[0]
        if m == 1:
            grid = (triton.cdiv(self.out_features, self.gemv_bn), 1)
            self._gemv(grid, x, y)
        else:
            bm = _bm(m)
            grid = (triton.cdiv(self.out_features, self.gemm_bn), triton.cdiv(m, bm))
            self._gemm(grid, x, y, bm)
        return y


class TritonQ4KMatmul(_TritonMatmul):
    """q4_K straight from GGUF bytes (N, K / 256 * 144)."""

    gemm_bb = 1

    def __init__(self, packed: Tensor, shape: tuple[int, int]):
        self.out_features, self.in_features = shape
        self.wb, self.wh = packed, packed.view(torch.float16)
        # Tuned on H100 at the 24B shapes (benchmarks/quant_gpu.py): few warps and several
        # blocks per step keep more independent loads in flight per thread.
        long_k = self.in_features >= 16384
        self.gemv_bb, self.gemv_warps = (4, 2) if long_k else (2, 1)

    def _gemv(self, grid, x, y):
        _q4k_gemv_kernel[grid](
            x, self.wb, self.wh, y, self.out_features, self.in_features, x.stride(0), y.stride(0),
            BN=self.gemv_bn, BB=self.gemv_bb, num_warps=self.gemv_warps,
        )  # fmt: skip

    def _gemm(self, grid, x, y, bm):
        _q4k_gemm_kernel[grid](
            x, self.wb, self.wh, y, x.shape[0], self.out_features, self.in_features,
            x.stride(0), y.stride(0), BM=bm, BN=self.gemm_bn, BB=self.gemm_bb, DOT=self._dot(x), num_warps=self.gemm_warps,
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


def build(fmt: str, packed: Tensor, shape: tuple[int, int], affine) -> QuantMatmul | None:
    """Kernel for format name `fmt` given its GGUF bytes, or (other formats) its
    GroupAffine form `affine` (codes, scale, offset, group); None for nothing suitable."""
    if fmt == "q4k":
        return TritonQ4KMatmul(packed, shape)
    if fmt == "q8_0":
        return TritonQ8_0Matmul(packed, shape)
    if fmt == "fp8":
        n, k = shape
        codes = packed[:, :k].contiguous()
        scale = packed[:, k:].contiguous().view(torch.float32)
        return TritonAffineMatmul(codes, scale, torch.zeros_like(scale), k, fp8=True)
    if affine is None:
        return None
    return TritonAffineMatmul(affine.codes, affine.scale, affine.offset, affine.group, False)
