"""float32 linears on the CPU through oneDNN instead of torch's default BLAS.

torch routes a float32 `F.linear` to its BLAS (MKL), which on this class of host (AMD Zen, where
MKL takes a generic code path) reads weights at about half the speed oneDNN does: measured on the
`small` preset, a 131072x512 lm_head GEMV took 14.6 ms vs 8.3 ms, and the decoder's projections
1.3-1.7x (2x for 512-row prefill GEMMs). bfloat16 linears already go through oneDNN. Tiny
weights stay on F.linear: oneDNN's ~10 us fixed cost exceeds their whole matmul. Same math
(a float32 dot product per output), only the summation order may differ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.model.layers import MergedLinear

MIN_WEIGHT_ELEMENTS = 1 << 16  # below this F.linear's lower call overhead wins


class OneDnnLinear(nn.Linear):
    """An nn.Linear sharing `linear`'s weight and bias whose 2-D float32 inputs take oneDNN's
    matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch's own CPU compiler emits)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.output_sizes = getattr(linear, "output_sizes", None)  # MergedLinear's parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, out)."""
        if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def onednn_usable() -> bool:
    """Whether this torch build has oneDNN (mkldnn) and its pointwise linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn_linears(model: Any) -> list[str]:
    """Swap every plain float32 CPU linear of at least MIN_WEIGHT_ELEMENTS weights for a
    `OneDnnLinear` (same tensors, no copy); returns the swapped module names."""
    if not onednn_usable():
        return []
    names = [
        name
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, MergedLinear)  # not quantized (ISQ) replacements
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and module.weight.is_contiguous()
        and module.weight.numel() >= MIN_WEIGHT_ELEMENTS
    ]
    for name in names:
        model.set_submodule(name, OneDnnLinear(model.get_submodule(name)))
    return names
