"""The random checkpoint loads in transformers and mistral-common, with the preset's shapes."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from mistralpy.processing.chat_template import ChatTemplate, build_chat_prompt
from mistralpy.processing.images import ImageProcessorConfig, preprocess_image
from mistralpy.processing.tokenizer import Tokenizer
from mistralpy.testing.tiny_checkpoint import (
    PRESETS,
    ensure_demo_checkpoint,
    main,
    model_config,
    weight_shapes,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return ensure_demo_checkpoint("tiny", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import Mistral3ForConditionalGeneration

    model, info = Mistral3ForConditionalGeneration.from_pretrained(
        str(ckpt), output_loading_info=True
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    return model.eval()


def test_transformers_reads_config(hf_model):
    preset = PRESETS["tiny"]
    text, vision = hf_model.config.text_config, hf_model.config.vision_config
    assert hf_model.config.model_type == "mistral3" and hf_model.config.image_token_index == 10
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (
        preset.hidden_size,
        preset.num_hidden_layers,
        preset.head_dim,
    )
    assert text.num_attention_heads * text.head_dim != text.hidden_size
    assert text.rope_parameters["rope_theta"] == 1e9 and text.sliding_window is None
    assert text.vocab_size == 131072 and text.max_position_embeddings == 131072
    assert vision.rope_parameters["rope_theta"] == 1e4 and vision.patch_size == 14
    assert vision.image_size == preset.image_size and hf_model.config.spatial_merge_size == 2
    assert not hf_model.config.tie_word_embeddings


def test_greedy_outputs_vary(hf_model):
    prompt = torch.tensor([[1, 3, 22177, 4304, 1033, 4]])
    out = hf_model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :]
    assert len(set(out.tolist())) > 4


def test_image_prompt_runs_through_transformers(ckpt, hf_model):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(ckpt))
    assert processor.size["longest_edge"] == PRESETS["tiny"].image_size
    image = Image.new("RGB", (300, 180), (200, 30, 90))
    pixels = processor(image, patch_size=28, return_tensors="pt")["pixel_values"]
    # ours, from the checkpoint's processor config: the same token grid as transformers'
    loaded = preprocess_image(image, ImageProcessorConfig.from_model_dir(ckpt))
    assert (loaded.rows, loaded.cols) == (pixels.shape[-2] // 28, pixels.shape[-1] // 28)
    tok, template = Tokenizer.from_dir(ckpt), ChatTemplate.from_dir(ckpt)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "x"}},
            ],
        }
    ]
    prompt = build_chat_prompt(tok, template, messages, image_loader=lambda url: loaded)
    ids = torch.tensor([prompt.token_ids])
    with torch.no_grad():
        logits = hf_model(
            input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([pixels.shape[-2:]])
        ).logits
    assert logits.shape == (1, len(prompt.token_ids), 131072) and torch.isfinite(logits).all()


def test_tokenizers_load_and_agree(ckpt):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = Tokenizer.from_dir(ckpt)
    text = "Hello [INST] wörld 😀 日本語  123\n"
    fast = PreTrainedTokenizerFast.from_pretrained(str(ckpt))
    assert (fast.bos_token_id, fast.eos_token_id, fast.unk_token_id, fast.pad_token_id) == (
        1,
        2,
        0,
        11,
    )
    assert fast.convert_tokens_to_ids(["[IMG]", "[IMG_BREAK]", "[IMG_END]"]) == [10, 12, 13]
    plain = "Hello wörld 😀 日本語  123\n"
    assert fast(plain, add_special_tokens=False).input_ids == ours.encode(plain)
    auto = AutoTokenizer.from_pretrained(str(ckpt))  # picks mistral-common when tekken.json exists
    assert auto.encode(text, add_special_tokens=False) == ours.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert fast.apply_chat_template(messages, tokenize=False) == "<s>[INST]hi[/INST]"


def test_mistral_common_reads_tekken(ckpt):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    mt = MistralTokenizer.from_file(str(ckpt / "tekken.json"))
    tekken = mt.instruct_tokenizer.tokenizer
    assert isinstance(tekken, Tekkenizer) and tekken.version.value == "v7"
    assert tekken.n_words == 131072 and tekken.num_special_tokens == 1000
    image = mt.instruct_tokenizer.image_encoder.image_config
    assert (image.image_patch_size, image.max_image_size, image.spatial_merge_size) == (
        14,
        PRESETS["tiny"].image_size,
        2,
    )


def test_processor_configs(ckpt):
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    proc = json.loads((ckpt / "processor_config.json").read_text())
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert pre["patch_size"] == 14 and math.isclose(pre["rescale_factor"], 1 / 255)
    assert proc["image_token"] == "[IMG]" and proc["spatial_merge_size"] == 2
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


def test_auto_processor(ckpt):
    pytest.importorskip("torchvision")  # transformers' PixtralProcessor needs it
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(ckpt))
    assert processor.spatial_merge_size == 2 and processor.image_token == "[IMG]"


def test_demo_checkpoint_is_built_once(ckpt, monkeypatch):
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint("tiny", cache_dir=ckpt.parent) == ckpt
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(os.listdir(ckpt.parent)) == ["demo-tiny"]  # no temporary dirs left
    monkeypatch.setenv("MISTRALPY_CACHE", str(ckpt.parent))
    assert ensure_demo_checkpoint("tiny") == ckpt
    with pytest.raises(ValueError, match="preset"):
        ensure_demo_checkpoint("huge", cache_dir=ckpt.parent)


def test_cli_dtype_and_seed(ckpt, tmp_path, capsys):
    main([str(tmp_path / "bf16"), "--dtype", "bfloat16", "--seed", "7"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    with (
        safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as new,
        safe_open(str(ckpt / "model.safetensors"), "pt") as old,
    ):
        assert set(new.keys()) == set(old.keys()) == set(weight_shapes(PRESETS["tiny"]))
        w_new, w_old = (
            new.get_tensor("language_model.lm_head.weight"),
            old.get_tensor("language_model.lm_head.weight"),
        )
        assert w_new.dtype == torch.bfloat16 and w_old.dtype == torch.float32
        assert not torch.equal(w_new.float(), w_old.to(torch.bfloat16).float())  # other seed


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_shapes_match_transformers(name):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    preset = PRESETS[name]
    config = Mistral3Config.from_dict(model_config(preset, preset.dtype))
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(config)
    theirs = sorted(tuple(p.shape) for p in model.state_dict().values())
    ours = sorted(weight_shapes(preset).values())
    assert theirs == ours
    total = sum(math.prod(s) for s in ours)
    if name == "small":
        assert 150e6 <= total <= 300e6
