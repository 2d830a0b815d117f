"""Save and reload ISQ-quantized models without quantizing again.

Directory layout written by `save_quantized(model, out_dir, fmt)`:
- `model.safetensors`: the model's whole state dict (vision tower and projector included);
  each QuantizedLinear contributes `<path>.qweight` (uint8 GGUF block bytes, one row per
  output channel) and `<path>.bias` when it has one; everything else is stored as is.
- `quantization.json`: {"quant_method": "mistralpy-isq", "version": 1, "format": <name>,
  "layers": {<path>: {"format": <name>, "shape": [out, in], "bias": bool}}}; a layer's
  format can differ from the requested one (width fallback, see isq.py).
`copy_model_files(src, out_dir)` copies everything else a model directory needs (config,
tokenizer, chat template, generation and processor configs) from the source checkpoint.

The loader reads `read_quantization_config(dir)`, and for every path in `config.layers`
builds the module with `load_prequantized_linear(path, tensors, config)` instead of nn.Linear
(`tensors` = that module's tensors with the path prefix stripped: "qweight", "bias").
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mistralpy.errors import UserError
from mistralpy.quant.formats import get_format

if TYPE_CHECKING:  # isq is imported where needed: reading quantization.json needs no kernels
    from mistralpy.quant.isq import QuantizedLinear
    from mistralpy.quant.tuning import KernelTuning

QUANT_CONFIG_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
QUANT_METHOD = "mistralpy-isq"
VERSION = 1


class PrequantizedFormatError(UserError):
    """quantization.json is missing fields, of another version, or disagrees with tensors."""


@dataclass(frozen=True)
class LayerQuant:
    """How one linear layer is stored."""

    format: str  # canonical format name ("q4k", "q4_0", ...)
    shape: tuple[int, int]  # (out_features, in_features)
    bias: bool  # a "<path>.bias" tensor is stored


@dataclass(frozen=True)
class QuantizationConfig:
    """Contents of quantization.json."""

    format: str  # the format asked for (--isq)
    layers: dict[str, LayerQuant]  # module path -> storage of that layer

    def to_json(self) -> dict:
        layers = {
            p: {"format": q.format, "shape": list(q.shape), "bias": q.bias}
            for p, q in sorted(self.layers.items())
        }
        return {
            "quant_method": QUANT_METHOD,
            "version": VERSION,
            "format": self.format,
            "layers": layers,
        }


def read_quantization_config(model_dir: str | Path) -> QuantizationConfig | None:
    """Parse `model_dir/quantization.json`; None when the directory has none."""
    path = Path(model_dir) / QUANT_CONFIG_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    if raw.get("quant_method") != QUANT_METHOD or raw.get("version") != VERSION:
        raise PrequantizedFormatError(f"{path}: unsupported quant_method/version")
    try:
        layers = {
            p: LayerQuant(get_format(v["format"]).name, tuple(v["shape"]), bool(v["bias"]))
            for p, v in raw["layers"].items()
        }
        return QuantizationConfig(get_format(raw["format"]).name, layers)
    except (KeyError, TypeError) as err:
        raise PrequantizedFormatError(f"{path}: malformed entry ({err})") from err


def quantization_config_of(model: nn.Module, fmt: str) -> QuantizationConfig:
    """The QuantizationConfig describing the QuantizedLinear modules of `model`."""
    from mistralpy.quant.isq import QuantizedLinear

    layers = {
        name: LayerQuant(m.fmt.name, (m.out_features, m.in_features), m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLinear)
    }
    return QuantizationConfig(get_format(fmt).name, layers)


def save_quantized(model: nn.Module, out_dir: str | Path, fmt: str) -> QuantizationConfig:
    """Write model.safetensors + quantization.json for an ISQ model into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = quantization_config_of(model, fmt)
    # Tied or shared tensors are written once per name, as separate copies (safetensors
    # refuses aliased storage).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"quant_method": QUANT_METHOD})
    (out / QUANT_CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=1) + "\n")
    return config


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")


def copy_model_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the non-weight top-level files of a checkpoint (config.json / params.json,
    tokenizer files, chat template, processor configs, ...) into out_dir; returns their
    names. Weights and any old quantization.json are left behind."""
    copied = []
    for f in sorted(Path(src_dir).iterdir()):
        if not f.is_file() or f.name == QUANT_CONFIG_FILE or f.name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, Path(out_dir) / f.name)
        copied.append(f.name)
    return copied


def load_prequantized_linear(
    module_path: str,
    tensors: dict[str, Tensor],
    config: QuantizationConfig,
    tuning: KernelTuning | None = None,
) -> QuantizedLinear:
    """Build the stored layer `module_path` from its tensors ("qweight", optional "bias"),
    already on the target device; the kernel is chosen for that device (launch configs timed
    once per shape through `tuning`, shared by the layers of one load)."""
    layer = config.layers.get(module_path)
    if layer is None:
        raise PrequantizedFormatError(f"{module_path} is not a quantized layer")
    if "qweight" not in tensors or (layer.bias and "bias" not in tensors):
        raise PrequantizedFormatError(f"{module_path}: missing tensors, have {sorted(tensors)}")
    qweight = tensors["qweight"]
    if qweight.dtype != torch.uint8:
        raise PrequantizedFormatError(f"{module_path}.qweight must be uint8, got {qweight.dtype}")
    from mistralpy.quant.isq import QuantizedLinear

    return QuantizedLinear(qweight, layer.format, layer.shape, tensors.get("bias"), tuning)
