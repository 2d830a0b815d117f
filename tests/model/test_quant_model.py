"""ISQ on whole models: pre-quantized save/reload, the `quantize` CLI, quality vs float32,
and peak memory while quantizing during a streaming load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mistralpy.checkpoint.loader import CheckpointError, load_model, quantize_checkpoint
from mistralpy.quant.formats import QuantFormat
from mistralpy.quant.isq import QuantizedLinear
from mistralpy.quant.prequantized import read_quantization_config
from mistralpy.testing.probes import prefill_logits
from mistralpy.testing.tiny_checkpoint import write_checkpoint

REPO_ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=3)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1000, 131072, (40,), generator=g).tolist() for _ in range(4)]


def _no_quantizing(monkeypatch) -> None:
    def refuse(self, w):
        raise AssertionError(f"quantized {self.name} again while loading a quantized model")

    monkeypatch.setattr(QuantFormat, "quantize", refuse)


def test_prequantized_roundtrip_is_exact_and_never_requantizes(
    tiny_dir, tmp_path, prompts, monkeypatch
):
    isq_model = load_model(tiny_dir, torch.float32, "cpu", isq="q8_0")
    out = quantize_checkpoint(tiny_dir, tmp_path / "q8", "q8_0")
    # a complete model directory: weights, quantization.json and every other file copied
    for name in ["config.json", "tokenizer.json", "tekken.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json",
                 "preprocessor_config.json", "processor_config.json",
                 "quantization.json", "model.safetensors"]:  # fmt: skip
        assert (out / name).is_file(), name
    qconfig = read_quantization_config(out)
    assert qconfig.format == "q8_0" and "lm_head" in qconfig.layers
    _no_quantizing(monkeypatch)
    reloaded = load_model(out, torch.float32, "cpu")
    quantized = {n for n, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(qconfig.layers)
    for ids in prompts[:2]:
        torch.testing.assert_close(
            prefill_logits(reloaded, ids), prefill_logits(isq_model, ids), rtol=0, atol=0
        )
    # the vision tower and projector survive (full precision, as ISQ leaves them)
    ours = dict(reloaded.named_parameters())
    for name, p in isq_model.named_parameters():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(ours[name], p), name
    assert any(n.startswith("vision_tower.") for n in ours)
    images = [torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_images(images)[0], isq_model.encode_images(images)[0]
        )
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(out, torch.float32, "cpu", isq="q4k")


def test_prequantized_vision_layers_are_loaded_quantized(tiny_dir, tmp_path, monkeypatch):
    from mistralpy.quant.isq import isq_linear_factory
    from mistralpy.quant.prequantized import copy_model_files, save_quantized

    model = load_model(tiny_dir, torch.float32, "cpu")
    factory = isq_linear_factory("q8_0", quantize_vision=True)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            new = factory(name, mod.weight, mod.bias)
            if new is not None:
                model.set_submodule(name, new)
    out = tmp_path / "qv"
    config = save_quantized(model, out, "q8_0")
    copy_model_files(tiny_dir, out)
    assert any(p.startswith("vision_tower.") for p in config.layers)
    _no_quantizing(monkeypatch)
    reloaded = load_model(out, torch.float32, "cpu")
    for path in config.layers:
        layer = reloaded.get_submodule(path)
        assert isinstance(layer, QuantizedLinear), path
        assert torch.equal(layer.qweight, model.get_submodule(path).qweight), path
    images = [torch.randn(3, 56, 84, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode_images(images)[0], model.encode_images(images)[0]
        )


def test_cli_quantize_writes_loadable_directory(tiny_dir, tmp_path, monkeypatch):
    from mistralpy.server.cli import main

    out = tmp_path / "cli_q4"
    assert main(["quantize", str(tiny_dir), "--isq", "Q4_0", "-o", str(out)]) == 0
    assert read_quantization_config(out).format == "q4_0"
    _no_quantizing(monkeypatch)
    model = load_model(out, torch.float32, "cpu")
    assert isinstance(model.lm_head, QuantizedLinear)
    with pytest.raises(SystemExit) as bad:  # argparse refuses an unknown format, exit 2
        main(["quantize", str(tiny_dir), "--isq", "q7", "-o", str(tmp_path / "bad")])
    assert bad.value.code == 2


# ---------------------------------------------------------------------------------------------
# quality: layer outputs and greedy tokens against the float32 model (tiny preset)

# Tiny-preset widths (64, 128) are not multiples of 256: K-quants fall back to their legacy
# sibling (q6k -> q8_0, q4k -> q4_0, see isq.py), so they are checked through that path here.
QUALITY = {  # format: (max relative layer-output error, min greedy agreement)
    "q8_0": (0.02, 0.95),
    "q6k": (0.02, 0.95),
    "fp8": (0.08, 0.80),
    "q5_0": (0.12, 0.70),
    "q4_0": (0.25, 0.55),
    "q4_1": (0.25, 0.55),
}


@pytest.fixture(scope="module")
def float_model(tiny_dir):
    return load_model(tiny_dir, torch.float32, "cpu")


@pytest.mark.parametrize("fmt", list(QUALITY))
def test_quality_against_float32(fmt, tiny_dir, float_model, prompts):
    max_err, min_agree = QUALITY[fmt]
    model = load_model(tiny_dir, torch.float32, "cpu", isq=fmt)
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLinear):
            ref = float_model.get_submodule(name)
            x = torch.randn(8, layer.in_features, generator=g)
            y_ref = ref(x)
            worst = max(worst, ((layer(x) - y_ref).abs().max() / y_ref.abs().max()).item())
    assert 0 < worst <= max_err, (fmt, worst)
    same = total = 0
    for ids in prompts:
        same += (
            prefill_logits(model, ids).argmax(-1) == prefill_logits(float_model, ids).argmax(-1)
        ).sum()
        total += len(ids)
    assert same / total >= min_agree, (fmt, float(same / total))


# ---------------------------------------------------------------------------------------------
# peak memory of a streaming load with ISQ (subprocess, VmHWM)

_MEMORY_SCRIPT = r"""
import json, sys, torch
from mistralpy.checkpoint.loader import load_model
from mistralpy.model.config import read_config
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration
from mistralpy.quant.isq import QuantizedLinear

def status_mb(field):  # VmHWM, unlike ru_maxrss, is not inherited from the parent
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024

path, isq = sys.argv[1], sys.argv[2]
with torch.device("meta"):  # warm-up: imports and first-call allocations before the baseline
    Mistral3ForConditionalGeneration(read_config(path))
QuantizedLinear.from_float(torch.randn(64, 256), None, isq)(torch.randn(2, 256))
before = status_mb("VmRSS")
model = load_model(path, torch.bfloat16, "cpu", isq=isq)
peak = status_mb("VmHWM")
size = 0
for m in model.modules():
    tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    if isinstance(m, QuantizedLinear):  # the kernel's own packing counts too
        tensors += [t for g in getattr(m.kernel, "gemms", []) for t in g]
    size += sum(t.numel() * t.element_size() for t in tensors)
largest = max(m.in_features * m.out_features * 2 for m in model.modules()
              if isinstance(m, QuantizedLinear))
print(json.dumps({"growth_mb": peak - before, "model_mb": size / 2**20,
                  "largest_bf16_mb": largest / 2**20}))
"""


def _peak(path: Path, isq: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(path), isq],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_one_layer_over_model(m: dict, path: Path) -> None:
    # The quantized model (with its kernel packing) + the (reclaimable) mapped pages of the
    # shard being read + about one layer in full precision and the quantizer's chunk
    # temporaries; never a second full-precision copy of the model.
    shard_mb = max(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    assert m["growth_mb"] < m["model_mb"] + shard_mb + 2 * m["largest_bf16_mb"] + 24, m


def test_isq_load_peak_memory_tiny(tiny_dir):
    _assert_one_layer_over_model(_peak(tiny_dir, "q4_0"), tiny_dir)


@pytest.mark.slow
def test_isq_load_peak_memory_small_preset(tmp_path):
    path = write_checkpoint(tmp_path / "small", preset="small")
    _assert_one_layer_over_model(_peak(path, "q4k"), path)


def test_isq_dummy_build_of_the_24b_layout_on_meta():
    from mistralpy.checkpoint.loader import load_dummy_model
    from mistralpy.model.config import mistral_small_3_1_config

    model = load_dummy_model(mistral_small_3_1_config(), torch.bfloat16, "meta", isq="q4k")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 40 * 4 + 1  # qkv, o, gate_up, down per decoder layer + lm_head
    gate_up = layers["language_model.layers.0.mlp.gate_up_proj"]
    assert gate_up.fmt.name == "q4k" and gate_up.qweight.shape == (65536, 5120 // 256 * 144)
    assert layers["lm_head"].qweight.shape == (131072, 5120 // 256 * 144)
    assert not any(n.startswith("vision_tower.") for n in layers)


def test_isq_dummy_build_on_cpu(tiny_dir, prompts):
    from mistralpy.checkpoint.loader import load_dummy_model
    from mistralpy.model.config import read_config

    model = load_dummy_model(read_config(tiny_dir), torch.float32, "cpu", isq="q8_0")
    assert isinstance(model.lm_head, QuantizedLinear)
    assert torch.isfinite(prefill_logits(model, prompts[0])).all()
