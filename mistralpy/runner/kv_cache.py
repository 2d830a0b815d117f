"""KV-cache sizing and allocation.

Layer i's cache is one tensor `(2, num_blocks, block_size, num_kv_heads, head_dim)` in the
model dtype or, with `kv_cache_dtype="fp8"`, in float8 e4m3 with per-layer (k_scale, v_scale)
(`[0]` keys, `[1]` values), the layout `kernels.attention` reads. fp8 takes half the bytes of
bf16 per token, so the same memory holds twice the tokens.
"""

from __future__ import annotations

import torch

from mistralpy.errors import UserError
from mistralpy.kernels.attention import FP8_KV_DTYPE, KVCacheSpec

# --kv-cache-dtype names (vLLM's): "auto" is the model dtype; both fp8 names are e4m3
_KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": FP8_KV_DTYPE,
    "fp8_e4m3": FP8_KV_DTYPE,
}


class KVCacheTooSmallError(UserError):
    """The memory left for the KV cache cannot hold even one block (or one full sequence)."""


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for a --kv-cache-dtype name (validated by the engine config)."""
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r}: expected one of {tuple(_KV_CACHE_DTYPES)}")
    return _KV_CACHE_DTYPES[name] or model_dtype


def num_blocks_for_bytes(spec: KVCacheSpec, budget_bytes: int) -> int:
    """How many blocks fit in `budget_bytes` (raises if not even one)."""
    num_blocks = budget_bytes // spec.bytes_per_block
    if num_blocks < 1:
        raise KVCacheTooSmallError(
            f"{budget_bytes / 2**20:.1f} MiB left for the KV cache, but one block of "
            f"{spec.block_size} tokens needs {spec.bytes_per_block / 2**20:.2f} MiB; raise "
            "gpu_memory_utilization / cpu_kv_cache_bytes or use a smaller model"
        )
    return int(num_blocks)


def cuda_kv_budget(device: torch.device, utilization: float, peak_torch_bytes: int) -> int:
    """Bytes the KV cache may take on `device`: `utilization` of total memory minus the peak
    this process's torch allocations reached during the profile run (weights + activations)
    and memory held outside torch's allocator (CUDA context, other processes)."""
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    return int(total * utilization) - peak_torch_bytes - max(0, outside_torch)


def allocate_kv_scales(spec: KVCacheSpec, device: torch.device) -> list[torch.Tensor] | None:
    """Per-layer (k_scale, v_scale), (2,) float32 on `device`, for an fp8 cache (else None).

    All 1.0, as vLLM's default for checkpoints without calibrated scales. Why not the first
    prefill's amax: the cache's stored values depend on the scale, so it is fixed before the
    first write and forever after; one prompt's amax says little about the next one's (a
    larger value would saturate anyway). A scale only moves the window: e4m3's relative
    precision (3 mantissa bits) is the same anywhere in its normal range 2^-6 .. 448, below it
    values keep an absolute step of 2^-9, and K/V of a model with RMS-normed inputs sit well
    inside that window at scale 1 (`benchmarks/gpu_e2e.py`'s kv_logits row reports the cost).
    They are device tensors the kernels read, not constants, so calibrated scales (vLLM's
    checkpoint `k_scale` / `v_scale`) can be copied in later without recapturing CUDA graphs.
    """
    if not spec.fp8:
        return None
    return [torch.ones(2, dtype=torch.float32, device=device) for _ in range(spec.num_layers)]
