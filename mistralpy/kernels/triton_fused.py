"""Fused Triton kernels for the small ops of `kernels.fused_ops` (CUDA; CPU via TRITON_INTERPRET).

Imports triton at the top: only `fused_ops.triton_layer_ops()` imports this module. Each kernel
reproduces the reference's rounding steps (sums and norms in float32, each product rounded to
the activation dtype as eager PyTorch does), so results differ from the reference only by the
order of float32 reductions and the last bit of exp / sqrt. No host syncs: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------
# RMSNorm, optionally after a residual add
# --------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program per row: [s = x + res, stored rounded;] y = w * round(s / rms(s))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / n_cols + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    normed = (x32 * rstd).to(x.dtype).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (normed * w).to(x.dtype), mask=mask)


def _launch_rms_norm(x, residual, weight, eps):
    """Shared launcher: returns (y, x + residual or None), both (T, N) in x's dtype."""
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} must be (T, N) rows, weight (N,)")
    y = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    if x.shape[0] == 0:
        return y, total
    block = triton.next_power_of_2(x.shape[1])
    res = residual if residual is not None else x
    out_sum = total if total is not None else y
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, y, out_sum, x.stride(0), res.stride(0), y.stride(0), out_sum.stride(0),
        x.shape[1], eps, HAS_RES=residual is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )  # fmt: skip
    return y, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) -> weight * x / rms(x), same shape and dtype (see fused_ops.rms_norm)."""
    flat = x.reshape(-1, x.shape[-1])
    return _launch_rms_norm(flat, None, weight, eps)[0].view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) for x, residual (T, N), in one pass."""
    if residual.shape != x.shape or residual.stride(-1) != 1:
        raise ValueError("add_rms_norm: residual must match x")
    return _launch_rms_norm(x, residual, weight, eps)


# --------------------------------------------------------------------------------------
# SiLU-and-mul
# --------------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, n_cols, BLOCK: tl.constexpr):
    """Program (row, column block): y = round(silu(gate)) * up, gate = x[:n], up = x[n:]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (act * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I) -> silu(gate) * up (T, I)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_and_mul: gate_up {tuple(gate_up.shape)} must be (T, 2I) rows")
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((rows, n), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return y
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](
        gate_up, y, gate_up.stride(0), y.stride(0), n, BLOCK=block, num_warps=4
    )
    return y


# --------------------------------------------------------------------------------------
# Rotate-half RoPE on queries and keys
# --------------------------------------------------------------------------------------


@triton.jit
def rotated_heads(x_row, stride_h, c, s, offs_d, H: tl.constexpr, H_PAD: tl.constexpr,
                  D: tl.constexpr):  # fmt: skip
    """All H heads (stride_h apart) of one token, rotated: (round(x c) + round(rot(x) s)
    (H_PAD, D) in x's dtype, the (H_PAD, 1) mask of real heads). Also the K/V store's RoPE
    (`triton_attention.rope_store_kv`)."""
    offs_h = tl.arange(0, H_PAD)
    mask = offs_h[:, None] < H
    half: tl.constexpr = D // 2
    partner = (offs_d + half) % D
    sign = tl.where(offs_d < half, -1.0, 1.0)
    base = x_row + offs_h[:, None] * stride_h
    x = tl.load(base + offs_d[None, :], mask=mask, other=0.0)
    xp = tl.load(base + partner[None, :], mask=mask, other=0.0)
    a = (x.to(tl.float32) * c[None, :]).to(x.dtype).to(tl.float32)
    b = (xp.to(tl.float32) * sign[None, :] * s[None, :]).to(x.dtype).to(tl.float32)
    return (a + b).to(x.dtype), mask


@triton.jit
def _rope_heads(x_row, out_row, stride_h, c, s, offs_d, H: tl.constexpr, H_PAD: tl.constexpr,
                D: tl.constexpr):  # fmt: skip
    """All H heads (stride_h apart) of one token rotated into out_row (H, D) contiguous."""
    y, mask = rotated_heads(x_row, stride_h, c, s, offs_d, H, H_PAD, D)
    tl.store(out_row + tl.arange(0, H_PAD)[:, None] * D + offs_d[None, :], y, mask=mask)


@triton.jit
def _rope_qk_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_ct, stride_st, HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """Program per token: every query and key head of it, one cos/sin row."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D)
    c = tl.load(cos_ptr + t * stride_ct + offs_d).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + offs_d).to(tl.float32)
    _rope_heads(
        q_ptr + t * stride_qt, qo_ptr + t * (HQ * D), stride_qh, c, s, offs_d, HQ, HQ_PAD, D
    )
    _rope_heads(
        k_ptr + t * stride_kt, ko_ptr + t * (HK * D), stride_kh, c, s, offs_d, HK, HK_PAD, D
    )


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hk, D) (any row/head strides, unit last stride), cos/sin (T, D)
    -> roped q, k as new contiguous tensors."""
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"rope_qk: q {tuple(q.shape)}, k {tuple(k.shape)}, cos/sin (T, D)")
    if d & (d - 1) or min(q.stride(-1), k.stride(-1), cos.stride(-1), sin.stride(-1)) != 1:
        raise ValueError("rope_qk: head_dim must be a power of two with unit-stride rows")
    hk = k.shape[1]
    q_out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, hk, d), dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    _rope_qk_kernel[(t,)](
        q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos.stride(0), sin.stride(0), HQ=hq, HK=hk, HQ_PAD=triton.next_power_of_2(hq),
        HK_PAD=triton.next_power_of_2(hk), D=d, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


__all__ = ["add_rms_norm", "rms_norm", "rope_qk", "silu_and_mul"]
