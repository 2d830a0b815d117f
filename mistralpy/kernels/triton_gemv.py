"""Weight-streaming matmuls for decode (CUDA; CPU via TRITON_INTERPRET), tuned per shape.

At a few tokens per step every linear layer only streams its weight. cuBLAS reaches 2.4-2.85
TB/s on the 24B shapes of an H100 at one row and ~2.7 at 32 rows (benchmarks/gpu_e2e.py).
`gemv` (one row, CUDA-core dot products) and `skinny_matmul` (2-32 rows, tensor cores, the
whole M in one tile) are candidates that the runner times against F.linear per weight shape
and row count at start-up, keeping whichever is faster (`tune_gemv`), so they can only help.
Imports triton at the top: CUDA path only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output rows per program
    block_k: int  # input columns per loop step (divides K)
    num_warps: int


CANDIDATES = (
    GemvConfig(8, 512, 4),
    GemvConfig(4, 1024, 4),
    GemvConfig(16, 256, 4),
    GemvConfig(8, 1024, 8),
)


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int  # output columns per program
    block_k: int  # reduction step (divides K)
    num_warps: int
    num_stages: int


SKINNY_CANDIDATES = (
    SkinnyConfig(64, 128, 4, 4),
    SkinnyConfig(64, 256, 4, 3),
    SkinnyConfig(128, 128, 4, 4),
    SkinnyConfig(32, 256, 4, 4),
)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, n_rows, n_cols, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr):  # fmt: skip
    """Program: BLOCK_N outputs y[r] = sum_k w[r, k] x[k], float32 accumulation, times a
    per-row scale s[r] when HAS_SCALE (fp8 weights: `triton_quant.fp8_gemv`)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None], other=0.0)
        x = tl.load(x_ptr + cols)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_SCALE:
        y = y * tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """x (1, K) @ weight (N, K).T -> (1, N) in x's dtype; K must be a multiple of block_k."""
    n, k = weight.shape
    if x.shape != (1, k) or k % config.block_k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} / weight {tuple(weight.shape)} unsupported")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, x, y, n, k, weight.stride(0),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_SCALE=False,
        num_warps=config.num_warps,
    )  # fmt: skip
    return y


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, y_ptr, n_rows_x, n_out, n_cols, stride_x, stride_w, stride_y,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Program: y[:, cols] = x @ w[cols].T for all (<= BLOCK_M) rows of x, float32 MMA."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < n_rows_x, offs_n < n_out
    x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, n_cols, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T -> (M, N) for 2 <= M <= 64, K a multiple of block_k."""
    m, k = x.shape
    n = weight.shape[0]
    if not 1 <= m <= 64 or weight.shape[1] != k or k % config.block_k or x.stride(1) != 1:
        raise ValueError(f"skinny_matmul: x {tuple(x.shape)} / weight {tuple(weight.shape)}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y


def run_tuned(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | SkinnyConfig):
    """x (M, K) @ weight.T with a config chosen by `tune_gemv` for M rows."""
    if isinstance(config, GemvConfig):
        return gemv(x, weight, config)
    return skinny_matmul(x, weight, config)


def tune_gemv(
    weight: torch.Tensor, rows: int = 1, repeats: int = 20
) -> tuple[GemvConfig | SkinnyConfig | None, dict]:
    """The fastest candidate for x (rows, K) @ weight.T if it beats F.linear by >= 3% and
    matches it to bf16 rounding; else None. Also returns the times (us) for the record."""
    k = weight.shape[1]
    x = torch.randn(rows, k, device=weight.device, dtype=weight.dtype)
    want = F.linear(x, weight)
    times = {"cublas": _time_us(lambda: F.linear(x, weight), repeats)}
    best, best_t = None, times["cublas"] * 0.97
    for cfg in CANDIDATES if rows == 1 else SKINNY_CANDIDATES:
        if k % cfg.block_k:
            continue
        try:
            got = run_tuned(x, weight, cfg)
        except Exception:  # noqa: BLE001 - a candidate that does not compile is skipped
            continue
        err = float((got.float() - want.float()).norm() / want.float().norm())
        if err > 1e-2:
            continue
        t = _time_us(lambda cfg=cfg: run_tuned(x, weight, cfg), repeats)
        times[str(cfg)] = t
        if t < best_t:
            best, best_t = cfg, t
    return best, times


def _time_us(fn, repeats: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    results = []
    for _ in range(3):
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) * 1e3 / repeats)
    return sorted(results)[1]
