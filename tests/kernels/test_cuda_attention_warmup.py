"""CudaPagedAttention.warm_up compiles every paged-prefill variant a step can need."""

from __future__ import annotations

import pytest
import torch

from mistralpy.kernels import cuda_attention


@pytest.mark.parametrize(
    ("cache_dtype", "q_dtype"),
    [(torch.float32, torch.float32), (torch.float8_e4m3fn, torch.bfloat16)],
)
def test_warm_up_launches_each_tile_config_and_table_stride_kind(monkeypatch, cache_dtype, q_dtype):
    calls = []

    def fake_prefill(q, kv_cache, qsl, seq_lens, tables, max_query_len, scale):
        # an fp8 cache compiles the fp8 variants, with the model's query dtype
        assert (q.dtype, kv_cache.dtype) == (q_dtype, cache_dtype)
        calls.append((max_query_len, tables.stride(0), int(seq_lens[0]), q.shape[1]))
        assert int(qsl[-1]) == q.shape[0] == max_query_len
        assert tables.shape[1] * kv_cache.shape[2] >= int(seq_lens[0]) > max_query_len
        return torch.empty_like(q)

    monkeypatch.setattr(cuda_attention.ta, "paged_prefill_attention", fake_prefill)
    cache = torch.zeros(2, 4, 16, 2, 32).to(cache_dtype)
    cuda_attention.CudaPagedAttention().warm_up(cache, num_heads=8, q_dtype=q_dtype)
    short = cuda_attention.ta.SHORT_QUERY_TOKENS
    configs = {
        cuda_attention.ta.default_tile_config(128, torch.device("cuda"), q) for q, *_ in calls
    }
    assert len(configs) == 2  # both tile configs of a 128-dim text head
    assert {q <= short for q, *_ in calls} == {True, False}
    for regime in (True, False):
        strides = {s % 16 == 0 for q, s, *_ in calls if (q <= short) == regime}
        assert strides == {True, False}  # Triton specializes ints divisible by 16
    assert {h for *_, h in calls} == {8}
