"""CPU fast paths vs their plain-PyTorch references, on fresh random inputs."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.kernels.attention import _decode_attention, _sdpa, gather_kv, write_kv_cache
from mistralpy.kernels.sampling import SamplingTensors, sample
from mistralpy.params import SamplingParams
from mistralpy.runner.cpu_linear import OneDnnLinear, onednn_usable, use_onednn_linears
from mistralpy.runner.model_runner import _argmax


@pytest.mark.skipif(not onednn_usable(), reason="torch built without oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_onednn_linear_equals_f_linear(rows):
    torch.manual_seed(random.randrange(1 << 30))
    linear = nn.Linear(256, 384, bias=rows == 3)
    fast = OneDnnLinear(linear)
    x = torch.randn(rows, 256)
    torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias))
    assert fast.weight is linear.weight  # shared, not copied
    # a non-contiguous input keeps F.linear
    xt = torch.randn(256, rows).t()
    torch.testing.assert_close(fast(xt), F.linear(xt, linear.weight, linear.bias))


@pytest.mark.skipif(not onednn_usable(), reason="torch built without oneDNN")
def test_use_onednn_linears_swaps_only_large_float32_linears():
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(8, 8), nn.Linear(512, 256).bfloat16())
    assert use_onednn_linears(model) == ["0"]
    assert isinstance(model[0], OneDnnLinear) and type(model[1]) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(dtype):
    torch.manual_seed(random.randrange(1 << 30))
    q, keys, values = torch.randn(8, 32), torch.randn(37, 2, 32), torch.randn(37, 2, 32)
    q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
    ours = _decode_attention(q, keys, values, 0.2)
    ref = _sdpa(q.float()[None], keys.float(), values.float(), 0.2, causal_offset=36)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref, atol=tol, rtol=tol)


def test_kv_write_then_gather_roundtrip_skips_minus_one_slots():
    cache = torch.zeros(2, 6, 4, 2, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([9, -1, 10, 11, -1])
    write_kv_cache(k, v, cache, slots)
    keys, values = gather_kv(cache, torch.tensor([2, 0], dtype=torch.int32), 4)
    torch.testing.assert_close(keys[1:4], k[[0, 2, 3]])
    torch.testing.assert_close(values[1:4], v[[0, 2, 3]])
    assert cache.count_nonzero() == 2 * 3 * 2 * 8


def test_numpy_argmax_takes_the_first_maximum_like_torch():
    logits = torch.randn(5, 1000)
    logits[2, [7, 300]] = 50.0  # a tie: the first index wins
    assert torch.equal(_argmax(logits), logits.argmax(dim=-1))
    assert _argmax(logits).dtype == torch.int64


def test_grammar_mask_of_some_rows_equals_full_mask_with_free_rows():
    torch.manual_seed(random.randrange(1 << 30))
    batch, vocab = 6, 40
    logits = torch.randn(batch, vocab) * 3
    rows = torch.tensor([1, 4])
    allowed = torch.rand(2, vocab) < 0.3
    allowed[:, 5] = True
    full = torch.ones(batch, vocab, dtype=torch.bool)
    full[rows] = allowed
    params = [SamplingParams(temperature=0.0, logprobs=True) for _ in range(batch)]
    st = SamplingTensors.from_params(params, [[]] * batch, [[]] * batch, vocab, "cpu")
    part = sample(logits, st, [None] * batch, allowed, rows)
    whole = sample(logits, st, [None] * batch, full)
    assert torch.equal(part.token_ids, whole.token_ids)
    assert torch.equal(part.logprobs, whole.logprobs)
    assert allowed[torch.arange(2), part.token_ids[rows]].all()
