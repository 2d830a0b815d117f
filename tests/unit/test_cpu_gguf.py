"""numba q8_0 GEMV on GGUF bytes vs the dequantize-then-matmul oracle; dispatch; fallback."""

from __future__ import annotations

import pytest
import torch

from mistralpy.kernels import cpu_gguf
from mistralpy.kernels.quant_matmul import Int4PackMatmul, SmallBatchMatmul
from mistralpy.quant.formats import get_format
from mistralpy.quant.isq import CPU_GEMV_MAX_M, QuantizedLinear, reference_matmul
from tests.seeds import fresh_seeds

SEEDS = fresh_seeds(6, "cpu-gguf")
U = 2.0**-24  # float32 unit roundoff

needs_numba = pytest.mark.skipif(not cpu_gguf.available(), reason="numba kernel unavailable")


def _weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Normal weights with some blocks scaled to fp16-subnormal scales and some all zero."""
    w = torch.randn(n, k, generator=gen) * 0.05
    blocks = w.view(n, k // 32, 32)
    pick = torch.rand(n, k // 32, generator=gen)
    blocks[pick < 0.1] *= 1e-4  # absmax / 127 below fp16's smallest normal (6.1e-5)
    blocks[pick > 0.95] = 0
    return w


def _summation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Largest difference two float32 dot products of the same K terms may show when they
    only sum in different orders (and round d * q * x in a different order): each is within
    (K + 2) * u * sum|x_i * w_i| of the exact value (standard error bound), so twice that."""
    k = x.shape[1]
    return 2 * (k + 2) * U * (x.double().abs() @ w.double().abs().T)


@needs_numba
@pytest.mark.parametrize("seed", SEEDS)
def test_q8_0_gemv_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=gen))
    k = 32 * int(torch.randint(1, 40, (1,), generator=gen))
    m = int(torch.randint(1, 5, (1,), generator=gen))
    fmt = get_format("q8_0")
    packed = fmt.quantize(_weight(n, k, gen))
    x = torch.randn(m, k, generator=gen) * float(torch.rand(1, generator=gen) * 10)
    y = cpu_gguf.q8_0_matmul(packed, x)
    ref = reference_matmul(fmt, packed, (n, k))(x)
    bound = _summation_bound(x, fmt.dequantize(packed, (n, k)))
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - ref.double()).abs() <= bound).all(), (y - ref).abs().max()


@needs_numba
def test_quantized_linear_dispatch_by_batch_rows():
    gen = torch.Generator().manual_seed(SEEDS[0])
    layer = QuantizedLinear.from_float(_weight(40, 256, gen), None, "q8_0")
    kernel = layer.kernel
    assert isinstance(kernel, SmallBatchMatmul) and isinstance(kernel.large, Int4PackMatmul)
    for m in (1, CPU_GEMV_MAX_M, CPU_GEMV_MAX_M + 1):
        x = torch.randn(m, 256, generator=gen).bfloat16()
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 40)
        expected = cpu_gguf.q8_0_matmul(layer.qweight, x) if m <= CPU_GEMV_MAX_M else None
        if expected is not None:
            assert torch.equal(y, expected.bfloat16())


def test_without_numba_q8_0_keeps_the_torch_kernel(monkeypatch):
    monkeypatch.setattr(cpu_gguf, "available", lambda: False)
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(SEEDS[1])) * 0.05
    assert isinstance(QuantizedLinear.from_float(w, None, "q8_0").kernel, Int4PackMatmul)
