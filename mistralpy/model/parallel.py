"""Tensor parallelism for the text decoder (Megatron style), as explicit per-rank context.

`ParallelConfig` says which rank of how many this model copy is, and carries the
torch.distributed process group its collectives run on. Nothing here is global: the model and
the loader receive it as an argument; `ParallelConfig()` (one rank) makes every collective a
no-op, so the single-device path is unchanged.

Split of the decoder over `world_size` ranks:
- qkv_proj, gate_up_proj: column parallel (each rank holds its query/KV heads, its slice of
  the intermediate features); o_proj, down_proj: row parallel, followed by an all-reduce.
- KV heads: with Hkv divisible by the rank count each rank holds Hkv/tp of them; with fewer KV
  heads than ranks (tp a multiple of Hkv) each rank holds a replica of the one KV head its
  query heads read, so the KV cache of a rank has max(Hkv/tp, 1) heads.
- lm_head: vocab parallel (each rank computes V/tp logits, gathered), or replicated when the
  vocabulary does not split evenly. Embeddings, norms and the vision tower stay replicated.

Each sharded Linear records where its rows/columns come from in the checkpoint as `tp_shards`
(one `Shard` per fused part), which the loader reads to fetch only this rank's slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mistralpy.params import InvalidParameter


class TensorParallelSizeError(InvalidParameter):
    """tensor_parallel_size does not split the model's heads (or the machine's devices)."""

    def __init__(self, message: str):
        super().__init__("tensor_parallel_size", message)


@dataclass(frozen=True)
class ParallelConfig:
    """This model copy's place in a tensor-parallel group."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup of the ranks; None when world_size == 1

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)
        assert self.world_size == 1 or self.group is not None, "a group is needed for tp > 1"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place; x itself when there is one rank)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) per rank -> (..., n * world_size), rank r's block at [r*n, (r+1)*n)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (all ranks must call it together)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return int(t.item())


SINGLE = ParallelConfig()


@dataclass(frozen=True)
class Shard:
    """This rank's slice [start, start + size) along `dim` of a checkpoint tensor whose size
    along `dim` is `full` (for a fused Linear: of the part's own tensor)."""

    dim: int
    start: int
    size: int
    full: int


def even_shard(full: int, parallel: ParallelConfig, dim: int, what: str) -> Shard:
    """Rank's equal share of `full` features along `dim`; raises if it does not divide."""
    if full % parallel.world_size:
        raise TensorParallelSizeError(
            f"tensor_parallel_size {parallel.world_size} does not divide {what} ({full})"
        )
    size = full // parallel.world_size
    return Shard(dim, parallel.rank * size, size, full)


def set_shards(linear: nn.Linear, *shards: Shard) -> nn.Linear:
    """Record where `linear`'s weight comes from: one Shard per fused part (or one)."""
    # a plain attribute (nn.Module.__setattr__ is typed for tensors and modules only)
    setattr(linear, "tp_shards", shards)  # noqa: B010
    return linear


@dataclass(frozen=True)
class HeadSplit:
    """Attention heads one rank holds: query heads [q_start, q_start + num_heads) and KV
    heads [kv_start, kv_start + num_kv_heads) of the checkpoint."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int


def split_heads(num_heads: int, num_kv_heads: int, parallel: ParallelConfig) -> HeadSplit:
    """Query and KV heads of `parallel.rank`; raises TensorParallelSizeError when the heads
    cannot be split (Hq % tp, or Hkv neither divisible by tp nor dividing it)."""
    tp, rank = parallel.world_size, parallel.rank
    if num_heads % tp:
        raise TensorParallelSizeError(
            f"tensor_parallel_size {tp} does not divide the {num_heads} attention heads"
        )
    if num_kv_heads % tp and tp % num_kv_heads:
        raise TensorParallelSizeError(
            f"tensor_parallel_size {tp} must divide or be a multiple of the "
            f"{num_kv_heads} key/value heads"
        )
    q_local = num_heads // tp
    if num_kv_heads >= tp:
        kv_local = num_kv_heads // tp
        return HeadSplit(q_local, kv_local, rank * q_local, rank * kv_local)
    # More ranks than KV heads: every rank keeps a copy of the one KV head its queries use.
    return HeadSplit(q_local, 1, rank * q_local, rank * q_local // (num_heads // num_kv_heads))


def check_tensor_parallel(
    num_heads: int, num_kv_heads: int, intermediate_size: int, world_size: int
) -> None:
    """Raise TensorParallelSizeError unless the decoder splits over `world_size` ranks."""
    if world_size < 1:
        raise TensorParallelSizeError(f"tensor_parallel_size must be >= 1, got {world_size}")
    probe = ParallelConfig(0, world_size, group=object() if world_size > 1 else None)
    split_heads(num_heads, num_kv_heads, probe)
    even_shard(intermediate_size, probe, 0, "the MLP intermediate size")
