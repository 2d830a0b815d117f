"""GGML/GGUF block quantization formats and fp8, as vectorized torch code.

Every format maps a float weight `(rows, cols)` to packed bytes `(rows, bytes_per_row)` uint8
whose layout is bit-for-bit the GGUF block layout (llama.cpp `block_q4_K` etc.), so the bytes
dequantize identically with `gguf.quants.dequantize`. Quantizers work on all blocks at once
(Python loops only over search candidates / element positions, never over blocks) and run on
the weight's device.

Quantizer quality. The legacy formats (q4_0 ... q8_0) evaluate several candidate scales per
block, always including the gguf reference choice, and keep the one with the least squared
error after fp16 rounding of the stored scales, so they are never worse than the reference.
The K-quants follow llama.cpp's reference algorithms (make_qkx2_quants for q2k/q4k/q5k,
make_qx_quants' weighted scale search for q3k/q6k, then 6/4/8-bit quantization of the
sub-block scales and a final re-rounding of the codes against the stored scales).

fp8 (not a GGUF type): e4m3fn codes with one float32 scale per output row (absmax / 448);
a row is `cols` code bytes followed by the 4 little-endian bytes of its scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mistralpy.errors import UserError

QK_K = 256
_FP8_MAX = 448.0  # largest finite float8_e4m3fn value


class UnknownQuantFormatError(UserError):
    """The ISQ/quantization format name is not one we support."""


# ---------------------------------------------------------------------------------------------
# byte helpers: (nb, n) tensors, little endian like GGUF files and every CPU/GPU we target


def _f16_round(x: Tensor) -> Tensor:
    """float32 -> float32 holding the nearest fp16 value (GGML_FP32_TO_FP16 rounding)."""
    return x.to(torch.float16).to(torch.float32)


def _f16_bytes(x: Tensor) -> Tensor:
    """(nb,) float -> (nb, 2) uint8 fp16 bytes."""
    return x.to(torch.float16).reshape(-1, 1).contiguous().view(torch.uint8)


def _bytes_to(b: Tensor, dtype: torch.dtype) -> Tensor:
    """(nb, k * itemsize) uint8 -> (nb, k) of `dtype` (bit reinterpretation)."""
    return b.contiguous().view(dtype)


def _bytes_f16(b: Tensor) -> Tensor:
    """(nb, 2) uint8 -> (nb, 1) float32."""
    return _bytes_to(b, torch.float16).to(torch.float32)


def _pack(q: Tensor, bits: int, run: int) -> Tensor:
    """(nb, n) codes -> (nb, n * bits // 8) uint8 holding the low `bits` bits of each code.

    GGML's one packing pattern, in every format: each 8 // bits consecutive runs of `run`
    codes share `run` bytes, the r-th run in bits r * bits of those bytes (q4_0: run 16, so
    byte j holds codes j and j + 16; q5_0's high bits: run 1, code 8i + j in bit j of byte i).
    """
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=q.device, dtype=torch.int32).view(1, 1, per, 1)
    fields = (q.to(torch.int32) & ((1 << bits) - 1)).reshape(q.shape[0], -1, per, run)
    return (fields << shifts).sum(2).reshape(q.shape[0], -1).to(torch.uint8)


def _unpack(b: Tensor, bits: int, run: int) -> Tensor:
    """(nb, k) uint8 -> (nb, 8 * k // bits) int32 codes; inverse of `_pack`."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=b.device, dtype=torch.int32).view(1, 1, per, 1)
    fields = b.to(torch.int32).reshape(b.shape[0], -1, 1, run) >> shifts
    return (fields & ((1 << bits) - 1)).reshape(b.shape[0], -1)


def _pack_k_scales(ls: Tensor, lm: Tensor) -> Tensor:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) uint8 in q4_K/q5_K `scales` packing."""
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    b0 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b1 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b2 = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return torch.cat([b0, b1, b2], dim=1).to(torch.uint8)


def _unpack_k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """(nb, 12) uint8 -> ((nb, 8), (nb, 8)) int32 6-bit scales and mins."""
    b = b.to(torch.int32)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def _signed_absmax(x: Tensor) -> Tensor:
    """(nb, n) -> (nb, 1): the element with the largest magnitude, sign kept."""
    return torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))


def _safe_inv(d: Tensor) -> Tensor:
    """1/d with 0 where d == 0 (an all-zero block quantizes to zero codes)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, 1.0, d))


# ---------------------------------------------------------------------------------------------
# candidate search for the legacy 32-element formats


def _sym_codes(x: Tensor, d: Tensor, lo: int, hi: int) -> Tensor:
    """Best codes in [lo, hi] for x ~ d * q given the stored scale d (nb, 1)."""
    return torch.round(x * _safe_inv(d)).clamp_(lo, hi)


def _sym_search(x: Tensor, base: Tensor, lo: int, hi: int, steps: list[float]) -> Tensor:
    """Scale d (nb, 1), already fp16-rounded, minimising ||x - d q||^2 for x (nb, n).

    Candidates: `base` (the gguf reference scale) and max / -(|lo| + s) for s in `steps`,
    each also refitted by least squares; all are rounded to fp16 before they are scored.
    The reference is scored exactly (its optimal codes); another candidate d is scored by
    the error of the codes q it was fitted on, from sums already at hand (sum x^2 - 2 d sum
    xq + d^2 sum q^2: no pass over x per candidate). That score bounds d's true error from
    above (the final codes, rounded against d, are optimal for it), so the choice is never
    worse than the reference; the margin covers float32 cancellation in the expansion.
    """
    mx = _signed_absmax(x)
    sxx = (x * x).sum(1, keepdim=True)
    margin = 1e-6 * sxx
    best_d = _f16_round(base)
    best_e = ((x - best_d * _sym_codes(x, best_d, lo, hi)) ** 2).sum(1, keepdim=True)
    for s in steps:
        d0 = mx / -(abs(lo) + s)
        q = _sym_codes(x, d0, lo, hi)
        qq = (q * q).sum(1, keepdim=True)
        xq = (x * q).sum(1, keepdim=True)
        d_ls = torch.where(qq > 0, xq / qq.clamp_min(1), d0)
        for cand in (d0, d_ls):
            d = _f16_round(cand)
            e = sxx - 2 * d * xq + d * d * qq
            better = e < best_e - margin
            best_d = torch.where(better, d, best_d)
            best_e = torch.where(better, e, best_e)
    return best_d


def _asym_codes(x: Tensor, d: Tensor, m: Tensor, nmax: int) -> Tensor:
    """Best codes in [0, nmax] for x ~ d * q + m given stored d, m (nb, 1)."""
    return torch.round((x - m) * _safe_inv(d)).clamp_(0, nmax)


def _asym_err(x: Tensor, d: Tensor, m: Tensor, nmax: int) -> Tensor:
    """(nb, 1) squared error of x (nb, n) coded with stored scale d and offset m."""
    return ((x - d * _asym_codes(x, d, m, nmax) - m) ** 2).sum(1, keepdim=True)


def _asym_search(x: Tensor, nmax: int, steps: list[float]) -> tuple[Tensor, Tensor]:
    """Scale d and offset m (nb, 1 each, fp16-rounded) for x ~ d * q + m, q in [0, nmax].

    Starts from the gguf reference ((max - min) / nmax, min) and tries the llama.cpp
    make_qkx2-style rescaled grids with a least-squares refit of (d, m); keeps the best.
    Candidates other than the reference are scored from sums (see `_sym_search`).
    """
    mn, mx = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    best_d, best_m = _f16_round((mx - mn) / nmax), _f16_round(mn)
    best_e = _asym_err(x, best_d, best_m, nmax)
    n = x.shape[1]
    rng = (mx - mn).clamp_min(1e-30)
    sx, sxx = x.sum(1, True), (x * x).sum(1, True)
    margin = 1e-6 * sxx
    for s in steps:
        q = torch.round((x - mn) * ((nmax + s) / rng)).clamp_(0, nmax)
        sl, sl2, sxl = q.sum(1, True), (q * q).sum(1, True), (x * q).sum(1, True)
        det = n * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        d = _f16_round(torch.where(ok, (n * sxl - sx * sl) / det, best_d))
        m = _f16_round(torch.where(ok, (sl2 * sx - sl * sxl) / det, best_m))
        # sum (x - d q - m)^2 expanded over the sums above
        e = sxx + d * d * sl2 + n * m * m - 2 * d * sxl - 2 * m * sx + 2 * d * m * sl
        better = e < best_e - margin
        best_d, best_m = torch.where(better, d, best_d), torch.where(better, m, best_m)
        best_e = torch.where(better, e, best_e)
    return best_d, best_m


# Decoded block: codes (nb, groups, group) float32, scale (nb, groups, 1), optional bias
# (nb, groups, 1); the weight is scale * codes (+ bias), computed in that order as gguf does.
Parts = tuple[Tensor, Tensor, "Tensor | None"]

_STEPS_4BIT = [-1.0 + 0.2 * i for i in range(11)]
_STEPS_8BIT = [-2.0 + 0.5 * i for i in range(5)]


# ---------------------------------------------------------------------------------------------
# legacy formats: blocks of 32


def _q4_0_quant(x: Tensor) -> Tensor:
    """(nb, 32) float32 -> (nb, 18) block_q4_0: fp16 d, 16 nibble bytes (j, j+16)."""
    d = _sym_search(x, _signed_absmax(x) / -8, -8, 7, _STEPS_4BIT)
    q = _sym_codes(x, d, -8, 7) + 8
    return torch.cat([_f16_bytes(d), _pack(q, 4, 16)], 1)


def _q4_0_parts(b: Tensor) -> Parts:
    """(nb, 18) -> signed codes (nb, 1, 32), d."""
    q = (_unpack(b[:, 2:], 4, 16) - 8).float()[:, None]
    return q, _bytes_f16(b[:, :2])[:, None], None


def _q4_1_quant(x: Tensor) -> Tensor:
    """(nb, 32) -> (nb, 20) block_q4_1: fp16 d, fp16 m, 16 nibble bytes."""
    d, m = _asym_search(x, 15, _STEPS_4BIT)
    q = _asym_codes(x, d, m, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(m), _pack(q, 4, 16)], 1)


def _q4_1_parts(b: Tensor) -> Parts:
    """(nb, 20) -> codes (nb, 1, 32) in [0, 15], d, m."""
    q = _unpack(b[:, 4:], 4, 16).float()[:, None]
    return q, _bytes_f16(b[:, :2])[:, None], _bytes_f16(b[:, 2:4])[:, None]


def _q5_pack(q: Tensor) -> tuple[Tensor, Tensor]:
    """(nb, 32) codes in [0, 31] -> qh (nb, 4) high bits, qs (nb, 16) low nibbles."""
    q = q.to(torch.int32)
    return _pack(q >> 4, 1, 1), _pack(q, 4, 16)


def _q5_unpack(qh: Tensor, qs: Tensor) -> Tensor:
    """Inverse of `_q5_pack`: (nb, 32) float32 codes in [0, 31]."""
    return (_unpack(qs, 4, 16) | (_unpack(qh, 1, 1) << 4)).float()


def _q5_0_quant(x: Tensor) -> Tensor:
    """(nb, 32) -> (nb, 22) block_q5_0: fp16 d, qh u32, 16 nibble bytes."""
    d = _sym_search(x, _signed_absmax(x) / -16, -16, 15, _STEPS_4BIT)
    qh, qs = _q5_pack(_sym_codes(x, d, -16, 15) + 16)
    return torch.cat([_f16_bytes(d), qh, qs], 1)


def _q5_0_parts(b: Tensor) -> Parts:
    """(nb, 22) -> signed codes (nb, 1, 32), d."""
    return (_q5_unpack(b[:, 2:6], b[:, 6:]) - 16)[:, None], _bytes_f16(b[:, :2])[:, None], None


def _q5_1_quant(x: Tensor) -> Tensor:
    """(nb, 32) -> (nb, 24) block_q5_1: fp16 d, fp16 m, qh u32, 16 nibble bytes."""
    d, m = _asym_search(x, 31, _STEPS_4BIT)
    qh, qs = _q5_pack(_asym_codes(x, d, m, 31))
    return torch.cat([_f16_bytes(d), _f16_bytes(m), qh, qs], 1)


def _q5_1_parts(b: Tensor) -> Parts:
    """(nb, 24) -> codes (nb, 1, 32) in [0, 31], d, m."""
    q = _q5_unpack(b[:, 4:8], b[:, 8:])[:, None]
    return q, _bytes_f16(b[:, :2])[:, None], _bytes_f16(b[:, 2:4])[:, None]


def _q8_0_quant(x: Tensor) -> Tensor:
    """(nb, 32) -> (nb, 34) block_q8_0: fp16 d, 32 int8 codes (reference range +-127)."""
    d = _sym_search(x, x.abs().amax(1, keepdim=True) / 127, -127, 127, _STEPS_8BIT)
    q = _sym_codes(x, d, -127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], 1)


def _q8_0_parts(b: Tensor) -> Parts:
    """(nb, 34) -> signed codes (nb, 1, 32), d."""
    return _bytes_to(b[:, 2:], torch.int8).float()[:, None], _bytes_f16(b[:, :2])[:, None], None


def _qkx2(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool
) -> tuple[Tensor, Tensor]:
    """make_qkx2_quants over rows of x (G, n) with weights w: (scale, -min) each (G,).

    Fits x ~ scale * L + min with L in [0, nmax], min <= 0, by a grid over the inverse scale
    plus a weighted least-squares refit, scored by weighted |err| (mad) or err^2.
    """
    mn = x.min(1).values.clamp(max=0)
    mx = x.max(1).values
    rng = torch.where(mx > mn, mx - mn, 1.0)
    sw, sx = w.sum(1), (w * x).sum(1)

    sxx = (w * x * x).sum(1)

    def score(scale: Tensor, lo: Tensor, q: Tensor, sums: tuple | None = None) -> Tensor:
        if sums is not None and not mad:  # sum w (s q + m - x)^2 expanded: no pass over x
            sl, sl2, sxl = sums
            return (
                scale * scale * sl2 + 2 * scale * lo * sl - 2 * scale * sxl
                + lo * lo * sw - 2 * lo * sx + sxx
            )  # fmt: skip
        diff = scale[:, None] * q + lo[:, None] - x
        return (w * (diff.abs() if mad else diff * diff)).sum(1)

    q = torch.round((x - mn[:, None]) * (nmax / rng)[:, None]).clamp_(0, nmax)
    best_s, best_m = rng / nmax, mn
    best_e = score(best_s, best_m, q)
    for i in range(nstep + 1):
        # As in llama.cpp, later grids start from the best (scale, min) found so far.
        rng = torch.where(mx > best_m, mx - best_m, 1.0)
        q = torch.round((x - best_m[:, None]) * ((rmin + rdelta * i + nmax) / rng)[:, None])
        q = q.clamp_(0, nmax)
        wq = w * q
        sl, sl2, sxl = wq.sum(1), (wq * q).sum(1), (wq * x).sum(1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s = (sw * sxl - sx * sl) / det
        m = (sl2 * sx - sl * sxl) / det
        pos = m > 0
        s = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, 1.0), s)
        m = torch.where(pos, 0.0, m)
        e = score(s, m, q, (sl, sl2, sxl))
        better = ok & (e < best_e)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_e = torch.where(better, e, best_e)
    flat = mx <= mn
    return torch.where(flat, 0.0, best_s), -best_m


def _qx(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_qx_quants(rmse_type=1) over rows of x (G, n): signed scale (G,) and its score.

    Codes in [-nmax, nmax-1]; least-squares scale weighted by x^2, best of 19 inverse-scale
    grids. The score slx^2/sl2 is the weighted error reduction (higher is better).
    """
    mx = _signed_absmax(x).squeeze(1)
    zero = mx.abs() < 1e-30
    mxs = torch.where(zero, 1.0, mx)
    w = x * x
    best_s = torch.zeros_like(mx)
    best = torch.full_like(mx, -1.0)
    for i in [0, *range(-9, 0), *range(1, 10)]:  # the plain absmax grid first, as llama.cpp
        q = torch.round(x * (-(nmax + 0.1 * i) / mxs)[:, None]).clamp_(-nmax, nmax - 1)
        slx, sl2 = (w * x * q).sum(1), (w * q * q).sum(1)
        ok = sl2 > 0
        s = slx / torch.where(ok, sl2, 1.0)
        score = torch.where(ok, s * slx, -1.0)
        better = ok & (score > best)
        best_s, best = torch.where(better, s, best_s), torch.where(better, score, best)
    return torch.where(zero, 0.0, best_s), best


def _q3_descent(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants(do_rmse=True) over rows of x (G, n): (scale, score) each (G,).

    Coordinate descent on the x^2-weighted error, one element position at a time for all
    groups at once (5 sweeps), starting from the absmax codes.
    """
    mx = _signed_absmax(x)
    zero = (mx.abs() < 1e-30).squeeze(1)
    q = torch.round(x * (-nmax / torch.where(mx == 0, 1.0, mx))).clamp_(-nmax, nmax - 1)
    w = x * x
    slx, sl2 = (w * x * q).sum(1), (w * q * q).sum(1)
    for _ in range(5):
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], q[:, i]
            s1 = slx - wi * xi * li
            s2 = sl2 - wi * li * li
            new = torch.round(xi * s2 / torch.where(s1 > 0, s1, 1.0)).clamp_(-nmax, nmax - 1)
            n1, n2 = s1 + wi * xi * new, s2 + wi * new * new
            take = (s1 > 0) & (new != li) & (n2 > 0) & (n1 * n1 * sl2 > slx * slx * n2)
            q[:, i] = torch.where(take, new, li)
            slx, sl2 = torch.where(take, n1, slx), torch.where(take, n2, sl2)
    ok = (sl2 > 0) & ~zero
    s = torch.where(ok, slx / torch.where(ok, sl2, 1.0), 0.0)
    return s, torch.where(ok, s * slx, -1.0)


def _quant_scales(scales: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Non-negative sub-block scales (nb, k) -> (fp16 super-scale d (nb, 1), codes (nb, k)
    in [0, levels]) with d = max / levels, codes = round(scale / d), as llama.cpp does."""
    mx = scales.max(1, keepdim=True).values
    inv = torch.where(mx > 0, levels / torch.where(mx > 0, mx, 1.0), 0.0)
    codes = torch.round(scales * inv).clamp_(0, levels)
    return _f16_round(mx / levels), codes


def _requant_affine(x: Tensor, d: Tensor, dm: Tensor, nmax: int) -> Tensor:
    """Final codes for x (nb, k, n) ~ d * q - dm with stored d, dm (nb, k, 1): q in [0, nmax]."""
    q = torch.round((x + dm) * _safe_inv(d)).clamp_(0, nmax)
    return torch.where(d == 0, 0.0, q)


def _weights_av(x: Tensor) -> Tensor:
    """llama.cpp q4_K/q5_K importance weights: rms(sub-block) + |x|, x (G, n)."""
    return (x * x).mean(1, keepdim=True).sqrt() + x.abs()


def _affine_k(x: Tensor, sub: int, nmax: int, qkx2_args: tuple) -> tuple[Tensor, ...]:
    """Shared q4_K / q5_K encoder for x (nb, 256).

    Returns fp16 d, dmin (nb, 1), 6-bit scale/min codes (nb, 8) and codes (nb, 256).
    """
    nb = x.shape[0]
    xs = x.reshape(-1, sub)
    scale, mins = _qkx2(xs, _weights_av(xs), nmax, *qkx2_args)
    d, ls = _quant_scales(scale.reshape(nb, -1), 63)
    dmin, lm = _quant_scales(mins.reshape(nb, -1), 63)
    q = _requant_affine(x.reshape(nb, -1, sub), (d * ls)[..., None], (dmin * lm)[..., None], nmax)
    return d, dmin, ls, lm, q.reshape(nb, QK_K)


def _q4k_quant(x: Tensor) -> Tensor:
    """(nb, 256) -> (nb, 144) block_q4_K: d, dmin, scales[12], qs[128]."""
    d, dmin, ls, lm, q = _affine_k(x, 32, 15, (-1.0, 0.1, 20, False))
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm), _pack(q, 4, 32)], 1)


def _k_affine_parts(b: Tensor, q: Tensor) -> Parts:
    """q4_K/q5_K header bytes b (nb, >=16), codes q (nb, 256) -> (nb, 8, 32) codes,
    sub-block scales d * sc and biases -dmin * m (nb, 8, 1)."""
    sc, mn = _unpack_k_scales(b[:, 4:16])
    d = _bytes_f16(b[:, :2]) * sc.float()
    dm = _bytes_f16(b[:, 2:4]) * mn.float()
    return q.reshape(-1, 8, 32), d[..., None], -dm[..., None]


def _q4k_parts(b: Tensor) -> Parts:
    """(nb, 144) -> codes (nb, 8, 32) in [0, 15], scales, biases."""
    return _k_affine_parts(b, _unpack(b[:, 16:], 4, 32).float())


def _q5k_quant(x: Tensor) -> Tensor:
    """(nb, 256) -> (nb, 176) block_q5_K: d, dmin, scales[12], qh[32], qs[128]."""
    d, dmin, ls, lm, q = _affine_k(x, 32, 31, (-0.5, 0.1, 15, False))
    qi = q.to(torch.int32)
    qh, qs = _pack(qi >> 4, 1, 32), _pack(qi, 4, 32)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm), qh, qs], 1)


def _q5k_parts(b: Tensor) -> Parts:
    """(nb, 176) -> codes (nb, 8, 32) in [0, 31], scales, biases."""
    q = _unpack(b[:, 48:], 4, 32) | (_unpack(b[:, 16:48], 1, 32) << 4)
    return _k_affine_parts(b, q.float())


def _q2k_quant(x: Tensor) -> Tensor:
    """(nb, 256) -> (nb, 84) block_q2_K: scales[16] (4-bit scale | min << 4), qs[64], d, dmin."""
    nb = x.shape[0]
    xs = x.reshape(-1, 16)
    scale, mins = _qkx2(xs, xs.abs(), 3, -0.5, 0.1, 15, True)
    d, ls = _quant_scales(scale.reshape(nb, 16), 15)
    dmin, lm = _quant_scales(mins.reshape(nb, 16), 15)
    q = _requant_affine(x.reshape(nb, 16, 16), (d * ls)[..., None], (dmin * lm)[..., None], 3)
    scales = (ls.to(torch.int32) | (lm.to(torch.int32) << 4)).to(torch.uint8)
    return torch.cat(
        [scales, _pack(q.reshape(nb, QK_K), 2, 32), _f16_bytes(d), _f16_bytes(dmin)], 1
    )


def _q2k_parts(b: Tensor) -> Parts:
    """(nb, 84) -> codes (nb, 16, 16) in [0, 3], scales, biases."""
    sc = b[:, :16].to(torch.int32)
    d = _bytes_f16(b[:, 80:82]) * (sc & 15).float()
    dm = _bytes_f16(b[:, 82:84]) * (sc >> 4).float()
    q = _unpack(b[:, 16:80], 2, 32).reshape(-1, 16, 16).float()
    return q, d[..., None], -dm[..., None]


def _signed_k(x: Tensor, nmax: int, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Shared q3_K / q6_K encoder for x (nb, 256) in 16-element sub-blocks.

    Returns fp16 d (nb, 1), signed sub-block scale codes (nb, 16) in [-levels, levels-1]
    and codes (nb, 256) in [0, 2 nmax) (offset by nmax), x ~ d * sc * (q - nmax).
    """
    nb = x.shape[0]
    # q3_K: llama.cpp's coordinate descent (its scale grid search does worse on 3 bits).
    fit = _q3_descent if nmax == 4 else _qx
    scales = fit(x.reshape(-1, 16), nmax)[0].reshape(nb, 16)
    mx = _signed_absmax(scales)
    zero = mx.abs() < 1e-30
    iscale = -levels / torch.where(zero, 1.0, mx)
    sc = torch.round(iscale * scales).clamp_(-levels, levels - 1)
    d = torch.where(zero, 0.0, _f16_round(1.0 / iscale))
    dl = (d * sc)[..., None]
    q = torch.round(x.reshape(nb, 16, 16) * _safe_inv(dl)).clamp_(-nmax, nmax - 1)
    q = torch.where(dl == 0, 0.0, q) + nmax
    return d, torch.where(zero, 0.0, sc), q.reshape(nb, QK_K)


def _q3k_quant(x: Tensor) -> Tensor:
    """(nb, 256) -> (nb, 110) block_q3_K: hmask[32], qs[64], scales[12], d."""
    d, sc, q = _signed_k(x, 4, 32)
    qi = q.to(torch.int32)
    l6 = sc.to(torch.int32) + 32  # 6-bit sub-block scales: low nibbles, then high crumbs
    scales = torch.cat([_pack(l6, 4, 8), _pack(l6 >> 4, 2, 4)], 1)
    return torch.cat([_pack(qi >> 2, 1, 32), _pack(qi, 2, 32), scales, _f16_bytes(d)], 1)


def _q3k_parts(b: Tensor) -> Parts:
    """(nb, 110) -> signed codes (nb, 16, 16) in [-4, 3], scales."""
    l6 = _unpack(b[:, 96:104], 4, 8) | (_unpack(b[:, 104:108], 2, 4) << 4)
    dl = _bytes_f16(b[:, 108:110]) * (l6 - 32).float()
    q = (_unpack(b[:, 32:96], 2, 32) | (_unpack(b[:, :32], 1, 32) << 2)) - 4
    return q.reshape(-1, 16, 16).float(), dl[..., None], None


def _q6k_quant(x: Tensor) -> Tensor:
    """(nb, 256) -> (nb, 210) block_q6_K: ql[128], qh[64], scales[16] int8, d."""
    d, sc, q = _signed_k(x, 32, 128)
    qi = q.to(torch.int32)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([_pack(qi, 4, 64), _pack(qi >> 4, 2, 32), scales, _f16_bytes(d)], 1)


def _q6k_parts(b: Tensor) -> Parts:
    """(nb, 210) -> signed codes (nb, 16, 16) in [-32, 31], scales."""
    q = _unpack(b[:, :128], 4, 64) | (_unpack(b[:, 128:192], 2, 32) << 4)
    q = (q - 32).reshape(-1, 16, 16).float()
    dl = _bytes_f16(b[:, 208:210]) * _bytes_to(b[:, 192:208], torch.int8).float()
    return q, dl[..., None], None


def _q8k_quant(x: Tensor) -> Tensor:
    """(nb, 256) -> (nb, 292) block_q8_K: float32 d, qs[256] int8, bsums[16] int16."""
    mx = _signed_absmax(x)
    zero = mx == 0
    iscale = torch.where(zero, 0.0, -127.0 / torch.where(zero, 1.0, mx))
    q = torch.round(x * iscale).clamp_(max=127)
    d = torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale))
    # An exact least-squares float32 scale can only lower the error; ties keep the reference.
    qq = (q * q).sum(1, keepdim=True)
    d_ls = torch.where(qq > 0, (x * q).sum(1, keepdim=True) / qq.clamp_min(1), d)
    e_ref = ((x - d * q) ** 2).sum(1, keepdim=True)
    d = torch.where(((x - d_ls * q) ** 2).sum(1, keepdim=True) < e_ref, d_ls, d)
    bsums = q.reshape(-1, 16, 16).sum(2).to(torch.int16).view(torch.uint8)
    qb = q.to(torch.int8).view(torch.uint8)
    return torch.cat([d.to(torch.float32).view(torch.uint8), qb, bsums], 1)


def _q8k_parts(b: Tensor) -> Parts:
    """(nb, 292) -> signed codes (nb, 1, 256), float32 d."""
    q = _bytes_to(b[:, 4:260], torch.int8).float()[:, None]
    return q, _bytes_to(b[:, :4], torch.float32)[:, None], None


def _fp8_quant(x: Tensor) -> Tensor:
    """(rows, cols) -> (rows, cols + 4): e4m3fn codes then a float32 row scale."""
    scale = x.abs().amax(1, keepdim=True) / _FP8_MAX
    codes = (x * _safe_inv(scale)).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return fp8_pack(codes, scale)


def fp8_parts(packed: Tensor, cols: int) -> tuple[Tensor, Tensor]:
    """fp8 rows (rows, cols + 4) -> (codes (rows, cols) float8_e4m3fn, scale (rows,) float32),
    both contiguous copies (the kernels' layout)."""
    codes = packed[:, :cols].contiguous().view(torch.float8_e4m3fn)
    return codes, packed[:, cols:].contiguous().view(torch.float32).reshape(-1)


def fp8_pack(codes: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `fp8_parts`: (rows, cols) e4m3 codes, (rows,) float32 -> (rows, cols + 4)."""
    scale_bytes = scale.to(torch.float32).reshape(-1, 1).contiguous().view(torch.uint8)
    return torch.cat([codes.view(torch.uint8), scale_bytes], 1)


def _fp8_dequant(b: Tensor) -> Tensor:
    """(rows, cols + 4) -> (rows, cols) float32."""
    codes, scale = fp8_parts(b, b.shape[1] - 4)
    return codes.to(torch.float32) * scale[:, None]


# ---------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True)
class GroupAffine:
    """A GGML weight as w = scale[n, k // group] * codes[n, k] + offset[n, k // group].

    The form every fast kernel consumes; equal to the GGUF dequantization up to float32
    rounding of the offset (offset = bias + center * scale for unsigned codes).
    """

    codes: Tensor  # (rows, cols) int8, signed, |codes| <= 128
    scale: Tensor  # (rows, cols // group) float32
    offset: Tensor  # (rows, cols // group) float32
    group: int  # 16, 32 or 256 weights sharing one (scale, offset)
    bits: int  # codes lie in [-2**(bits-1), 2**(bits-1))


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format; GGUF-exact block layout unless `ggml_type` is None."""

    name: str  # canonical lower-case name: "q4k", "q8_0", "fp8", ...
    block_size: int  # weights per block along a row (32 or 256); 1 for fp8 (any width)
    type_size: int  # bytes per block; fp8: 1 byte per weight plus 4 per row (see module doc)
    ggml_type: int | None  # gguf.GGMLQuantizationType value, None for fp8
    bits: int  # bits of a code
    center: int  # subtract from stored codes to make them signed (0: already signed)
    _quant: Callable[[Tensor], Tensor]  # (nb, block) float32 -> (nb, type_size) uint8
    _parts: Callable[[Tensor], Parts] | None  # GGML blocks -> codes, scales, biases

    def supports(self, cols: int) -> bool:
        """True when rows of `cols` weights split into whole blocks."""
        return cols > 0 and cols % self.block_size == 0

    def bytes_per_row(self, cols: int) -> int:
        """Packed bytes of one row of `cols` weights."""
        if self.ggml_type is None:
            return cols + 4
        return cols // self.block_size * self.type_size

    def quantize(self, w: Tensor) -> Tensor:
        """(rows, cols) float -> (rows, bytes_per_row(cols)) uint8, on w's device."""
        rows, cols = w.shape
        if not self.supports(cols):
            raise ValueError(f"{self.name}: cols={cols} is not a multiple of {self.block_size}")
        if w.device.type == "meta":  # shape-only builds (the 24B layout without memory)
            return torch.empty(rows, self.bytes_per_row(cols), dtype=torch.uint8, device="meta")
        # Bounded temporaries: a few candidate-sized float32 buffers per chunk of rows.
        # CPU: chunks that stay in cache run the many elementwise passes ~2x faster.
        budget = (1 << 24) if w.device.type == "cuda" else (1 << 18)
        step = max(1, budget // cols)
        # Filled in place (no list + cat): keeps the peak at the result plus one chunk.
        out = torch.empty(rows, self.bytes_per_row(cols), dtype=torch.uint8, device=w.device)
        for r in range(0, rows, step):
            out[r : r + step] = self._quant_rows(w[r : r + step].float())
        return out

    def _quant_rows(self, x: Tensor) -> Tensor:
        """(r, cols) float32 -> (r, bytes_per_row) uint8."""
        if self.ggml_type is None:
            return self._quant(x)
        return self._quant(x.reshape(-1, self.block_size)).reshape(x.shape[0], -1)

    def dequantize(
        self, packed: Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """(rows, bytes_per_row) uint8 -> (rows, cols) `dtype` (`shape` = (rows, cols))."""
        rows, cols = shape
        assert packed.shape == (rows, self.bytes_per_row(cols)), (packed.shape, shape, self.name)
        if self._parts is None:
            return _fp8_dequant(packed).to(dtype)
        q, scale, bias = self._parts(packed.reshape(-1, self.type_size))
        w = scale * q if bias is None else scale * q + bias
        return w.reshape(rows, cols).to(dtype)

    def group_affine(self, packed: Tensor, shape: tuple[int, int]) -> GroupAffine | None:
        """Packed rows -> the kernel-friendly `GroupAffine` form; None for fp8."""
        if self._parts is None:
            return None
        rows, cols = shape
        q, scale, bias = self._parts(packed.reshape(-1, self.type_size))
        group = q.shape[-1]
        offset = scale * self.center if bias is None else bias + scale * self.center
        codes = (q - self.center).to(torch.int8).reshape(rows, cols)
        return GroupAffine(
            codes, scale.reshape(rows, -1), offset.reshape(rows, -1), group, self.bits
        )


# ggml type ids are fixed by the GGUF spec (gguf.GGMLQuantizationType).
FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q4_0", 32, 18, 2, 4, 0, _q4_0_quant, _q4_0_parts),
        QuantFormat("q4_1", 32, 20, 3, 4, 8, _q4_1_quant, _q4_1_parts),
        QuantFormat("q5_0", 32, 22, 6, 5, 0, _q5_0_quant, _q5_0_parts),
        QuantFormat("q5_1", 32, 24, 7, 5, 16, _q5_1_quant, _q5_1_parts),
        QuantFormat("q8_0", 32, 34, 8, 8, 0, _q8_0_quant, _q8_0_parts),
        QuantFormat("q2k", 256, 84, 10, 2, 2, _q2k_quant, _q2k_parts),
        QuantFormat("q3k", 256, 110, 11, 3, 0, _q3k_quant, _q3k_parts),
        QuantFormat("q4k", 256, 144, 12, 4, 8, _q4k_quant, _q4k_parts),
        QuantFormat("q5k", 256, 176, 13, 5, 16, _q5k_quant, _q5k_parts),
        QuantFormat("q6k", 256, 210, 14, 6, 0, _q6k_quant, _q6k_parts),
        QuantFormat("q8k", 256, 292, 15, 8, 0, _q8k_quant, _q8k_parts),
        QuantFormat("fp8", 1, 1, None, 8, 0, _fp8_quant, None),
    )
}

_NUMERIC = {"2": "q2k", "3": "q3k", "4": "q4k", "5": "q5k", "6": "q6k", "8": "q8_0"}


def get_format(name: str | int | QuantFormat) -> QuantFormat:
    """Format by mistral.rs-style name: case-insensitive, "_" optional before K ("Q4K",
    "q4_k", "Q8_0", "fp8"), or a bit count 2/3/4/5/6/8; unknown -> UnknownQuantFormatError."""
    if isinstance(name, QuantFormat):
        return name
    key = str(name).strip().lower()
    key = _NUMERIC.get(key, key)
    if key.endswith("_k"):
        key = key[:-2] + "k"
    if key in ("fp8_e4m3", "f8e4m3"):
        key = "fp8"
    fmt = FORMATS.get(key)
    if fmt is None:
        valid = ", ".join(sorted(FORMATS)) + " (or 2, 3, 4, 5, 6, 8)"
        raise UnknownQuantFormatError(f"unknown quantization format {name!r}; valid: {valid}")
    return fmt


def format_of_ggml_type(ggml_type: int) -> QuantFormat | None:
    """Our block format for a GGUF tensor type id (GGMLQuantizationType); None for types we
    have no format for (float types, IQ*, ...)."""
    return next((f for f in FORMATS.values() if f.ggml_type == ggml_type), None)
