"""Fused Triton layer ops vs the plain-PyTorch reference ops, on CPU through TRITON_INTERPRET=1.

Fresh random shapes and inputs each run (odd widths, strided views like the model's qkv
split). float32 must agree to float32 rounding; half precisions within one or two units of
the last place, since the kernels round at the same steps as the reference.
"""

from __future__ import annotations

import os
import sys

FRESH = "triton" not in sys.modules
if FRESH:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402, F401  (imported now, while TRITON_INTERPRET is set)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mistralpy.kernels import fused_ops as ref  # noqa: E402
from tests.triton_interp import rerun_in_interpreter  # noqa: E402

in_process = pytest.mark.skipif(not FRESH, reason="triton already imported: subprocess runs it")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative to max |reference|: float32 rounding, or ~2 ulp of the storage dtype
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.skipif(FRESH, reason="the cases below run in this process")
def test_cases_in_fresh_interpreter_process():
    rerun_in_interpreter(__file__)


@pytest.fixture(scope="module")
def tf():
    if not FRESH:
        pytest.skip("triton was imported before TRITON_INTERPRET was set")
    import importlib

    return importlib.import_module("mistralpy.kernels.triton_fused")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item() + 1e-12
    assert err <= TOL[want.dtype] * scale, (err, scale)


dtypes = st.sampled_from(DTYPES)


@in_process
@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 300), dtype=dtypes, seed=st.integers(0, 2**30))
def test_rms_norm_and_add(tf, rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    res = torch.randn(rows, cols, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(cols, generator=g)).to(dtype)
    _close(tf.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    y, s = tf.add_rms_norm(x, res, w, 1e-6)
    y_ref, s_ref = ref.add_rms_norm(x, res, w, 1e-6)
    if dtype == torch.bfloat16:  # the interpreter's float32 -> bfloat16 may truncate
        _close(s, s_ref)
    else:
        assert torch.equal(s, s_ref)  # one rounded add: exact
    _close(y, y_ref)


@in_process
@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 4), half=st.integers(1, 1500), dtype=dtypes, seed=st.integers(0, 2**30))
def test_silu_and_mul(tf, rows, half, dtype, seed):
    x = torch.randn(rows, 2 * half, generator=torch.Generator().manual_seed(seed)).to(dtype) * 3
    _close(tf.silu_and_mul(x), ref.silu_and_mul(x))


@in_process
@settings(max_examples=10, deadline=None)
@given(
    tokens=st.integers(1, 4),
    hk=st.integers(1, 3),
    group=st.integers(1, 4),
    d=st.sampled_from([16, 32, 64]),
    dtype=dtypes,
    seed=st.integers(0, 2**30),
)
def test_rope_qk_on_strided_views(tf, tokens, hk, group, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    hq = hk * group
    # q/k as views of a packed qkv row, as the model splits them
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(tokens, hq, d), k.view(tokens, hk, d)
    angles = torch.rand(tokens, d // 2, generator=g) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got_q, got_k = tf.rope_qk(q, k, cos, sin)
    want_q, want_k = ref.rope_qk(q, k, cos, sin)
    _close(got_q, want_q)
    _close(got_k, want_k)


@in_process
def test_empty_rows(tf):
    x = torch.zeros(0, 8)
    assert tf.rms_norm(x, torch.ones(8), 1e-5).shape == (0, 8)
    assert tf.silu_and_mul(x).shape == (0, 4)


@in_process
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), k_blocks=st.integers(1, 3), seed=st.integers(0, 2**30))
def test_gemv_candidates_and_tuned_linear(n, k_blocks, seed):
    import importlib

    gemv = importlib.import_module("mistralpy.kernels.triton_gemv")
    from mistralpy.runner.gemv import TunedLinear

    g = torch.Generator().manual_seed(seed)
    k = 1024 * k_blocks
    linear = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(linear.weight, generator=g)
    x = torch.randn(1, k, generator=g)
    want = linear(x)
    for cfg in gemv.CANDIDATES:
        _close(gemv.gemv(x, linear.weight, cfg), want.detach())
    xs = torch.randn(3, k, generator=g)
    for cfg in gemv.SKINNY_CANDIDATES:
        if k % cfg.block_k == 0:
            _close(gemv.skinny_matmul(xs, linear.weight, cfg), linear(xs).detach())
    tuned = TunedLinear(linear, {1: gemv.CANDIDATES[0], 3: gemv.SKINNY_CANDIDATES[0]})
    assert tuned.weight is linear.weight and isinstance(tuned, torch.nn.Linear)
    _close(tuned(x).detach(), want.detach())
    _close(tuned(xs).detach(), linear(xs).detach())
    x5 = torch.randn(5, k, generator=g)  # an untuned row count: plain F.linear
    assert torch.equal(tuned(x5), linear(x5))
