"""The small per-token ops of a transformer layer, as a swappable set (`LayerOps`).

`REFERENCE_OPS` is plain PyTorch and defines the numerics (those of transformers' mistral3 /
pixtral modules: norm reduction in float32, every elementwise product rounded to the
activation dtype). `triton_layer_ops()` returns fused Triton kernels with the same rounding
steps, one launch per op instead of 3-10: on a batch-1 decode step the model runs ~40 layers
of these, and each avoided launch is ~2 us of a ~17 ms step. The model holds one `LayerOps`,
chosen once (`Mistral3ForConditionalGeneration.set_layer_ops`); CPU takes `CPU_OPS`,
the reference's own products regrouped into fewer dispatched ops (~0.2 ms of a ~7 ms `small`
decode step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., N) -> weight * (x / rms(x)): reduction in float32, product in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x), the sum rounded to x's dtype first; (T, N) each."""
    total = residual + x
    return norm(total, weight, eps), total


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I) = [gate | up] -> silu(gate) * up (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x (N, H, D), cos/sin (N, D) -> (N, H, D)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries (T, Hq, D) and keys (T, Hk, D) with the same cos/sin (T, D)."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@dataclass(frozen=True)
class LayerOps:
    """One implementation of each small op; every field matches the reference's contract."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rope_qk: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ]


REFERENCE_OPS = LayerOps(rms_norm, add_rms_norm, silu_and_mul, rope_qk)


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` for float32 x as torch's one fused op (same products; the mean's float32
    summation order may differ); other dtypes take the reference."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def cpu_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul`, the product written into silu's output (one temporary fewer)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def cpu_rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_qk` in fewer ops: rotate_half(x) * sin == roll(x, D/2) * (sin with its first half
    negated), exactly (a sign flip), and the signed sin is made once for q and k."""
    half = q.shape[-1] // 2
    signed = sin.clone()
    signed[:, :half].neg_()
    cos, signed = cos[:, None, :], signed[:, None, :]

    def rope(x: torch.Tensor) -> torch.Tensor:
        return (x * cos).add_(torch.roll(x, half, -1).mul_(signed))

    return rope(q), rope(k)


CPU_OPS = LayerOps(
    cpu_rms_norm, functools.partial(add_rms_norm, norm=cpu_rms_norm), cpu_silu_and_mul, cpu_rope_qk
)


def triton_layer_ops() -> LayerOps:
    """The fused Triton kernels (imports triton: call only when choosing the CUDA backend)."""
    from mistralpy.kernels import triton_fused

    return LayerOps(
        triton_fused.rms_norm,
        triton_fused.add_rms_norm,
        triton_fused.silu_and_mul,
        triton_fused.rope_qk,
    )
