"""GGUF bit-exactness and quality of mistralpy.quant.formats against the gguf package."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistralpy.quant.formats import FORMATS, QuantFormat, UnknownQuantFormatError, get_format

GGUF_DEQUANT = sorted(n for n, f in FORMATS.items() if f.ggml_type is not None and n != "q8k")
GGUF_QUANT = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


@dataclass(frozen=True)
class QualityReport:
    """Error of quantize -> dequantize against the original weight."""

    rmse: float  # sqrt(mean((w - w_hat)^2))
    max_abs_error: float  # max |w - w_hat|
    max_rel_error: float  # max |w - w_hat| / max |w| over the whole tensor
    rel_rmse: float  # rmse / rms(w)


def quality_report(w: torch.Tensor, fmt: str | QuantFormat) -> QualityReport:
    """Quantize then dequantize the (rows, cols) weight `w` and measure the error."""
    f = get_format(fmt)
    w = w.float()
    rows, cols = w.shape
    err = f.dequantize(f.quantize(w), (rows, cols)) - w
    rmse = err.pow(2).mean().sqrt().item()
    scale = w.abs().max().item() or 1.0
    rms = w.pow(2).mean().sqrt().item() or 1.0
    return QualityReport(rmse, err.abs().max().item(), err.abs().max().item() / scale, rmse / rms)


def _weights(dist: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        return torch.randn(rows, cols, generator=g) * 0.02
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(2.5).sample((rows, cols)) * 0.02
    idx = torch.randint(0, rows * cols, (max(1, rows * cols // 300),), generator=g)
    w.view(-1)[idx] *= 10  # a few outliers, as real checkpoints have
    return w


def _gguf_dequant(packed: torch.Tensor, name: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(FORMATS[name].ggml_type)
    return gguf.quants.dequantize(packed.numpy(), qtype)


@pytest.mark.parametrize("name", GGUF_DEQUANT)
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_bytes_dequantize_identically_with_gguf(name, dist):
    fmt = get_format(name)
    w = _weights(dist, 6, 2 * 256, seed=len(name) + len(dist))
    packed = fmt.quantize(w)
    assert packed.dtype == torch.uint8 and packed.shape == (6, fmt.bytes_per_row(512))
    ours = fmt.dequantize(packed, (6, 512), torch.float32).numpy()
    np.testing.assert_array_equal(ours, _gguf_dequant(packed, name))


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(GGUF_DEQUANT),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 2),
    log_scale=st.integers(-12, 6),
    zero_rows=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gguf_exact_any_scale(name, rows, blocks, log_scale, zero_rows, seed):
    fmt = get_format(name)
    cols = blocks * fmt.block_size
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    if zero_rows:
        w[0] = 0  # all-zero blocks must give zero scales, not NaN
    packed = fmt.quantize(w)
    ours = fmt.dequantize(packed, (rows, cols)).numpy()
    assert np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, _gguf_dequant(packed, name))
    if zero_rows:
        assert (ours[0] == 0).all()


@pytest.mark.parametrize("name", GGUF_QUANT)
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_error_not_worse_than_gguf_quantizer(name, dist):
    w = _weights(dist, 16, 1024, seed=7 * len(name) + len(dist))
    qtype = gguf.GGMLQuantizationType(FORMATS[name].ggml_type)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    ref_rmse = float(np.sqrt(((ref - w.numpy()) ** 2).mean()))
    report = quality_report(w, name)
    assert report.rmse <= ref_rmse * (1 + 1e-6), (report.rmse, ref_rmse)


def _q8k_reference(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """block_q8_K {float d; int8 qs[256]; int16 bsums[16]} -> (weights, bsums) per block."""
    blocks = packed.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)
    qs = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
    bsums = blocks[:, 260:].copy().view(np.int16)
    return d * qs, bsums


def test_q8k_layout_matches_block_struct():
    w = _weights("heavy", 4, 512, seed=3)
    fmt = get_format("q8k")
    packed = fmt.quantize(w)
    ref, bsums = _q8k_reference(packed.numpy())
    ours = fmt.dequantize(packed, (4, 512)).numpy()
    np.testing.assert_array_equal(ours.reshape(-1, 256), ref)
    qs = packed.numpy().reshape(-1, 292)[:, 4:260].view(np.int8).astype(np.int64)
    np.testing.assert_array_equal(bsums, qs.reshape(-1, 16, 16).sum(-1))
    # llama.cpp's quantize_row_q8_K_ref: d = max / -127 (signed absmax), codes rounded.
    x = w.reshape(-1, 256).double()
    mx = torch.gather(x, 1, x.abs().argmax(1, keepdim=True))
    ref_rmse = (torch.round(x * (-127 / mx)) * (mx / -127) - x).pow(2).mean().sqrt().item()
    assert quality_report(w, "q8k").rmse <= ref_rmse * (1 + 1e-6)


def _e4m3_decode(b: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bits -> float32 by the OCP spec (bias 7, no infinities)."""
    b = b.astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp, man = (b >> 3) & 15, b & 7
    normal = (1 + man / 8.0) * 2.0 ** (exp - 7)
    sub = man / 8.0 * 2.0**-6
    return (sign * np.where(exp == 0, sub, normal)).astype(np.float32)


def test_fp8_per_row_scales():
    w = _weights("heavy", 5, 96, seed=11)
    fmt = get_format("fp8")
    packed = fmt.quantize(w).numpy()
    assert packed.shape == (5, 96 + 4)
    scale = packed[:, 96:].copy().view(np.float32)
    np.testing.assert_allclose(scale[:, 0], w.abs().amax(1).numpy() / 448, rtol=1e-6)
    ref = _e4m3_decode(packed[:, :96]) * scale
    ours = fmt.dequantize(torch.from_numpy(packed), (5, 96)).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert quality_report(w, "fp8").rel_rmse < 0.05


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("Q4K", "q4k"),
        ("q4k", "q4k"),
        ("Q4_K", "q4k"),
        ("q6_k", "q6k"),
        ("Q8_0", "q8_0"),
        ("q4_0", "q4_0"),
        ("Q5_1", "q5_1"),
        ("fp8", "fp8"),
        ("FP8", "fp8"),
        ("2", "q2k"),
        (3, "q3k"),
        ("4", "q4k"),
        ("5", "q5k"),
        ("6", "q6k"),
        (8, "q8_0"),
        ("Q8K", "q8k"),
    ],
)
def test_names(alias, canonical):
    assert get_format(alias).name == canonical


@pytest.mark.parametrize("bad", ["q7k", "int4", "", "7", "hqq4"])
def test_unknown_name_lists_valid(bad):
    with pytest.raises(UnknownQuantFormatError) as err:
        get_format(bad)
    assert isinstance(err.value, ValueError)
    assert "q4k" in str(err.value) and "q8_0" in str(err.value)


def test_quantize_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        get_format("q4k").quantize(torch.randn(2, 96))


def test_quality_ordering_by_bits():
    w = _weights("normal", 8, 1024, seed=5)
    rmse = {n: quality_report(w, n).rmse for n in ["q2k", "q3k", "q4k", "q5k", "q6k", "q8_0"]}
    ordered = [rmse[n] for n in ["q2k", "q3k", "q4k", "q5k", "q6k", "q8_0"]]
    assert ordered == sorted(ordered, reverse=True), rmse
