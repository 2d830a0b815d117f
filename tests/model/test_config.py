"""Config parsing: every value from the file, both rope spellings, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from mistralpy.model.config import (
    ConfigError,
    Mistral3Config,
    mistral_small_3_1_config,
    read_config,
)
from tests.seeds import fresh_seeds

from .oracle import random_hf_config

# The text/vision/top-level fields of Mistral-Small-3.1-24B-Instruct-2503's config.json
# (transformers-4 spelling: rope_theta at the section level).
REAL_CONFIG = {
    "architectures": ["Mistral3ForConditionalGeneration"],
    "image_token_index": 10,
    "model_type": "mistral3",
    "multimodal_projector_bias": False,
    "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {
        "attention_dropout": 0.0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "intermediate_size": 32768,
        "max_position_embeddings": 131072,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
        "use_cache": True,
        "vocab_size": 131072,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "attention_dropout": 0.0,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "image_size": 1540,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "pixtral",
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "rope_theta": 10000.0,
    },
    "vision_feature_layer": -1,
}


def test_real_config_equals_builtin_24b_config():
    assert Mistral3Config.from_hf_dict(REAL_CONFIG) == mistral_small_3_1_config()
    cfg = mistral_small_3_1_config()
    assert cfg.text_config.head_dim == 128 != cfg.text_config.hidden_size // 32


@pytest.mark.parametrize("seed", fresh_seeds(3, __name__))
def test_values_come_from_transformers_saved_config(seed, tmp_path):
    """A transformers-5 config.json (rope_parameters dicts) is read field for field."""
    hf = random_hf_config(seed)
    hf.save_pretrained(tmp_path)
    ours = read_config(tmp_path)
    t, v = hf.text_config, hf.vision_config
    assert ours.text_config.hidden_size == t.hidden_size
    assert ours.text_config.head_dim == t.head_dim
    assert ours.text_config.num_key_value_heads == t.num_key_value_heads
    assert ours.text_config.rms_norm_eps == t.rms_norm_eps
    assert ours.text_config.rope_theta == t.rope_parameters["rope_theta"] == 1e9
    assert ours.text_config.vocab_size == t.vocab_size
    assert ours.vision_config.rope_theta == v.rope_parameters["rope_theta"] == 1e4
    assert ours.vision_config.head_dim == v.hidden_size // v.num_attention_heads
    assert ours.vision_config.image_size == v.image_size
    assert ours.multimodal_projector_bias == hf.multimodal_projector_bias
    assert ours.spatial_merge_size == hf.spatial_merge_size
    assert ours.image_token_index == hf.image_token_index


def _bad(edit) -> dict:
    cfg = copy.deepcopy(REAL_CONFIG)
    edit(cfg)
    return cfg


BAD_CONFIGS = {
    "vision_feature_layer": lambda c: c.update(vision_feature_layer=[-1, -2]),
    "vision_feature_layer=-2": lambda c: c.update(vision_feature_layer=-2),
    "projector_hidden_act": lambda c: c.update(projector_hidden_act="swishy"),
    "vision_config.hidden_act": lambda c: c["vision_config"].update(hidden_act="tanhh"),
    "num_key_value_heads": lambda c: c["text_config"].update(num_key_value_heads=6),
    "not divisible": lambda c: c["vision_config"].update(hidden_size=1000),
    "rope type": lambda c: c["text_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}),
    "sliding_window": lambda c: c["text_config"].update(sliding_window=4096),
    "missing required field 'head_dim'": lambda c: c["text_config"].pop("head_dim"),
    "model_type": lambda c: c.update(model_type="llava"),
    "must be positive": lambda c: c["text_config"].update(num_hidden_layers=0),
    "image_token_index": lambda c: c.update(image_token_index=10**9),
    "vision_config.head_dim": lambda c: c["vision_config"].update(head_dim=32),
}


@pytest.mark.parametrize("expected", list(BAD_CONFIGS))
def test_bad_configs_raise_config_error(expected):
    with pytest.raises(ConfigError, match=expected.split("=")[0].split(" ")[0]) as err:
        Mistral3Config.from_hf_dict(_bad(BAD_CONFIGS[expected]))
    assert isinstance(err.value, ValueError)


def test_rope_parameters_default_is_accepted():
    cfg = _bad(lambda c: c["text_config"].update(
        rope_parameters={"rope_type": "default", "rope_theta": 5e8}))  # fmt: skip
    cfg["text_config"].pop("rope_theta")
    assert Mistral3Config.from_hf_dict(cfg).text_config.rope_theta == 5e8


def test_read_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_config(tmp_path)


def test_mistral_params_json():
    params = {
        "dim": 5120,
        "n_layers": 40,
        "head_dim": 128,
        "hidden_dim": 32768,
        "n_heads": 32,
        "n_kv_heads": 8,
        "rope_theta": 1000000000.0,
        "norm_eps": 1e-05,
        "vocab_size": 131072,
        "vision_encoder": {
            "hidden_size": 1024,
            "num_channels": 3,
            "max_image_size": 1540,
            "patch_size": 14,
            "rope_theta": 10000.0,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "adapter_bias": False,
            "mm_projector_id": "patch_merge",
            "spatial_merge_size": 2,
            "add_pre_mm_projector_layer_norm": True,
            "image_token_id": 10,
            "image_break_token_id": 12,
            "image_end_token_id": 13,
            "image_size": 1540,
        },
    }
    ours = Mistral3Config.from_mistral_params(json.loads(json.dumps(params)))
    expected = mistral_small_3_1_config()
    assert ours.text_config == expected.text_config
    assert ours.vision_config == expected.vision_config
    assert ours.projector_hidden_act == "gelu" and not ours.multimodal_projector_bias
    with pytest.raises(ConfigError, match="vision_encoder"):
        Mistral3Config.from_mistral_params(
            {k: v for k, v in params.items() if k != "vision_encoder"}
        )


def test_transformers_accepts_what_we_accept():
    """Our real config is a valid transformers config with the same derived numbers."""
    hf = transformers.Mistral3Config.from_dict(REAL_CONFIG)
    assert hf.text_config.head_dim == 128
    assert hf.vision_config.head_dim == mistral_small_3_1_config().vision_config.head_dim
