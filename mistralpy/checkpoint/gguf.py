"""Build a model from a GGUF file (llama.cpp's `llama` architecture): a text-only decoder, or
with an `mmproj` file (llama.cpp's pixtral projector: `v.*` encoder, `mm.*` projector
tensors) the whole mistral3 model.

GGUF tensor names map to our modules (`blk.N.attn_q` -> part 0 of
`language_model.layers.N.self_attn.qkv_proj`, `v.blk.N.attn_q` -> part 0 of
`vision_tower.transformer.layers.N.attention.qkv_proj`, ...). A tensor whose GGUF type is one of our
block formats (quant.formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K) keeps its bytes: the
Linear becomes a QuantizedLinear over them with the kernel ISQ would pick, no dequantize /
requantize round trip. A fused projection concatenates its parts' rows when they share a
format, else it becomes a ConcatLinear of per-part layers (Q4_K_M files mix Q4_K and Q6_K).
llama.cpp stores q/k rows (the encoder's too) in interleaved RoPE order; they are permuted back
to rotate-half order, byte rows included (a row is quantized on its own, so rows move whole).

Norms and the token embedding (a lookup needs float rows) are dequantized into the model dtype;
a tied lm_head (no `output.weight`) keeps the embedding's bytes. `dequantize=True` (an explicit
--dtype) or an ISQ format dequantizes every Linear first (ISQ then quantizes in its own format).
Types we have no block format for (IQ*, ...) are dequantized by the gguf package.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mistralpy.checkpoint.loader import (
    _empty_model,
    _Filler,
    _isq_factory,
    _Target,
    check_match,
    expected_shape,
    rotate_half_rows,
    submodule,
)
from mistralpy.model.config import config_from_gguf
from mistralpy.model.gguf_file import GGUFModelFile, GGUFTensor, open_gguf
from mistralpy.model.layers import MergedLinear
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration
from mistralpy.model.parallel import SINGLE
from mistralpy.quant.formats import format_of_ggml_type
from mistralpy.quant.isq import ConcatLinear, QuantizedLinear
from mistralpy.quant.tuning import KernelTuning

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
# the same for a Pixtral block of an mmproj file (`v.blk.N.*`, llama.cpp's MODEL_TENSOR.V_ENC_*)
_VISION_LAYER_TENSORS: dict[str, tuple[str, int | None]] = {
    "ln1": ("attention_norm", None),
    "ln2": ("ffn_norm", None),
    "attn_q": ("attention.qkv_proj", 0),
    "attn_k": ("attention.qkv_proj", 1),
    "attn_v": ("attention.qkv_proj", 2),
    "attn_out": ("attention.o_proj", None),
    "ffn_gate": ("feed_forward.gate_up_proj", 0),
    "ffn_up": ("feed_forward.gate_up_proj", 1),
    "ffn_down": ("feed_forward.down_proj", None),
}
# GGUF block prefix -> (our module prefix, its per-layer table)
_BLOCKS = {
    "blk": ("language_model.layers", _LAYER_TENSORS),
    "v.blk": ("vision_tower.transformer.layers", _VISION_LAYER_TENSORS),
}
_GLOBAL_TENSORS = {
    "token_embd": "language_model.embed_tokens",
    "output_norm": "language_model.norm",
    "output": "lm_head",
    # mmproj (llama.cpp's pixtral projector)
    "v.patch_embd": "vision_tower.patch_conv",
    "v.pre_ln": "vision_tower.ln_pre",
    "mm.input_norm": "multi_modal_projector.norm",
    "mm.patch_merger": "multi_modal_projector.patch_merger.merging_layer",
    "mm.1": "multi_modal_projector.linear_1",
    "mm.2": "multi_modal_projector.linear_2",
}
# llama.cpp adds [IMG_BREAK]'s input embedding to the mmproj (its decoder does not look it
# up); ours embeds that token from the text model's table, which holds the same row.
IMG_BREAK_TENSOR = "v.token_embd.img_break"
_BLOCK = re.compile(r"^(blk|v\.blk)\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")

Parts = list[tuple[int | None, GGUFTensor]]  # (part index, tensor), in part order


@dataclass
class _Plan:
    """Our module path -> its GGUF weight parts, and the biases of those that have one."""

    weights: dict[str, Parts] = field(default_factory=dict)
    biases: dict[str, GGUFTensor] = field(default_factory=dict)


def load_gguf_model(
    path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    isq: str | None = None,
    dequantize: bool = False,
    mmproj: str | None = None,
) -> Mistral3ForConditionalGeneration:
    """Model of the GGUF file `path` (any shard of a split model) on `device`, with the
    vision encoder + projector of the llama.cpp `mmproj` file if given; activations and
    dense tensors in `dtype`. See the module doc for what stays quantized."""
    gguf = open_gguf(path)
    files = [gguf] if mmproj is None else [gguf, open_gguf(mmproj)]
    config = config_from_gguf(*files)
    device = torch.device(device)
    model = _empty_model(config, dtype, device, SINGLE)
    filler = _Filler(model, _isq_factory(isq))
    keep = not dequantize and isq is None
    tuning = KernelTuning()  # one load: launch configs timed once per shape
    plan = _plan(files, model)
    for module, parts in plan.weights.items():
        target = model.get_submodule(module)
        if not isinstance(target, nn.Linear):
            filler.put(_Target(module, "weight"), _dense(parts[0][1]))
            continue
        bias = _dense(plan.biases[module]).to(device, dtype) if module in plan.biases else None
        rows = [(rope_heads(model, module, part), t) for part, t in parts]
        layer = _quantized(rows, bias, device, tuning) if keep else None
        if layer is None:
            weight = torch.cat([_permuted(_dense(t), heads) for heads, t in rows])
            filler.finalize(module, weight.to(device, dtype), bias)
        else:
            model.set_submodule(module, layer)
    if config.tie_word_embeddings:
        embedding = gguf.tensors["token_embd.weight"]
        layer = _quantized([(0, embedding)], None, device, tuning) if keep else None
        if layer is None:
            filler.tie_lm_head()
        else:
            model.lm_head = layer
    return filler.finish()


def _plan(files: list[GGUFModelFile], model: Mistral3ForConditionalGeneration) -> _Plan:
    """Our module paths -> their GGUF tensors (all files); raises CheckpointError naming every
    unknown, missing or misshapen tensor."""
    plan = _Plan()
    unexpected, wrong = [], []
    for name, tensor in [(n, t) for f in files for n, t in f.tensors.items()]:
        if name == IMG_BREAK_TENSOR:
            continue
        target = _target(name)
        if target is None or submodule(model, target[0]) is None:
            unexpected.append(name)
            continue
        module, part, param = target
        expected = expected_shape(model.get_submodule(module), param, part)
        if tensor.shape != expected:
            wrong.append(f"{name} {tensor.shape} != {expected}")
        if param == "bias":
            plan.biases[module] = tensor
        else:
            plan.weights.setdefault(module, []).append((part, tensor))
    for parts in plan.weights.values():
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
    missing = _missing(model, plan)
    names = " + ".join(f.path.name for f in files)
    check_match(f"GGUF {names} does not match its metadata", missing, unexpected, wrong)
    return plan


def _target(name: str) -> tuple[str, int | None, str] | None:
    """(our module path, part, "weight" | "bias") of GGUF tensor `name`, or None for a name
    we do not know."""
    base, _, param = name.rpartition(".")
    if base in _GLOBAL_TENSORS and param in ("weight", "bias"):
        return _GLOBAL_TENSORS[base], None, param
    m = _BLOCK.match(name)
    if m is None:
        return None
    prefix, table = _BLOCKS[m[1]]
    if m[3] not in table:
        return None
    module, part = table[m[3]]
    return f"{prefix}.{m[2]}.{module}", part, m[4]


def gguf_name(module: str, part: int | None, param: str) -> str | None:
    """GGUF tensor name of our `module`'s `param` (its `part` of a fused Linear): the
    inverse of `_target`; None for a module GGUF has no tensor for."""
    for gguf, ours in _GLOBAL_TENSORS.items():
        if ours == module:
            return f"{gguf}.{param}"
    for gguf_prefix, (prefix, table) in _BLOCKS.items():
        m = re.match(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$", module)
        if m is None:
            continue
        for kind, place in table.items():
            if place == (m[2], part):
                return f"{gguf_prefix}.{m[1]}.{kind}.{param}"
    return None


def _missing(model: Mistral3ForConditionalGeneration, plan: _Plan) -> list[str]:
    """Modules (every part of a fused one) or biases that some tensor should fill but none
    does."""
    missing = []
    for name, module in model.named_modules():
        if not list(module.parameters(recurse=False)):
            continue
        if name == "lm_head" and model.config.tie_word_embeddings:
            continue
        want = len(module.output_sizes) if isinstance(module, MergedLinear) else 1
        if len(plan.weights.get(name, [])) != want:
            missing.append(name)
        if getattr(module, "bias", None) is not None and name not in plan.biases:
            missing.append(f"{name}.bias")
    return missing


def rope_heads(model: Mistral3ForConditionalGeneration, module: str, part: int | None) -> int:
    """Heads whose q/k rows llama.cpp permutes into interleaved order (0: not a q/k weight);
    its converter permutes the Pixtral encoder's q/k too (all heads: no GQA there)."""
    if not module.endswith("qkv_proj") or part not in (0, 1):
        return 0
    vision = model.config.vision_config
    if module.startswith("vision_tower."):
        assert vision is not None, "a vision_tower module exists only with a vision config"
        return vision.num_attention_heads
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
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(np.asarray(tensor.data), GGMLQuantizationType(tensor.ggml_type))
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(tensor.shape)


def _quantized(
    rows: list[tuple[int, GGUFTensor]],
    bias: torch.Tensor | None,
    device: torch.device,
    tuning: KernelTuning,
) -> nn.Module | None:
    """A QuantizedLinear over the parts' GGUF bytes (a ConcatLinear if their formats differ),
    or None when some part has no block format of ours (float or IQ types)."""
    fmts = [f for _, t in rows if (f := format_of_ggml_type(t.ggml_type)) is not None]
    if len(fmts) != len(rows) or any(len(t.shape) != 2 for _, t in rows):
        return None
    parts = [
        (f, _permuted(_raw(t), heads), (t.shape[0], t.shape[1]))
        for f, (heads, t) in zip(fmts, rows)
    ]
    if len({f.name for f, _, _ in parts}) == 1:
        fmt = parts[0][0]
        packed = torch.cat([p for _, p, _ in parts]).to(device)
        shape = (sum(s[0] for _, _, s in parts), parts[0][2][1])
        return QuantizedLinear(packed, fmt, shape, bias, tuning)
    if bias is not None:  # no fused projection has a bias (q/k/v and gate/up are bias-free)
        return None
    log.info("GGUF: fused projection of formats %s kept as separate layers", [f.name for f in fmts])
    return ConcatLinear([QuantizedLinear(p.to(device), f, s, None, tuning) for f, p, s in parts])
