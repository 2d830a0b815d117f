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

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mistralpy.kernels.quant_matmul import (
    DequantMatmul,
    FunctionMatmul,
    Int4PackMatmul,
    QuantMatmul,
    ScaledMMFp8Matmul,
    SmallBatchMatmul,
    TinyGemmInt4Matmul,
    int4pack_supported,
    scaled_mm_fp8_supported,
    tinygemm_supported,
)
from mistralpy.quant.formats import QuantFormat, fp8_pack, fp8_parts, get_format
from mistralpy.quant.tuning import KernelTuning

log = logging.getLogger(__name__)

_FALLBACK = {
    "q2k": "q4_0",
    "q3k": "q4_0",
    "q4k": "q4_0",
    "q5k": "q5_0",
    "q6k": "q8_0",
    "q8k": "q8_0",
}
_VISION_PARTS = ("vision_tower", "multi_modal_projector")
# 4-bit codes in groups of 32 with no kernel on their own bytes: tinygemm's repack serves them.
# Not q4k: its Triton kernels on the GGUF bytes alone (one copy of the weight) beat tinygemm,
# whose repack held a second copy and fell 2-5x behind at 16-64 rows
# (benchmarks/quant_gpu.py --sections gemm).
_TINYGEMM_FORMATS = ("q4_0", "q4_1")
# Batches up to this many rows take the numba q8_0 / q4k GEMVs, larger ones torch's int4 GEMM
# (the GEMV's cost grows linearly with the rows). Measured on the `small` preset's shapes (2
# Zen 4 cores): q8_0 ~1.7-2.1x faster at M=1, 1.3-1.4x at M=2, level or behind from M=4; q4k
# 2.3-2.8x at M=1, ~1.5x at M=2 on the decoder layers.
CPU_GEMV_MAX_M = 2


LinearFactory = Callable[[str, Tensor, "Tensor | None"], "nn.Module | None"]


def _dequant_rows_fn(
    fmt: QuantFormat, packed: Tensor, in_features: int
) -> Callable[[int, int, torch.dtype], Tensor]:
    """(start, stop, dtype) -> dense rows start:stop of the packed weight."""

    def rows(start: int, stop: int, dtype: torch.dtype) -> Tensor:
        return fmt.dequantize(packed[start:stop], (stop - start, in_features), dtype)

    return rows


def _affine_rows_fn(
    fmt: QuantFormat, packed: Tensor, in_features: int
) -> Callable[[int, int], tuple[Tensor, Tensor, Tensor]]:
    """(start, stop) -> GroupAffine (codes, scale, offset) of rows start:stop."""

    def rows(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
        ga = fmt.group_affine(packed[start:stop], (stop - start, in_features))
        assert ga is not None, fmt.name  # only GGML formats (never fp8) come here
        return ga.codes, ga.scale, ga.offset

    return rows


def reference_matmul(fmt: QuantFormat, packed: Tensor, shape: tuple[int, int]) -> QuantMatmul:
    """The plain-PyTorch oracle: dequantize all of W, then matmul (tests only)."""
    return DequantMatmul(_dequant_rows_fn(fmt, packed, shape[1]), *shape, tile_bytes=None)


def build_quant_matmul(
    fmt: QuantFormat, packed: Tensor, shape: tuple[int, int], tuning: KernelTuning | None = None
) -> QuantMatmul:
    """Pick, once, the fastest faithful kernel for `fmt` on packed's device.

    CUDA: q4k on its GGUF bytes alone (Triton GEMV at one row and swap-AB GEMM for decode
    batches, configs timed per shape through `tuning`; dequantize + cuBLAS for prefill);
    tinygemm int4 for q4_0/q4_1 (bf16 scale/zero), W8A8
    `_scaled_mm` for fp8 on sm90, Triton fused kernels (mistralpy.kernels.triton_quant)
    otherwise, tiled dequantize + matmul without Triton. CPU: q8_0 with numba and AVX-512 VNNI
    (K a multiple of 64) runs every batch on numba q8_0 x q8_0 kernels over its GGUF bytes
    (one-row for decode, four-row for prefill; no second copy); otherwise torch's int4
    kernels for formats whose groups are multiples of 32 (q4_0, q4_1, q5_0, q5_1, q8_0, q4k,
    q5k, q8k), with decode-sized batches of q8_0 (numba installed) and q4k (numba and AVX-512
    VNNI) on the numba GEMVs over their GGUF bytes (mistralpy.kernels.cpu_gguf; q4k rounds
    activations to int8 per 256 as GGML does); tiled dequantize + fp32 matmul for the
    16-element-group K-quants (q2k, q3k, q6k) and fp8.
    """
    if packed.device.type == "cuda":
        return _cuda_matmul(fmt, packed, shape, tuning or KernelTuning())
    if packed.device.type == "cpu" and fmt.ggml_type is not None:
        whole = _cpu_any_batch(fmt, packed, shape)
        if whole is not None:
            return whole
        group = fmt.group_affine(packed[:1], (1, shape[1]))
        assert group is not None, fmt.name  # ggml_type is set, so the format is group-affine
        if int4pack_supported(group.group, group.bits):
            int4 = Int4PackMatmul(
                _affine_rows_fn(fmt, packed, shape[1]), shape, group.group, group.bits
            )
            return _with_cpu_gemv(fmt, packed, int4)
    return DequantMatmul(_dequant_rows_fn(fmt, packed, shape[1]), *shape)


def _cpu_any_batch(fmt: QuantFormat, packed: Tensor, shape: tuple[int, int]) -> QuantMatmul | None:
    """A numba kernel on the GGUF bytes that is the fastest CPU path for every batch size
    (mistralpy.kernels.cpu_gguf.any_batch_matmul: q8_0 on AVX-512 VNNI), or None."""
    from mistralpy.kernels import cpu_gguf

    kernel = cpu_gguf.any_batch_matmul(fmt.name, shape[1]) if packed.is_contiguous() else None
    if kernel is None:
        return None
    return FunctionMatmul(functools.partial(kernel, packed), *shape)


def _with_cpu_gemv(fmt: QuantFormat, packed: Tensor, gemm: QuantMatmul) -> QuantMatmul:
    """`gemm`, with decode-sized batches sent to the numba kernel on the GGUF bytes where one
    exists for `fmt` and numba is installed (mistralpy.kernels.cpu_gguf)."""
    from mistralpy.kernels import cpu_gguf

    kernel = cpu_gguf.gemv(fmt.name) if packed.is_contiguous() else None
    if kernel is None:
        return gemm
    return SmallBatchMatmul(functools.partial(kernel, packed), gemm, CPU_GEMV_MAX_M)


def _cuda_matmul(
    fmt: QuantFormat, packed: Tensor, shape: tuple[int, int], tuning: KernelTuning
) -> QuantMatmul:
    """CUDA kernel choice of `build_quant_matmul` (fp8: see `_cuda_fp8_matmul`)."""
    tiled = DequantMatmul(_dequant_rows_fn(fmt, packed, shape[1]), *shape)
    if fmt.name in _TINYGEMM_FORMATS and tinygemm_supported(*shape, 32, fmt.bits):
        ga = fmt.group_affine(packed, shape)
        assert ga is not None and ga.group == 32
        return TinyGemmInt4Matmul(ga.codes, ga.scale, ga.offset, tiled, 256)
    # q4k: the Triton GEMV at one row, the swap-AB GEMM for decode batches, dequantize +
    # cuBLAS for prefill, all on its GGUF bytes (see `_triton_matmul`).
    return _triton_matmul(fmt, packed, shape, tuning) or tiled


def _triton_matmul(
    fmt: QuantFormat, packed: Tensor, shape: tuple[int, int], tuning: KernelTuning
) -> QuantMatmul | None:
    """The Triton fused kernel for `fmt`, or None when Triton does not import."""
    try:
        from mistralpy.kernels import triton_quant
    except ImportError:  # no Triton: the tiled fallback still runs on CUDA
        log.warning("triton not importable; %s uses dequantize + matmul", fmt.name)
        return None
    native = fmt.name in triton_quant.NATIVE_FORMATS or fmt.name == "fp8"
    ga = None if native else fmt.group_affine(packed, shape)
    gemv = gemm = None
    if fmt.name == "q4k":
        gemv = tuning.get(
            ("q4k", shape),
            lambda: triton_quant.tune_q4k_gemv(packed, shape),
            triton_quant.gemv_config_of,
        )
        gemm = tuning.get(
            ("q4k-gemm", shape),
            lambda: triton_quant.tune_q4k_gemm(packed, shape),
            triton_quant.gemm_configs_of,
        )
    return triton_quant.build(fmt.name, packed, shape, ga, gemv, gemm)


def _cuda_fp8_matmul(codes: Tensor, scale: Tensor, tuning: KernelTuning) -> QuantMatmul:
    """fp8 on CUDA from codes (N, K) e4m3 and row scales (N,): W8A8 `_scaled_mm` on sm90,
    else the Triton weight-only kernel (dequantize in registers, bf16 tl.dot / GEMV)."""
    from mistralpy.kernels import triton_quant  # fp8 on CUDA needs Triton either way

    if scaled_mm_fp8_supported(codes.device):
        quantizers = (triton_quant.fp8_quantize_rows, triton_quant.fp8_quantize_tensor)
        w8a8 = ScaledMMFp8Matmul(codes, scale, *quantizers)
        # At one row a weight-only GEMV can beat W8A8's three kernels; keep it where it does.
        config = tuning.get(
            ("fp8", tuple(codes.shape)),
            lambda: triton_quant.tune_fp8_gemv(codes, w8a8.scale, w8a8),
            triton_quant.fp8_gemv_config_of,
        )
        if config is None:
            return w8a8
        return ScaledMMFp8Matmul(
            codes, scale, *quantizers, gemv=triton_quant.fp8_gemv, gemv_config=config
        )
    k = codes.shape[1]
    s = scale.reshape(-1, 1)
    return triton_quant.TritonAffineMatmul(
        codes.view(torch.uint8), s, torch.zeros_like(s), k, fp8=True
    )


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W).T + b with W kept in GGUF block layout (`qweight`, persistent).

    The kernel is chosen at construction for the buffer's device; build the module on the
    device it will run on (moving it later would leave the kernel's own packing behind).
    fp8 on CUDA keeps only the kernel's contiguous codes + scales (a lossless re-layout):
    `qweight` is then rebuilt on demand for `state_dict()` / saving, so the weight is held
    once (1 byte per weight), not twice.
    """

    qweight: Tensor | None  # a buffer: None while the fp8 codes + scales hold the weight

    def __init__(
        self,
        qweight: Tensor,
        fmt: str | QuantFormat,
        shape: tuple[int, int],
        bias: Tensor | None,
        tuning: KernelTuning | None = None,
    ):
        # qweight (out, bytes_per_row(in)) uint8; shape = (out_features, in_features);
        # tuning: launch configs shared by the layers of one load (one timing per shape).
        super().__init__()
        self.fmt = get_format(fmt)
        self.out_features, self.in_features = shape
        if qweight.shape != (shape[0], self.fmt.bytes_per_row(shape[1])):
            raise ValueError(f"qweight shape {tuple(qweight.shape)} does not fit {self.fmt.name}")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._fp8: tuple[Tensor, Tensor] | None = None
        if self.fmt.name == "fp8" and qweight.device.type == "cuda":
            self._fp8 = fp8_parts(qweight, shape[1])
            self.register_buffer("qweight", None)
            self._register_state_dict_hook(_add_fp8_qweight)
            self.kernel = _cuda_fp8_matmul(*self._fp8, tuning or KernelTuning())
        else:
            self.register_buffer("qweight", qweight)
            self.kernel = build_quant_matmul(self.fmt, qweight, shape, tuning)

    @classmethod
    def from_float(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        fmt: str | QuantFormat,
        tuning: KernelTuning | None = None,
    ) -> QuantizedLinear:
        """Quantize a (out, in) float weight on its own device."""
        f = get_format(fmt)
        out_features, in_features = weight.shape
        return cls(f.quantize(weight), f, (out_features, in_features), bias, tuning)

    def packed_weight(self) -> Tensor:
        """(out, bytes_per_row(in)) uint8: the format's bytes, whichever way they are held."""
        if self._fp8 is not None:
            return fp8_pack(*self._fp8)
        assert self.qweight is not None  # registered as None only when _fp8 holds the weight
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(out, in) dense weight, for checks and export."""
        shape = (self.out_features, self.in_features)
        return self.fmt.dequantize(self.packed_weight(), shape, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features) in x.dtype."""
        y = self.kernel(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = type(self.kernel).__name__
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt.name}, kernel={kernel}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding whose table stays in a GGUF block format (`qweight`, persistent): a
    lookup gathers the rows it needs and dequantizes only those. On the GPU this keeps the
    24B model's 131072 x 5120 table at 0.38 GB in q4k instead of 1.34 GB in bf16 (llama.cpp
    quantizes token_embd too); a decode step reads a few rows, so it costs nothing there."""

    qweight: Tensor  # a buffer

    def __init__(self, qweight: Tensor, fmt: str | QuantFormat, shape: tuple[int, int],
                 dtype: torch.dtype):  # fmt: skip
        super().__init__()
        self.fmt = get_format(fmt)
        self.num_embeddings, self.embedding_dim = shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight)

    def forward(self, ids: Tensor) -> Tensor:
        """ids (...) int64 -> (..., embedding_dim) in self.dtype."""
        rows = self.qweight.index_select(0, ids.reshape(-1))
        out = self.fmt.dequantize(rows, (rows.shape[0], self.embedding_dim), self.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt.name}"


def quantize_embedding(emb: nn.Embedding, fmt: str) -> nn.Module:
    """`emb` as a QuantizedEmbedding in `fmt` (or its width fallback); as is when neither
    fits its width."""
    chosen = compatible_format(get_format(fmt), emb.embedding_dim)
    if chosen is None:
        return emb
    weight = emb.weight.detach()
    shape = (emb.num_embeddings, emb.embedding_dim)
    return QuantizedEmbedding(chosen.quantize(weight), chosen, shape, weight.dtype)


class ConcatLinear(nn.Module):
    """Projections of one input whose outputs are concatenated: a fused Linear (qkv_proj,
    gate_up_proj) whose parts a GGUF file stores in different formats (Q4_K_M files keep some
    attn_v / ffn_down in Q6_K). Each part keeps its own bytes and kernel."""

    def __init__(self, parts: list[QuantizedLinear]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_features) -> (..., out_features)."""
        return torch.cat([p(x) for p in self.parts], dim=-1)


def _add_fp8_qweight(module: QuantizedLinear, state_dict: dict, prefix: str, _meta) -> None:
    """state_dict hook: the fp8 bytes of a module that holds only its kernel's copy."""
    state_dict[prefix + "qweight"] = module.packed_weight()


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
    tuning = KernelTuning()  # one load: each weight shape is timed once

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
        return QuantizedLinear.from_float(weight, bias, chosen, tuning)

    return factory
