"""Random-weight Mistral Small 3.1 (mistral3) checkpoints in the Hugging Face layout.

    python -m mistralpy.testing.tiny_checkpoint OUT [--preset tiny|small] [--dtype ...] [--seed N]

Real architecture and vocabulary (Tekken v7 from mistral-common's data: 131072 ids, 1000
special tokens), small shapes. Weights are written by our own code from torch's RNG;
transformers (Mistral3ForConditionalGeneration, AutoTokenizer, AutoProcessor) and
mistral-common read the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mistralpy.model.config import MODEL_DTYPES
from mistralpy.paths import mistralpy_cache_dir
from mistralpy.processing.chat_template import packaged_template_path
from mistralpy.processing.tokenizer import tekken_special_tokens, tekken_to_hf_tokenizer

VOCAB_SIZE = 131072
NUM_SPECIAL_TOKENS = 1000
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP statistics, as Mistral Small 3.1
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Preset:
    """Shapes of a random checkpoint (the ratios of Mistral Small 3.1, scaled down)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # heads * head_dim != hidden_size on purpose, as in the real model
    intermediate_size: int
    vision_hidden_size: int
    vision_layers: int
    vision_heads: int
    vision_intermediate_size: int
    image_size: int  # longest image edge in pixels (vision_config.image_size)
    dtype: str  # default weight dtype


PRESETS = {
    "tiny": Preset(64, 2, 4, 2, 32, 128, 32, 2, 2, 64, 224, "float32"),
    "small": Preset(512, 8, 8, 2, 128, 1536, 256, 4, 4, 1024, 448, "bfloat16"),
}
# Mistral-Small-3.1-24B's own shapes (model.config.mistral_small_3_1_config): for a config-only
# directory that `serve --load-format dummy` reads; never written with weights (48 GB).
REAL_SHAPES = Preset(5120, 40, 32, 8, 128, 32768, 1024, 24, 16, 4096, 1540, "bfloat16")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}, choose from {sorted(PRESETS)}")
    return PRESETS[name]


def tekken_data(preset: Preset) -> dict[str, Any]:
    """tekken.json content: v7 config, special tokens, mistral-common's shipped vocabulary."""
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    base = json.loads(source.read_text(encoding="utf-8"))
    inner = VOCAB_SIZE - NUM_SPECIAL_TOKENS
    config = {
        **base["config"],
        "num_vocab_tokens": inner,
        "default_vocab_size": VOCAB_SIZE,
        "default_num_special_tokens": NUM_SPECIAL_TOKENS,
        "version": "v7",
    }
    data = {"config": config, "vocab": base["vocab"][:inner], "special_tokens": []}
    specials = tekken_special_tokens(data | {"special_tokens": None})
    data["special_tokens"] = [
        {"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)
    ]
    data["image"] = {
        "image_patch_size": PATCH_SIZE,
        "max_image_size": preset.image_size,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
    }
    return data


def model_config(preset: Preset, dtype: str) -> dict[str, Any]:
    """config.json in transformers' Mistral3Config layout (rope given both ways: rope_theta as
    the hub files have it, rope_parameters as transformers 5 writes it)."""
    p = preset
    text = {
        "model_type": "mistral",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 11,
        "use_cache": True,
    }
    vision = {
        "model_type": "pixtral",
        "hidden_size": p.vision_hidden_size,
        "intermediate_size": p.vision_intermediate_size,
        "num_hidden_layers": p.vision_layers,
        "num_attention_heads": p.vision_heads,
        "head_dim": p.vision_hidden_size // p.vision_heads,
        "num_channels": 3,
        "image_size": p.image_size,
        "patch_size": PATCH_SIZE,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        "attention_dropout": 0.0,
    }
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": 10,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "multimodal_projector_bias": False,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "torch_dtype": dtype,
        # The layout of transformers >= 5; also tells transformers that the tokenizer.json
        # regex needs no "fix_mistral_regex" patch (it is Tekken's own pattern).
        "transformers_version": "5.0.0",
    }


def weight_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, with the names transformers 5 saves for mistral3."""
    p = preset
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (VOCAB_SIZE, p.hidden_size),
        "language_model.model.norm.weight": (p.hidden_size,),
        "language_model.lm_head.weight": (VOCAB_SIZE, p.hidden_size),
    }
    q, kv = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    for i in range(p.num_hidden_layers):
        pre = f"language_model.model.layers.{i}."
        shapes |= {
            pre + "input_layernorm.weight": (p.hidden_size,),
            pre + "post_attention_layernorm.weight": (p.hidden_size,),
            pre + "self_attn.q_proj.weight": (q, p.hidden_size),
            pre + "self_attn.k_proj.weight": (kv, p.hidden_size),
            pre + "self_attn.v_proj.weight": (kv, p.hidden_size),
            pre + "self_attn.o_proj.weight": (p.hidden_size, q),
            pre + "mlp.gate_proj.weight": (p.intermediate_size, p.hidden_size),
            pre + "mlp.up_proj.weight": (p.intermediate_size, p.hidden_size),
            pre + "mlp.down_proj.weight": (p.hidden_size, p.intermediate_size),
        }
    vh, vi = p.vision_hidden_size, p.vision_intermediate_size
    shapes |= {
        "vision_tower.patch_conv.weight": (vh, 3, PATCH_SIZE, PATCH_SIZE),
        "vision_tower.ln_pre.weight": (vh,),
    }
    for i in range(p.vision_layers):
        pre = f"vision_tower.transformer.layers.{i}."
        shapes |= {pre + f"attention.{n}_proj.weight": (vh, vh) for n in "qkvo"}
        shapes |= {
            pre + "attention_norm.weight": (vh,),
            pre + "ffn_norm.weight": (vh,),
            pre + "feed_forward.gate_proj.weight": (vi, vh),
            pre + "feed_forward.up_proj.weight": (vi, vh),
            pre + "feed_forward.down_proj.weight": (vh, vi),
        }
    merge = SPATIAL_MERGE_SIZE**2
    shapes |= {
        "multi_modal_projector.norm.weight": (vh,),
        "multi_modal_projector.patch_merger.merging_layer.weight": (vh, vh * merge),
        "multi_modal_projector.linear_1.weight": (p.hidden_size, vh),
        "multi_modal_projector.linear_2.weight": (p.hidden_size, p.hidden_size),
    }
    return shapes


def random_weights(preset: Preset, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random weights: matrices N(0, 1/fan_in) so every layer moves the residual stream (and
    greedy outputs vary), embeddings N(0, 1), norm scales 1 + N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in weight_shapes(preset).items():
        w = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) == 1:
            w = 1.0 + 0.1 * w
        elif "embed_tokens" not in name:
            w = w / math.sqrt(math.prod(shape[1:]))
        out[name] = w.to(dtype).contiguous()
    return out


def _tokenizer_config(template: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "PixtralProcessor",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": template,
    }


def _processor_files(preset: Preset) -> dict[str, dict[str, Any]]:
    image_processor = {
        "image_processor_type": "PixtralImageProcessor",
        "processor_class": "PixtralProcessor",
        "patch_size": PATCH_SIZE,
        "size": {"longest_edge": preset.image_size},
        "do_resize": True,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_convert_rgb": True,
        # The hub's Mistral Small 3.1 file carries it; mistral.rs panics on images without it.
        "default_to_square": True,
    }
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    return {"preprocessor_config.json": image_processor, "processor_config.json": processor}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out: str | Path, preset: str | Preset = "tiny") -> Path:
    """Only the tokenizer part: tekken.json, tokenizer.json, tokenizer_config.json and
    chat_template.jinja (for tests that need no weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    template = packaged_template_path().read_text(encoding="utf-8")
    tekken = tekken_data(preset if isinstance(preset, Preset) else get_preset(preset))
    _write_json(out / "tekken.json", tekken)
    tekken_to_hf_tokenizer(tekken).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(template))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def write_config_files(out: str | Path, shapes: Preset, dtype: str) -> Path:
    """A checkpoint directory without weights (tokenizer, processor, config.json): enough for
    `load_format="dummy"`, e.g. REAL_SHAPES for a server at full scale without a download."""
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}, choose from {MODEL_DTYPES}")
    out = Path(out)
    write_tokenizer_files(out, shapes)
    for name, value in _processor_files(shapes).items():
        _write_json(out / name, value)
    _write_json(out / "config.json", model_config(shapes, dtype))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 11},
    )
    return out


def write_checkpoint(
    out: str | Path, preset: str = "tiny", dtype: str | None = None, seed: int = 0
) -> Path:
    """Write a complete random checkpoint into directory `out` (created); returns it."""
    from safetensors.torch import save_file

    shapes = get_preset(preset)
    dtype = dtype or shapes.dtype
    out = write_config_files(out, shapes, dtype)
    weights = random_weights(shapes, getattr(torch, dtype), seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def ensure_demo_checkpoint(preset: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """The demo checkpoint `<cache>/demo-<preset>`, built once (atomically) and reused."""
    get_preset(preset)
    root = mistralpy_cache_dir(cache_dir)
    target = root / f"demo-{preset}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{preset}-", dir=root))
    try:
        write_checkpoint(tmp, preset=preset)
        os.rename(tmp, target)  # atomic: readers see a complete checkpoint or none
    except OSError:
        if not (target / "model.safetensors").is_file():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_checkpoint(args.out, preset=args.preset, dtype=args.dtype, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
