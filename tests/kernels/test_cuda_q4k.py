"""The CUDA q4_K tensor-core GEMM (`mistralpy.kernels.cuda_q4k`) without a GPU.

- `replay` runs the kernel's per-lane maps in numpy: each lane reads the code words, header
  sub-blocks and x values the CUDA source reads, builds its register pairs as the source
  does (shift, mask, scale), and the pairs are placed into the 16x16 A and 16x8 B tiles by
  the PTX ISA's fragment layout of `mma.m16n8k16` (not by the kernel's own maps). Its product
  must equal the dequantize-matmul oracle: that checks that every weight meets its own x.
- Where NVRTC is installed (the test extras install it) the source must compile for sm_80
  and sm_90 with an empty log, for every shape the tuner can pick.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np
import pytest
import torch

from mistralpy.kernels import cuda_q4k
from mistralpy.quant.formats import get_format


def _scale_min(header: np.ndarray, jj: int, hi: bool) -> tuple[float, float]:
    """`sub_block` of the source: header (16,) uint8 -> (d sc, -dmin m) of sub-block
    4 hi + jj."""
    d, dmin = header[:4].view(np.float16).astype(np.float32)
    q = header[4:16].astype(np.int64)
    if hi:
        sc = (q[8 + jj] & 15) | ((q[jj] >> 6) << 4)
        mn = (q[8 + jj] >> 4) | ((q[4 + jj] >> 6) << 4)
    else:
        sc, mn = q[jj] & 63, q[4 + jj] & 63
    return float(d) * sc, -float(dmin) * mn


def _pair(word: int, shift: int, scale: float, neg_min: float) -> tuple[float, float]:
    """`dequant_pair`: the low and high half of the register."""
    lo, hi = (word >> shift) & 15, (word >> (shift + 16)) & 15
    return scale * lo + neg_min, scale * hi + neg_min


def replay(packed: torch.Tensor, shape: tuple[int, int], x: torch.Tensor) -> np.ndarray:
    """y (M, N) as the kernel computes it, in float64 (one 16-row tile, 8 x rows at a time)."""
    n_rows, k = shape
    nblk = k // 256
    wb = packed.numpy().reshape(n_rows, nblk, 144)
    xs = x.double().numpy()
    m = xs.shape[0]
    y = np.zeros((m, n_rows))
    for row0 in range(0, n_rows, 16):
        for n0 in range(0, m, 8):
            acc = np.zeros((16, 8))
            for b in range(nblk):
                for sp in range(2):
                    for hh in range(2):
                        for j in range(4):
                            a = np.full((16, 16), np.nan)
                            bt = np.full((16, 8), np.nan)
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                k0 = 64 * (t // 2) + 16 * (t % 2)
                                regs = []
                                for ab in range(2):  # rows g (a) and g + 8 (b)
                                    blk = wb[min(row0 + 8 * ab + g, n_rows - 1), b]
                                    codes = blk[16 + 64 * sp + 16 * t : 32 + 64 * sp + 16 * t]
                                    word = int(codes.view("<u4")[j])
                                    s, o = _scale_min(blk[:16], 2 * (t // 2) + hh, sp == 1)
                                    regs.append((word, s, o))
                                (qa, sa, oa), (qb, sb, ob) = regs
                                a_regs = [
                                    _pair(qa, 4 * hh, sa, oa), _pair(qb, 4 * hh, sb, ob),
                                    _pair(qa, 4 * hh + 8, sa, oa), _pair(qb, 4 * hh + 8, sb, ob),
                                ]  # fmt: skip
                                # PTX fragment layout of A (16x16, row major): registers
                                # 0..3 = rows (g, g+8, g, g+8), columns (2t, 2t, 2t+8, 2t+8) + e
                                for i, (lo, hi) in enumerate(a_regs):
                                    r, c = g + 8 * (i % 2), 2 * t + 8 * (i // 2)
                                    a[r, c], a[r, c + 1] = lo, hi
                                run = xs[min(n0 + g, m - 1), b * 256 + sp * 128 + k0 + 32 * hh :]
                                vals = run[4 * j : 4 * j + 4]
                                # prmt 0x5410 / 0x7632 of words (v0, v1), (v2, v3)
                                b_regs = [(vals[0], vals[2]), (vals[1], vals[3])]
                                # B (16x8, column major): register i = rows 2t + 8i + e, col g
                                for i, (lo, hi) in enumerate(b_regs):
                                    bt[2 * t + 8 * i, g], bt[2 * t + 8 * i + 1, g] = lo, hi
                            assert not np.isnan(a).any() and not np.isnan(bt).any()
                            acc += a @ bt
            rows = slice(row0, min(row0 + 16, n_rows))
            cols = slice(n0, min(n0 + 8, m))
            y[cols, rows] = acc[: rows.stop - row0, : cols.stop - n0].T
    return y


@pytest.mark.parametrize("m, n, k", [(1, 16, 256), (5, 24, 512), (9, 16, 256)])
def test_lane_maps_meet_every_weight_with_its_x(m, n, k):
    f = get_format("q4k")
    gen = torch.Generator().manual_seed(m * 100 + n)
    w = torch.randn(n, k, generator=gen)
    packed = f.quantize(w)
    x = torch.randn(m, k, generator=gen)
    want = x.double() @ f.dequantize(packed, (n, k), torch.float32).double().T
    got = replay(packed, (n, k), x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-9)


def _q8_groups(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 -> int8 codes (M, K / 32, 32) and (scale, sum, residual) (M, K / 32, 3)
    float32, as `triton_quant._q8_words` makes them (round half away from zero)."""
    g = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(g).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    v = g * inv[..., None]
    q = np.trunc(v + np.where(v >= 0, 0.5, -0.5).astype(np.float32)).astype(np.int64)
    scale = (amax / np.float32(127)).astype(np.float32)
    total = g.sum(-1, dtype=np.float32)
    residual = (total - scale * q.sum(-1).astype(np.float32)).astype(np.float32)
    return q, np.stack([scale, total, residual], -1)


def replay_gemv(packed: torch.Tensor, shape: tuple[int, int], xq, xs) -> np.ndarray:
    """y (M, N) as `q4k_gemv` computes it, in float64: per lane (quarter, c, h) of one warp,
    its blocks, code bytes, dp4a dots (the high nibbles masked in place: 16x), sub-block
    (scale, min) pairs by the source's shifts, and the sum/residual terms from h == 0 lanes."""
    n_rows, k = shape
    nblk = k // 256
    wb = packed.numpy().reshape(n_rows, nblk, 144)
    y = np.zeros((xq.shape[0], n_rows))
    for m in range(xq.shape[0]):
        for row in range(n_rows):
            total = 0.0
            for lane in range(32):
                j, quarter = lane % 8, lane // 8
                c, h = j // 2, j % 2
                sh, first = 16 * (c % 2), float(h == 0)
                for b in range(quarter, nblk, 4):
                    blk = wb[row, b]
                    hd = [int(w) for w in blk[:16].view("<u4")]
                    codes = blk[16 + 16 * j : 32 + 16 * j].astype(np.int64)
                    lo_g, hi_g = 8 * b + 2 * c, 8 * b + 2 * c + 1
                    dl = int((codes & 15) @ xq[m, lo_g, 16 * h : 16 * h + 16])
                    dh = int((codes & 0xF0) @ xq[m, hi_g, 16 * h : 16 * h + 16])
                    if c >= 2:
                        sc = ((hd[3] >> sh) & 0x0F0F) | ((hd[1] >> (sh + 2)) & 0x3030)
                        mn = ((hd[3] >> (sh + 4)) & 0x0F0F) | ((hd[2] >> (sh + 2)) & 0x3030)
                    else:
                        sc, mn = (hd[1] >> sh) & 0x3F3F, (hd[2] >> sh) & 0x3F3F
                    d, dmin = blk[:4].view(np.float16).astype(np.float64)
                    (dxl, sl, rl), (dxh, shi, rh) = xs[m, lo_g], xs[m, hi_g]
                    lo = (dxl * dl + 8 * first * rl) * (sc & 255)
                    hi = (dxh / 16 * dh + 8 * first * rh) * (sc >> 8)
                    total += d * (lo + hi) - dmin * first * ((mn & 255) * sl + (mn >> 8) * shi)
            y[m, row] = total
    return y


@pytest.mark.parametrize("m, n, k", [(1, 3, 256), (2, 2, 1280)])
def test_gemv_lanes_cover_every_sub_block_once(m, n, k):
    """The replayed lanes equal the closed form over q4_K's sub-blocks (from the format's own
    `group_affine` parts, not the kernel's maps): sum over groups of scale (dx q.xq + 8 r)
    + (offset - 8 scale) sum(x), and stay within int8 rounding of the float product."""
    f = get_format("q4k")
    gen = torch.Generator().manual_seed(m * 10 + n)
    packed = f.quantize(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    xq, xs = _q8_groups(x.numpy())
    got = replay_gemv(packed, (n, k), xq, xs.astype(np.float64))
    ga = f.group_affine(packed, (n, k))
    q = ga.codes.numpy().astype(np.int64).reshape(n, -1, 32) + 8
    scale, offset = ga.scale.numpy().astype(np.float64), ga.offset.numpy().astype(np.float64)
    dots = np.einsum("ngi,mgi->mng", q, xq)
    xs64 = xs.astype(np.float64)
    want = (scale[None] * (xs64[:, None, :, 0] * dots + 8 * xs64[:, None, :, 2])).sum(-1)
    want += ((offset - 8 * scale)[None] * xs64[:, None, :, 1]).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # offset is float32
    exact = x.double() @ f.dequantize(packed, (n, k), torch.float32).double().T
    assert np.abs(got - exact.numpy()).max() <= 0.02 * np.abs(exact.numpy()).max()


def _nvrtc() -> ctypes.CDLL | None:
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return None
    for root in nvidia.__path__:
        for lib in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*"))):
            if "builtins" not in lib and "alt" not in lib:
                return ctypes.CDLL(lib)
    return None


def _compile_log(lib: ctypes.CDLL, source: str, arch: str) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    assert (
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"q4k.cu", 0, None, None) == 0
    )
    opts = [f"--gpu-architecture={arch}".encode()]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return res, log.value.decode(errors="replace").strip()


def test_source_compiles_for_every_tuned_shape():
    """Every GEMV and mma shape the tuner can pick; sm_80 (A100), sm_86 / sm_89 (RTX 3090 / 4090, L4: the 24 GB cards q4k serves) and
    sm_90 (H100); the consumer archs for one shape only (same source paths)."""
    lib = _nvrtc()
    if lib is None:  # the test extras install it on Linux: there its absence is a failure
        assert sys.platform != "linux", "nvidia-cuda-nvrtc (a test extra) is not installed"
        pytest.skip("NVRTC wheels exist for Linux only")
    from mistralpy.kernels import triton_quant as tq

    for c in tq.Q4K_GEMV_CUDA_CANDIDATES:
        for fp16 in (False, True):
            shape = cuda_q4k.GemvShape(c.bn // c.warps, c.bb, c.warps, fp16)
            for arch in ("sm_80", "sm_90"):
                res, log = _compile_log(lib, cuda_q4k.source_of(shape), arch)
                assert res == 0 and not log, (shape, arch, log)
    for tiles, warps in {(c.bn // (16 * c.warps), c.warps) for c in _mma_candidates()}:
        for x_tiles in (1, 2, 3, 4):
            for fp16 in (False, True):
                source = cuda_q4k.source_of(cuda_q4k.MmaShape(tiles, warps, x_tiles, fp16))
                consumer = (tiles, warps, x_tiles) == (1, 4, 1)
                for arch in (
                    ("sm_80", "sm_86", "sm_89", "sm_90") if consumer else ("sm_80", "sm_90")
                ):
                    res, log = _compile_log(lib, source, arch)
                    assert res == 0 and not log, (tiles, warps, x_tiles, fp16, arch, log)


def _mma_candidates():
    from mistralpy.kernels import triton_quant as tq

    return tq.q4k_gemm_mma_candidates(5120, 5120)


def test_q4k_mma_rejects_what_it_cannot_run():
    x = torch.zeros(33, 256, dtype=torch.bfloat16)
    y = torch.zeros(33, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="<= 32"):
        cuda_q4k.q4k_mma(torch.zeros(16, 144, dtype=torch.uint8), x, y, y, y,
                         row_tiles=1, warps=4, split_blocks=1)  # fmt: skip


def test_mma_configs_route_to_the_cuda_kernel_with_their_launch_shape(monkeypatch):
    """A GemmConfig with mma=True sends a decode product to `cuda_q4k.q4k_mma` with bn split
    into warps x 16-row tiles, its split-K block count, and a workspace that holds every
    split's partials (here recorded on the CPU instead of launched)."""
    from mistralpy.kernels import triton_quant as tq

    calls = []
    monkeypatch.setattr(cuda_q4k, "q4k_mma", lambda *a, **kw: calls.append((a, kw)))
    n, k = 256, 256 * 10
    packed = get_format("q4k").quantize(torch.randn(n, k))
    cfg = tq.GemmConfig(128, 1, 4, 1, 4, mma=True)
    kern = tq.TritonQ4KMatmul(packed, (n, k), gemm={b: cfg for b in tq.Q4K_GEMM_BUCKETS})
    x = torch.randn(5, k, dtype=torch.bfloat16)
    kern(x)
    ((w, xa, y, ws, cnt), kw) = calls[0]
    assert w is packed and xa.shape == (5, k) and y.shape == (5, n)
    assert kw == {"row_tiles": 2, "warps": 4, "split_blocks": 3}  # 10 blocks in 4 splits of 3
    assert ws.shape[0] >= 4 and ws.shape[1:] == (5, n) and ws.dtype == torch.float32
    assert cnt.dtype == torch.int32 and cnt.numel() >= 2 and not cnt.any()  # 2 row tiles


def test_cuda_gemv_configs_route_with_x_in_int8_groups(monkeypatch):
    """A GemvConfig with cuda=True quantizes x once (`_quantized_x`) and sends it to
    `cuda_q4k.q4k_gemv` with bn split into warps x rows per warp and bb as the unroll."""
    from mistralpy.kernels import triton_quant as tq

    calls = []
    monkeypatch.setattr(cuda_q4k, "q4k_gemv", lambda *a, **kw: calls.append((a, kw)))
    n, k = 64, 512
    packed = get_format("q4k").quantize(torch.randn(n, k))
    kern = tq.TritonQ4KMatmul(packed, (n, k), tq.GemvConfig(8, 4, 4, cuda=True))
    groups = (torch.zeros(1, k // 4, dtype=torch.int32), torch.zeros(1, k // 32, 3))
    monkeypatch.setattr(kern, "_quantized_x", lambda x: groups)
    y = kern(torch.randn(1, k, dtype=torch.bfloat16))
    ((w, xq, xs, out), kw) = calls[0]
    assert w is packed and (xq, xs) == groups and out is y and y.shape == (1, n)
    assert kw == {"rows_per_warp": 2, "unroll": 4, "warps": 4}


def test_q4k_gemv_rejects_what_it_cannot_run():
    xq, xs = torch.zeros(1, 64, dtype=torch.int32), torch.zeros(1, 8, 3)
    y = torch.zeros(1, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        cuda_q4k.q4k_gemv(torch.zeros(16, 144, dtype=torch.uint8), xq, xs, y,
                          rows_per_warp=1, unroll=4, warps=4)  # fmt: skip
