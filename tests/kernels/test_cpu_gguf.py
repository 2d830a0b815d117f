"""numba q8_0 / q4k GEMVs on GGUF bytes vs the dequantize-then-matmul oracle; dispatch;
fallback."""

from __future__ import annotations

import pytest
import torch

from mistralpy.kernels import cpu_gguf
from mistralpy.kernels.quant_matmul import FunctionMatmul, Int4PackMatmul, SmallBatchMatmul
from mistralpy.quant.formats import get_format
from mistralpy.quant.isq import CPU_GEMV_MAX_M, QuantizedLinear, reference_matmul
from tests.seeds import fresh_seeds

SEEDS = fresh_seeds(6, "cpu-gguf")
U = 2.0**-24  # float32 unit roundoff

needs_numba = pytest.mark.skipif(not cpu_gguf.available(), reason="numba kernel unavailable")
needs_q4k = pytest.mark.skipif(not cpu_gguf.q4k_available(), reason="no AVX-512 VNNI / numba")


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


@pytest.mark.parametrize(
    "fmt", [pytest.param("q8_0", marks=needs_numba), pytest.param("q4k", marks=needs_q4k)]
)
def test_quantized_linear_dispatch_by_batch_rows(fmt, monkeypatch):
    # the pairing of a GEMV with the int4 GEMM, where the four-row kernels are missing
    monkeypatch.setattr(cpu_gguf, "q8_0_vnni_gemm_available", lambda: False)
    gemv = cpu_gguf.gemv(fmt)
    gen = torch.Generator().manual_seed(SEEDS[0])
    layer = QuantizedLinear.from_float(_weight(40, 256, gen), None, fmt)
    kernel = layer.kernel
    assert isinstance(kernel, SmallBatchMatmul) and isinstance(kernel.large, Int4PackMatmul)
    for m in (1, CPU_GEMV_MAX_M, CPU_GEMV_MAX_M + 1):
        x = torch.randn(m, 256, generator=gen).bfloat16()
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, 40)
        expected = gemv(layer.qweight, x) if m <= CPU_GEMV_MAX_M else None
        if expected is not None:
            assert torch.equal(y, expected.bfloat16())


@pytest.mark.parametrize(
    ("fmt", "checks"),
    [
        ("q8_0", ("available", "q8_0_vnni_available", "q8_0_vnni_gemm_available")),
        ("q8_0", ("available", "q8_0_vnni_available")),
        ("q4k", ("q4k_available",)),
    ],
)
def test_without_the_numba_kernel_the_torch_kernel_stays(monkeypatch, fmt, checks):
    for check in checks:
        monkeypatch.setattr(cpu_gguf, check, lambda: False)
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(SEEDS[1])) * 0.05
    assert isinstance(QuantizedLinear.from_float(w, None, fmt).kernel, Int4PackMatmul)


def test_q4k_and_int8_q8_0_need_avx512_vnni(monkeypatch):
    monkeypatch.setattr(cpu_gguf, "_host_has", lambda features: False)
    assert cpu_gguf.q4k_available.__wrapped__() is False
    assert cpu_gguf.q8_0_vnni_available.__wrapped__() is False


@needs_numba
def test_q8_0_without_vnni_keeps_the_float_activation_kernel(monkeypatch):
    monkeypatch.setattr(cpu_gguf, "q8_0_vnni_available", lambda: False)
    assert cpu_gguf.gemv("q8_0") is cpu_gguf.q8_0_matmul


needs_q8_0_vnni = pytest.mark.skipif(
    not cpu_gguf.q8_0_vnni_available(), reason="no AVX-512 VNNI / numba"
)


def _q8_0_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """q8_0 bytes of a random (n, k) weight (odd and even block counts) and x (m, k) with a
    random magnitude, some all-zero 32-blocks and a few outliers."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=gen))
    k = 32 * int(torch.randint(1, 40, (1,), generator=gen))
    m = int(torch.randint(1, 4, (1,), generator=gen))
    x = torch.randn(m, k, generator=gen) * float(torch.rand(1, generator=gen) * 10)
    x.view(m, k // 32, 32).masked_fill_(torch.rand(m, k // 32, 1, generator=gen) < 0.1, 0.0)
    x.view(-1)[torch.randint(0, m * k, (3,), generator=gen)] *= 50
    return get_format("q8_0").quantize(_weight(n, k, gen)), x, (n, k)


@needs_q8_0_vnni
@pytest.mark.parametrize("seed", SEEDS)
def test_q8_0_vnni_gemv_is_exact_on_its_int8_activations(seed):
    # int8 x int8 block sums are exact; only the float32 scaling and summation round.
    packed, x, (n, k) = _q8_0_inputs(seed)
    fmt = get_format("q8_0")
    y = cpu_gguf.q8_0_vnni_matmul(packed, x)
    xr = cpu_gguf.q8_0_round_activations(x)
    ref = reference_matmul(fmt, packed, (n, k))(xr)
    bound = _summation_bound(xr, fmt.dequantize(packed, (n, k)))
    assert y.shape == (x.shape[0], n) and y.dtype == torch.float32
    assert ((y.double() - ref.double()).abs() <= bound).all(), (y - ref).abs().max()


needs_q8_0_gemm = pytest.mark.skipif(
    not cpu_gguf.q8_0_vnni_gemm_available(), reason="no AVX-512 VNNI / numba"
)


@needs_q8_0_gemm
@pytest.mark.parametrize("seed", SEEDS)
def test_q8_0_four_row_kernel_equals_the_one_row_kernel(seed):
    """Prefill-sized batches (four activation rows per pass, a padded last group) give the
    one-row kernel's results, which the tests above hold to the reference; and a q8_0 layer
    on this host serves every batch through them, with no int4 copy of its weight."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=gen))
    k = 64 * int(torch.randint(1, 25, (1,), generator=gen))
    m = int(torch.randint(cpu_gguf.FOUR_ROW_MIN_M, 40, (1,), generator=gen))
    x = torch.randn(m, k, generator=gen) * float(torch.rand(1, generator=gen) * 10)
    x.view(m, k // 32, 32).masked_fill_(torch.rand(m, k // 32, 1, generator=gen) < 0.1, 0.0)
    packed = get_format("q8_0").quantize(_weight(n, k, gen))
    y = cpu_gguf.q8_0_vnni_any_matmul(packed, x)
    one_row = cpu_gguf.q8_0_vnni_matmul(packed, x)
    assert y.shape == (m, n)
    torch.testing.assert_close(y, one_row, rtol=1e-6, atol=1e-6 * float(one_row.abs().max()))
    layer = QuantizedLinear.from_float(_weight(n, k, gen), None, "q8_0")
    assert isinstance(layer.kernel, FunctionMatmul)
    for rows in (1, 2, m):
        xb = x[:rows].bfloat16()
        assert torch.equal(layer(xb), cpu_gguf.q8_0_vnni_any_matmul(layer.qweight, xb).bfloat16())
    assert cpu_gguf.any_batch_matmul("q8_0", k + 32) is None  # odd block count: int4 GEMM


@needs_q8_0_vnni
@pytest.mark.parametrize("seed", SEEDS)
def test_q8_0_vnni_error_is_bounded_by_activation_rounding(seed):
    packed, x, (n, k) = _q8_0_inputs(seed)
    fmt = get_format("q8_0")
    m = x.shape[0]
    w = fmt.dequantize(packed, (n, k)).double()
    step = x.abs().reshape(m, -1, 32).amax(-1).double() / 127
    half_step = (step / 2 * (1 + 1024 * U)).repeat_interleave(32, 1)  # (M, K)
    xr = cpu_gguf.q8_0_round_activations(x)
    assert ((xr.double() - x.double()).abs() <= half_step).all()
    y = cpu_gguf.q8_0_vnni_matmul(packed, x)
    ref = reference_matmul(fmt, packed, (n, k))(x)
    bound = half_step @ w.abs().T + _summation_bound(xr, w.float()) + _summation_bound(x, w.float())
    assert ((y.double() - ref.double()).abs() <= bound).all(), (y - ref).abs().max()


def _q4k_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """q4k bytes of a random (n, k) weight (some 256-blocks tiny or zero) and x (m, k) with
    a random magnitude, some all-zero 256-blocks and a few outliers."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300, (1,), generator=gen))
    k = 256 * int(torch.randint(1, 7, (1,), generator=gen))
    m = int(torch.randint(1, 4, (1,), generator=gen))
    w = torch.randn(n, k, generator=gen) * 0.05
    pick = torch.rand(n, k // 256, 1, generator=gen)
    blocks = w.view(n, k // 256, 256)
    blocks.mul_(torch.where(pick < 0.1, 1e-4, 1.0)).masked_fill_(pick > 0.95, 0.0)
    x = torch.randn(m, k, generator=gen) * float(torch.rand(1, generator=gen) * 10)
    xb = x.view(m, k // 256, 256)
    xb.masked_fill_(torch.rand(m, k // 256, 1, generator=gen) < 0.1, 0.0)
    x.view(-1)[torch.randint(0, m * k, (3,), generator=gen)] *= 50
    return get_format("q4k").quantize(w), x, (n, k)


def _q4k_term_bound(packed: torch.Tensor, x: torch.Tensor, shape) -> torch.Tensor:
    """sum_i (|d sc q| + |dmin m|)_i |x_i| (M, N) in float64: the kernel sums the scale and
    min terms of w = d sc q - dmin m separately, so its rounding scales with both."""
    ga = get_format("q4k").group_affine(packed, shape)
    scale = ga.scale.double().repeat_interleave(32, 1)
    offset = ga.offset.double().repeat_interleave(32, 1)
    codes = ga.codes.double() + 8  # the stored nibbles
    terms = (scale * codes).abs() + (offset - 8 * scale).abs()
    return x.double().abs() @ terms.T


@needs_q4k
@pytest.mark.parametrize("seed", SEEDS)
def test_q4k_gemv_is_exact_on_its_int8_activations(seed):
    # The reference on the activation the kernel multiplies: only float32 rounding differs.
    packed, x, (n, k) = _q4k_inputs(seed)
    fmt = get_format("q4k")
    y = cpu_gguf.q4k_matmul(packed, x)
    xr = cpu_gguf.q8k_round_activations(x)
    ref = reference_matmul(fmt, packed, (n, k))(xr)
    bound = 2 * (k + 4) * U * _q4k_term_bound(packed, xr, (n, k))
    assert y.shape == (x.shape[0], n) and y.dtype == torch.float32
    assert ((y.double() - ref.double()).abs() <= bound).all(), (y - ref).abs().max()


@needs_q4k
@pytest.mark.parametrize("seed", SEEDS)
def test_q4k_gemv_error_is_bounded_by_activation_rounding(seed):
    # Each 256-block of x is rounded to int8 codes of step amax / 127: |dx| <= step / 2 plus
    # float32 slack (x * 127 / amax and code * step each round within 2u of up to 127 codes:
    # step * 508u, i.e. half a step * (1 + 1016u); a tie sits right on that edge), so
    # |y - x @ W.T| <= sum |w| |dx| + the float32 summation bounds.
    packed, x, (n, k) = _q4k_inputs(seed)
    fmt = get_format("q4k")
    m = x.shape[0]
    w = fmt.dequantize(packed, (n, k)).double()
    step = x.abs().reshape(m, -1, 256).amax(-1).double() / 127
    half_step = (step / 2 * (1 + 1024 * U)).repeat_interleave(256, 1)  # (M, K)
    xr = cpu_gguf.q8k_round_activations(x)
    assert ((xr.double() - x.double()).abs() <= half_step).all()
    y = cpu_gguf.q4k_matmul(packed, x)
    ref = reference_matmul(fmt, packed, (n, k))(x)
    rounding = half_step @ w.abs().T
    summation = (
        2 * (k + 4) * U * (_q4k_term_bound(packed, xr, (n, k)) + x.double().abs() @ w.abs().T)
    )
    assert ((y.double() - ref.double()).abs() <= rounding + summation).all(), (y - ref).abs().max()


@needs_numba
def test_functions_closing_over_numba_objects_are_not_disk_cached():
    """numba keys a closure's disk-cache entry on the pickles of its closure variables; an
    intrinsic's or a dispatcher's pickle holds a per-process UUID, so such an entry never
    hits again and a new file was written at every start (the kernels' __pycache__ grew
    without bound). Every compiled function we build either closes over no numba object or
    is not cached on disk."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher
    from numba.core.extending import _Intrinsic

    from mistralpy.kernels import cpu_decode

    kernels = cpu_decode.layer_kernels()
    compiled = [cpu_gguf._q8_0_driver(), cpu_gguf._activation_codes()]
    compiled += [getattr(kernels, name) for name in ("rms_norm", "rope", "attention", "attention4")]
    if cpu_gguf.q8_0_vnni_available():
        compiled += [cpu_gguf._q8_0_vnni_driver(), cpu_gguf._q8_0_vnni_gemm_driver()]
    if cpu_gguf.q4k_available():
        compiled.append(cpu_gguf._q4k_driver())
    for fn in compiled:
        cells = fn.py_func.__closure__ or ()
        numba_objects = [c for c in cells if isinstance(c.cell_contents, Dispatcher | _Intrinsic)]
        if numba_objects:
            assert isinstance(fn._cache, NullCache), fn.py_func.__qualname__
