"""The GGUF path against transformers on the same file (SmolLM2-135M-Instruct Q4_1).

transformers dequantizes every tensor to float32; our `dequantize=True` load must give the same
logits (within 1e-4 relative), our tokenizer + the GGUF's chat template the same prompt ids.
The default load keeps the GGUF block formats; its next-token distributions are compared by
top-1 agreement and KL divergence.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistralpy.checkpoint.loader import load_model
from mistralpy.model.config import read_config
from mistralpy.processing.chat_template import ChatTemplate, build_chat_prompt
from mistralpy.processing.tokenizer import Tokenizer
from mistralpy.quant.isq import QuantizedLinear
from mistralpy.testing.probes import prefill_logits
from tests.realmodel.conftest import CHATS

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families."
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_gguf)


@pytest.fixture(scope="module")
def template(smollm2_gguf) -> ChatTemplate:
    return ChatTemplate.from_dir(smollm2_gguf)


@pytest.fixture(scope="module")
def ours_f32(smollm2_gguf):
    return load_model(smollm2_gguf, torch.float32, "cpu", dequantize=True)


@pytest.fixture(scope="module")
def ours_gguf_types(smollm2_gguf):
    return load_model(smollm2_gguf, torch.float32, "cpu")


@torch.inference_mode()
def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([ids])).logits[0].float()


def test_config_matches_transformers(smollm2_gguf, hf_model):
    ours, theirs = read_config(smollm2_gguf), hf_model.config
    text = ours.text_config
    assert ours.vision_config is None and ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (
        theirs.hidden_size,
        theirs.intermediate_size,
        theirs.num_hidden_layers,
    )
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (
        theirs.num_attention_heads,
        theirs.num_key_value_heads,
        theirs.head_dim,
    )
    assert text.vocab_size == theirs.vocab_size
    assert text.rope_theta == pytest.approx(theirs.rope_parameters["rope_theta"])
    assert text.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)


@pytest.mark.parametrize("chat", CHATS, ids=[f"chat{i}" for i in range(len(CHATS))])
def test_prompt_ids_equal_transformers(chat, tokenizer, template, hf_tokenizer):
    theirs = hf_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert build_chat_prompt(tokenizer, template, chat).token_ids == list(theirs)


def test_template_renders_like_transformers(template, hf_tokenizer):
    for chat in CHATS:
        theirs = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert template.render(chat) == theirs


@pytest.mark.parametrize(
    "text", [TEXT, "Hello, world!", "  two  spaces\n\nand\ttabs", "café naïve 東京 😀", "x = 42;"]
)
def test_plain_text_encodes_like_transformers(text, tokenizer, hf_tokenizer):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_tokens_from_metadata(tokenizer, hf_tokenizer):
    assert tokenizer.eos_token_id == hf_tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id
    assert tokenizer.add_bos is False  # tokenizer.ggml.add_bos_token: the template writes it
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi")
    # a user typing a control token gets plain text, not the control id
    assert 2 not in tokenizer.encode("<|im_end|>")


def test_dequantized_logits_match_transformers(tokenizer, template, ours_f32, hf_model):
    prompts = [build_chat_prompt(tokenizer, template, CHATS[1]).token_ids, tokenizer.encode(TEXT)]
    for ids in prompts:
        ours, theirs = prefill_logits(ours_f32, ids), hf_logits(hf_model, ids)
        rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert rel <= 1e-4, rel


def test_tensors_keep_their_gguf_types(ours_gguf_types, ours_f32, smollm2_gguf):
    from mistralpy.model.gguf_file import open_gguf

    layer = ours_gguf_types.language_model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(linear, QuantizedLinear) and linear.fmt.name == "q4_1"
    # tied lm_head: the Q8_0 token embedding's own bytes, not a re-quantization
    head = ours_gguf_types.lm_head
    assert isinstance(head, QuantizedLinear) and head.fmt.name == "q8_0"
    stored = open_gguf(smollm2_gguf).tensors["token_embd.weight"].data
    assert torch.equal(head.qweight, torch.from_numpy(stored.copy()))
    assert type(ours_f32.language_model.layers[0].self_attn.qkv_proj) is not QuantizedLinear
    assert isinstance(ours_f32.lm_head, nn.Linear)


def test_gguf_types_path_agrees_with_float(tokenizer, ours_gguf_types, ours_f32):
    """The kernels on the GGUF bytes (int8-rounded activations for q8_0, as llama.cpp) against
    the same weights dequantized: next-token argmax mostly equal, small KL divergence."""
    ids = tokenizer.encode(TEXT)
    p = prefill_logits(ours_f32, ids).log_softmax(-1)
    q = prefill_logits(ours_gguf_types, ids).log_softmax(-1)
    agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert agree >= 0.9 and kl < 0.05, (agree, kl)


def test_hf_layout_tokenizer_of_the_same_vocabulary(tmp_path, tokenizer, hf_tokenizer):
    """tokenizer.json + tokenizer_config.json (a text-only HF checkpoint's files, written by
    transformers from the GGUF): same ids, BOS/EOS from the config (no "<s>" here)."""
    hf_tokenizer.save_pretrained(tmp_path)
    from_json = Tokenizer.from_dir(tmp_path)
    assert from_json.encode(TEXT) == tokenizer.encode(TEXT)
    assert (from_json.bos_token_id, from_json.eos_token_id) == (1, 2)
