"""Build a text-only decoder from a GGUF model (llama.cpp's `llama` architecture).

GGUF tensor names map to our modules (`blk.N.attn_q` -> part 0 of
`language_model.layers.N.self_attn.qkv_proj`, ...). A tensor whose GGUF type is one of our
block formats (quant.formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K) keeps its bytes: the
Linear becomes a QuantizedLinear over them with the kernel ISQ would pick, no dequantize /
requantize round trip. A fused projection concatenates its parts' rows when they share a
format, else it becomes a ConcatLinear of per-part layers (Q4_K_M files mix Q4_K and Q6_K).
llama.cpp stores q/k rows in interleaved RoPE order; they are permuted back to rotate-half
order, byte rows included (a row is quantized on its own, so rows move whole).

Norms and the token embedding (a lookup needs float rows) are dequantized into the model dtype;
a tied lm_head (no `output.weight`) keeps the embedding's bytes. `dequantize=True` (an explicit
--dtype) or an ISQ format dequantizes every Linear first (ISQ then quantizes in its own format).
Types we have no block format for (IQ*, ...) are dequantized by the gguf package.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch
from torch import nn

from mistralpy.checkpoint.loader import (
    _empty_model,
    _Filler,
    _isq_factory,
    _Target,
    check_match,
    rotate_half_rows,
)
from mistralpy.model.config import config_from_gguf
from mistralpy.model.gguf_file import GGUFModelFile, GGUFTensor, open_gguf
from mistralpy.model.layers import MergedLinear
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration
from mistralpy.model.parallel import SINGLE
from mistralpy.quant.formats import QuantFormat, format_of_ggml_type
from mistralpy.quant.isq import ConcatLinear, KernelTuning, QuantizedLinear

log = logging.getLogger(__name__)

# per-layer GGUF tensor -> (our module under language_model.layers.N, part of a fused Linear)
_LAYER_TENSORS: dict[str, tuple[str, int | None]] = {
    "attn_norm": ("input_layernorm", None),
    "ffn_norm": ("post_attention_layernorm", None),
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": ("self_attn.o_proj", None),
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", None),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "language_model.embed_tokens",
    "output_norm.weight": "language_model.norm",
    "output.weight": "lm_head",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

Parts = list[tuple[int | None, GGUFTensor]]  # (part index, tensor), in part order


def load_gguf_model(
    path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    isq: str | None = None,
    dequantize: bool = False,
) -> Mistral3ForConditionalGeneration:
    """Model of the GGUF file `path` (any shard of a split model) on `device`; activations and
    dense tensors in `dtype`. See the module doc for what stays quantized."""
    gguf = open_gguf(path)
    config = config_from_gguf(gguf)
    device = torch.device(device)
    model = _empty_model(config, dtype, device, SINGLE)
    filler = _Filler(model, _isq_factory(isq))
    keep = not dequantize and isq is None
    tuning = KernelTuning()  # one load: launch configs timed once per shape
    for module, parts in _plan(gguf, model).items():
        target = model.get_submodule(module)
        if not isinstance(target, nn.Linear):
            filler.put(_Target(module, "weight"), _dense(parts[0][1]))
            continue
        rows = [(_rope_heads(model, module, part), t) for part, t in parts]
        layer = _quantized(rows, device, tuning) if keep else None
        if layer is None:
            weight = torch.cat([_permuted(_dense(t), heads) for heads, t in rows])
            filler.finalize(module, weight.to(device, dtype), None)
        else:
            model.set_submodule(module, layer)
    if config.tie_word_embeddings:
        embedding = gguf.tensors["token_embd.weight"]
        layer = _quantized([(None, embedding)], device, tuning) if keep else None
        if layer is None:
            filler.tie_lm_head()
        else:
            model.lm_head = layer
    return filler.finish()


def _plan(gguf: GGUFModelFile, model: Mistral3ForConditionalGeneration) -> dict[str, Parts]:
    """Our module path -> its GGUF tensors; raises CheckpointError naming every unknown,
    missing or misshapen tensor."""
    plan: dict[str, Parts] = {}
    unexpected, wrong = [], []
    for name, tensor in gguf.tensors.items():
        target = _target(name)
        if target is None or not _exists(model, target[0]):
            unexpected.append(name)
            continue
        module, part = target
        expected = _expected_shape(model.get_submodule(module), part)
        if tensor.shape != expected:
            wrong.append(f"{name} {tensor.shape} != {expected}")
        plan.setdefault(module, []).append((part, tensor))
    for parts in plan.values():
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
    missing = _missing(model, plan)
    check_match(f"GGUF {gguf.path.name} does not match its metadata", missing, unexpected, wrong)
    return plan


def _target(name: str) -> tuple[str, int | None] | None:
    """(our module path, part) of GGUF tensor `name`, or None for a name we do not know."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name], None
    m = _BLOCK.match(name)
    if m is None or m[2] not in _LAYER_TENSORS:
        return None
    module, part = _LAYER_TENSORS[m[2]]
    return f"language_model.layers.{m[1]}.{module}", part


def _exists(model: nn.Module, module: str) -> bool:
    try:
        model.get_submodule(module)
    except AttributeError:
        return False
    return True


def _expected_shape(module: nn.Module, part: int | None) -> tuple[int, ...]:
    """(rows, cols) a GGUF tensor for `module` (its `part`) must have; (n,) for a norm."""
    if isinstance(module, nn.Linear):
        rows = (
            module.output_sizes[part] if isinstance(module, MergedLinear) else module.out_features
        )
        return (rows, module.in_features)
    return tuple(module.weight.shape)


def _missing(model: Mistral3ForConditionalGeneration, plan: dict[str, Parts]) -> list[str]:
    """Modules (with the part count) that some tensor should fill but none does."""
    missing = []
    for name, module in model.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue
        want = len(module.output_sizes) if isinstance(module, MergedLinear) else 1
        if len(plan.get(name, [])) != want:
            missing.append(name)
    return missing


def _rope_heads(model: Mistral3ForConditionalGeneration, module: str, part: int | None) -> int:
    """Heads whose q/k rows llama.cpp permuted (0: not a q/k weight)."""
    if not module.endswith("qkv_proj") or part not in (0, 1):
        return 0
    text = model.config.text_config
    return text.num_attention_heads if part == 0 else text.num_key_value_heads


def _permuted(rows: torch.Tensor, heads: int) -> torch.Tensor:
    return rotate_half_rows(rows, heads) if heads else rows


def _raw(tensor: GGUFTensor) -> torch.Tensor:
    """The stored rows as an owned tensor: (rows, bytes per row) uint8 for block types."""
    return torch.from_numpy(np.array(tensor.data))  # a copy: the file's map is read-only


def _dense(tensor: GGUFTensor) -> torch.Tensor:
    """The tensor dequantized to float32, in its logical shape."""
    fmt = format_of_ggml_type(tensor.ggml_type)
    if fmt is not None and len(tensor.shape) == 2:
        return fmt.dequantize(_raw(tensor), tensor.shape)
    from gguf.quants import dequantize

    values = dequantize(np.asarray(tensor.data), tensor.ggml_type)
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tensor.shape)


def _quantized(
    rows: list[tuple[int, GGUFTensor]], device: torch.device, tuning: KernelTuning
) -> nn.Module | None:
    """A QuantizedLinear over the parts' GGUF bytes (a ConcatLinear if their formats differ),
    or None when some part has no block format of ours (float or IQ types)."""
    fmts = [format_of_ggml_type(t.ggml_type) for _, t in rows]
    if any(f is None for f in fmts) or any(len(t.shape) != 2 for _, t in rows):
        return None
    parts = [(f, _permuted(_raw(t), heads), t.shape) for f, (heads, t) in zip(fmts, rows)]
    if len({f.name for f, _, _ in parts}) == 1:
        fmt: QuantFormat = parts[0][0]
        packed = torch.cat([p for _, p, _ in parts]).to(device)
        shape = (sum(s[0] for _, _, s in parts), parts[0][2][1])
        return QuantizedLinear(packed, fmt, shape, None, tuning)
    log.info("GGUF: fused projection of formats %s kept as separate layers", [f.name for f in fmts])
    return ConcatLinear([QuantizedLinear(p.to(device), f, s, None, tuning) for f, p, s in parts])
