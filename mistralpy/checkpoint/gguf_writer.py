"""Write a model as llama.cpp's converter does for Mistral Small 3.1, with the `gguf` package.

Two files: the decoder as a GGUF of architecture `llama` (q/k rows permuted into llama.cpp's
interleaved RoPE order, the Tekken vocabulary as gpt2 BPE with pre "tekken", BOS/EOS, add_bos
and the chat template), and the Pixtral encoder + projector as a separate `mmproj` GGUF
(architecture `clip`, projector type pixtral, `v.*` / `mm.*` tensors, the encoder's q/k rows
permuted as well, [IMG_BREAK]'s embedding row as `v.token_embd.img_break`). checkpoint.gguf
reads both back (`load_model(file, ..., mmproj=...)`).

Tensor types: norms and biases are F32 (as llama.cpp keeps them). `outtype` f32/f16/bf16 is
every other tensor's type; a block format (q8_0, q4k, ...) quantizes the decoder's linears and
lm_head with our GGUF-exact quantizers, the same layers and width fallbacks as ISQ
(`quant.isq.should_quantize`, `compatible_format`), so the file serves exactly what
`--isq FORMAT` would; the token embedding and the vision file then keep the checkpoint's
stored float type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFType, GGUFWriter

from mistralpy.checkpoint.gguf import gguf_name, rope_heads
from mistralpy.checkpoint.loader import CheckpointError, interleave_rows, load_model
from mistralpy.model.config import (
    MMPROJ_PROJECTOR,
    PIXTRAL_PROJECTOR_ACT,
    PIXTRAL_ROPE_THETA,
    Mistral3Config,
    read_config,
)
from mistralpy.model.gguf_file import GGUFVocab
from mistralpy.model.layers import MergedLinear
from mistralpy.model.mistral3 import Mistral3ForConditionalGeneration
from mistralpy.quant.formats import QuantFormat, get_format
from mistralpy.quant.isq import compatible_format, should_quantize

FLOAT_TYPES = {
    "f32": (torch.float32, GGMLQuantizationType.F32),
    "f16": (torch.float16, GGMLQuantizationType.F16),
    "bf16": (torch.bfloat16, GGMLQuantizationType.BF16),
}
_STORED = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_VISION_PREFIXES = ("v.", "mm.")  # tensors of the mmproj file


@dataclass(frozen=True)
class GGUFFiles:
    """What `write_gguf` wrote."""

    model: Path  # the decoder, architecture llama
    mmproj: Path | None  # the vision encoder + projector; None for a text-only model


def check_outtype(outtype: str) -> str:
    """Canonical `outtype`: f32, f16, bf16 or a GGUF block format name ("q4k", "q8_0", ...);
    raises ValueError for anything else (fp8 has no GGUF type)."""
    name = outtype.lower()
    if name in FLOAT_TYPES:
        return name
    fmt = get_format(name)
    if fmt.ggml_type is None:
        raise ValueError(f"--outtype {outtype}: {fmt.name} has no GGUF tensor type")
    return fmt.name


def write_gguf(
    path: str | Path,
    out_dir: str | Path,
    outtype: str,
    vocab: GGUFVocab,
    image_stats: tuple[list[float], list[float]] | None,
) -> GGUFFiles:
    """Write the checkpoint at `path` as `<name>-<TYPE>.gguf` (+ `mmproj-<name>-<TYPE>.gguf`
    for a model with vision) into `out_dir`; image_stats: the image processor's (mean, std)."""
    outtype = check_outtype(outtype)
    src, out = Path(path), Path(out_dir)
    stored = _STORED.get(read_config(src).dtype or "bfloat16", "bf16")
    model = load_model(src, FLOAT_TYPES[stored][0], "cpu")
    config = model.config
    out.mkdir(parents=True, exist_ok=True)
    label = GGMLQuantizationType(_type_of(outtype)).name
    files = GGUFFiles(
        out / f"{src.stem}-{label}.gguf",
        out / f"mmproj-{src.stem}-{label}.gguf" if config.has_vision else None,
    )
    text = GGUFWriter(str(files.model), "llama", use_temp_file=True)
    _text_metadata(text, config, src.stem, vocab)
    mmproj = None
    if files.mmproj is not None:
        if image_stats is None:
            raise CheckpointError(f"{src}: a vision model's GGUF export needs its image stats")
        mmproj = GGUFWriter(str(files.mmproj), "clip")
        _mmproj_metadata(mmproj, config, src.stem, image_stats)
        row = model.language_model.embed_tokens.weight[vocab.tokens.index("[IMG_BREAK]")]
        _add(mmproj, "v.token_embd.img_break", _float_bytes(row, "f32"))
    for name, tensor, module in _gguf_tensors(model):
        writer = mmproj if name.startswith(_VISION_PREFIXES) else text
        assert writer is not None, name
        _add(writer, name, _encode(tensor, module, outtype, stored))
    for writer in (text, mmproj):
        if writer is not None:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    return files


def _gguf_tensors(model: Mistral3ForConditionalGeneration):
    """(GGUF name, tensor in llama.cpp's row order, our module path) of every parameter;
    a fused projection yields one tensor per part. A tied lm_head is not written."""
    tied = model.lm_head.weight is model.language_model.embed_tokens.weight
    for module_name, module in model.named_modules():
        if module_name == "lm_head" and tied:
            continue
        for param, value in module.named_parameters(recurse=False):
            merged = isinstance(module, MergedLinear)
            parts = value.split(list(module.output_sizes)) if merged else [value]
            for i, tensor in enumerate(parts):
                part = i if merged else None
                name = gguf_name(module_name, part, param)
                if name is None:
                    raise CheckpointError(f"no GGUF tensor name for {module_name}.{param}")
                heads = rope_heads(model, module_name, part) if param == "weight" else 0
                yield name, interleave_rows(tensor, heads) if heads else tensor, module_name


def _add(writer: GGUFWriter, name: str, encoded: tuple) -> None:
    data, ggml_type = encoded
    writer.add_tensor(name, data, raw_dtype=ggml_type)


def _type_of(outtype: str) -> int:
    if outtype in FLOAT_TYPES:
        return FLOAT_TYPES[outtype][1]
    return _block_type(get_format(outtype))


def _block_type(fmt: QuantFormat) -> GGMLQuantizationType:
    """The GGML type of a block format `check_outtype` let through (or its width fallback)."""
    assert fmt.ggml_type is not None, fmt.name  # check_outtype refuses fp8, the one without
    return GGMLQuantizationType(fmt.ggml_type)


def _encode(tensor: torch.Tensor, module: str, outtype: str, stored: str) -> tuple:
    """(uint8 array of the stored bytes, GGML type) of one tensor (see the module doc)."""
    if tensor.dim() == 1:
        return _float_bytes(tensor, "f32")
    if outtype in FLOAT_TYPES:
        return _float_bytes(tensor, outtype)
    fmt = compatible_format(get_format(outtype), tensor.shape[-1]) if tensor.dim() == 2 else None
    if fmt is None or not should_quantize(module):
        return _float_bytes(tensor, stored)
    return fmt.quantize(tensor.float()).numpy(), _block_type(fmt)


def _float_bytes(tensor: torch.Tensor, float_type: str) -> tuple:
    """The tensor's values in `float_type` as bytes: (..., last * itemsize) uint8, as the
    writer takes a raw type (numpy has no bfloat16)."""
    dtype, ggml = FLOAT_TYPES[float_type]
    values = tensor.detach().to("cpu", dtype).contiguous()
    return values.view(torch.uint8).numpy(), ggml


def _text_metadata(w: GGUFWriter, config: Mistral3Config, name: str, vocab: GGUFVocab) -> None:
    """llama.cpp's `llama.*` hyper-parameters and `tokenizer.*` keys."""
    text = config.text_config
    w.add_name(name)
    w.add_context_length(text.max_position_embeddings)
    w.add_embedding_length(text.hidden_size)
    w.add_block_count(text.num_hidden_layers)
    w.add_feed_forward_length(text.intermediate_size)
    w.add_head_count(text.num_attention_heads)
    w.add_head_count_kv(text.num_key_value_heads)
    w.add_key_length(text.head_dim)  # 128 for Mistral Small 3.1, not hidden / heads
    w.add_value_length(text.head_dim)
    w.add_rope_dimension_count(text.head_dim)
    w.add_rope_freq_base(text.rope_theta)
    w.add_layer_norm_rms_eps(text.rms_norm_eps)
    w.add_vocab_size(text.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_token_id)
    w.add_eos_token_id(vocab.eos_token_id)
    w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


def _mmproj_metadata(
    w: GGUFWriter, config: Mistral3Config, name: str, stats: tuple[list[float], list[float]]
) -> None:
    """llama.cpp's `clip.*` keys of a pixtral projector file."""
    vision = config.vision_config
    assert vision is not None
    w.add_type(GGUFType.MMPROJ)
    w.add_name(name)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(MMPROJ_PROJECTOR)
    w.add_vision_projection_dim(config.text_config.hidden_size)
    w.add_vision_image_size(vision.image_size)
    w.add_vision_patch_size(vision.patch_size)
    w.add_vision_embedding_length(vision.hidden_size)
    w.add_vision_feed_forward_length(vision.intermediate_size)
    w.add_vision_block_count(vision.num_hidden_layers)
    w.add_vision_head_count(vision.num_attention_heads)
    w.add_vision_attention_layernorm_eps(vision.rms_norm_eps)
    w.add_vision_image_mean(list(stats[0]))
    w.add_vision_image_std(list(stats[1]))
    w.add_vision_spatial_merge_size(config.spatial_merge_size)
    if vision.hidden_act == "silu":
        w.add_vision_use_silu(True)
    else:
        w.add_vision_use_gelu(True)
    _check_fixed(config)


def _check_fixed(config: Mistral3Config) -> None:
    """Values the mmproj cannot state and its readers (ours, llama.cpp's) fix: refuse a model
    whose own differ, instead of writing a file that computes something else."""
    vision = config.vision_config
    assert vision is not None
    if vision.rope_theta != PIXTRAL_ROPE_THETA or config.vision_feature_layer != -1:
        raise CheckpointError("mmproj: only Pixtral's RoPE base 10000 and last-layer features")
    if config.projector_hidden_act != PIXTRAL_PROJECTOR_ACT:
        raise CheckpointError(f"mmproj: projector act {config.projector_hidden_act} is not gelu")
    if vision.hidden_act not in ("silu", "gelu"):
        raise CheckpointError(f"mmproj: vision act {vision.hidden_act} is not silu or gelu")
