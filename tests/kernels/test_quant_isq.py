"""QuantizedLinear kernels vs the dequantize-then-matmul oracle; ISQ rules; prequantized I/O."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mistralpy.kernels import cpu_gguf
from mistralpy.kernels.quant_matmul import (
    DequantMatmul,
    FunctionMatmul,
    Int4PackMatmul,
    SmallBatchMatmul,
)
from mistralpy.quant.formats import FORMATS, UnknownQuantFormatError, get_format
from mistralpy.quant.isq import (
    QuantizedLinear,
    isq_linear_factory,
    reference_matmul,
    should_quantize,
)
from mistralpy.quant.prequantized import (
    load_prequantized_linear,
    read_quantization_config,
    save_quantized,
)

INT4_PATH = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4k", "q5k", "q8k"}


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_kernel_matches_reference(name):
    n, k = 40, 512  # 40: not a multiple of the int4 packer's 16-channel tiles
    w, x = _rand(n, k, seed=1, scale=0.05), _rand(3, k, seed=2)
    layer = QuantizedLinear.from_float(w, None, name)
    expected_kernel = Int4PackMatmul if name in INT4_PATH else DequantMatmul
    kernel = layer.kernel
    if isinstance(kernel, SmallBatchMatmul):  # numba GEMV: 3 rows still take the int4 GEMM
        assert name in ("q8_0", "q4k") and kernel.max_m < 3
        kernel = kernel.large
    fmt = get_format(name)
    ref = reference_matmul(fmt, layer.qweight, (n, k))(x)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (3, n)
    if isinstance(kernel, FunctionMatmul):  # numba int8 kernels for every batch (VNNI)
        assert name == "q8_0"
        xr = cpu_gguf.q8_0_round_activations(x)  # exact int8 sums: only float32 rounding left
        ref = reference_matmul(fmt, layer.qweight, (n, k))(xr)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        return
    assert isinstance(kernel, expected_kernel)
    if name in INT4_PATH:
        # Faithful up to bf16 rounding: compare with the oracle's own bf16 rounding error.
        wd = layer.dequantized_weight()
        bf16 = (x.bfloat16().float() @ wd.bfloat16().float().T - ref).abs().max()
        assert (y - ref).abs().max() <= 4 * bf16 + 1e-6, ((y - ref).abs().max(), bf16)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_tiled_fallback_equals_single_tile():
    fmt = get_format("q6k")
    w, x = _rand(100, 256, seed=3), _rand(2, 256, seed=4)
    packed = fmt.quantize(w)
    rows = lambda a, b, dt: fmt.dequantize(packed[a:b], (b - a, 256), dt)  # noqa: E731
    tiled = DequantMatmul(rows, 100, 256, tile_bytes=16 * 256 * 4)
    assert tiled.tile == 16
    torch.testing.assert_close(tiled(x), reference_matmul(fmt, packed, (100, 256))(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_batch_dims_and_bias(dtype):
    w, b = _rand(48, 256, seed=5, scale=0.05), _rand(48, seed=6)
    layer = QuantizedLinear.from_float(w, b, "q4k")
    x = _rand(2, 3, 256, seed=7).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    ref = x.float() @ layer.dequantized_weight().T + b
    torch.testing.assert_close(y.float(), ref, rtol=0.03, atol=0.03)


@pytest.mark.parametrize(
    ("path", "vision", "expected"),
    [
        ("model.language_model.layers.3.self_attn.qkv_proj", False, True),
        ("model.language_model.layers.0.self_attn.o_proj", False, True),
        ("model.language_model.layers.1.mlp.gate_up_proj", False, True),
        ("model.language_model.layers.1.mlp.down_proj", False, True),
        ("lm_head", False, True),
        ("model.vision_tower.transformer.layers.0.attention.q_proj", False, False),
        ("model.vision_tower.transformer.layers.0.attention.q_proj", True, True),
        ("model.multi_modal_projector.linear_1", False, False),
        ("model.multi_modal_projector.patch_merger.merging_layer", True, True),
        ("model.language_model.embed_tokens", False, False),
    ],
)
def test_which_layers(path, vision, expected):
    assert should_quantize(path, vision) is expected


def test_factory_fallbacks(caplog):
    factory = isq_linear_factory("Q4K")
    path = "model.language_model.layers.0.mlp.down_proj"
    with caplog.at_level(logging.INFO):
        assert factory(path, _rand(32, 96), None).fmt.name == "q4_0"  # 96 % 256 != 0
        assert factory(path, _rand(32, 48), None) is None  # not even a multiple of 32
    assert "q4_0" in caplog.text and "full precision" in caplog.text
    assert factory(path, _rand(32, 512), None).fmt.name == "q4k"
    assert factory("model.vision_tower.patch_conv", _rand(32, 512), None) is None
    assert isq_linear_factory("fp8")(path, _rand(8, 50), None).fmt.name == "fp8"
    with pytest.raises(UnknownQuantFormatError):
        isq_linear_factory("q7")


class _Tiny(nn.Module):
    """Module names as in mistral3 (only the parts ISQ cares about)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.language_model = nn.Module()
        self.model.language_model.layers = nn.ModuleList([nn.Module()])
        blk = self.model.language_model.layers[0]
        blk.qkv_proj = nn.Linear(256, 96, bias=False)
        blk.down_proj = nn.Linear(64, 256, bias=True)  # 64: q4k falls back to q4_0
        self.model.language_model.norm = nn.LayerNorm(256)
        self.model.vision_tower = nn.Linear(32, 32)
        self.lm_head = nn.Linear(256, 80, bias=False)


def _apply_isq(model: nn.Module, fmt: str, vision: bool) -> None:
    factory = isq_linear_factory(fmt, quantize_vision=vision)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            new = factory(
                name, mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
            )
            if new is not None:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, new)


@pytest.mark.parametrize("vision", [False, True])
def test_save_and_reload_prequantized(tmp_path, vision):
    torch.manual_seed(0)
    model = _Tiny()
    _apply_isq(model, "q4k", vision)
    config = save_quantized(model, tmp_path, "q4k")
    assert config.layers["model.language_model.layers.0.down_proj"].format == "q4_0"
    assert ("model.vision_tower" in config.layers) is vision
    read = read_quantization_config(tmp_path)
    assert read == config
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "model.language_model.norm.weight" in stored
    assert "model.vision_tower.weight" in stored or "model.vision_tower.qweight" in stored
    x = torch.randn(2, 256)
    for path, layer in config.layers.items():
        tensors = {k[len(path) + 1 :]: v for k, v in stored.items() if k.startswith(path + ".")}
        loaded = load_prequantized_linear(path, tensors, read)
        original = model.get_submodule(path)
        assert torch.equal(loaded.qweight, original.qweight)
        xi = x[:, : layer.shape[1]]
        torch.testing.assert_close(loaded(xi), original(xi), rtol=0, atol=0)
    assert read_quantization_config(tmp_path / "nope") is None


@pytest.mark.parametrize("name", ["q4_0", "q5k"])  # one and two int4 GEMMs
def test_int4pack_built_in_chunks_equals_one_piece(name):
    from mistralpy.quant.isq import _affine_rows_fn

    fmt = get_format(name)
    n, k = 200, 256  # 200: chunks of 64 leave a ragged, padded last chunk
    packed = fmt.quantize(_rand(n, k, seed=8, scale=0.05))
    group, bits = (32, 4) if name == "q4_0" else (32, 5)
    rows = _affine_rows_fn(fmt, packed, k)
    whole = Int4PackMatmul(rows, (n, k), group, bits)
    chunked = Int4PackMatmul(rows, (n, k), group, bits, chunk_rows=64)
    x = _rand(3, k, seed=9)
    assert torch.equal(whole(x), chunked(x))


@pytest.mark.parametrize("fmt", ["q4k", "q8_0", "fp8"])
def test_quantized_embedding_gathers_dequantized_rows(fmt):
    """A lookup equals the same rows of the whole dequantized table, in the table's dtype
    and the ids' shape; a width no block fits keeps the float table."""
    from mistralpy.quant.isq import QuantizedEmbedding, quantize_embedding

    g = torch.Generator().manual_seed(7)
    emb = torch.nn.Embedding(40, 512)
    emb.weight.data = torch.randn(40, 512, generator=g).to(torch.bfloat16)
    q = quantize_embedding(emb, fmt)
    assert isinstance(q, QuantizedEmbedding)
    table = q.fmt.dequantize(q.qweight, (40, 512), torch.bfloat16)
    ids = torch.randint(0, 40, (3, 5), generator=g)
    out = q(ids)
    assert out.shape == (3, 5, 512) and out.dtype == torch.bfloat16
    assert torch.equal(out, table[ids])
    err = (table.float() - emb.weight.float()).norm() / emb.weight.float().norm()
    assert err < 0.1
    if fmt != "fp8":  # block formats: 20 is no multiple of 32
        assert isinstance(quantize_embedding(torch.nn.Embedding(4, 20), fmt), torch.nn.Embedding)
