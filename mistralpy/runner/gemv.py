"""Batch-1 linears through a per-shape tuned Triton GEMV (CUDA), where it beats cuBLAS.

`use_tuned_gemv(model)` times, once per weight shape of the language model and lm_head, the
Triton candidates of `kernels.triton_gemv` against F.linear at one input row, and swaps in a
`TunedLinear` (same weight tensor, no copy) only where a candidate was measurably faster and
numerically equal to bf16 rounding. Inputs with more than one row keep F.linear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.model.layers import MergedLinear


class TunedLinear(nn.Linear):
    """An nn.Linear sharing `linear`'s weight whose (1, K) inputs take the Triton GEMV."""

    def __init__(self, linear: nn.Linear, config: Any) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.gemv_config = config  # kernels.triton_gemv.GemvConfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, out)."""
        if x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1 and self.bias is None:
            from mistralpy.kernels.triton_gemv import gemv

            return gemv(x, self.weight, self.gemv_config)
        return F.linear(x, self.weight, self.bias)


def use_tuned_gemv(model: Any) -> dict[str, Any]:
    """Swap the decoder's and lm_head's plain linears for `TunedLinear` where the tuned GEMV
    wins; returns per shape the chosen config (or None) and the measured times in us."""
    from mistralpy.kernels.triton_gemv import tune_gemv

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, MergedLinear)  # not quantized (ISQ) replacements
        and module.bias is None
        and (name.startswith("language_model.") or name == "lm_head")
    ]
    chosen: dict[tuple[int, ...], Any] = {}
    report: dict[str, Any] = {}
    for name, module in targets:
        shape = tuple(module.weight.shape)
        if shape not in chosen:
            chosen[shape], times = tune_gemv(module.weight)
            report["x".join(map(str, shape))] = {"config": str(chosen[shape]), "us": times}
        if chosen[shape] is not None:
            model.set_submodule(name, TunedLinear(module, chosen[shape]))
    return report
