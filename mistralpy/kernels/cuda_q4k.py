"""q4_K decode kernels in CUDA C++ compiled at run time by NVRTC: `q4k_mma`, a GEMM on the
tensor cores for 1-32 rows of x, and `q4k_gemv`, the batch-1 GEMV (imported lazily, never by
`import mistralpy`; tests/kernels/test_cuda_q4k.py replays their lane maps on the CPU and
compiles them where NVRTC is installed).

`q4k_gemv`: lane 8 quarter + 2 c + h of a warp reads, for each of its rows, the 16 code bytes
at 32 c + 16 h of blocks quarter, quarter + 4, ... (the warp: four consecutive blocks, 512
contiguous bytes, per load), and meets them with x in int8 groups of 32 (quantized by
`triton_quant._q8_quant_kernel`) through dp4a (the high nibbles masked in place: a 16x dot),
as llama.cpp's mmvq; a sub-block's x sum and residual terms enter once, from its h == 0 lane.
The rest of this docstring is about `q4k_mma`.

Why CUDA and not Triton: in Triton a dequantized weight tile reaches the matrix unit
through shared memory in a layout the compiler picks, and the swap-AB `tl.dot` kernel
streams q4_K at ~30% of HBM bandwidth at 8-32 rows (BENCHMARKS.md). Here each thread
dequantizes straight into the registers `mma.sync.m16n8k16` reads as its A operand, as
Marlin does, but over the GGUF bytes in place (no repacked copy): instead of permuting the
weight at load, the kernel permutes the reduction order, which only x has to follow.

Maps (per 256-weight block, two 128-weight spans sp; lane = 4 g + t):
- weight rows are the mma's M side (16 per tile: rows g and g + 8), rows of x its N side
  (8 per tile: column g of B), so a batch of 1-32 rows pads only x;
- thread t reads 16 code bytes at offset 64 sp + 16 t of the block's 128 (one 16-byte load
  per row: a warp reads 64 contiguous bytes of each row); byte e of its word j holds the
  codes of weights k0 + 4 j + e (low nibble) and k0 + 32 + 4 j + e (high), with
  k0 = 128 sp + 64 (t // 2) + 16 (t % 2);
- mma tile (sp, j, nibble h) takes as thread t's k slots 2 t + 8 s + e (s, e in {0, 1})
  the weights k0 + 32 h + 4 j + s + 2 e: nibble h of bytes (0, 2) for s = 0 and (1, 3) for
  s = 1, so each bf16x2 register pair is one byte permute of the word's nibbles, and each
  pair has one (scale, min) sub-block;
- x's B fragment for that tile is gathered by two byte permutes from the 16 contiguous
  values at k0 + 32 h that the thread loads once per span.
A weight is w = d sc q - dmin m: per word a LOP3 (+ a shift) splits the nibbles; per pair a
byte permute writes the magic exponent above each code (0x43 | q is 128 + q in bf16), one
FMA removes the bias and one FMA applies the sub-block's (scale, -min) pair.

Split-K partials go to a float32 workspace (split, M, N); the last program of a row tile
to arrive sums them in order and resets its counter (graph replays need no memset).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

_COMMON = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#if FP16
#define MAGIC_NEG 0xE400E400u
#define ONE2 0x3C003C00u
#define FMA2 "fma.rn.f16x2"
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#define CVT2 "cvt.rn.f16x2.f32"
#define CVT1 "cvt.rn.f16.f32"
#define MAGIC4 0x64646464u
#else
#define MAGIC_NEG 0xC300C300u
#define ONE2 0x3F803F80u
#define FMA2 "fma.rn.bf16x2"
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#define CVT2 "cvt.rn.bf16x2.f32"
#define CVT1 "cvt.rn.bf16.f32"
#define MAGIC4 0x43434343u
#endif

__device__ __forceinline__ void load_stream(u32 (&r)[4], const unsigned char* p) {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

__device__ __forceinline__ void load_x(u32 (&r)[4], const u16* p) {
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm(FMA2 " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ u32 pack2(float v) {
    u32 d;
    asm(CVT2 " %0, %1, %1;" : "=r"(d) : "f"(v));
    return d;
}

__device__ __forceinline__ u16 to_half(float v) {
    u16 d;
    asm(CVT1 " %0, %1;" : "=h"(d) : "f"(v));
    return d;
}

__device__ __forceinline__ float half_to_float(u32 bits) {
    float f;
    u16 h = (u16)bits;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// pair of weights of one sub-block from a word of nibbles (nib: one nibble per byte):
// bytes (0, 2) (SEL 0x4240) or (1, 3) (0x4341) get the magic exponent byte above them
__device__ __forceinline__ u32 dequant_pair(u32 nib, u32 sel, u32 scale2, u32 neg_min2) {
    u32 v = prmt(nib, MAGIC4, sel);  // 128 + q in each half
    v = fma2(v, ONE2, MAGIC_NEG);  // exactly q
    return fma2(v, scale2, neg_min2);
}

// The 6-bit scales (sc) and mins (mn) of sub-blocks 4 hi + sh / 8 + {0, 1} of a block
// header h (16 bytes as 4 words), one per byte of the low half-word (sh = 0 or 16)
__device__ __forceinline__ void scale_min_bytes(const u32 (&h)[4], int sh, bool hi, u32& sc, u32& mn) {
    sc = hi ? (((h[3] >> sh) & 0x0F0Fu) | ((h[1] >> (sh + 2)) & 0x3030u)) : ((h[1] >> sh) & 0x3F3Fu);
    mn = hi ? (((h[3] >> (sh + 4)) & 0x0F0Fu) | ((h[2] >> (sh + 2)) & 0x3030u)) : ((h[2] >> sh) & 0x3F3Fu);
}

"""

_MMA = r"""
__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(MMA " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (scale, -min) pairs of the two sub-blocks 4 HI + 2 (t / 2) + {0, 1} of a block header h
// (16 bytes as 4 words; sh = 16 (t / 2)): the two 6-bit values sit in adjacent bytes, so
// both are decoded at once, spread into a half-precision pair by a byte permute that
// writes the magic exponent above each byte (128 + v) and scaled by (d, d) / (-dmin, -dmin)
__device__ __forceinline__ void sub_blocks(const u32 (&h)[4], int sh, bool hi, u32& s2, u32& o2) {
    u32 sc, mn;
    scale_min_bytes(h, sh, hi, sc, mn);
    u32 sc2 = fma2(prmt(sc, MAGIC4, 0x4140u), ONE2, MAGIC_NEG);  // exact integers
    u32 mn2 = fma2(prmt(mn, MAGIC4, 0x4140u), ONE2, MAGIC_NEG);
#if FP16
    u32 d2 = prmt(h[0], 0u, 0x1010u), negdmin2 = prmt(h[0], 0u, 0x3232u) ^ 0x80008000u;
#else
    u32 d2 = pack2(half_to_float(h[0] & 0xFFFFu)), negdmin2 = pack2(-half_to_float(h[0] >> 16));
#endif
    s2 = fma2(sc2, d2, 0x80008000u);  // + (-0): a product
    o2 = fma2(mn2, negdmin2, 0x80008000u);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
q4k_mma(const unsigned char* __restrict__ w, const u16* __restrict__ x, u16* __restrict__ y,
        float* __restrict__ ws, int* __restrict__ cnt, int M, int N, int K,
        int split_blocks, int ldx, int ldy) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int nblk = K >> 8;
    const long long row_bytes = (long long)nblk * 144;
    const int row0 = (blockIdx.x * WARPS + warp) * (RT * 16);
    const int split = blockIdx.y;
    const int b_start = split * split_blocks;
    const int b_end = min(b_start + split_blocks, nblk);
    const int k0 = 64 * (t >> 1) + 16 * (t & 1);

    const unsigned char* wrow[RT][2];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int ab = 0; ab < 2; ++ab)  // rows past N read the last row, never stored
            wrow[r][ab] = w + (long long)min(row0 + 16 * r + 8 * ab + g, N - 1) * row_bytes;
    const u16* xrow[NT];  // rows of x past M read row M - 1: their columns are never stored
#pragma unroll
    for (int n = 0; n < NT; ++n) xrow[n] = x + (long long)min(8 * n + g, M - 1) * ldx + k0;

    float acc[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][n][i] = 0.f;

    u32 hdr[RT][2][4], code[RT][2][2][4];
    if (b_start < b_end) {
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int ab = 0; ab < 2; ++ab) {
                const unsigned char* p = wrow[r][ab] + (long long)b_start * 144;
                load_stream(hdr[r][ab], p);
                load_stream(code[r][ab][0], p + 16 + 16 * t);
                load_stream(code[r][ab][1], p + 80 + 16 * t);
            }
    }
    for (int b = b_start; b < b_end; ++b) {
        u32 h_cur[RT][2][4], c_cur[RT][2][2][4];
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int ab = 0; ab < 2; ++ab)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    h_cur[r][ab][i] = hdr[r][ab][i];
                    c_cur[r][ab][0][i] = code[r][ab][0][i];
                    c_cur[r][ab][1][i] = code[r][ab][1][i];
                }
        if (b + 1 < b_end) {  // the next block's bytes are in flight during this one's math
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int ab = 0; ab < 2; ++ab) {
                    const unsigned char* p = wrow[r][ab] + (long long)(b + 1) * 144;
                    load_stream(hdr[r][ab], p);
                    load_stream(code[r][ab][0], p + 16 + 16 * t);
                    load_stream(code[r][ab][1], p + 80 + 16 * t);
                }
        }
#pragma unroll
        for (int sp = 0; sp < 2; ++sp) {
            u32 xv[NT][2][8];
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const u16* p = xrow[n] + b * 256 + sp * 128 + 32 * hh;
                    u32 lo[4], hi[4];
                    load_x(lo, p);
                    load_x(hi, p + 8);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        xv[n][hh][i] = lo[i];
                        xv[n][hh][4 + i] = hi[i];
                    }
                }
            u32 s_pair[RT][2], o_pair[RT][2];
#pragma unroll
            for (int r = 0; r < RT; ++r)
#pragma unroll
                for (int ab = 0; ab < 2; ++ab)
                    sub_blocks(h_cur[r][ab], 16 * (t >> 1), sp == 1, s_pair[r][ab], o_pair[r][ab]);
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                u32 s2[RT][2], o2[RT][2];  // sub-block 4 sp + 2 (t / 2) + hh's, in both halves
#pragma unroll
                for (int r = 0; r < RT; ++r)
#pragma unroll
                    for (int ab = 0; ab < 2; ++ab) {
                        u32 sel = hh ? 0x3232u : 0x1010u;
                        s2[r][ab] = prmt(s_pair[r][ab], 0u, sel);
                        o2[r][ab] = prmt(o_pair[r][ab], 0u, sel);
                    }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    u32 bx0[NT], bx1[NT];
#pragma unroll
                    for (int n = 0; n < NT; ++n) {
                        bx0[n] = prmt(xv[n][hh][2 * j], xv[n][hh][2 * j + 1], 0x5410u);
                        bx1[n] = prmt(xv[n][hh][2 * j], xv[n][hh][2 * j + 1], 0x7632u);
                    }
#pragma unroll
                    for (int r = 0; r < RT; ++r) {
                        u32 qa = c_cur[r][0][sp][j], qb = c_cur[r][1][sp][j];
                        u32 na = (hh ? qa >> 4 : qa) & 0x0F0F0F0Fu, nb = (hh ? qb >> 4 : qb) & 0x0F0F0F0Fu;
                        u32 a0 = dequant_pair(na, 0x4240u, s2[r][0], o2[r][0]);
                        u32 a1 = dequant_pair(nb, 0x4240u, s2[r][1], o2[r][1]);
                        u32 a2 = dequant_pair(na, 0x4341u, s2[r][0], o2[r][0]);
                        u32 a3 = dequant_pair(nb, 0x4341u, s2[r][1], o2[r][1]);
#pragma unroll
                        for (int n = 0; n < NT; ++n) mma(acc[r][n], a0, a1, a2, a3, bx0[n], bx1[n]);
                    }
                }
            }
        }
    }

    // C fragment: acc[r][n][2 ab + e] is weight row row0 + 16 r + 8 ab + g, x row 8 n + 2 t + e
    const bool partial = gridDim.y > 1;
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int row = row0 + 16 * r + 8 * (i >> 1) + g, m = 8 * n + 2 * t + (i & 1);
                if (row < N && m < M) {
                    if (partial) ws[((long long)split * M + m) * N + row] = acc[r][n][i];
                    else y[(long long)m * ldy + row] = to_half(acc[r][n][i]);
                }
            }
    if (!partial) return;
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                int row = row0 + 16 * r + 8 * (i >> 1) + g, m = 8 * n + 2 * t + (i & 1);
                if (row < N && m < M) {
                    float total = 0.f;
                    for (int s = 0; s < (int)gridDim.y; ++s) {
                        float v;
                        const float* p = ws + ((long long)s * M + m) * N + row;
                        asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
                        total += v;
                    }
                    y[(long long)m * ldy + row] = to_half(total);
                }
            }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}
"""


_GEMV = r"""
__device__ __forceinline__ int dp4a_us(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// volatile: NVRTC emits the batch's loads in program order, ahead of the math (plain asm
// loads sink to their first use); ptxas may still interleave them with the math (sm_90
// SASS), so rows per warp, not the unroll, is what keeps more bytes in flight
__device__ __forceinline__ void load_stream_now(u32 (&r)[4], const unsigned char* p) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p));
}

__device__ __forceinline__ float2 load_f2(const float* p) {
    float2 v;
    asm("ld.global.nc.v2.f32 {%0,%1}, [%2];" : "=f"(v.x), "=f"(v.y) : "l"(p));
    return v;
}

// y[m] = W x[m] for one row m of x per blockIdx.y, x as int8 groups of 32 (xq: 8 words per
// group; xs: (scale, sum, residual) per group). Lane = 8 quarter + 2 c + h reads, of blocks
// quarter, quarter + 4, ..., the 16 code bytes at 32 c + 16 h: low nibbles are weights
// 64 c + 16 h + i of sub-block 2 c, high nibbles the same i of sub-block 2 c + 1.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
q4k_gemv(const unsigned char* __restrict__ w, const u32* __restrict__ xq,
         const float* __restrict__ xs, u16* __restrict__ y, int N, int K, int ldy) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j = lane & 7, c = j >> 1, h = j & 1, quarter = lane >> 3;
    const int m = blockIdx.y, nblk = K >> 8;
    const long long row_bytes = (long long)nblk * 144;
    const int row0 = (blockIdx.x * WARPS + warp) * RW;
    const unsigned char* wrow[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r)  // rows past N read the last row, never stored
        wrow[r] = w + (long long)min(row0 + r, N - 1) * row_bytes;
    const u32* xq_lane = xq + (long long)m * (K >> 2) + 16 * c + 4 * h;
    const float* xs_lane = xs + (long long)m * (K >> 5) * 3 + 6 * c;
    const int sh = 16 * (c & 1);
    const bool hi_sub = c >= 2;
    // a sub-block's x sum and residual terms enter once: from its h == 0 lane
    const float first = h == 0 ? 1.f : 0.f;
    float acc[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) acc[r] = 0.f;

    for (int b0 = quarter; b0 < nblk; b0 += 4 * U) {
        u32 hdr[U][RW][4], code[U][RW][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {  // all U blocks of every row in flight at once
            const long long off = (long long)min(b0 + 4 * u, nblk - 1) * 144;
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                load_stream_now(hdr[u][r], wrow[r] + off);
                load_stream_now(code[u][r], wrow[r] + off + 16 + 16 * j);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int b = min(b0 + 4 * u, nblk - 1);  // a clamped block counts 0 times
            const float keep = b0 + 4 * u < nblk ? 1.f : 0.f;
            u32 xl[4], xh[4];
            load_x(xl, (const u16*)(xq_lane + 64 * b));
            load_x(xh, (const u16*)(xq_lane + 64 * b + 8));
            const float2 s0 = load_f2(xs_lane + 24 * b), s1 = load_f2(xs_lane + 24 * b + 2);
            const float2 s2 = load_f2(xs_lane + 24 * b + 4);
            // (scale, sum, residual) of group lo = s0.x, s0.y, s1.x; of group hi = s1.y, s2
            const float r8_lo = 8.f * first * s1.x, r8_hi = 8.f * first * s2.y;
            const float sum_lo = first * s0.y, sum_hi = first * s2.x, dx_hi = s1.y * 0.0625f;
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                const u32* q = code[u][r];
                int dl = 0, dh = 0;  // dh is 16x the dot: high nibbles masked in place
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    dl = dp4a_us(q[i] & 0x0F0F0F0Fu, xl[i], dl);
                    dh = dp4a_us(q[i] & 0xF0F0F0F0u, xh[i], dh);
                }
                const u32* hd = hdr[u][r];
                u32 sc, mn;
                scale_min_bytes(hdr[u][r], sh, hi_sub, sc, mn);
                const float d = keep * half_to_float(hd[0]), dmin = keep * half_to_float(hd[0] >> 16);
                const float lo = fmaf(s0.x, (float)dl, r8_lo) * (float)(sc & 0xFFu);
                const float hi = fmaf(dx_hi, (float)dh, r8_hi) * (float)(sc >> 8);
                const float mins = fmaf((float)(mn & 0xFFu), sum_lo, (float)(mn >> 8) * sum_hi);
                acc[r] = fmaf(d, lo + hi, fmaf(-dmin, mins, acc[r]));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RW; ++r) {
        float v = acc[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        if (lane == 0 && row0 + r < N) y[(long long)m * ldy + row0 + r] = to_half(v);
    }
}
"""


@dataclass(frozen=True)
class MmaShape:
    """Compile-time shape of one `q4k_mma` build: `row_tiles` 16-row weight tiles per warp,
    `warps` per program (each its own rows, all over the same k range, so x is read from
    L1 by all but the first), `x_tiles` 8-row tiles of x (rows 8 x_tiles >= M)."""

    row_tiles: int
    warps: int
    x_tiles: int
    fp16: bool = False

    @property
    def rows_per_program(self) -> int:
        return 16 * self.row_tiles * self.warps


@dataclass(frozen=True)
class GemvShape:
    """Compile-time shape of one `q4k_gemv` build: `rows_per_warp` weight rows per warp,
    `unroll` blocks of each row in flight per lane at once, `warps` per program."""

    rows_per_warp: int
    unroll: int
    warps: int
    fp16: bool = False

    @property
    def rows_per_program(self) -> int:
        return self.rows_per_warp * self.warps


def source_of(shape: MmaShape | GemvShape) -> str:
    """The CUDA source of one kernel build (its constants as macros)."""
    if isinstance(shape, GemvShape):
        head = f"#define RW {shape.rows_per_warp}\n#define U {shape.unroll}\n"
        body = _GEMV
    else:
        head = f"#define RT {shape.row_tiles}\n#define NT {shape.x_tiles}\n"
        body = _MMA
    return head + f"#define WARPS {shape.warps}\n#define FP16 {int(shape.fp16)}\n" + _COMMON + body


@functools.cache
def compiled(shape: MmaShape | GemvShape, device_index: int):
    """The NVRTC-compiled kernel for `shape` on a CUDA device (cached per process)."""
    from torch.cuda import _compile_kernel  # NVRTC; ships with CUDA builds of torch

    name = "q4k_gemv" if isinstance(shape, GemvShape) else "q4k_mma"
    with torch.cuda.device(device_index):
        return _compile_kernel(source_of(shape), name)


_HALF = (torch.bfloat16, torch.float16)  # activation dtypes both kernels take


def supported(device: torch.device) -> bool:
    """mma.sync with bf16 operands needs sm_80+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def q4k_mma(
    packed: Tensor,
    x: Tensor,
    y: Tensor,
    workspace: Tensor,
    counters: Tensor,
    *,
    row_tiles: int,
    warps: int,
    split_blocks: int,
) -> None:
    """y (M, N) = x (M, K) @ W.T for q4_K bytes `packed` (N, K / 256 * 144), M <= 32.
    `workspace` (>= splits, M, N) float32 and `counters` (>= row tiles) int32 zeros are used
    when the K range is split (splits = ceil(K / 256 / split_blocks) > 1)."""
    m, k = x.shape
    n = y.shape[1]
    if m > 32 or x.dtype not in _HALF or y.dtype != x.dtype:
        raise ValueError(f"q4k_mma: x must be (<= 32, K) bf16/fp16, got {tuple(x.shape)} {x.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1 or x.data_ptr() % 16 or packed.data_ptr() % 16:
        raise ValueError("q4k_mma: x and y need unit column stride, x and W 16-byte alignment")
    shape = MmaShape(row_tiles, warps, -(-m // 8), x.dtype == torch.float16)
    nblk = k // 256
    splits = -(-nblk // split_blocks)
    grid = (-(-n // shape.rows_per_program), splits, 1)
    kernel = compiled(shape, x.device.index or 0)
    args = [packed, x, y, workspace, counters, m, n, k, split_blocks, x.stride(0), y.stride(0)]
    kernel(grid=grid, block=(32 * warps, 1, 1), args=args)


def q4k_gemv(
    packed: Tensor,
    xq: Tensor,
    xs: Tensor,
    y: Tensor,
    *,
    rows_per_warp: int,
    unroll: int,
    warps: int,
) -> None:
    """y (M, N) = x @ W.T for q4_K bytes `packed` (N, K / 256 * 144), x given as int8
    groups of 32 (`triton_quant._q8_quant_kernel`): words xq (M, K / 4) int32 and (scale,
    sum, residual) xs (M, K / 32, 3) float32. One program column per row of x."""
    m, k4 = xq.shape
    n = y.shape[1]
    if xq.dtype != torch.int32 or xs.shape != (m, k4 // 8, 3) or y.dtype not in _HALF:
        raise ValueError("q4k_gemv: xq (M, K/4) int32, xs (M, K/32, 3) float32, y bf16/fp16")
    if (
        not (xq.is_contiguous() and xs.is_contiguous() and y.stride(1) == 1)
        or packed.data_ptr() % 16
    ):
        raise ValueError(
            "q4k_gemv: contiguous x groups, y with unit column stride, W 16-byte aligned"
        )
    shape = GemvShape(rows_per_warp, unroll, warps, y.dtype == torch.float16)
    grid = (-(-n // shape.rows_per_program), m, 1)
    kernel = compiled(shape, y.device.index or 0)
    kernel(grid=grid, block=(32 * warps, 1, 1), args=[packed, xq, xs, y, n, 4 * k4, y.stride(0)])
