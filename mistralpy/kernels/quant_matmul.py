"""Matmuls against quantized weights: y = x @ W.T with W stored in a packed format.

This layer knows nothing of GGUF byte layouts (mistralpy.quant decodes them): kernels are
built from plain tensors and chosen once, when the quantized layer is built.

Paths (all compute y (M, N) in x.dtype from x (M, K)):
- `DequantMatmul`: dequantize row tiles of W (at most `tile_bytes` of scratch, never a cached
  full-size copy) and matmul them. With one tile it is the plain-PyTorch reference that the
  tests use as the oracle; tiled it is the CPU/CUDA fallback for formats no fast path handles.
- `Int4PackMatmul` (CPU): torch's `_weight_int4pack_mm_for_cpu` (bf16 activations, int4
  codes, one bf16 scale and zero per group of 32 and output channel, fp32 accumulation).
  Formats with codes of at most 4 bits use one int4 GEMM; 5- to 8-bit codes are split into
  a signed high nibble and an unsigned low nibble, two int4 GEMMs whose sum is exact.
  Faithful up to bf16 rounding of activations, scales, zeros and the output (relative
  error ~2^-9 per term, far below the quantization error itself). The bf16 kernel is the
  only fast one in torch's CPU int4 family (its fp32/fp16 variants are ~50x slower).
- `SmallBatchMatmul`: one kernel for batches of at most `max_m` rows (decode), another for
  larger ones; on the CPU q4k (and q8_0 without AVX-512 VNNI) pairs the numba GEMVs on the
  GGUF bytes (`cpu_gguf`: int8-rounded activations per 256 for q4k, float32 for q8_0) with
  `Int4PackMatmul` for prefill.
- `FunctionMatmul`: one kernel for every batch; on a CPU with AVX-512 VNNI, q8_0 (q8_0 x q8_0
  numba kernels on the GGUF bytes, one-row for decode, four-row for prefill, faster than two
  int4 passes and without their repacked copy).
- `TinyGemmInt4Matmul` (CUDA, sm80+): torch's tinygemm `_weight_int4pack_mm` for codes of at
  most 4 bits in groups of 32 (q4k, q4_0, q4_1): w = (u - 8) * scale + zero with bf16 scale
  and zero, the same affine form. It is the fastest decode (small M) path; above `max_m`
  rows the call goes to `fallback` (the Triton GEMM over the GGUF bytes), because tinygemm
  re-reads its weight per 16-row tile and loses to a tl.dot GEMM for larger batches.
- `ScaledMMFp8Matmul` (CUDA sm90): W8A8 `torch._scaled_mm` with per-output-channel weight
  scales and dynamic activation scales (absmax / 448), no host sync (see the class).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_INT4_GROUP = 32  # group size we feed torch's int4 kernel (it supports 32..256)
FP8_MAX = 448.0  # largest finite float8_e4m3fn value


class QuantMatmul:
    """Base: y = x @ W.T for x (M, in_features) -> (M, out_features) in x.dtype."""

    out_features: int
    in_features: int

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class DequantMatmul(QuantMatmul):
    """Dequantize W in row tiles and matmul; the reference (one tile) and the fallback."""

    def __init__(
        self,
        dequant_rows: Callable[[int, int, torch.dtype], Tensor],
        out_features: int,
        in_features: int,
        tile_bytes: int | None = 8 << 20,
    ):
        # dequant_rows(start, stop, dtype) -> (stop - start, in_features) dense weight rows.
        self.dequant_rows = dequant_rows
        self.out_features, self.in_features = out_features, in_features
        per_row = in_features * 4
        self.tile = out_features if tile_bytes is None else max(16, tile_bytes // per_row)

    def __call__(self, x: Tensor) -> Tensor:
        # CPU matmuls are fastest (and exact) in fp32; CUDA keeps the activation dtype.
        dt = torch.float32 if x.device.type == "cpu" else x.dtype
        xc = x.to(dt)
        if self.tile >= self.out_features:
            return (xc @ self.dequant_rows(0, self.out_features, dt).T).to(x.dtype)
        y = torch.empty(x.shape[0], self.out_features, dtype=dt, device=x.device)
        for r in range(0, self.out_features, self.tile):
            stop = min(r + self.tile, self.out_features)
            torch.matmul(xc, self.dequant_rows(r, stop, dt).T, out=y[:, r:stop])
        return y.to(x.dtype)


def int4pack_supported(group: int, bits: int) -> bool:
    """True when group-affine weights with this group size and code width map exactly onto
    torch's CPU int4 kernel (groups must be whole multiples of 32; codes at most 8 bits)."""
    return group % _INT4_GROUP == 0 and bits <= 8


def _pack_nibble_gemm(u: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """codes u (N, K) in [0, 15], per-group scale/zero (N, K/32) with w = (u - 8) * s + z
    -> (int4-packed weight, scales_and_zeros (K/32, N, 2) bf16), N padded to 16."""
    n = u.shape[0]
    pad = (-n) % 16  # the packer tiles output channels by 16
    if pad:
        u = torch.cat([u, u.new_full((pad, u.shape[1]), 8)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32), 1)
    sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


GroupAffineRows = Callable[[int, int], tuple[Tensor, Tensor, Tensor]]


class Int4PackMatmul(QuantMatmul):
    """CPU fast path over group-affine weights w = scale * codes + offset (see module doc)."""

    def __init__(
        self, rows: GroupAffineRows, shape: tuple[int, int], group: int, bits: int,
        chunk_rows: int = 4096,
    ):  # fmt: skip
        # rows(start, stop) -> codes (stop - start, K) int8 signed, scale and offset
        # (stop - start, K / group) float32. Packed chunk by chunk of `chunk_rows` output
        # channels (a multiple of 64: the packer's channel block) so the int32 temporaries
        # stay small while a large layer (lm_head) is built.
        assert int4pack_supported(group, bits), (group, bits)
        assert chunk_rows % 64 == 0, chunk_rows
        self.out_features, self.in_features = n, k = shape
        # The results are allocated first and filled in place: chunk results kept in a list
        # between the chunks' large temporaries fragment glibc's heap (measured: +460 MB RSS
        # for a 131072 x 512 lm_head, +40 MB this way).
        n_pad = n + (-n) % 16
        self.gemms = [
            (
                torch.empty(n_pad, k // 2, dtype=torch.uint8),
                torch.empty(k // _INT4_GROUP, n_pad, 2, dtype=torch.bfloat16),
            )
            for _ in range(1 if bits <= 4 else 2)
        ]
        for r in range(0, n, chunk_rows):
            parts = self._pack_rows(*rows(r, min(r + chunk_rows, n)), group, bits)
            for (packed, sz), (p, z) in zip(self.gemms, parts, strict=True):
                packed[r : r + p.shape[0]].copy_(p)
                sz[:, r : r + p.shape[0]].copy_(z)

    @staticmethod
    def _pack_rows(codes: Tensor, scale: Tensor, offset: Tensor, group: int, bits: int):
        """One chunk of channels -> [(int4 packed, scales_and_zeros)] per int4 GEMM."""
        rep = group // _INT4_GROUP
        scale = scale.float().repeat_interleave(rep, 1)
        offset = offset.float().repeat_interleave(rep, 1)
        c = codes.to(torch.int32)
        if bits <= 4:  # u - 8 = codes
            return [_pack_nibble_gemm(c + 8, scale, offset)]
        # codes = 16 * hi + lo with hi in [-8, 7], lo in [0, 15]
        hi, lo = c >> 4, c & 15
        return [
            _pack_nibble_gemm(hi + 8, 16 * scale, torch.zeros_like(offset)),
            _pack_nibble_gemm(lo, scale, offset + 8 * scale),
        ]

    def __call__(self, x: Tensor) -> Tensor:
        xb = x.to(torch.bfloat16)
        y = None
        for packed, sz in self.gemms:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, _INT4_GROUP, sz)
            y = part.float() if y is None else y.add_(part.float())
        assert y is not None  # two passes, high and low nibble
        return y[:, : self.out_features].to(x.dtype)


class SmallBatchMatmul(QuantMatmul):
    """Batches of at most `max_m` rows (decode) go to `small`, larger ones (prefill) to
    `large`: a GEMV streams each weight once per call, a GEMM kernel reuses it across rows."""

    def __init__(self, small: Callable[[Tensor], Tensor], large: QuantMatmul, max_m: int):
        self.small, self.large, self.max_m = small, large, max_m
        self.out_features, self.in_features = large.out_features, large.in_features

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.max_m:
            return self.large(x)
        return self.small(x).to(x.dtype)


class FunctionMatmul(QuantMatmul):
    """A kernel `fn(x) -> y` (float32) that serves every batch size by itself (on the CPU,
    q8_0 through `cpu_gguf.any_batch_matmul`: no second copy of the weight for prefill)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], out_features: int, in_features: int):
        self.fn, self.out_features, self.in_features = fn, out_features, in_features

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x).to(x.dtype)


def tinygemm_supported(n: int, k: int, group: int, bits: int) -> bool:
    """True when a (n, k) group-affine weight fits the CUDA tinygemm kernel exactly:
    4-bit codes, groups of 32, n a multiple of its 8-channel tiles, k of 32."""
    return bits <= 4 and group == _INT4_GROUP and n % 8 == 0 and k % 32 == 0


def _inner_k_tiles(k: int) -> int:
    """tinygemm packs 2, 4 or 8 k-tiles of 16 per lane; 8 gives 16-byte loads."""
    return 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2


def tinygemm_pack(codes: Tensor, scale: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
    """Signed 4-bit codes (N, K) int8 in [-8, 7], scale/offset (N, K / 32) on CUDA ->
    (int4pack weight, scales_and_zeros (K / 32, N, 2) bf16) for `_weight_int4pack_mm`."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    # The CUDA packer takes (N, K / 2) bytes with the even k in the high nibble.
    nib = ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(nib, _inner_k_tiles(codes.shape[1]))
    sz = torch.stack([scale.float().T, offset.float().T], dim=-1).to(torch.bfloat16)
    return packed, sz.contiguous()


class TinyGemmInt4Matmul(QuantMatmul):
    """CUDA decode path over w = scale * codes + offset (4-bit codes, groups of 32)."""

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        offset: Tensor,
        fallback: QuantMatmul,
        max_m: int,
        gemv: QuantMatmul | None = None,
    ):
        # codes (N, K) int8 in [-8, 7]; scale, offset (N, K / 32) float32; fallback serves
        # calls with more than max_m rows, gemv (if given) calls with one row (both chosen
        # by shape, so fixed inside a CUDA graph).
        self.out_features, self.in_features = codes.shape
        assert tinygemm_supported(self.out_features, self.in_features, _INT4_GROUP, 4), codes.shape
        self.weight, self.scales_zeros = tinygemm_pack(codes, scale, offset)
        self.fallback, self.max_m, self.gemv = fallback, max_m, gemv

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.max_m:
            return self.fallback(x)
        if self.gemv is not None and x.shape[0] == 1:
            return self.gemv(x)
        xb = x.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(xb, self.weight, _INT4_GROUP, self.scales_zeros)
        return y.to(x.dtype)


def fp8_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float -> (codes (M, K) float8_e4m3fn, scale (M, 1) float32), x ~ codes *
    scale row by row (absmax / 448); the torch reference of the fused CUDA kernel."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    codes = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_quantize_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """As `fp8_quantize_rows` with one scale (1, 1) for the whole of x."""
    scale = x.abs().amax().float().clamp_min(1e-12).reshape(1, 1) / FP8_MAX
    codes = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


Fp8Quantizer = Callable[[Tensor], tuple[Tensor, Tensor]]


class ScaledMMFp8Matmul(QuantMatmul):
    """W8A8 fp8 GEMM (sm90) with per-output-channel weight scales sw and dynamic activation
    scales, no host sync. Batches of at most `tensorwise_max_m` rows take one activation
    scale for the whole batch and cuBLASLt's tensor-wise `_scaled_mm` (fast at decode
    shapes), then multiply the bf16 output by sw; larger batches use the row-wise scaled
    CUTLASS kernel with per-token scales. fp8's exponent keeps per-tensor activation
    scaling accurate for small batches (relative precision does not depend on the scale).
    Defaults from H100 measurements (benchmarks/quant_gpu.py, section fp8): tensor-wise is
    ~2x faster than row-wise at M=1 on the 5120-wide layers, row-wise wins from M=16 (the
    one-program activation quantizer grows with M); `use_fast_accum` gains nothing for
    tensor-wise and raised the max error up to 20x on some shapes, so it is off.
    """

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        quantize_rows: Fp8Quantizer = fp8_quantize_rows,
        quantize_tensor: Fp8Quantizer = fp8_quantize_tensor,
        tensorwise_max_m: int = 4,
        fast_accum: bool = False,
        gemv: Callable[..., Tensor | None] | None = None,
        gemv_config: object = None,
    ):
        # codes (N, K) float8_e4m3fn contiguous; scale (N,) float32 per output channel;
        # quantize_*: activation quantizers (fused Triton kernels on CUDA).
        self.out_features, self.in_features = codes.shape
        self.codes, self.scale = codes, scale.float().reshape(-1)
        self.w_t = codes.t()  # (K, N) column-major, the layout cuBLASLt wants for mat2
        self.scale_b = self.scale.reshape(1, -1)
        self.scale_bf16 = self.scale_b.to(torch.bfloat16)
        self.one = torch.ones(1, 1, dtype=torch.float32, device=codes.device)
        self.quantize_rows, self.quantize_tensor = quantize_rows, quantize_tensor
        self.tensorwise_max_m, self.fast_accum = tensorwise_max_m, fast_accum
        # gemv: optional one-kernel weight-only path for a single row (decode at batch 1),
        # used with `gemv_config` (chosen by timing at load); None keeps the W8A8 path.
        self.gemv = gemv if gemv_config is not None else None
        self.gemv_config = gemv_config

    def __call__(self, x: Tensor) -> Tensor:
        fast = self.fast_accum
        if self.gemv is not None and x.shape[0] == 1:
            y = self.gemv(x, self.codes, self.scale, self.gemv_config)
            if y is not None:
                return y
        if x.shape[0] <= self.tensorwise_max_m:
            xq, sx = self.quantize_tensor(x)
            y = torch._scaled_mm(
                xq, self.w_t, sx, self.one, out_dtype=torch.bfloat16, use_fast_accum=fast
            )
            return y.mul_(self.scale_bf16).to(x.dtype)
        xq, sx = self.quantize_rows(x)
        y = torch._scaled_mm(
            xq, self.w_t, sx, self.scale_b, out_dtype=torch.bfloat16, use_fast_accum=fast
        )
        return y.to(x.dtype)


def scaled_mm_fp8_supported(device: torch.device) -> bool:
    """Row-wise scaled fp8 GEMMs need compute capability 9.0 (H100/H200)."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (9, 0)
        and hasattr(torch, "_scaled_mm")
    )
