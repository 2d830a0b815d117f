"""Model configuration for mistral3 (Pixtral vision encoder + projector + Mistral decoder),
and for the text-only decoders that share its decoder (`llama` / `mistral`: no vision tower).

Every value is read from the checkpoint's `config.json` (HF layout), `params.json` (Mistral's
native layout) or GGUF metadata; nothing the file states is derived. Values we cannot honour
raise `ConfigError` at load time instead of silently producing a different model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mistralpy.errors import UserError
from mistralpy.model.gguf_file import GGUFModelFile, open_gguf

# the model dtypes a user may ask for, by their torch names (torch.float32, ...)
MODEL_DTYPES = ("float32", "bfloat16", "float16")

# Activation names we implement (transformers' ACT2FN spelling).
SUPPORTED_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")


class ConfigError(UserError):
    """The model configuration is malformed, inconsistent or asks for something unsupported."""


@dataclass(frozen=True)
class TextConfig:
    """The Mistral decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # stated by the file: 128 for Mistral Small 3.1 (not hidden / heads = 160)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    hidden_act: str = "silu"

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class VisionConfig:
    """The Pixtral vision encoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    num_channels: int
    image_size: int  # longest side in pixels after resizing
    patch_size: int
    rope_theta: float
    hidden_act: str
    rms_norm_eps: float = 1e-5  # not in the file: fixed in Pixtral (transformers hard-codes it)


@dataclass(frozen=True)
class Mistral3Config:
    """The whole model: vision tower, projector, language model."""

    text_config: TextConfig
    vision_config: VisionConfig | None  # None: a text-only decoder (llama / mistral)
    spatial_merge_size: int
    image_token_index: int | None  # None for a text-only decoder
    projector_hidden_act: str
    multimodal_projector_bias: bool
    vision_feature_layer: int = -1
    tie_word_embeddings: bool = False  # only used when the checkpoint has no lm_head weight
    dtype: str | None = None  # the checkpoint's stored dtype name, e.g. "bfloat16"

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> Mistral3Config:
        """Config from a parsed HF `config.json` of `model_type` mistral3."""
        return _from_hf_dict(cfg)

    @classmethod
    def from_mistral_params(cls, params: dict[str, Any]) -> Mistral3Config:
        """Config from a parsed Mistral-native `params.json` (with a `vision_encoder` section)."""
        return _from_mistral_params(params)

    @classmethod
    def text_only(
        cls, text: TextConfig, tie_word_embeddings: bool, dtype: str | None = None
    ) -> Mistral3Config:
        """A decoder without vision tower or projector (their fields are unused)."""
        return cls(text, None, 1, None, "gelu", False, -1, tie_word_embeddings, dtype)

    @property
    def has_vision(self) -> bool:
        return self.vision_config is not None


def read_config(path: str | Path, mmproj: str | Path | None = None) -> Mistral3Config:
    """Config of the checkpoint directory `path` (config.json, else params.json) or of a file
    (a config.json / params.json, or a GGUF model; `mmproj`: its llama.cpp vision file)."""
    path = Path(path)
    if path.suffix == ".gguf":
        return config_from_gguf(open_gguf(path), open_gguf(mmproj) if mmproj else None)
    if mmproj is not None:
        raise ConfigError(f"--mmproj goes with a GGUF model, not with {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            path = path / "config.json"
        elif (path / "params.json").is_file():
            path = path / "params.json"
        else:
            raise ConfigError(f"no config.json or params.json in {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read model config {path}: {e}") from e
    if path.name == "params.json":
        return Mistral3Config.from_mistral_params(data)
    return Mistral3Config.from_hf_dict(data)


def mistral_small_3_1_config() -> Mistral3Config:
    """The real Mistral-Small-3.1-24B shapes, for dummy-weight benchmarks without a download."""
    text = TextConfig(
        vocab_size=131072,
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1e9,
        max_position_embeddings=131072,
    )
    vision = VisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        head_dim=64,
        num_channels=3,
        image_size=1540,
        patch_size=14,
        rope_theta=1e4,
        hidden_act="silu",
    )
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        spatial_merge_size=2,
        image_token_index=10,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        dtype="bfloat16",
    )


# ---------------------------------------------------------------------------------------------
# HF config.json


# HF model types served by the text-only decoder (same layers, names under `model.`)
TEXT_ONLY_MODEL_TYPES = ("llama", "mistral")


def _from_hf_dict(cfg: dict[str, Any]) -> Mistral3Config:
    model_type = cfg.get("model_type")
    if model_type in TEXT_ONLY_MODEL_TYPES:
        return _hf_text_only(cfg)
    if model_type != "mistral3":
        raise ConfigError(
            f"model_type is {model_type!r}; supported: 'mistral3', {TEXT_ONLY_MODEL_TYPES}"
        )
    text = _require(cfg, "text_config", "config")
    vision = _require(cfg, "vision_config", "config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConfigError("text_config and vision_config must be objects")
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Mistral3Config(
        text_config=_hf_text(text),
        vision_config=_hf_vision(vision),
        spatial_merge_size=_int(cfg, "spatial_merge_size", "config"),
        image_token_index=_int(cfg, "image_token_index", "config"),
        projector_hidden_act=str(_require(cfg, "projector_hidden_act", "config")),
        multimodal_projector_bias=bool(_require(cfg, "multimodal_projector_bias", "config")),
        vision_feature_layer=_feature_layer(_require(cfg, "vision_feature_layer", "config")),
        tie_word_embeddings=bool(tie),
        dtype=cfg.get("dtype", cfg.get("torch_dtype")),
    )


def _hf_text_only(cfg: dict[str, Any]) -> Mistral3Config:
    """`LlamaForCausalLM` / `MistralForCausalLM` config.json: the decoder fields at top level."""
    for key, unsupported in (("attention_bias", True), ("mlp_bias", True)):
        if cfg.get(key, False) == unsupported:
            raise ConfigError(f"{key}={unsupported} is not supported (bias-free linears only)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise ConfigError("pretraining_tp != 1 is not supported")
    text = _hf_text(cfg, where="config", model_type=cfg["model_type"])
    tie = bool(cfg.get("tie_word_embeddings", cfg["model_type"] == "llama"))
    return Mistral3Config.text_only(text, tie, cfg.get("dtype", cfg.get("torch_dtype")))


def _hf_text(
    text: dict[str, Any], where: str = "text_config", model_type: str = "mistral"
) -> TextConfig:
    if text.get("model_type", model_type) != model_type:
        raise ConfigError(f"{where}.model_type is {text.get('model_type')!r}, not {model_type!r}")
    _check_no_sliding_window(text.get("sliding_window"), text.get("max_position_embeddings"))
    if text.get("layer_types") is not None and set(text["layer_types"]) != {"full_attention"}:
        raise ConfigError(f"{where}.layer_types (mixed attention kinds) is not supported")
    heads = _int(text, "num_attention_heads", where)
    return TextConfig(
        vocab_size=_int(text, "vocab_size", where),
        hidden_size=_int(text, "hidden_size", where),
        intermediate_size=_int(text, "intermediate_size", where),
        num_hidden_layers=_int(text, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=_int(text, "num_key_value_heads", where)
        if "num_key_value_heads" in text or model_type == "mistral"
        else heads,  # transformers' llama default: no GQA
        head_dim=_head_dim(text, where, heads),
        rms_norm_eps=_float(text, "rms_norm_eps", where),
        rope_theta=_rope_theta(text, where, ("default",)),
        max_position_embeddings=_int(text, "max_position_embeddings", where),
        hidden_act=str(text.get("hidden_act", "silu")),
    )


def _hf_vision(vision: dict[str, Any]) -> VisionConfig:
    where = "vision_config"
    if vision.get("model_type", "pixtral") != "pixtral":
        raise ConfigError(
            f"vision_config.model_type is {vision.get('model_type')!r}, not 'pixtral'"
        )
    hidden = _int(vision, "hidden_size", where)
    heads = _int(vision, "num_attention_heads", where)
    head_dim = _pixtral_head_dim(hidden, heads, where)
    # A different stated head_dim would be ignored upstream (Pixtral always uses hidden // heads).
    if vision.get("head_dim", head_dim) != head_dim:
        raise ConfigError(f"vision_config.head_dim {vision['head_dim']} != hidden_size / heads")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=_int(vision, "intermediate_size", where),
        num_hidden_layers=_int(vision, "num_hidden_layers", where),
        num_attention_heads=heads,
        head_dim=head_dim,
        num_channels=_int(vision, "num_channels", where) if "num_channels" in vision else 3,
        image_size=_square(vision, "image_size", where),
        patch_size=_square(vision, "patch_size", where),
        rope_theta=_rope_theta(vision, where, ("default", "axial")),
        hidden_act=str(_require(vision, "hidden_act", where)),
    )


def _pixtral_head_dim(hidden: int, heads: int, where: str) -> int:
    """Pixtral's head size: always hidden / heads, whatever the file."""
    if hidden % heads:
        raise ConfigError(f"{where}: hidden size {hidden} is not divisible by {heads} heads")
    return hidden // heads


def _head_dim(text: dict[str, Any], where: str, heads: int) -> int:
    """Stated head_dim; a text-only config.json may omit it, meaning hidden / heads there
    (mistral3's text_config must state it: 128 for Mistral Small 3.1, not 5120 / 32)."""
    if text.get("head_dim") is not None or where == "text_config":
        return _int(text, "head_dim", where)
    hidden = _int(text, "hidden_size", where)
    if hidden % heads:
        raise ConfigError(f"{where}: no head_dim and hidden_size {hidden} % heads {heads} != 0")
    return hidden // heads


def _rope_theta(section: dict[str, Any], where: str, allowed_types: tuple[str, ...]) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (+ `rope_scaling`)."""
    params = section.get("rope_parameters")
    if params is None:
        scaling = section.get("rope_scaling")
        if scaling is not None:
            params = {**scaling, "rope_theta": section.get("rope_theta")}
        else:
            params = {"rope_type": "default", "rope_theta": section.get("rope_theta")}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.rope_parameters must be an object")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in allowed_types:
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported ({allowed_types})")
    return _float(params, "rope_theta", f"{where}.rope_parameters")


def _feature_layer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == -1:
        return -1
    raise ConfigError(f"vision_feature_layer={value!r} is not supported; only -1 (the last layer)")


def _check_no_sliding_window(window: Any, max_pos: Any) -> None:
    # Mistral Small 3.1 attends over the full context; a real window would change the numerics.
    if window is None:
        return
    if isinstance(max_pos, int) and int(window) >= max_pos:
        return
    raise ConfigError(f"sliding_window={window!r} is not supported (full attention only)")


# ---------------------------------------------------------------------------------------------
# Mistral-native params.json


def _from_mistral_params(params: dict[str, Any]) -> Mistral3Config:
    where = "params.json"
    vision = _require(params, "vision_encoder", where)
    if not isinstance(vision, dict):
        raise ConfigError("params.json vision_encoder must be an object")
    max_pos = int(params.get("max_seq_len", params.get("max_position_embeddings", 131072)))
    _check_no_sliding_window(params.get("sliding_window"), max_pos)
    if params.get("rope_scaling") or params.get("yarn"):
        raise ConfigError("params.json: rope scaling is not supported")
    text = TextConfig(
        vocab_size=_int(params, "vocab_size", where),
        hidden_size=_int(params, "dim", where),
        intermediate_size=_int(params, "hidden_dim", where),
        num_hidden_layers=_int(params, "n_layers", where),
        num_attention_heads=_int(params, "n_heads", where),
        num_key_value_heads=_int(params, "n_kv_heads", where),
        head_dim=_int(params, "head_dim", where),
        rms_norm_eps=_float(params, "norm_eps", where),
        rope_theta=_float(params, "rope_theta", where),
        max_position_embeddings=max_pos,
    )
    return Mistral3Config(
        text_config=text,
        vision_config=_native_vision(vision),
        spatial_merge_size=_int(vision, "spatial_merge_size", "vision_encoder"),
        image_token_index=int(vision.get("image_token_id", 10)),
        projector_hidden_act="gelu",  # Mistral's vision-language adapter is Linear-GELU-Linear
        multimodal_projector_bias=bool(vision.get("adapter_bias", False)),
        tie_word_embeddings=False,
    )


def _native_vision(vision: dict[str, Any]) -> VisionConfig:
    where = "vision_encoder"
    if vision.get("mm_projector_id", "patch_merge") != "patch_merge":
        raise ConfigError(f"{where}.mm_projector_id {vision.get('mm_projector_id')!r} unsupported")
    if vision.get("add_pre_mm_projector_layer_norm", True) is not True:
        raise ConfigError(f"{where}.add_pre_mm_projector_layer_norm=false is not supported")
    hidden = _int(vision, "hidden_size", where)
    heads = _int(vision, "num_attention_heads", where)
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=_int(vision, "intermediate_size", where),
        num_hidden_layers=_int(vision, "num_hidden_layers", where),
        num_attention_heads=heads,
        head_dim=_pixtral_head_dim(hidden, heads, where),
        num_channels=int(vision.get("num_channels", 3)),
        image_size=int(vision.get("image_size", vision.get("max_image_size", 0))),
        patch_size=_int(vision, "patch_size", where),
        rope_theta=_float(vision, "rope_theta", where),
        hidden_act="silu",  # the native Pixtral encoder's feed-forward is SiLU-gated
    )


# ---------------------------------------------------------------------------------------------
# GGUF metadata (llama.cpp keys: `<arch>.block_count`, `<arch>.attention.head_count`, ...)

GGUF_ARCHITECTURES = ("llama",)  # llama.cpp writes Mistral (Small 3.1 text too) as `llama`


def config_from_gguf(model: GGUFModelFile, mmproj: GGUFModelFile | None = None) -> Mistral3Config:
    """Config of a parsed GGUF model: text-only, or with
    the Pixtral encoder + projector of a parsed llama.cpp `mmproj` file (see `_gguf_vision`).

    Defaults are llama.cpp's for keys a file may omit: KV heads = heads, head_dim = hidden /
    heads (`key_length` states it otherwise: 128 for Mistral Small 3.1), RoPE base 10000.
    Tied embeddings: the file has no `output.weight`.
    """
    arch = model.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported ({GGUF_ARCHITECTURES})")
    meta = {k.removeprefix(f"{arch}."): v for k, v in model.metadata.items()}
    where = f"GGUF {arch}"
    heads = _int(meta, "attention.head_count", where)
    hidden = _int(meta, "embedding_length", where)
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    if int(meta.get("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{where}: value_length != key_length is not supported")
    if int(meta.get("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"{where}: partial rotary (rope.dimension_count) is not supported")
    if meta.get("rope.scaling.type", "none") not in ("none", None) or "rope_freqs.weight" in (
        model.tensors
    ):
        raise ConfigError(f"{where}: RoPE scaling is not supported")
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    vocab = meta.get("vocab_size", len(tokens) if tokens is not None else None)
    text = TextConfig(
        vocab_size=_int({"vocab_size": vocab}, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_int(meta, "feed_forward_length", where),
        num_hidden_layers=_int(meta, "block_count", where),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_float(meta, "attention.layer_norm_rms_epsilon", where),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        max_position_embeddings=_int(meta, "context_length", where),
    )
    tie = "output.weight" not in model.tensors
    if mmproj is None:
        return Mistral3Config.text_only(text, tie_word_embeddings=tie)
    return _gguf_vision(mmproj, text, tie, list(model.metadata.get("tokenizer.ggml.tokens") or []))


# llama.cpp's mmproj files: general.architecture "clip", keys `clip.*` (gguf.Keys.Clip*)
MMPROJ_PROJECTOR = "pixtral"
# Neither file states these; llama.cpp's clip.cpp fixes them for its pixtral projector (and
# Mistral Small 3.1's config.json says the same).
PIXTRAL_ROPE_THETA = 10000.0
PIXTRAL_PROJECTOR_ACT = "gelu"
_IMAGE_TOKEN = "[IMG]"


def _gguf_vision(
    mmproj: GGUFModelFile, text: TextConfig, tie: bool, tokens: list[str]
) -> Mistral3Config:
    """mistral3 config of a text GGUF (`text`, its vocabulary `tokens`) and a Pixtral mmproj;
    raises ConfigError when the mmproj is of another kind or does not fit the text model."""
    meta, where = mmproj.metadata, f"mmproj {mmproj.path.name}"
    kind = meta.get("clip.projector_type", meta.get("clip.vision.projector_type"))
    if meta.get("general.architecture") != "clip" or not meta.get("clip.has_vision_encoder"):
        raise ConfigError(f"{where} is not a llama.cpp vision projector (clip) file")
    if kind != MMPROJ_PROJECTOR:
        raise ConfigError(f"{where}: projector type {kind!r}; only {MMPROJ_PROJECTOR!r} is served")
    vision = {k.removeprefix("clip.vision."): v for k, v in meta.items()}
    projects_to = _int(vision, "projection_dim", where)
    if projects_to != text.hidden_size:
        raise ConfigError(
            f"{where} projects images to {projects_to} features, but the text model's hidden "
            f"size is {text.hidden_size}: it belongs to another model"
        )
    if _IMAGE_TOKEN not in tokens:
        raise ConfigError(f"{where}: the text model's vocabulary has no {_IMAGE_TOKEN} token")
    hidden = _int(vision, "embedding_length", where)
    heads = _int(vision, "attention.head_count", where)
    config = VisionConfig(
        hidden_size=hidden,
        intermediate_size=_int(vision, "feed_forward_length", where),
        num_hidden_layers=_int(vision, "block_count", where),
        num_attention_heads=heads,
        head_dim=_pixtral_head_dim(hidden, heads, where),
        num_channels=3,
        image_size=_int(vision, "image_size", where),
        patch_size=_int(vision, "patch_size", where),
        rope_theta=PIXTRAL_ROPE_THETA,
        hidden_act="silu" if meta.get("clip.use_silu") else "gelu",
        rms_norm_eps=_float(vision, "attention.layer_norm_epsilon", where),
    )
    return Mistral3Config(
        text_config=text,
        vision_config=config,
        spatial_merge_size=int(vision.get("spatial_merge_size", 1)),  # llama.cpp's default
        image_token_index=tokens.index(_IMAGE_TOKEN),
        projector_hidden_act=PIXTRAL_PROJECTOR_ACT,
        multimodal_projector_bias="mm.1.bias" in mmproj.tensors,
        tie_word_embeddings=tie,
    )


# ---------------------------------------------------------------------------------------------
# Validation and typed field readers


def _validate(cfg: Mistral3Config) -> None:
    text, vision = cfg.text_config, cfg.vision_config
    _validate_text(text)
    if vision is None:
        return
    _check_positive(vision)
    if vision.head_dim % 4:
        raise ConfigError("vision head_dim must be a multiple of 4 (2-D RoPE)")
    for name, act in (("vision_config.hidden_act", vision.hidden_act),
                      ("projector_hidden_act", cfg.projector_hidden_act)):  # fmt: skip
        if act not in SUPPORTED_ACTS:
            raise ConfigError(f"{name} {act!r} is not one of {SUPPORTED_ACTS}")
    if cfg.spatial_merge_size < 1:
        raise ConfigError(f"spatial_merge_size={cfg.spatial_merge_size} must be >= 1")
    if cfg.image_token_index is None or not 0 <= cfg.image_token_index < text.vocab_size:
        raise ConfigError(f"image_token_index {cfg.image_token_index} is outside the vocabulary")


def _validate_text(text: TextConfig) -> None:
    """The decoder's own checks (a text-only model has nothing else)."""
    _check_positive(text)
    if text.num_attention_heads % text.num_key_value_heads:
        raise ConfigError(
            f"num_attention_heads {text.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {text.num_key_value_heads}"
        )
    if text.head_dim % 2:
        raise ConfigError("head_dim must be even")
    if text.hidden_act != "silu":
        raise ConfigError(f"text_config.hidden_act {text.hidden_act!r} unsupported (silu only)")


def _check_positive(section: TextConfig | VisionConfig) -> None:
    """Every number of a config section (sizes, counts, eps, RoPE base) is > 0."""
    for name, value in vars(section).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{name}={value} must be positive")


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise ConfigError(f"{where}: missing required field {key!r}")
    return section[key]


def _int(section: dict[str, Any], key: str, where: str) -> int:
    value = _require(section, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
    return value


def _float(section: dict[str, Any], key: str, where: str) -> float:
    value = _require(section, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def _square(section: dict[str, Any], key: str, where: str) -> int:
    """An int, or a [h, w] pair with h == w (Pixtral uses square patches)."""
    value = _require(section, key, where)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}.{key}={value!r}: only square values are supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
    return value
