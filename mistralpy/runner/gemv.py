"""Decode-sized linears through per-shape tuned Triton kernels (CUDA), where they beat cuBLAS.

`use_tuned_gemv(model, rows)` times, once per weight shape of the language model and lm_head
and per row count in `rows` (the decode graph buckets), the Triton candidates of
`kernels.triton_gemv` against F.linear, and swaps in a `TunedLinear` (same weight tensor, no
copy) holding the configs that were measurably faster and equal to bf16 rounding. Any other
row count keeps F.linear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.model.layers import MergedLinear


class TunedLinear(nn.Linear):
    """An nn.Linear sharing `linear`'s weight whose inputs of a tuned row count take the
    Triton kernel chosen for it (a host-side lookup: CUDA-graph safe)."""

    def __init__(self, linear: nn.Linear, configs: dict[int, Any]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.configs = configs  # rows -> kernels.triton_gemv.GemvConfig | SkinnyConfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, in) -> (T, out)."""
        config = self.configs.get(x.shape[0]) if x.dim() == 2 else None
        if config is not None and x.stride(1) == 1 and self.bias is None:
            from mistralpy.kernels.triton_gemv import run_tuned

            return run_tuned(x, self.weight, config)
        return F.linear(x, self.weight, self.bias)


def use_tuned_gemv(model: Any, rows: list[int]) -> dict[str, Any]:
    """Swap the decoder's and lm_head's plain linears for `TunedLinear` where a tuned kernel
    wins at some row count of `rows`; returns per shape and row count the chosen config (or
    None) and the measured times in us."""
    from mistralpy.kernels.triton_gemv import tune_gemv

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in (nn.Linear, MergedLinear)  # not quantized (ISQ) replacements
        and module.bias is None
        and (name.startswith("language_model.") or name == "lm_head")
    ]
    chosen: dict[tuple[int, ...], dict[int, Any]] = {}
    report: dict[str, Any] = {}
    for name, module in targets:
        shape = tuple(module.weight.shape)
        if shape not in chosen:
            chosen[shape] = {}
            for m in rows:
                config, times = tune_gemv(module.weight, m)
                report[f"{'x'.join(map(str, shape))} rows={m}"] = {
                    "config": str(config),
                    "us": times,
                }
                if config is not None:
                    chosen[shape][m] = config
        if chosen[shape]:
            model.set_submodule(name, TunedLinear(module, chosen[shape]))
    return report
