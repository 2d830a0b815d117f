"""Building blocks shared by the Pixtral encoder and the Mistral decoder.

Numerics follow transformers' mistral3/pixtral modules exactly (norm in float32, RoPE angles in
float32 then cast to the activation dtype, rotate-half convention), so that tiny random
checkpoints match the oracle to ~1e-5 in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.kernels.fused_ops import REFERENCE_OPS, LayerOps, apply_rope
from mistralpy.model.parallel import SINGLE, ParallelConfig, even_shard, set_shards

__all__ = [
    "GatedMLP",
    "MergedLinear",
    "RMSNorm",
    "activation",
    "apply_rope",
    "rope_cos_sin",
    "rope_inv_freq",
    "text_rope",
]


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation called `name` in transformers' ACT2FN spelling."""
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
    return table[name]  # names were validated by model.config


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)), the reduction in float32, the product in x's dtype."""

    ops: LayerOps = REFERENCE_OPS  # set per instance by the model's `set_layer_ops`

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., hidden) -> same shape and dtype."""
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual (T, hidden) -> (norm(residual + x), residual + x): one fused pass."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class MergedLinear(nn.Linear):
    """Several bias-free projections of the same input stacked along the output dim.

    `output_sizes` gives each part's rows in order; checkpoint loaders fill part i into rows
    [sum(sizes[:i]), sum(sizes[:i+1])) and the forward splits the output the same way.
    """

    def __init__(self, in_features: int, output_sizes: tuple[int, ...], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused in one `gate_up_proj` matmul.

    Under tensor parallelism each rank holds 1/tp of the intermediate features (gate_up column
    parallel, down row parallel) and the partial outputs are summed across ranks.
    """

    ops: LayerOps = REFERENCE_OPS  # set per instance by the model's `set_layer_ops`

    def __init__(
        self, hidden_size: int, intermediate_size: int, act: str, parallel: ParallelConfig = SINGLE
    ) -> None:
        super().__init__()
        col = even_shard(intermediate_size, parallel, 0, "the MLP intermediate size")
        self.gate_up_proj = set_shards(MergedLinear(hidden_size, (col.size, col.size)), col, col)
        self.down_proj = nn.Linear(col.size, hidden_size, bias=False)
        set_shards(self.down_proj, even_shard(intermediate_size, parallel, 1, "down_proj"))
        self.act = activation(act)
        self.parallel = parallel
        self.fused_silu = act == "silu"  # silu(gate) * up is one LayerOps op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, hidden) -> (N, hidden)."""
        gate_up = self.gate_up_proj(x)
        if self.fused_silu:
            hidden = self.ops.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = self.act(gate) * up
        return self.parallel.all_reduce(self.down_proj(hidden))


def rope_inv_freq(theta: float, dim: int, device: torch.device) -> torch.Tensor:
    """(dim/2,) float32 inverse frequencies theta^(-2i/dim), computed as transformers does."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles (N, dim/2) float32 -> (cos, sin), each (N, dim) in `dtype`, halves repeated."""
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def text_rope(
    positions: torch.Tensor, theta: float, dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D RoPE tables for arbitrary positions (T,) int -> cos, sin (T, dim).

    Computed from the positions on the fly: no precomputed table that a long context
    (131072 tokens) could overrun.
    """
    inv_freq = rope_inv_freq(theta, dim, positions.device)
    return rope_cos_sin(positions.float()[:, None] * inv_freq[None, :], dtype)
