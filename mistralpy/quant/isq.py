"""In-situ quantization (ISQ): swap full-precision Linear layers for `QuantizedLinear`.

The loader calls `isq_linear_factory(fmt)(module_path, weight, bias)` for every nn.Linear once
its full-precision weight is assembled on the target device; it swaps in the returned module
(None keeps the plain Linear). Which layers: every linear of the text decoder (paths with a
`layers` component: qkv_proj, o_proj, gate_up_proj, down_proj, ...) and `lm_head`; the vision
tower and projector only with `quantize_vision=True`.

Width fallback: a format needs in_features to be a multiple of its block (256 for K-quants,
32 for the legacy formats). Otherwise the K-quant falls back to the legacy format of similar
size (q2k/q3k/q4k -> q4_0, q5k -> q5_0, q6k/q8k -> q8_0) when in_features % 32 == 0, else
the layer stays full precision; each fallback is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mistralpy.kernels.quant_matmul import (
    DequantMatmul,
    Int4PackMatmul,
    QuantMatmul,
    int4pack_supported,
)
from mistralpy.quant.formats import QuantFormat, get_format

log = logging.getLogger(__name__)

_FALLBACK = {"q2k": "q4_0", "q3k": "q4_0", "q4k": "q4_0", "q5k": "q5_0", "q6k": "q8_0"}
_FALLBACK["q8k"] = "q8_0"
_VISION_PARTS = ("vision_tower", "multi_modal_projector")

LinearFactory = Callable[[str, Tensor, "Tensor | None"], "nn.Module | None"]


def _dequant_rows_fn(fmt: QuantFormat, packed: Tensor, in_features: int):
    """(start, stop, dtype) -> dense rows start:stop of the packed weight."""

    def rows(start: int, stop: int, dtype: torch.dtype) -> Tensor:
        return fmt.dequantize(packed[start:stop], (stop - start, in_features), dtype)

    return rows


def reference_matmul(fmt: QuantFormat, packed: Tensor, shape: tuple[int, int]) -> QuantMatmul:
    """The plain-PyTorch oracle: dequantize all of W, then matmul (tests only)."""
    return DequantMatmul(_dequant_rows_fn(fmt, packed, shape[1]), *shape, tile_bytes=None)


def build_quant_matmul(fmt: QuantFormat, packed: Tensor, shape: tuple[int, int]) -> QuantMatmul:
    """Pick, once, the fastest faithful kernel for `fmt` on packed's device.

    CUDA: Triton fused kernels (mistralpy.kernels.triton_quant) when Triton imports, else
    tiled dequantize + matmul. CPU: torch's int4 kernels for formats whose groups are
    multiples of 32 (q4_0, q4_1, q5_0, q5_1, q8_0, q4k, q5k, q8k), tiled dequantize + fp32
    matmul for the 16-element-group K-quants (q2k, q3k, q6k) and fp8.
    """
    if packed.device.type == "cuda":
        try:
            from mistralpy.kernels import triton_quant
        except ImportError:  # no Triton: the tiled fallback still runs on CUDA
            log.warning("triton not importable; %s uses dequantize + matmul", fmt.name)
        else:
            ga = (
                None if fmt.name in triton_quant.NATIVE_FORMATS else fmt.group_affine(packed, shape)
            )
            kernel = triton_quant.build(fmt.name, packed, shape, ga)
            if kernel is not None:
                return kernel
    elif packed.device.type == "cpu":
        ga = fmt.group_affine(packed, shape)
        if ga is not None and int4pack_supported(ga.group, ga.bits):
            return Int4PackMatmul(ga.codes, ga.scale, ga.offset, ga.group, ga.bits)
    return DequantMatmul(_dequant_rows_fn(fmt, packed, shape[1]), *shape)


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b with W kept in GGUF block layout (`qweight`, persistent).

    The kernel is chosen at construction for the buffer's device; build the module on the
    device it will run on (moving it later would leave the kernel's own packing behind).
    """

    def __init__(
        self, qweight: Tensor, fmt: str | QuantFormat, shape: tuple[int, int], bias: Tensor | None
    ):
        # qweight (out, bytes_per_row(in)) uint8; shape = (out_features, in_features).
        super().__init__()
        self.fmt = get_format(fmt)
        self.out_features, self.in_features = shape
        if qweight.shape != (shape[0], self.fmt.bytes_per_row(shape[1])):
            raise ValueError(f"qweight shape {tuple(qweight.shape)} does not fit {self.fmt.name}")
        self.register_buffer("qweight", qweight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = build_quant_matmul(self.fmt, qweight, (self.out_features, self.in_features))

    @classmethod
    def from_float(
        cls, weight: Tensor, bias: Tensor | None, fmt: str | QuantFormat
    ) -> QuantizedLinear:
        """Quantize a (out, in) float weight on its own device."""
        f = get_format(fmt)
        return cls(f.quantize(weight), f, tuple(weight.shape), bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in) dense weight, for checks and export."""
        return self.fmt.dequantize(self.qweight, (self.out_features, self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        y = self.kernel(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = type(self.kernel).__name__
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt.name}, kernel={kernel}"


def should_quantize(module_path: str, quantize_vision: bool = False) -> bool:
    """True for text-decoder linears and lm_head; vision parts only when asked."""
    parts = module_path.split(".")
    if any(p in parts for p in _VISION_PARTS):
        return quantize_vision
    return parts[-1] == "lm_head" or "layers" in parts


def compatible_format(fmt: QuantFormat, in_features: int) -> QuantFormat | None:
    """`fmt`, or the documented fallback when in_features does not split into its blocks."""
    if fmt.supports(in_features):
        return fmt
    fallback = _FALLBACK.get(fmt.name)
    if fallback is not None and get_format(fallback).supports(in_features):
        return get_format(fallback)
    return None


def isq_linear_factory(fmt: str, quantize_vision: bool = False) -> LinearFactory:
    """Loader hook: (module_path, weight (out, in), bias) -> QuantizedLinear or None.

    Raises UnknownQuantFormatError (a ValueError) at once for an unknown `fmt`.
    """
    base = get_format(fmt)

    def factory(module_path: str, weight: Tensor, bias: Tensor | None) -> nn.Module | None:
        if not should_quantize(module_path, quantize_vision):
            return None
        chosen = compatible_format(base, weight.shape[1])
        if chosen is None:
            log.info(
                "ISQ %s: %s in=%d kept full precision", base.name, module_path, weight.shape[1]
            )
            return None
        if chosen is not base:
            log.info(
                "ISQ %s: %s in=%d uses %s", base.name, module_path, weight.shape[1], chosen.name
            )
        return QuantizedLinear.from_float(weight, bias, chosen)

    return factory
