"""K-quant quality against a scalar re-implementation of llama.cpp's reference quantizers.

gguf's Python package dequantizes K-quants but cannot quantize them, so this file carries a
slow, per-block numpy transcription of the algorithms in ggml-quants.c
(quantize_row_q{2,3,4,5,6}_K_ref with make_qkx2_quants / make_q3_quants / make_qx_quants),
written from the published description. It returns reconstructed weights (not bytes): the
error of that reconstruction is the bar our vectorized quantizer must meet.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from mistralpy.quant.formats import get_format

f32 = np.float32


def _f16(v):
    return f32(np.float16(v))


def _nearest(v):
    return np.rint(np.asarray(v, dtype=f32)).astype(np.int64)


def _qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad):
    mn, mx = min(f32(x.min()), f32(0)), f32(x.max())
    if mx == mn:
        return f32(0), -mn
    sum_w, sum_x = f32(w.sum()), f32((w * x).sum())
    iscale = f32(nmax) / (mx - mn)
    scale = f32(1) / iscale
    L = np.clip(_nearest(iscale * (x - mn)), 0, nmax)

    def err(s, m, q):
        d = s * q + m - x
        return f32((w * (np.abs(d) if use_mad else d * d)).sum())

    best = err(scale, mn, L)
    for i in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * i + nmax) / (mx - mn)
        q = np.clip(_nearest(iscale * (x - mn)), 0, nmax).astype(f32)
        sl, sl2, sxl = f32((w * q).sum()), f32((w * q * q).sum()), f32((w * q * x).sum())
        det = sum_w * sl2 - sl * sl
        if det > 0:
            s = (sum_w * sxl - sum_x * sl) / det
            m = (sl2 * sum_x - sl * sxl) / det
            if m > 0:
                m, s = f32(0), sxl / sl2
            e = err(s, m, q)
            if e < best:
                best, scale, mn = e, s, m
    return f32(scale), f32(-mn)


def _q3(x, nmax):
    """make_q3_quants(do_rmse=True): returns the scale."""
    amax_i = int(np.argmax(np.abs(x)))
    mx = x[amax_i]
    if mx == 0:
        return f32(0)
    iscale = f32(-nmax) / mx
    L = np.clip(_nearest(iscale * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = f32((w * x * L).sum()), f32((w * L * L).sum())
    for _ in range(5):
        changed = 0
        for i in range(len(x)):
            slx = sumlx - w[i] * x[i] * L[i]
            if slx > 0:
                sl2 = suml2 - w[i] * L[i] * L[i]
                new = int(np.clip(_nearest(x[i] * sl2 / slx), -nmax, nmax - 1))
                if new != L[i]:
                    slx += w[i] * x[i] * new
                    sl2 += w[i] * new * new
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return sumlx / suml2


def _qx(x, nmax):
    """make_qx_quants(rmse_type=1): returns the scale."""
    mx = x[int(np.argmax(np.abs(x)))]
    if abs(mx) < 1e-30:
        return f32(0)
    w = x * x

    def fit(iscale):
        q = np.clip(_nearest(iscale * x), -nmax, nmax - 1).astype(f32)
        return f32((w * x * q).sum()), f32((w * q * q).sum())

    slx, sl2 = fit(f32(-nmax) / mx)
    scale = slx / sl2
    best = scale * slx
    for i in [*range(-9, 0), *range(1, 10)]:
        slx, sl2 = fit(-(f32(nmax) + f32(0.1) * i) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            scale = slx / sl2
            best = scale * slx
    return f32(scale)


def _affine_block(x, sub, nmax, args, levels, weights):
    """q2_K/q4_K/q5_K super-block -> reconstruction."""
    n = len(x) // sub
    sc, mins = np.zeros(n, f32), np.zeros(n, f32)
    for j in range(n):
        xs = x[sub * j : sub * (j + 1)]
        sc[j], mins[j] = _qkx2(xs, weights(xs), nmax, *args)
    out = np.zeros_like(x)
    ms, mm = sc.max(), mins.max()
    ls = np.minimum(levels, _nearest(f32(levels) / ms * sc)) if ms > 0 else np.zeros(n, int)
    lm = np.minimum(levels, _nearest(f32(levels) / mm * mins)) if mm > 0 else np.zeros(n, int)
    d, dmin = _f16(ms / levels), _f16(mm / levels)
    for j in range(n):
        xs = x[sub * j : sub * (j + 1)]
        dl, dm = d * f32(ls[j]), dmin * f32(lm[j])
        q = np.clip(_nearest((xs + dm) / dl), 0, nmax) if dl else np.zeros(sub)
        out[sub * j : sub * (j + 1)] = dl * q - dm
    return out


def _signed_block(x, nmax, levels, scale_fn):
    """q3_K/q6_K super-block -> reconstruction."""
    sc = np.array([scale_fn(x[16 * j : 16 * j + 16], nmax) for j in range(16)], f32)
    mx = sc[int(np.argmax(np.abs(sc)))]
    if abs(mx) < 1e-30:
        return np.zeros_like(x)
    iscale = f32(-levels) / mx
    ls = np.clip(_nearest(iscale * sc), -levels, levels - 1)
    d = _f16(f32(1) / iscale)
    out = np.zeros_like(x)
    for j in range(16):
        dl = d * f32(ls[j])
        if dl:
            q = np.clip(_nearest(x[16 * j : 16 * j + 16] / dl), -nmax, nmax - 1)
            out[16 * j : 16 * j + 16] = dl * q
    return out


def _av_weights(xs):
    return np.sqrt((xs * xs).mean(dtype=f32)) + np.abs(xs)


REFERENCE = {
    "q2k": lambda b: _affine_block(b, 16, 3, (-0.5, 0.1, 15, True), 15, np.abs),
    "q3k": lambda b: _signed_block(b, 4, 32, _q3),
    "q4k": lambda b: _affine_block(b, 32, 15, (-1.0, 0.1, 20, False), 63, _av_weights),
    "q5k": lambda b: _affine_block(b, 32, 31, (-0.5, 0.1, 15, False), 63, _av_weights),
    "q6k": lambda b: _signed_block(b, 32, 128, _qx),
}


def reference_reconstruct(w: np.ndarray, fmt: str) -> np.ndarray:
    """(rows, cols) float32 -> llama.cpp reference quantize+dequantize of every 256-block."""
    blocks = w.astype(f32).reshape(-1, 256)
    return np.stack([REFERENCE[fmt](b) for b in blocks]).reshape(w.shape)


def naive_reconstruct(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round-to-nearest with per-sub-block absmax (symmetric) or min/max (affine) scales."""
    bits = {"q2k": 2, "q3k": 3, "q4k": 4, "q5k": 5, "q6k": 6}[fmt]
    sub = 32 if fmt in ("q4k", "q5k") else 16
    x = w.float().reshape(-1, sub)
    if fmt in ("q3k", "q6k"):
        d = x.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        return (torch.round(x / d) * d).reshape(w.shape)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (hi - lo) / (2**bits - 1)
    return (torch.round((x - lo) / d) * d + lo).reshape(w.shape)


def _heavy(rows, cols, g):
    """Student-t (3 dof) weights plus a few large outliers."""
    w = torch.distributions.StudentT(3.0).sample((rows, cols))
    idx = torch.randint(0, rows * cols, (rows * cols // 200,), generator=g)
    w.view(-1)[idx] *= 8
    return w


@pytest.mark.parametrize("fmt", sorted(REFERENCE))
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_kquant_error_matches_llamacpp_reference(fmt, dist):
    seed = zlib.crc32(f"{fmt}-{dist}".encode())
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = torch.randn(4, 512, generator=g) if dist == "normal" else _heavy(4, 512, g)
    f = get_format(fmt)
    ours = f.dequantize(f.quantize(w), tuple(w.shape))
    rmse_ours = (ours - w).pow(2).mean().sqrt().item()
    ref = torch.from_numpy(reference_reconstruct(w.numpy(), fmt))
    rmse_ref = (ref - w).pow(2).mean().sqrt().item()
    rmse_naive = (naive_reconstruct(w, fmt) - w).pow(2).mean().sqrt().item()
    # Same algorithm up to float summation order, which can flip a close choice of scale:
    # allow 2% over the llama.cpp reference.
    assert rmse_ours <= rmse_ref * 1.02, (rmse_ours, rmse_ref)
    assert rmse_ours < rmse_naive, (rmse_ours, rmse_naive)
