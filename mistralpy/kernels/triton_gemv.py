"""Matrix-vector product for batch-1 decode (CUDA; CPU via TRITON_INTERPRET), tuned per shape.

At one token per step every linear layer is a GEMV that only streams its weight. cuBLAS
reaches 2.4-2.85 TB/s on the 24B shapes of an H100 (benchmarks/gpu_e2e.py); this kernel is
a candidate that the runner times against it per weight shape at start-up, keeping whichever
is faster (`tune_gemv`), so it can only help. Imports triton at the top: CUDA path only.
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


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Program: BLOCK_N outputs y[r] = sum_k w[r, k] x[k], float32 accumulation."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None], other=0.0)
        x = tl.load(x_ptr + cols)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """x (1, K) @ weight (N, K).T -> (1, N) in x's dtype; K must be a multiple of block_k."""
    n, k = weight.shape
    if x.shape != (1, k) or k % config.block_k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} / weight {tuple(weight.shape)} unsupported")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, y, n, k, weight.stride(0),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return y


def tune_gemv(weight: torch.Tensor, repeats: int = 20) -> tuple[GemvConfig | None, dict]:
    """The fastest candidate for x (1, K) @ weight.T if it beats F.linear by >= 3% and
    matches it to bf16 rounding; else None. Also returns the times (us) for the record."""
    k = weight.shape[1]
    x = torch.randn(1, k, device=weight.device, dtype=weight.dtype)
    want = F.linear(x, weight)
    times = {"cublas": _time_us(lambda: F.linear(x, weight), repeats)}
    best, best_t = None, times["cublas"] * 0.97
    for cfg in CANDIDATES:
        if k % cfg.block_k:
            continue
        try:
            got = gemv(x, weight, cfg)
        except Exception:  # noqa: BLE001 - a candidate that does not compile is skipped
            continue
        err = float((got.float() - want.float()).norm() / want.float().norm())
        if err > 1e-2:
            continue
        t = _time_us(lambda cfg=cfg: gemv(x, weight, cfg), repeats)
        times[f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}"] = t
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
