"""Attention over a paged KV cache.

Contract shared by the runner (which builds `AttentionMetadata`) and the model (which calls
`paged_attention`). KV cache of one layer: a tensor of shape
`(2, num_blocks, block_size, num_kv_heads, head_dim)`; `[0]` holds keys, `[1]` values.
Token `i` of a sequence lives in block `block_table[i // block_size]` at offset
`i % block_size`; its flat slot is `block * block_size + offset`.

The cache is in the model dtype, or in float8 e4m3 (`--kv-cache-dtype fp8`, half the bytes of
bf16) with one float32 scale per layer for keys and one for values, `kv_scale` (2,) =
(k_scale, v_scale) as vLLM's: a value x is stored as e4m3(clamp(x / scale, -448, 448)) and read
back as stored * scale. Saturating (not inf/NaN) keeps one outlier from poisoning a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mistralpy.model.config import TextConfig


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
    # host, per sequence: its first block when its table is one run b, b + 1, ... (its cache
    # is then a slice, no gather needed), else None; the field is None where not computed
    first_block_if_run: list[int | None] | None = None


# Signature every paged-attention backend implements (the reference below, Triton on CUDA):
# (q (T, Hq, D), k_new (T, Hkv, D), v_new (T, Hkv, D), kv_cache, attn, scale, kv_scale)
# -> (T, Hq, D). kv_scale: (2,) float32 on the cache's device, read only by fp8 caches
# (None there means 1.0, 1.0).
PagedAttentionFn = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        AttentionMetadata,
        float,
        torch.Tensor | None,
    ],
    torch.Tensor,
]

# A backend that also applies RoPE (fusing it into its K/V store): (q, k_new, v_new, cos (T, D),
# sin (T, D), kv_cache, attn, scale, kv_scale) -> (T, Hq, D), the same as `rope_qk` on q and
# k_new followed by the `PagedAttentionFn`. It may rotate q and k_new in place.
RopePagedAttentionFn = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        AttentionMetadata,
        float,
        torch.Tensor | None,
    ],
    torch.Tensor,
]

FP8_KV_DTYPE = torch.float8_e4m3fn  # OCP e4m3 ("fn": no inf, one NaN code), as vLLM's fp8
FP8_E4M3_MAX = 448.0  # its largest finite value: writes saturate here


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., D) any float dtype, scale a broadcastable float32 tensor -> e4m3 of x / scale,
    saturated to +-448 (a plain cast would give NaN past 448: e4m3fn has no inf)."""
    return (x.float() / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 x -> float32 x * scale (every e4m3 value is exact in float32)."""
    return x.float() * scale


def kv_bytes_view(x: torch.Tensor) -> torch.Tensor:
    """x itself, or for an fp8 tensor the same memory as uint8: indexing kernels (index_put,
    index_select, index_copy_, fill) lack fp8 on some devices and torch builds, and a byte
    copy is all they do."""
    return x.view(torch.uint8) if x.dtype == FP8_KV_DTYPE else x


def zeros_kv_cache(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A zeroed cache of `dtype` (fp8 zeroed as bytes: e4m3 0x00 is +0.0)."""
    if dtype == FP8_KV_DTYPE:
        return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape and storage dtype of every layer's cache (num_kv_heads: this rank's share)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # storage dtype: the model's, or float8_e4m3fn

    @classmethod
    def of_text(cls, config: TextConfig, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        """The unsharded cache of a text decoder config."""
        return cls(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, dtype
        )

    @property
    def fp8(self) -> bool:
        return self.dtype == FP8_KV_DTYPE

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers, keys and values."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, device: torch.device | str
) -> list[torch.Tensor]:
    """Zeroed per-layer caches, (2, num_blocks, block_size, num_kv_heads, head_dim) each."""
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [zeros_kv_cache(shape, spec.dtype, device) for _ in range(spec.num_layers)]


def kv_scales_or_unit(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> torch.Tensor:
    """(2,) float32 scales of an fp8 cache: the given ones, or 1.0 and 1.0."""
    if kv_scale is not None:
        return kv_scale
    return torch.ones(2, dtype=torch.float32, device=kv_cache.device)


# Per-segment bidirectional attention of the vision encoder (`varlen_attention` below):
# (q, k, v (N, H, D), cu_seqlens [0, n0, n0 + n1, ...], scale) -> (N, H, D).
VarlenAttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, list[int], float], torch.Tensor
]


def write_kv_cache(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Store k_new/v_new (T, Hkv, D) at the flat slots `slot_mapping` (T,); slot -1 is skipped.
    An fp8 cache stores them quantized by kv_scale (2,)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv = torch.stack((k_new, v_new))  # (2, T, Hkv, D): one indexed write
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if slots.shape[0] != slot_mapping.shape[0]:  # padding rows (CUDA graph buckets)
        kv = kv[:, keep]
    if is_fp8_cache(kv_cache):
        kv = quantize_kv(kv, kv_scales_or_unit(kv_cache, kv_scale).view(2, 1, 1, 1))
    else:
        kv = kv.to(kv_cache.dtype)
    kv_bytes_view(kv_cache).view(2, -1, num_kv_heads, head_dim)[:, slots] = kv_bytes_view(kv)


def _first_tokens(kv_blocks: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (seq_len, Hkv, D) from (2, blocks, block_size, Hkv, D) in token order."""
    kv = kv_blocks.flatten(1, 2)[:, :seq_len]
    return kv[0], kv[1]


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (seq_len, Hkv, D) of one sequence, read through its block table row."""
    block_size = kv_cache.shape[2]
    blocks = block_table[: (seq_len + block_size - 1) // block_size].long()
    # one gather for keys and values; index_select is ~4x faster than [:, blocks] on the CPU
    kv = kv_bytes_view(kv_cache).index_select(1, blocks).view(kv_cache.dtype)
    return _first_tokens(kv, seq_len)


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference paged attention: write the new K/V, then causal GQA attention per sequence.

    q (T, Hq, D), k_new/v_new (T, Hkv, D) -> (T, Hq, D) in q's dtype. A sequence's new tokens
    are the last `query_len` of its `seq_len` cached tokens, so query i may see keys
    0 .. seq_len - query_len + i. An fp8 cache is dequantized (float32) as it is read, so
    every query, including a fresh prompt's, sees the K/V as stored.
    """
    write_kv_cache(k_new, v_new, kv_cache, attn.slot_mapping, kv_scale)
    out = torch.empty_like(q)
    start = 0
    for b, (query_len, seq_len) in enumerate(zip(attn.query_lens_cpu, attn.seq_lens_cpu)):
        if query_len == 0:
            continue
        keys, values = _readable(*gather_kv(kv_cache, attn.block_tables[b], seq_len),
                                 kv_cache, kv_scale)  # fmt: skip
        q_b = q[start : start + query_len]
        if query_len == 1:
            out[start] = _decode_attention(q_b[0], keys, values, scale)
        else:
            out[start : start + query_len] = _sdpa(q_b, keys.to(q.dtype), values.to(q.dtype),
                                                   scale, causal_offset=seq_len - query_len)  # fmt: skip
        start += query_len
    return out


def cpu_paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` with less per-layer work for CPU decode (same contract and numerics):
    new K/V written with two `index_copy_`, and a sequence whose blocks form one run read as
    a slice of the cache instead of gathered (`attn.first_block_if_run`)."""
    if attn.first_block_if_run is None or attn.max_query_len > 1:
        return paged_attention(q, k_new, v_new, kv_cache, attn, scale, kv_scale)
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    slots = attn.slot_mapping
    if is_fp8_cache(kv_cache):
        scales = kv_scales_or_unit(kv_cache, kv_scale)
        k_new = kv_bytes_view(quantize_kv(k_new, scales[0]))
        v_new = kv_bytes_view(quantize_kv(v_new, scales[1]))
    store = kv_bytes_view(kv_cache)
    store[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k_new)
    store[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v_new)
    if len(attn.seq_lens_cpu) == 1:  # batch 1: no output buffer, no per-row copy
        keys, values = _readable(*_cached_kv(kv_cache, attn, 0), kv_cache, kv_scale)
        return _decode_attention(q[0], keys, values, scale)[None]
    out = torch.empty_like(q)
    for b in range(len(attn.seq_lens_cpu)):
        keys, values = _readable(*_cached_kv(kv_cache, attn, b), kv_cache, kv_scale)
        out[b] = _decode_attention(q[b], keys, values, scale)
    return out


def _readable(
    keys: torch.Tensor, values: torch.Tensor, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (L, Hkv, D) read from `kv_cache` as attention uses them: float32 times
    the layer's scales for an fp8 cache, else unchanged."""
    if not is_fp8_cache(kv_cache):
        return keys, values
    scales = kv_scales_or_unit(kv_cache, kv_scale)
    return dequantize_kv(keys, scales[0]), dequantize_kv(values, scales[1])


def _cached_kv(
    kv_cache: torch.Tensor, attn: AttentionMetadata, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (seq_len, Hkv, D) of sequence b: a view when its blocks form one run."""
    seq_len = attn.seq_lens_cpu[b]
    assert attn.first_block_if_run is not None
    first = attn.first_block_if_run[b]
    if first is None:
        return gather_kv(kv_cache, attn.block_tables[b], seq_len)
    block_size = kv_cache.shape[2]
    return _first_tokens(
        kv_cache[:, first : first + (seq_len + block_size - 1) // block_size], seq_len
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], scale: float
) -> torch.Tensor:
    """Bidirectional attention within each segment [cu[i], cu[i+1]) of packed tokens.

    q, k, v (N, H, D) -> (N, H, D). Used by the vision tower: each image attends only to its
    own patches, without materialising an (N, N) block-diagonal mask.
    """
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        out[start:end] = _sdpa(q[start:end], k[start:end], v[start:end], scale, causal_offset=None)
    return out


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token q (Hq, D) over all of its sequence's keys/values (L, Hkv, D) -> (Hq, D).

    Two batched matmuls per KV head in float32 (no mask: every key is visible), which on the
    CPU beats SDPA's math fallback for a single query and needs no repeat of K/V per group.
    Query head h reads kv head h // (Hq / Hkv), as transformers' repeat_kv does.
    """
    num_kv_heads, head_dim = keys.shape[1], keys.shape[2]
    dtype = q.dtype
    if dtype != torch.float32:  # float32 inputs skip the no-op casts (~1 us of dispatch each)
        q, keys, values = q.float(), keys.float(), values.float()
    qg = q.view(num_kv_heads, -1, head_dim)  # (Hkv, G, D)
    scores = torch.bmm(qg, keys.permute(1, 2, 0)).mul_(scale)  # (Hkv, G, L)
    out = torch.bmm(scores.softmax(dim=-1), values.transpose(0, 1)).view(q.shape)  # (Hq, D)
    return out if dtype == torch.float32 else out.to(dtype)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_offset: int | None
) -> torch.Tensor:
    """q (Lq, Hq, D), k/v (Lk, Hkv, D) -> (Lq, Hq, D); causal with key j visible to query i
    iff j <= causal_offset + i (None: no mask). GQA: query head h reads kv head
    h // (Hq / Hkv), as transformers' repeat_kv does (SDPA's enable_gqa, without the copy)."""
    mask = None
    causal = False
    if causal_offset == 0:
        causal = q.shape[0] > 1
    elif causal_offset is not None and q.shape[0] > 1:
        q_pos = torch.arange(q.shape[0], device=q.device)[:, None] + causal_offset
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos
    # 4-D (1, H, L, D) inputs: the CPU flash kernel takes those, the 3-D form falls back to math
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Metadata for a packed step where sequence b has `query_lens[b]` new tokens, the last of
    its `seq_lens[b]` tokens, stored through `block_tables[b]` (a simple host-side builder for
    tests and one-off generation; the runner builds its own batched tensors)."""
    slots: list[int] = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(
            len(padded), width
        ),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
