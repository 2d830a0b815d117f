"""Attention over a paged KV cache.

Contract shared by the runner (which builds `AttentionMetadata`) and the model (which calls
`paged_attention`). KV cache of one layer: a tensor of shape
`(2, num_blocks, block_size, num_kv_heads, head_dim)`; `[0]` holds keys, `[1]` values.
Token `i` of a sequence lives in block `block_table[i // block_size]` at offset
`i % block_size`; its flat slot is `block * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """One forward step over a packed batch of B sequences with T new tokens in total."""

    query_start_loc: torch.Tensor  # (B + 1,) int32: new tokens of seq b are [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # (B,) int32: tokens in the cache for seq b after this step
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32, padded with 0
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token; -1 = do not write
    max_query_len: int  # max new tokens of one sequence in this step
    max_seq_len: int  # max of seq_lens
    query_lens_cpu: list[int]  # host copy of the per-sequence new-token counts
    seq_lens_cpu: list[int]  # host copy of seq_lens
