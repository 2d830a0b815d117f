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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_INT4_GROUP = 32  # group size we feed torch's int4 kernel (it supports 32..256)


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


class Int4PackMatmul(QuantMatmul):
    """CPU fast path over group-affine weights w = scale * codes + offset (see module doc)."""

    def __init__(self, codes: Tensor, scale: Tensor, offset: Tensor, group: int, bits: int):
        # codes (N, K) int8 signed; scale, offset (N, K / group) float32.
        assert int4pack_supported(group, bits), (group, bits)
        self.out_features, self.in_features = codes.shape
        rep = group // _INT4_GROUP
        scale = scale.float().repeat_interleave(rep, 1)
        offset = offset.float().repeat_interleave(rep, 1)
        c = codes.to(torch.int32)
        if bits <= 4:  # u - 8 = codes
            self.gemms = [_pack_nibble_gemm(c + 8, scale, offset)]
        else:  # codes = 16 * hi + lo with hi in [-8, 7], lo in [0, 15]
            hi, lo = c >> 4, c & 15
            self.gemms = [
                _pack_nibble_gemm(hi + 8, 16 * scale, torch.zeros_like(offset)),
                _pack_nibble_gemm(lo, scale, offset + 8 * scale),
            ]

    def __call__(self, x: Tensor) -> Tensor:
        xb = x.to(torch.bfloat16)
        y = None
        for packed, sz in self.gemms:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, _INT4_GROUP, sz)
            y = part.float() if y is None else y.add_(part.float())
        return y[:, : self.out_features].to(x.dtype)
