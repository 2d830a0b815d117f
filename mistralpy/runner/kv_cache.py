"""KV-cache sizing and allocation.

Layer i's cache is one tensor `(2, num_blocks, block_size, num_kv_heads, head_dim)` in the
model dtype (`[0]` keys, `[1]` values), the layout `kernels.attention` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheTooSmallError(ValueError):
    """The memory left for the KV cache cannot hold even one block (or one full sequence)."""


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers, keys and values."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize


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


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, device: torch.device
) -> list[torch.Tensor]:
    """Zeroed per-layer caches, (2, num_blocks, block_size, num_kv_heads, head_dim) each."""
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
